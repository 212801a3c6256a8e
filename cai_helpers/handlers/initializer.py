"""Initializer handler: partition if needed, assign partitions to ranks, write the plan.

The event is a :class:`~cai_helpers.runconfig.RunParams` dict. The world size is
min(number of partitions, max_concurrency), never the number of partitions alone, so
a run with more partitions than concurrent workers still forms a communicator of
workers that all run at once. Each rank gets a balanced share of rows. The handler
returns one small item per rank, the input of the Distributed Map or local fan-out.

Passing the ``run_id`` of an earlier run resumes it: the stored plan is reused
unchanged, so ranks keep their partitions and skip those already predicted.
"""

from __future__ import annotations

import heapq
import logging
import re
import time
from typing import Any

from cai_helpers.errors import DataFormatError, InvalidParameterError, ObjectNotFoundError
from cai_helpers.handlers import plan_key, partition_name, read_json, write_json
from cai_helpers.logs import setup_logging
from cai_helpers.partition import (
    BYTES_PER_GALAXY,
    MANIFEST_NAME,
    MB,
    plan_partitions,
    read_manifest,
    rows_for_data_size,
    write_partitions,
)
from cai_helpers.partition_io import dataset_fingerprint, dataset_row_count
from cai_helpers.runconfig import RunParams, new_run_id
from cai_helpers.store import Store, join_key, open_store

log = logging.getLogger(__name__)

PLAN_FORMAT = "cai-plan/1"
PARTITIONS_ROOT = "partitions"


def assign_partitions(rows: list[int], world_size: int) -> list[int]:
    """Return the rank of each partition, balancing rows per rank.

    Greedy longest-processing-time: partitions in order of decreasing rows go to the
    rank with the fewest rows so far (lowest rank on ties). Each rank gets at least one
    partition when there are at least ``world_size`` partitions of at least one row.
    """
    if world_size < 1:
        raise InvalidParameterError(f"world_size must be >= 1, got {world_size}")
    heap = [(0, rank) for rank in range(world_size)]  # (rows so far, rank)
    ranks = [0] * len(rows)
    for index in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        load, rank = heapq.heappop(heap)
        ranks[index] = rank
        heapq.heappush(heap, (load + rows[index], rank))
    return ranks


def default_partition_prefix(params: RunParams) -> str:
    """Return ``partitions/<data set>/<mb>mb[-<rows>rows]`` for a data set and size."""
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "-", (params.dataset_prefix or "").strip("/"))
    name = f"{params.partition_mb:g}mb"
    if params.data_size_mb is not None:
        name += f"-{rows_for_data_size(params.data_size_mb)}rows"
    return join_key(PARTITIONS_ROOT, dataset, name)


def ensure_partitions(store: Store, params: RunParams) -> tuple[str, dict[str, Any]]:
    """Return (prefix, manifest) of the run's partitions, partitioning first if needed."""
    if params.partition_prefix:
        return params.partition_prefix, read_manifest(store, params.partition_prefix)

    prefix = default_partition_prefix(params)
    max_rows = rows_for_data_size(params.data_size_mb) if params.data_size_mb is not None else None
    if store.exists(join_key(prefix, MANIFEST_NAME)):
        manifest = read_manifest(store, prefix)
        same_source = (manifest.get("dataset_prefix") == params.dataset_prefix
                       and manifest.get("partition_mb") == params.partition_mb
                       and manifest.get("dataset_manifest_sha256") == dataset_fingerprint(store, params.dataset_prefix))
        if same_source:
            log.info("reusing %d partitions under %s", manifest["n_partitions"], prefix)
            return prefix, manifest
        log.info("partitions under %s were cut from another build of %s; partitioning again",
                 prefix, params.dataset_prefix)
    return prefix, write_partitions(store, params.dataset_prefix, prefix, params.partition_mb, max_rows=max_rows)


def preview_plan(params: RunParams) -> list[dict[str, int]]:
    """Return the partitions (index, rows, rank) a new run of ``params`` would plan.

    Pure apart from reading the data set's row count or the partition manifest, so a
    notebook can show the plan before the run writes anything.
    """
    params.validate()
    store = open_store(params.store, endpoint_url=params.endpoint_url)
    if params.partition_prefix:
        rows = [p["rows"] for p in read_manifest(store, params.partition_prefix)["partitions"]]
    else:
        n_rows = dataset_row_count(store, params.dataset_prefix)
        if params.data_size_mb is not None:
            n_rows = min(n_rows, rows_for_data_size(params.data_size_mb))
        rows = [stop - start for start, stop in plan_partitions(n_rows, params.partition_mb)]
    ranks = assign_partitions(rows, params.resolved_concurrency(len(rows)))
    return [{"index": index, "rows": count, "rank": rank} for index, (count, rank) in enumerate(zip(rows, ranks))]


def initialize(params: RunParams) -> dict[str, Any]:
    """Write ``runs/<run_id>/plan.json`` (or reuse it on resume) and return the rank items."""
    started_at = time.time()
    params.validate()
    store = open_store(params.store, endpoint_url=params.endpoint_url)
    run_id = params.run_id or new_run_id()

    try:
        plan = read_json(store, plan_key(run_id))
        log.info("run %s: resuming with the stored plan (%d partitions, world size %d)",
                 run_id, len(plan["partitions"]), plan["world_size"])
    except ObjectNotFoundError:
        plan = _new_plan(store, params, run_id, started_at)
        write_json(store, plan_key(run_id), plan)
        log.info("run %s: %d partitions over %d ranks, plan at %s",
                 run_id, len(plan["partitions"]), plan["world_size"], store.url_of(plan_key(run_id)))

    items = [
        {"run_id": run_id, "rank": rank, "store": params.store, "endpoint_url": params.endpoint_url}
        for rank in range(plan["world_size"])
    ]
    return {
        "run_id": run_id,
        "plan_key": plan_key(run_id),
        "world_size": plan["world_size"],
        "n_partitions": len(plan["partitions"]),
        "n_rows": plan["n_rows"],
        "items": items,
    }


def check_worker_memory(partition_mb: float, params: RunParams, label: str) -> None:
    """Raise InvalidParameterError if a ``partition_mb`` MB partition needs more than the worker memory.

    The need is the scale model's estimate (a base plus a multiple of the partition
    size, see ``cai_helpers.scale_model.LambdaAssumptions``), not a measurement.
    """
    from cai_helpers.scale_model import LambdaAssumptions, required_memory_mb

    assumptions = LambdaAssumptions()
    needed_mb = required_memory_mb(partition_mb, assumptions)
    if needed_mb > params.lambda_memory_mb:
        raise InvalidParameterError(
            f"{label} ({partition_mb:.2f} MB) needs about {needed_mb:.0f} MB of worker memory "
            f"(estimate: {assumptions.memory_base_mb:.0f} MB + {assumptions.memory_per_partition_mb} x "
            f"partition MB), more than lambda_memory_mb={params.lambda_memory_mb} MB; use a smaller "
            "partition_mb or give the workers more memory"
        )


def check_partition_names(records: list[dict[str, Any]], manifest_url: str) -> None:
    """Raise DataFormatError if two partitions share a name, because predictions are stored per name."""
    keys_by_name: dict[str, list[str]] = {}
    for record in records:
        keys_by_name.setdefault(partition_name(record["key"]), []).append(record["key"])
    repeated = {name: keys for name, keys in keys_by_name.items() if len(keys) > 1}
    if repeated:
        raise DataFormatError(
            f"partition manifest {manifest_url} lists partition name(s) {sorted(repeated)} more than "
            f"once (keys {sorted(repeated.values())}); predictions are stored per name, so give every "
            "partition a distinct file name"
        )


def _new_plan(store: Store, params: RunParams, run_id: str, started_at: float) -> dict[str, Any]:
    if not params.partition_prefix:
        check_worker_memory(params.partition_mb, params, f"partition_mb={params.partition_mb}")
    prefix, manifest = ensure_partitions(store, params)
    records = manifest["partitions"]
    if not records:
        raise InvalidParameterError(f"partition set {prefix} contains no partitions, so there is nothing to run; partition the data set again")
    check_partition_names(records, store.url_of(join_key(prefix, MANIFEST_NAME)))
    for record in records:
        size_bytes = record.get("bytes")
        if not isinstance(size_bytes, int):  # a hand-made manifest may leave sizes out
            size_bytes = record["rows"] * BYTES_PER_GALAXY
        check_worker_memory(size_bytes / MB, params, f"partition {record['key']}")

    world_size = params.resolved_concurrency(len(records))
    ranks = assign_partitions([p["rows"] for p in records], world_size)
    partitions = [
        {**record, "name": partition_name(record["key"]), "rank": rank}
        for record, rank in zip(records, ranks)
    ]
    return {
        "format": PLAN_FORMAT,
        "run_id": run_id,
        "created_at": started_at,
        "planned_at": time.time(),
        "store": params.store,
        "endpoint_url": params.endpoint_url,
        "partition_prefix": prefix,
        "dataset_prefix": manifest.get("dataset_prefix"),
        "partition_mb": manifest.get("partition_mb"),
        "n_rows": sum(p["rows"] for p in records),
        "world_size": world_size,
        # a configuration the caller gave; None for "off" and for the local backend's own server
        "fmi": params.fmi if isinstance(params.fmi, dict) else None,
        "params": {**params.to_dict(), "run_id": run_id},
        "partitions": partitions,
    }


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """AWS Lambda entry point: ``event`` is a RunParams dict; returns the rank items."""
    setup_logging()
    return initialize(RunParams.from_dict(event))
