"""Thin Lambda entry points that adapt the package's handlers to the state machine.

``initializer`` runs the package's initializer and writes its rank items to
``runs/<run_id>/items.json``, the key the launcher passes as ``items_key``. The
Distributed Map reads its items from there (ItemReader) because a state's payload is
limited to 256 KiB and a large run has thousands of ranks. It returns counts only.

``executor`` makes the model local before the package's executor runs. On AWS the
plan's ``model_dir`` is a key prefix in the bucket (``models/<name>``), so the model
files are copied once per execution environment to ``/tmp/cai/<model_dir>``, and the
working directory moves to ``/tmp/cai`` so that the relative ``model_dir`` resolves.
The summarizer needs no adapter (see deploy/template.yaml).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cai_helpers.errors import CheckpointError
from cai_helpers.handlers import executor as package_executor
from cai_helpers.handlers import initializer as package_initializer
from cai_helpers.handlers import plan_key, read_json, run_key, store_from_event
from cai_helpers.inference import ONNX_FILES
from cai_helpers.store import Store, open_store

log = logging.getLogger(__name__)

ITEMS_NAME = "items.json"
MODEL_CACHE_ENV = "CAI_MODEL_CACHE"
DEFAULT_MODEL_CACHE = "/tmp/cai"  # /tmp is the only writable path in Lambda
MODEL_CONFIG_NAME = "config.json"


def initializer(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Plan the run (event: a RunParams dict), write its items file, return counts and keys."""
    result = package_initializer.handler(event, context)
    store = open_store(event["store"], endpoint_url=event.get("endpoint_url"))
    items_key = run_key(result["run_id"], ITEMS_NAME)
    store.put(items_key, json.dumps(result["items"]).encode())
    log.info("run %s: %d rank items written to %s", result["run_id"], len(result["items"]),
             store.url_of(items_key))
    return {**{k: v for k, v in result.items() if k != "items"}, "items_key": items_key}


def fetch_model(store: Store, model_dir: str, runtime: str, cache_root: Path) -> Path:
    """Copy the ``runtime``'s model files from the store prefix ``model_dir`` into the cache.

    Only the runtime's ONNX file and ``config.json`` (if stored) are copied. Files
    already in the cache are kept, so a warm environment copies nothing. Returns the
    local folder. Raises CheckpointError when the store lacks the ONNX file.
    """
    local = cache_root / model_dir
    needed = [ONNX_FILES[runtime], MODEL_CONFIG_NAME] if runtime in ONNX_FILES else None
    keys = store.list(model_dir.rstrip("/") + "/")
    names = {key.rsplit("/", 1)[-1]: key for key in keys}
    if needed is not None and needed[0] not in names:
        raise CheckpointError(
            f"{store.url_of(model_dir)}/{needed[0]} not found; upload the exported model "
            "(the launcher does) or pick the runtime whose ONNX file is there"
        )

    local.mkdir(parents=True, exist_ok=True)
    for name, key in sorted(names.items()):
        target = local / name
        if (needed is not None and name not in needed) or target.exists():
            continue
        partial_path = target.with_suffix(target.suffix + ".partial")
        partial_path.write_bytes(store.get(key))
        partial_path.replace(target)  # a crash never leaves a truncated model behind
        log.info("model file %s copied to %s", store.url_of(key), target)
    return local


def executor(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Make the plan's model local if it lives in the store, then run one rank."""
    store = store_from_event(event)
    params = read_json(store, plan_key(event["run_id"]))["params"]
    model_dir = params["model_dir"]
    if not os.path.isabs(model_dir) and not Path(model_dir).is_dir():
        cache_root = Path(os.environ.get(MODEL_CACHE_ENV, DEFAULT_MODEL_CACHE))
        fetch_model(store, model_dir, params["runtime"], cache_root)
        os.chdir(cache_root)
    return package_executor.handler(event, context)
