"""Lambda-style handlers of a fan-out run: initializer, executor (one per rank), summarizer.

Each handler has the AWS Lambda signature ``handler(event, context)``: it parses the
event, sets up logging, calls the package and returns a small JSON-able dict. The local
backend runs the same handlers in worker processes. Every object of a run lives under
``runs/<run_id>/`` in the run's store:

    plan.json                      partitions, their ranks and the run parameters
    predictions/<partition>.parquet  object_id, z_pred, z_true, split of one partition
    ranks/<rank>.json              one rank's partitions, stage times and error sums
    catalog.parquet, summary.json  written by the summarizer
"""

from __future__ import annotations

import json
from typing import Any

from cai_helpers.errors import DataFormatError
from cai_helpers.store import Store, join_key, open_store

RUNS_PREFIX = "runs"


def run_key(run_id: str, *parts: str) -> str:
    """Return the store key of ``parts`` under the run's prefix ``runs/<run_id>/``."""
    return join_key(RUNS_PREFIX, run_id, *parts)


def plan_key(run_id: str) -> str:
    return run_key(run_id, "plan.json")


def predictions_prefix(run_id: str) -> str:
    return run_key(run_id, "predictions") + "/"


def predictions_key(run_id: str, partition_name: str) -> str:
    return run_key(run_id, "predictions", f"{partition_name}.parquet")


def ranks_prefix(run_id: str) -> str:
    return run_key(run_id, "ranks") + "/"


def rank_key(run_id: str, rank: int) -> str:
    return run_key(run_id, "ranks", f"{rank:05d}.json")


def partition_name(partition_key: str) -> str:
    """Return a partition's name (``part-00003``) from its store key."""
    return partition_key.rsplit("/", 1)[-1].removesuffix(".safetensors")


def store_from_event(event: dict[str, Any]) -> Store:
    """Open the store an event names with ``store`` and optional ``endpoint_url``."""
    return open_store(event["store"], endpoint_url=event.get("endpoint_url"))


def read_json(store: Store, key: str) -> Any:
    """Return the parsed JSON object ``key``; raise DataFormatError if it is not valid JSON."""
    try:
        return json.loads(store.get(key))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(
            f"{store.url_of(key)} is not valid JSON ({exc}); it was changed outside CAI, so restore "
            "it or start a new run with a fresh run_id"
        ) from exc


def _to_builtin(value: Any) -> Any:
    """Convert numpy scalars and arrays, which json cannot encode, to Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(store: Store, key: str, value: Any) -> None:
    store.put(key, json.dumps(value, indent=1, sort_keys=True, default=_to_builtin).encode())
