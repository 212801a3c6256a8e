"""Hardware facts, peak memory, target ratios, tables and JSON files of the benchmark.

The benchmark (``cai_helpers.bench``) measures. This module describes the machine,
measures the peak resident memory of one section, turns measured rows into the target
ratios and writes the results. Every ratio is computed from rows of the same run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from cai_helpers.inference import BITS_PER_GALAXY, peak_rss_mb, proc_status_mb

logger = logging.getLogger(__name__)

BITS_PER_IMAGE = BITS_PER_GALAXY
TARGET_BATCH_SIZE = 512
TARGET_INT8_SPEEDUP = 2.5  # int8 ONNX images/s over torch eager
TARGET_INT8_P99_DZ = 0.003  # p99 |dz| of int8 against fp32 ONNX
TARGET_ONNX_SPEEDUP = 1.3  # fp32 ONNX images/s over torch eager
TARGET_WORKER_EFFICIENCY = 0.85  # worker end-to-end images/s over its inference-only images/s
TARGET_WORKER_PEAK_RSS_MB = 600.0  # on a 100 MB partition
TARGET_PARTITION_MB = 100


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def hardware_info(device: str) -> dict[str, Any]:
    """Return the CPU model, core count, memory (MB), GPU name and library versions."""
    import numpy
    import torch

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_mb": _memory_total_mb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


class PeakRSS:
    """Peak resident memory (MB) of this process while the ``with`` block runs.

    On Linux the kernel's high-water mark is reset on entry by writing 5 to
    /proc/self/clear_refs, so the peak belongs to this block only (``scope`` "block").
    Where that fails, the process-lifetime peak is reported (``scope`` "process").
    ``start_mb`` is the resident memory on entry (libraries and model already loaded).
    """

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self.start_mb: float | None = None
        self.scope = "block"

    def __enter__(self) -> "PeakRSS":
        self.start_mb = proc_status_mb("VmRSS:")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.scope = "process"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.peak_mb = peak_rss_mb()


def _best_row(rows: list[dict], runtime: str, batch_size: int) -> dict | None:
    """Return the row of ``runtime`` at ``batch_size`` with the most threads (ties: fastest)."""
    matching = [r for r in rows if r["runtime"] == runtime and r["batch_size"] == batch_size]
    if not matching:
        return None
    return max(matching, key=lambda r: (r["threads"], r["images_per_s"]))


def _target(name: str, value: float | None, threshold: float, higher_is_better: bool, basis: str) -> dict:
    if value is None:
        met = None
    else:
        met = value >= threshold if higher_is_better else value <= threshold
    return {"target": name, "value": value, "threshold": threshold,
            "direction": ">=" if higher_is_better else "<=", "met": met, "basis": basis}


def compute_targets(result: dict) -> list[dict]:
    """Return each target with its measured ratio or value and whether it is met.

    Speed ratios compare rows of the same device, batch size and thread count taken in
    this run, at batch 512 or else at the largest batch measured. A value is None
    (and ``met`` None) when the run lacks the rows it needs.
    """
    rows = [r for r in result.get("inference", []) if r.get("images_per_s")]
    cpu_rows = [r for r in rows if r["device"] == "cpu"] or rows
    batches = sorted({r["batch_size"] for r in cpu_rows})
    batch = None
    if TARGET_BATCH_SIZE in batches:
        batch = TARGET_BATCH_SIZE
    elif batches:
        batch = batches[-1]

    eager = _best_row(cpu_rows, "torch", batch) if batch else None
    onnx = _best_row(cpu_rows, "onnx", batch) if batch else None
    int8 = _best_row(cpu_rows, "onnx-int8", batch) if batch else None
    int8_ratio = int8["images_per_s"] / eager["images_per_s"] if eager and int8 else None
    onnx_ratio = onnx["images_per_s"] / eager["images_per_s"] if eager and onnx else None
    basis = f"batch {batch}, {eager['threads']} threads" if eager else "missing torch eager row"

    accuracy = result.get("int8_accuracy") or {}
    targets = [
        _target("int8 ONNX / torch eager images/s", int8_ratio, TARGET_INT8_SPEEDUP, True, basis),
        _target("int8 vs fp32 p99 |dz|", accuracy.get("p99"), TARGET_INT8_P99_DZ, False,
                f"{accuracy.get('n', 0)} galaxies"),
        _target("fp32 ONNX / torch eager images/s", onnx_ratio, TARGET_ONNX_SPEEDUP, True, basis),
    ]

    fanout = [r for r in result.get("fanout", []) if r.get("partition_mb") == TARGET_PARTITION_MB]
    efficiency = fanout[0].get("worker_efficiency") if fanout else None
    peak = fanout[0].get("worker_peak_rss_mb") if fanout else None
    targets.append(_target("worker end-to-end / inference-only images/s", efficiency,
                           TARGET_WORKER_EFFICIENCY, True, "100 MB partitions, rank records"))
    targets.append(_target("worker peak RSS on a 100 MB partition (MB)", peak,
                           TARGET_WORKER_PEAK_RSS_MB, False, "rank records"))
    return targets


def _format_rows(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Format records as a fixed-width table; columns are (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


INFERENCE_COLUMNS = [
    ("runtime", "runtime", ""), ("device", "device", ""), ("batch_size", "batch", "d"),
    ("threads", "threads", "d"), ("images_per_s", "images/s", ".1f"), ("gbit_per_s", "Gbit/s", ".4f"),
    ("ms_per_batch", "ms/batch", ".1f"), ("roofline_images_per_s", "bound img/s", ".0f"),
    ("roofline_fraction", "of bound", ".3f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
]
DATA_SIZE_COLUMNS = [
    ("runtime", "runtime", ""), ("data_gb", "data GB", ".4g"), ("images", "images", "d"),
    ("seconds", "time s", ".2f"), ("read_s", "read s", ".2f"), ("decode_s", "decode s", ".2f"),
    ("inference_s", "infer s", ".2f"), ("write_s", "write s", ".2f"),
    ("images_per_s", "images/s", ".1f"), ("roofline_fraction", "of bound", ".3f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
]
FANOUT_COLUMNS = [
    ("partition_mb", "partition MB", ".0f"), ("batch_size", "batch", "d"), ("workers", "workers", "d"),
    ("partitions", "partitions", "d"),
    ("wall_s", "wall s", ".2f"), ("worker_mean_s", "worker mean s", ".2f"),
    ("images_per_s", "images/s", ".1f"), ("worker_efficiency", "e2e/infer", ".3f"),
    ("worker_peak_rss_mb", "worker peak MB", ".0f"),
]
TARGET_COLUMNS = [("target", "target", ""), ("direction", "", ""), ("threshold", "threshold", ".3f"),
                  ("value", "measured", ".4f"), ("met_text", "met", ""), ("basis", "basis", "")]


def format_report(result: dict) -> str:
    """Return the printable tables: inference sweep, data-size sweep, fan-out, targets."""
    parts = [f"device {result['hardware'].get('device')}: {result['hardware'].get('cpu_model')}"
             f"{' / ' + result['hardware']['gpu'] if result['hardware'].get('gpu') else ''}",
             f"model: {result.get('model', {}).get('description')}, "
             f"{result.get('flop_per_image', 0) / 1e9:.3f} GFLOP per image"]
    for roofline in result.get("roofline", []):
        parts.append(f"roofline {roofline['device']} {roofline['threads']} threads: "
                     f"{roofline['flops_per_s'] / 1e9:.1f} GFLOP/s -> {roofline['bound_images_per_s']:.0f} images/s")
    if result.get("inference"):
        parts += ["", "inference only (median of repeats)", _format_rows(result["inference"], INFERENCE_COLUMNS)]
    if result.get("data_size"):
        parts += ["", "data-size sweep (repeated passes over a partition file)",
                  _format_rows(result["data_size"], DATA_SIZE_COLUMNS)]
    if result.get("fanout"):
        parts += ["", "fan-out partition-size sweep (local workers)", _format_rows(result["fanout"], FANOUT_COLUMNS)]
    for skipped in result.get("skipped", []):
        parts.append(f"skipped {skipped['runtime']} on {skipped['device']}: {skipped['reason']}")
    if result.get("targets"):
        rows = [{**t, "met_text": {True: "yes", False: "NO", None: "n/a"}[t["met"]]} for t in result["targets"]]
        parts += ["", "targets", _format_rows(rows, TARGET_COLUMNS)]
    return "\n".join(parts)


def write_json(result: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``result`` to ``out_dir/bench-<UTC time>-<device>.json`` and return the path."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = folder / f"bench-{stamp}-{result['hardware'].get('device', 'cpu').replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True, default=float))
    logger.info("wrote benchmark results to %s", path)
    return path
