"""Timed sections of the device benchmark: inference-only batches, the data-size stream
and the int8-vs-fp32 comparison. ``cai_helpers.bench`` runs them over its sweep axes.

Shape legend: N galaxies, B batch, C bands, H W pixels.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cai_helpers import bench_report

if TYPE_CHECKING:
    from cai_helpers.bench import BenchConfig

BITS_PER_IMAGE = bench_report.BITS_PER_IMAGE
BYTES_PER_IMAGE = BITS_PER_IMAGE // 8  # data-size axis of the CAI paper (arXiv:2501.06249): 20,520 B per galaxy
GB = 2**30
PARTITION_MB_FOR_SWEEP = 25  # the data-size sweep cycles one partition of this size


def time_inference(predictor, images: np.ndarray, magnitudes: np.ndarray, batch_size: int,
                   config: BenchConfig) -> dict:
    """Time ``predictor.predict_batch`` on batches of ``batch_size``; return median figures.

    Each repeat runs ceil(min_images_per_repeat / batch) batches (at least one) after
    ``warmup_batches`` untimed ones. The first call's time is kept as ``first_call_s``
    (torch.compile's compile time).
    """
    n = len(images)
    batches_per_repeat = max(1, -(-config.min_images_per_repeat // batch_size))
    starts = [(i * batch_size) % max(1, n - batch_size + 1) for i in range(batches_per_repeat)]

    first = time.perf_counter()
    predictor.predict_batch(images[:batch_size], magnitudes[:batch_size])
    first_call_s = time.perf_counter() - first
    for _ in range(max(0, config.warmup_batches - 1)):
        predictor.predict_batch(images[:batch_size], magnitudes[:batch_size])

    seconds = []
    with bench_report.PeakRSS() as peak:
        for _ in range(config.repeats):
            started = time.perf_counter()
            for start in starts:
                predictor.predict_batch(images[start:start + batch_size], magnitudes[start:start + batch_size])
            seconds.append(time.perf_counter() - started)
    median_s = statistics.median(seconds)
    images_timed = batches_per_repeat * batch_size
    images_per_s = images_timed / median_s
    return {
        "batch_size": batch_size, "images_per_repeat": images_timed, "repeats": config.repeats,
        "median_s": median_s, "min_s": min(seconds), "max_s": max(seconds),
        "images_per_s": images_per_s, "bits_per_s": images_per_s * BITS_PER_IMAGE,
        "gbit_per_s": images_per_s * BITS_PER_IMAGE / 1e9, "ms_per_batch": 1000 * median_s / batches_per_repeat,
        "first_call_s": first_call_s, "peak_rss_mb": peak.peak_mb, "rss_start_mb": peak.start_mb,
        "peak_rss_scope": peak.scope,
    }


def images_for_gb(data_gb: float) -> int:
    """Return the galaxies in ``data_gb`` GB at 20,520 B per galaxy (at least one)."""
    return max(1, int(data_gb * GB // BYTES_PER_IMAGE))


def data_size_sweep(predictor, galaxies: dict[str, np.ndarray], sizes_gb: tuple[float, ...],
                    work_dir: Path, warmup_batches: int = 1) -> list[dict]:
    """Stream the largest data size through read -> decode -> inference -> write; return
    one row per size with the cumulative stage times when that size was reached.

    The input is one partition file (the worker's format, up to 25 MB) read from disk
    and decoded on every pass, so the read, decode and write stages are real I/O. A pass
    ends early at the next requested size, so every row counts exactly its images. The
    predictor first runs ``warmup_batches`` untimed full batches.
    """
    from cai_helpers.partition import decode_partition, galaxies_per_partition
    from cai_helpers.partition_io import encode_safetensors

    rows_per_file = min(galaxies_per_partition(PARTITION_MB_FOR_SWEEP), len(galaxies["images"]))
    path = work_dir / "sweep-partition.safetensors"
    path.write_bytes(encode_safetensors({k: v[:rows_per_file] for k, v in galaxies.items()}))
    output = work_dir / "sweep-predictions.safetensors"

    warmup = {name: np.resize(values, (predictor.batch_size, *values.shape[1:]))
              for name, values in galaxies.items() if name in ("images", "magnitudes")}
    for _ in range(max(1, warmup_batches)):
        predictor.predict_batch(warmup["images"], warmup["magnitudes"])

    targets = sorted((images_for_gb(size), size) for size in sizes_gb)
    stages = dict(read_s=0.0, decode_s=0.0, inference_s=0.0, write_s=0.0)
    done, rows = 0, []
    with bench_report.PeakRSS() as peak:
        while targets and done < targets[-1][0]:
            t0 = time.perf_counter()
            data = path.read_bytes()
            t1 = time.perf_counter()
            arrays = decode_partition(data, key=str(path))
            take = min(rows_per_file, targets[0][0] - done)  # stop exactly at the next size
            arrays = {name: values[:take] for name, values in arrays.items()}
            t2 = time.perf_counter()
            z_pred, _ = predictor.predict_partition(arrays)
            t3 = time.perf_counter()
            output.write_bytes(encode_safetensors({"object_id": arrays["object_id"], "z_pred": z_pred}))
            t4 = time.perf_counter()
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stages[name] += seconds
            done += take
            while targets and done >= targets[0][0]:
                images, size = targets.pop(0)
                total = sum(stages.values())
                rows.append({"data_gb": size, "images": done, "seconds": total, **stages,
                             "images_per_s": done / total, "bits_per_s": done * BITS_PER_IMAGE / total})
    for row in rows:
        row.update(peak_rss_mb=peak.peak_mb, rss_start_mb=peak.start_mb, peak_rss_scope=peak.scope)
    return rows


def int8_accuracy(model_dir: Path, images: np.ndarray, magnitudes: np.ndarray, threads: int) -> dict:
    """Compare int8 and fp32 ONNX on the same galaxies: |dz| = |z8 - z32| / (1 + z32) quantiles."""
    from cai_helpers.inference import make_predictor

    batch = 512
    fp32 = make_predictor("onnx", model_dir, batch_size=batch, threads=threads)
    int8 = make_predictor("onnx-int8", model_dir, batch_size=batch, threads=threads)
    arrays = {"images": images, "magnitudes": magnitudes}
    z32, _ = fp32.predict_partition(arrays)
    z8, _ = int8.predict_partition(arrays)
    dz = np.abs(z8 - z32) / (1.0 + z32)
    return {"n": int(len(dz)), "p50": float(np.percentile(dz, 50)), "p99": float(np.percentile(dz, 99)),
            "max": float(dz.max()), "reference": "fp32 ONNX", "mean_z_fp32": float(z32.mean())}
