"""Helpers of the fault-injection tests: hand-made partition sets, a worker hook, servers.

The worker hook is a ``sitecustomize.py`` written into a temporary folder and put on
``PYTHONPATH``, so every Python process of a run (driver and executor workers) loads
it at start-up. The environment variable ``CAI_TEST_FAULTS`` (JSON) selects what it
does; the product itself has no fault-injection switch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fanout_fixtures import make_dataset_arrays

WAIT_TIMEOUT_S = 60.0
POLL_S = 0.05
REDIS_START_TIMEOUT_S = 10.0

# Loaded by every Python process whose PYTHONPATH starts with the hook folder.
#   partition_delay_s: sleep before each partition (after writing the start marker)
#   marker_dir: write "<rank>-<attempt>-<partition>.started" holding the worker's pid
#   hang: {"rank": r, "attempt": a}: that worker sleeps forever before its first partition
#   kill_in_allreduce: {"rank": r, "attempt": a}: that worker SIGKILLs itself on
#       entering Communicator.allreduce
#   pickle_log: append a line for every pickle.load(s) call and unpickled global
HOOK_SOURCE = r'''
import json, os, signal, sys, time

_SPEC = json.loads(os.environ.get("CAI_TEST_FAULTS") or "{}")


def _event():
    try:
        return json.loads(sys.argv[-1])
    except (ValueError, IndexError):
        return {}


def _matches(rule):
    event = _event()
    return bool(rule) and event.get("rank") == rule["rank"] and event.get("attempt", 0) == rule["attempt"]


def _log_pickle(what):
    with open(_SPEC["pickle_log"], "a", encoding="utf-8") as handle:
        handle.write(f"{os.getpid()} {sys.argv[1:2]} {what}\n")


if _SPEC.get("pickle_log"):
    def _audit(event, args):
        if event == "pickle.find_class":
            _log_pickle(f"find_class {args[0]}.{args[1]}")
    sys.addaudithook(_audit)
    import pickle
    for _name in ("load", "loads"):
        def _wrapper(*args, _name=_name, _original=getattr(pickle, _name), **kwargs):
            _log_pickle(f"pickle.{_name}")
            return _original(*args, **kwargs)
        setattr(pickle, _name, _wrapper)

if any(key in _SPEC for key in ("partition_delay_s", "marker_dir", "hang")):
    import cai_helpers.handlers.executor as _executor
    _original_predict = _executor._predict_one

    def _predict_one(store, record, *args, **kwargs):
        event = _event()
        if _SPEC.get("marker_dir"):
            name = f"{event.get('rank')}-{event.get('attempt', 0)}-{record['name']}.started"
            with open(os.path.join(_SPEC["marker_dir"], name), "w", encoding="utf-8") as handle:
                handle.write(str(os.getpid()))
        if _matches(_SPEC.get("hang")):
            time.sleep(3600)
        time.sleep(_SPEC.get("partition_delay_s", 0.0))
        return _original_predict(store, record, *args, **kwargs)

    _executor._predict_one = _predict_one

if _SPEC.get("kill_in_allreduce"):
    import cai_helpers.fmi.communicator as _communicator
    _original_allreduce = _communicator.Communicator.allreduce

    def _allreduce(self, *args, **kwargs):
        if _matches(_SPEC["kill_in_allreduce"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return _original_allreduce(self, *args, **kwargs)

    _communicator.Communicator.allreduce = _allreduce
'''


def hook_env(folder: Path, spec: dict[str, Any]) -> dict[str, str]:
    """Write the worker hook into ``folder``; return the environment variables that load it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(HOOK_SOURCE, encoding="utf-8")
    paths = [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths), "CAI_TEST_FAULTS": json.dumps(spec)}


def wait_for(condition: Callable[[], Any], description: str, timeout_s: float = WAIT_TIMEOUT_S) -> Any:
    """Poll ``condition`` until it returns a true value; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {description}")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def partition_arrays(n_rows: int, *, first_id: int, seed: int) -> dict[str, np.ndarray]:
    """Return valid partition tensors: images [N, 5, 32, 32], no magnitude_errors."""
    arrays = make_dataset_arrays(n_rows, pixels=32, first_id=first_id, seed=seed)
    del arrays["magnitude_errors"]
    return arrays


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise arrays to safetensors bytes exactly as they are (any dtype or shape)."""
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(values) for name, values in arrays.items()})


def write_partition_set(store, prefix: str, objects: list[bytes | None], *, rows: list[int],
                        sha256: list[str | None] | None = None, keys: list[str] | None = None) -> dict[str, Any]:
    """Write partition objects and a manifest that lists them; return the manifest.

    ``objects[i]`` None lists a partition that is never written. ``sha256[i]`` overrides
    the listed checksum (default: that of the written bytes), ``keys[i]`` the key.
    """
    records = []
    for index, data in enumerate(objects):
        key = keys[index] if keys else f"{prefix}/part-{index:05d}.safetensors"
        if data is not None:
            store.put(key, data)
        digest = (sha256 or [None] * len(objects))[index] or hashlib.sha256(data or b"").hexdigest()
        records.append({"index": index, "key": key, "rows": rows[index], "bytes": len(data or b""),
                        "sha256": digest, "object_id_min": 0, "object_id_max": 0})
    manifest = {"format": "cai-partitions/1", "store": store.uri, "dataset_prefix": None,
                "partition_prefix": prefix, "partition_mb": 0.2, "n_rows": sum(rows),
                "n_partitions": len(records), "partitions": records}
    store.put(f"{prefix}/manifest.json", json.dumps(manifest).encode())
    return manifest


def run_handlers(params) -> dict[str, Any]:
    """Run initializer, every rank's executor and the summarizer in this process; return the summary."""
    from cai_helpers.handlers import executor, initializer, summarizer

    init = initializer.initialize(params)
    for item in init["items"]:
        executor.run_rank({**item, "threads": 1})
    return summarizer.summarize({"run_id": init["run_id"], "store": params.store,
                                 "endpoint_url": params.endpoint_url})


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[subprocess.Popen, int]]:
    """Start a redis-server on a free loopback port; yield (process, port); stop it after."""
    import pytest
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed; install the Debian package redis-server")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return process.poll() is not None  # exited: stop waiting and fail below

    try:
        wait_for(ready, f"redis-server on port {port}", REDIS_START_TIMEOUT_S)
        assert process.poll() is None, f"redis-server on port {port} exited with {process.returncode}"
        yield process, port
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def write_single_shard_dataset(store, prefix: str, n_rows: int, *, first_id: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a one-shard data set whose object ids start at ``first_id``; return its tensors."""
    arrays = make_dataset_arrays(n_rows, first_id=first_id, seed=seed)
    store.put(f"{prefix}/shards/shard-00000.safetensors", encode(arrays))
    manifest = {"n_rows": n_rows, "shards": [{"key": "shards/shard-00000.safetensors", "rows": n_rows}]}
    store.put(f"{prefix}/manifest.json", json.dumps(manifest).encode())
    return arrays


def read_catalog(store, run_id: str) -> dict[str, list]:
    """Return the columns of a run's catalog.parquet as lists."""
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.get(f"runs/{run_id}/catalog.parquet"))).to_pydict()


def read_rank_records(store, run_id: str) -> list[dict[str, Any]]:
    """Return every rank record of a run, in rank order."""
    return [json.loads(store.get(key)) for key in store.list(f"runs/{run_id}/ranks/")]
