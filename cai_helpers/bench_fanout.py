"""Partition-size sweep of the local fan-out, read from the workers' rank records.

For each partition size the benchmark launches one real run through
``cai_helpers.launcher.run`` (local backend: one process per worker, real partitions
in the store) and reads every rank record under ``runs/<run_id>/ranks/``. Each worker
reports its duration, peak RSS, end-to-end images/s (images / duration, model load
included) and inference-only images/s (images / inference time). The ratio of the
last two is the worker efficiency.

Without a data set prefix, a synthetic data set (64x64 cutouts, the data set format) is
written once under ``bench/synthetic-<rows>`` in the store and reused by later runs.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from cai_helpers.bench_setup import synthetic_galaxies
from cai_helpers.errors import CAIError
from cai_helpers.inference import BITS_PER_GALAXY

logger = logging.getLogger(__name__)

DATASET_PIXELS = 64
SYNTHETIC_CHUNK_ROWS = 2_000
SKY_NOISE_NANOMAGGIES = 0.02
BITS_PER_IMAGE = BITS_PER_GALAXY


def synthetic_dataset(store, rows: int, seed: int = 0) -> str:
    """Write (once) a synthetic data set of ``rows`` galaxies; return its prefix."""
    from cai_helpers.dataset import DatasetWriter

    prefix = f"bench/synthetic-{rows}"
    if store.exists(f"{prefix}/manifest.json"):
        return prefix
    writer = DatasetWriter(store, prefix, attributes={"source": "synthetic Gaussian galaxies (benchmark only)"})
    rng = np.random.default_rng(seed)
    pad = (DATASET_PIXELS - 32) // 2
    for first in range(0, rows, SYNTHETIC_CHUNK_ROWS):
        n = min(SYNTHETIC_CHUNK_ROWS, rows - first)
        arrays = synthetic_galaxies(n, seed=seed + first)
        images = np.pad(arrays["images"], ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # [N, C, 64, 64]
        border = np.ones_like(images, dtype=bool)
        border[:, :, pad:pad + 32, pad:pad + 32] = False
        images[border] = rng.normal(0.0, SKY_NOISE_NANOMAGGIES, size=int(border.sum()))
        arrays.update(images=images.astype(np.float32),
                      magnitude_errors=np.full_like(arrays["magnitudes"], 0.05),
                      object_id=np.arange(first, first + n, dtype=np.int64))
        writer.add(arrays)
    writer.close()
    return prefix


def _rank_records(store, run_id: str) -> list[dict]:
    from cai_helpers.handlers import ranks_prefix

    return [json.loads(store.get(key)) for key in store.list(ranks_prefix(run_id))]


def summarize_ranks(records: list[dict], wall_s: float, partition_mb: float, workers: int,
                    partitions: int) -> dict:
    """Return one sweep row from the rank records of one run (seconds, MB, images/s).

    Throughput is images over the map stage; worker efficiency is inference time over
    worker duration, which equals end-to-end images/s over inference-only images/s.
    """
    worked = [r for r in records if r.get("images")]
    images = sum(r["images"] for r in worked)
    inference_s = sum(r["timings"]["inference_s"] for r in worked)
    duration_s = sum(r["duration_s"] for r in worked)
    # The map stage runs from the first worker's start to the last worker's end; the
    # launcher's wall time also covers partitioning and the summary.
    map_s = (max(r["finished_at"] for r in worked) - min(r["started_at"] for r in worked)) if worked else 0.0
    return {
        "partition_mb": partition_mb, "workers": workers, "partitions": partitions, "images": images,
        "wall_s": wall_s, "map_s": map_s, "images_per_s": images / map_s if map_s else None,
        "bits_per_s": images * BITS_PER_IMAGE / map_s if map_s else None,
        "worker_mean_s": statistics.mean(r["duration_s"] for r in worked) if worked else None,
        "worker_max_s": max((r["duration_s"] for r in worked), default=None),
        "worker_images_per_s": images / duration_s if duration_s else None,
        "worker_inference_images_per_s": images / inference_s if inference_s else None,
        "worker_efficiency": inference_s / duration_s if duration_s else None,
        # The CAI paper's throughput: the sum over workers of bits / own inference time.
        "paper_style_bits_per_s": sum(r["images"] * BITS_PER_IMAGE / r["timings"]["inference_s"]
                                      for r in worked if r["timings"]["inference_s"]),
        "worker_peak_rss_mb": max((r["peak_rss_mb"] for r in worked), default=None),
        "model_load_s": statistics.mean(r["model_load_s"] for r in worked) if worked else None,
        "stage_s": {stage: sum(r["timings"][stage] for r in worked)
                    for stage in ("read_s", "decode_s", "inference_s", "write_s")},
    }


def fanout_sweep(config, model_dir: Path, work_dir: Path, result: dict) -> list[dict]:
    """Run the fan-out once per partition size in ``config.fanout_partition_mb``; return rows.

    A size whose run fails is logged and recorded under ``result["skipped"]``.
    """
    try:
        from cai_helpers.launcher import run as launch
    except ImportError as error:
        reason = f"cai_helpers.launcher is not importable ({error})"
        logger.warning("skipping the fan-out sweep: %s", reason)
        result["skipped"].append({"runtime": "fanout", "device": "cpu", "reason": reason})
        return []
    from cai_helpers.partition import rows_for_data_size
    from cai_helpers.runconfig import RunParams, new_run_id
    from cai_helpers.store import open_store

    store = open_store(config.fanout_store)
    prefix = config.fanout_dataset_prefix or synthetic_dataset(store, rows_for_data_size(config.fanout_data_mb),
                                                               seed=config.seed)
    runtime = "onnx" if "onnx" in config.runtimes else config.runtimes[0]
    batch_size = config.fanout_batch_size or RunParams.batch_size  # the dataclass field's default
    rows = []
    for partition_mb in config.fanout_partition_mb:
        params = RunParams(store=config.fanout_store, dataset_prefix=prefix, partition_mb=float(partition_mb),
                           data_size_mb=config.fanout_data_mb, model_dir=str(model_dir), runtime=runtime,
                           batch_size=batch_size, max_concurrency=config.fanout_workers,
                           threads_per_worker=1, backend="local", run_id=new_run_id())
        started = time.perf_counter()
        try:
            launch(params, progress=False)
        except CAIError as error:
            logger.warning("fan-out at %s MB failed: %s", partition_mb, error)
            result["skipped"].append({"runtime": f"fanout {partition_mb} MB", "device": "cpu", "reason": str(error)})
            continue
        wall_s = time.perf_counter() - started
        records = _rank_records(store, params.run_id)
        partitions = sum(len(r.get("partitions_done", [])) for r in records)
        row = summarize_ranks(records, wall_s, float(partition_mb), len(records), partitions)
        row.update(run_id=params.run_id, runtime=runtime, batch_size=batch_size)
        logger.info("fan-out %s MB: %d workers, %.1f images/s, worker efficiency %s", partition_mb,
                    len(records), row["images_per_s"] or 0.0, row["worker_efficiency"])
        rows.append(row)
    return rows
