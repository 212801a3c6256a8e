"""Summarizer handler: merge a run's predictions into a catalog and write its summary.

Throughput here is the wall-clock throughput of the fan-out. It divides images (and
bits, at 164,160 bits per galaxy) by ``map_wall_s``, the time from the first rank's
start to the last rank's end, which includes model loading, reads and writes. The CAI
paper (Staylor et al., arXiv:2501.06249) instead summed, over Lambdas, each Lambda's bits divided by its own
profiled CPU time of inference alone; that sum (18.04 Gbit/s at 25 MB partitions)
counts concurrency as if it were speed, and gives about 3.9 Gbit/s when its bits are
divided by the 28 s map state instead. ``rank_inference_bits_per_s_sum`` reports the
paper's style of figure beside ours for comparison.

The cost estimate prices every rank as one Lambda invocation billed for the rank's
wall duration at the configured memory, not the memory used.

``fmi`` in the summary compares the figures the ranks summed over FMI with the
summarizer's own totals (:mod:`cai_helpers.handlers.fmi_check`).
"""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cai_helpers.handlers import (
    plan_key,
    predictions_prefix,
    ranks_prefix,
    read_json,
    run_key,
    store_from_event,
    write_json,
)
from cai_helpers.handlers.executor import PREDICTION_COLUMNS, decode_predictions
from cai_helpers.handlers.fmi_check import fmi_summary
from cai_helpers.inference import BITS_PER_GALAXY
from cai_helpers.logs import setup_logging
from cai_helpers.store import Store

log = logging.getLogger(__name__)

SPLIT_NAMES = {0: "train", 1: "validation", 2: "test"}
METRIC_KEYS = ("mse", "mae", "bias", "sigma_nmad", "outlier_fraction")
READ_THREADS = 16  # concurrent GETs of predictions objects
MAX_DUPLICATES_SHOWN = 20  # object ids listed in summary.json under duplicate_object_ids

# Fallback prices (Lambda x86, us-east-1) used only when cai_helpers.cost is absent.
LAMBDA_USD_PER_GB_S = 0.0000166667
LAMBDA_USD_PER_REQUEST = 0.20 / 1_000_000


def prediction_keys(store: Store, run_id: str) -> list[str]:
    """Return the keys of every predictions object of the run (a complete, paginated listing)."""
    return [k for k in store.list(predictions_prefix(run_id)) if k.endswith(".parquet")]


def read_predictions(store: Store, keys: list[str]) -> list[dict[str, np.ndarray]]:
    """Read and decode the predictions objects ``keys``, in the order given."""
    # GETs in parallel: one S3 request takes tens of ms, and boto3 clients are thread-safe.
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        return list(pool.map(lambda key: decode_predictions(store.get(key)), keys))


def duplicate_object_ids(parts: list[dict[str, np.ndarray]], names: list[str]) -> tuple[int, list[dict[str, Any]]]:
    """Return how many rows repeat an object_id of another row, and up to MAX_DUPLICATES_SHOWN examples.

    Each example names the object_id and the partitions (``names[i]`` for ``parts[i]``)
    that contain it. Only bad input repeats an id, because every partition has exactly
    one predictions object and write_partitions rejects duplicate ids.
    """
    if not parts:
        return 0, []
    ids = np.concatenate([part["object_id"] for part in parts])
    owners = np.concatenate([np.full(len(part["object_id"]), index) for index, part in enumerate(parts)])
    unique, counts = np.unique(ids, return_counts=True)
    examples = [
        {"object_id": int(object_id), "partitions": sorted({names[i] for i in owners[ids == object_id]})}
        for object_id in unique[counts > 1][:MAX_DUPLICATES_SHOWN]
    ]
    return int(len(ids) - len(unique)), examples


def build_catalog(store: Store, run_id: str, keys: list[str],
                  parts: list[dict[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Read the predictions objects ``keys`` (or take ``parts``, already read); return columns
    deduplicated by object_id (the first occurrence in ``keys`` order wins), sorted."""
    if parts is None:
        parts = read_predictions(store, keys)
    if not parts:
        return {name: np.empty(0) for name in PREDICTION_COLUMNS}
    joined = {name: np.concatenate([p[name] for p in parts]) for name in PREDICTION_COLUMNS}
    _, first = np.unique(joined["object_id"], return_index=True)  # sorted by object_id
    log.info("run %s: %d predictions objects, %d rows, %d unique objects",
             run_id, len(keys), len(joined["object_id"]), len(first))
    return {name: values[first] for name, values in joined.items()}


def encode_catalog(catalog: dict[str, np.ndarray]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({name: catalog[name] for name in PREDICTION_COLUMNS}), sink)
    return sink.getvalue()


def metrics_by_split(catalog: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Return photo-z metrics for all galaxies with a known redshift and per split."""
    from cai_helpers.metrics import photoz_metrics

    known = np.isfinite(catalog["z_true"])
    groups = {"all": known}
    for value, name in SPLIT_NAMES.items():
        groups[name] = known & (catalog["split"] == value)
    return {
        name: photoz_metrics(catalog["z_pred"][mask], catalog["z_true"][mask])
        for name, mask in groups.items()
        if mask.any()
    }


def failed_partitions(plan: dict[str, Any], catalog_keys: set[str], ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return every planned partition without predictions, with the last recorded reason."""
    reasons = {}
    for record in sorted(ranks, key=lambda r: r.get("finished_at", 0.0)):
        for failure in record["partitions_failed"]:
            reasons[failure["partition"]] = failure["reason"]
    return [
        {"partition": p["name"], "key": p["key"], "rank": p["rank"],
         "reason": reasons.get(p["name"], "no predictions: its rank did not finish")}
        for p in plan["partitions"]
        if p["name"] not in catalog_keys
    ]


def estimate_cost_usd(durations_s: list[float], memory_mb: int, world_size: int) -> float:
    """Estimate the Lambda bill of the executors (plus Step Functions when cost is present)."""
    try:
        from cai_helpers.cost import count_state_transitions, estimate_run_cost
    except ImportError:
        billed_s = sum(np.ceil(np.asarray(durations_s) * 1000.0) / 1000.0)
        return float(billed_s * memory_mb / 1024 * LAMBDA_USD_PER_GB_S + len(durations_s) * LAMBDA_USD_PER_REQUEST)
    cost = estimate_run_cost(len(durations_s), durations_s, memory_mb,
                             n_state_transitions=count_state_transitions(world_size))
    return float(cost["total_usd"])


def summarize(
    event: dict[str, Any],
) -> dict[str, Any]:
    """Write ``catalog.parquet`` and ``summary.json`` of ``event['run_id']``; return the summary.

    Optional event fields: ``backend``; ``map_started_at`` and ``map_finished_at``, the
    Unix times of the fan-out stage, which default to the ranks' earliest start and
    latest end; ``run_started_at``, the Unix time the whole run began, which defaults
    to the plan's creation; ``attempts``, the rank invocations including retries.
    """
    run_id = event["run_id"]
    store = store_from_event(event)
    plan = read_json(store, plan_key(run_id))
    ranks = [read_json(store, key) for key in store.list(ranks_prefix(run_id)) if key.endswith(".json")]

    keys = prediction_keys(store, run_id)
    parts = read_predictions(store, keys)
    catalog = build_catalog(store, run_id, keys, parts)
    store.put(run_key(run_id, "catalog.parquet"), encode_catalog(catalog))
    names = [k.rsplit("/", 1)[-1].removesuffix(".parquet") for k in keys]
    predicted = set(names)
    n_duplicate_rows, duplicates = duplicate_object_ids(parts, names)
    if n_duplicate_rows:
        log.warning("run %s: %d rows repeat an object_id of another partition, e.g. %s; the catalog keeps "
                    "the first of each, so fix the partition set so that every galaxy appears once",
                    run_id, n_duplicate_rows, duplicates[:3])
    del parts

    map_started = event.get("map_started_at") or min((r["started_at"] for r in ranks), default=plan["created_at"])
    map_finished = event.get("map_finished_at") or max((r["finished_at"] for r in ranks), default=map_started)
    map_wall_s = max(map_finished - map_started, 1e-9)
    n_images = int(len(catalog["object_id"]))
    by_split = metrics_by_split(catalog)
    headline = by_split.get("test") or by_split.get("all") or {}
    params = plan["params"]
    inference_rates = [r["bits"] / r["timings"]["inference_s"] for r in ranks if r["timings"]["inference_s"] > 0]

    summary = {
        "run_id": run_id,
        "backend": event.get("backend", params.get("backend", "local")),
        "store": plan["store"],
        "partition_prefix": plan["partition_prefix"],
        "partition_mb": plan["partition_mb"],
        "runtime": params["runtime"],
        "batch_size": params["batch_size"],
        "n_partitions": len(plan["partitions"]),
        "world_size": plan["world_size"],
        "n_rows_planned": plan["n_rows"],
        "n_images": n_images,
        "n_bits": n_images * BITS_PER_GALAXY,
        "wall_s": time.time() - event.get("run_started_at", plan["created_at"]),
        "map_wall_s": map_wall_s,
        "images_per_s": n_images / map_wall_s,
        "bits_per_s": n_images * BITS_PER_GALAXY / map_wall_s,
        "rank_inference_bits_per_s_sum": float(sum(inference_rates)),
        "metrics_split": "test" if "test" in by_split else "all",
        **{key: headline.get(key) for key in METRIC_KEYS},
        "metrics_by_split": by_split,
        "failed_partitions": failed_partitions(plan, predicted, ranks),
        "n_duplicate_rows": n_duplicate_rows,
        "duplicate_object_ids": duplicates,
        "peak_rss_mb_max": max((r["peak_rss_mb"] for r in ranks), default=None),
        "lambda_memory_mb": params["lambda_memory_mb"],
        "lambda_cost_usd_estimate": estimate_cost_usd(
            [r["duration_s"] for r in ranks], params["lambda_memory_mb"], plan["world_size"]),
        "rank_attempts": event.get("attempts", len(ranks)),
        "catalog_key": run_key(run_id, "catalog.parquet"),
        "summary_key": run_key(run_id, "summary.json"),
        "allreduced": next((r["allreduced"] for r in ranks if r["rank"] == 0 and r.get("allreduced")), None),
        "fmi": fmi_summary(plan, ranks, catalog),
    }
    failed_percentage = 100.0 * len(summary["failed_partitions"]) / max(1, summary["n_partitions"])
    tolerated = float(params.get("tolerated_failure_percentage", 0.0))
    summary["failed_percentage"] = failed_percentage
    summary["status"] = "succeeded" if failed_percentage <= tolerated else "failed"
    write_json(store, run_key(run_id, "summary.json"), summary)
    log.info("run %s: %d images over %.2f s map stage (%.1f images/s), %d failed partitions",
             run_id, n_images, map_wall_s, summary["images_per_s"], len(summary["failed_partitions"]))
    return summary


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """AWS Lambda entry point; returns the headline figures, not the full summary."""
    setup_logging()
    summary = summarize(event)
    keep = ("run_id", "status", "n_partitions", "world_size", "n_images", "map_wall_s", "images_per_s",
            "mse", "mae", "summary_key", "catalog_key")
    return {**{key: summary[key] for key in keep}, "n_failed": len(summary["failed_partitions"])}
