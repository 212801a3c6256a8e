"""Peak resident memory of one worker, stage by stage, on one partition.

Run ``python -m cai_helpers.bench_memory --partition-mb 100 --batch-sizes 128 256 512``.
For each batch size a fresh process goes through a worker's stages (imports, model
load, read, decode, predict, encode) on a partition file and reports, per stage, the
resident set size (VmRSS) at its end and the peak (VmHWM) during it. The peak is reset
between stages by writing 5 to ``/proc/self/clear_refs``, so this probe runs on Linux
only. The worker's own figure, ``peak_rss_mb`` in its rank record, is the maximum over
these stages plus what the executor's bookkeeping adds.

Shape legend: N galaxies, C bands, H W pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cai_helpers.errors import InvalidParameterError

STAGES = ("imports", "load_model", "read", "decode", "predict", "encode")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK = "5"  # clear_refs value that resets VmHWM to the current RSS (Linux 4.0 and later)


def _status_mb(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name):
            return int(line.split()[1]) / 1024
    raise InvalidParameterError(f"/proc/self/status has no {field_name}; this probe needs Linux")


def _mark(stages: list[dict], name: str) -> None:
    stages.append({"stage": name, "rss_mb": _status_mb("VmRSS:"), "peak_mb": _status_mb("VmHWM:")})
    CLEAR_REFS.write_text(RESET_PEAK)


def probe_worker(partition: str, runtime: str, model_dir: str, batch_size: int, threads: int,
                 mem_pattern: bool) -> dict:
    """Go through a worker's stages on ``partition`` in this process; return RSS per stage (MB).

    Call it in a fresh process: modules imported earlier would hide the imports stage.
    ``mem_pattern`` turns ONNX Runtime's memory pattern back on, the setting before
    ``cai_helpers.inference.session_options`` turned it off.
    """
    stages: list[dict] = []
    CLEAR_REFS.write_text(RESET_PEAK)
    from cai_helpers import inference
    from cai_helpers.handlers.executor import encode_predictions
    from cai_helpers.partition import decode_partition

    _mark(stages, "imports")
    if mem_pattern:
        default_options = inference.session_options

        def session_options(threads: int):
            options = default_options(threads)
            options.enable_mem_pattern = True
            return options

        inference.session_options = session_options
    predictor = inference.make_predictor(runtime, model_dir, batch_size=batch_size, threads=threads)
    _mark(stages, "load_model")
    data = Path(partition).read_bytes()
    _mark(stages, "read")
    arrays = decode_partition(data, key=partition, expected_sha256=hashlib.sha256(data).hexdigest())
    del data
    _mark(stages, "decode")
    started = time.perf_counter()
    z_pred, _ = predictor.predict_partition(arrays)
    inference_s = time.perf_counter() - started
    _mark(stages, "predict")
    encode_predictions(arrays, z_pred)
    _mark(stages, "encode")
    return {"runtime": runtime, "batch_size": batch_size, "threads": threads, "mem_pattern": mem_pattern,
            "images": int(len(z_pred)), "images_per_s": len(z_pred) / inference_s,
            "peak_rss_mb": max(s["peak_mb"] for s in stages), "stages": stages}


def write_partition(path: Path, partition_mb: float, dataset: str | None) -> int:
    """Write one partition file of ``partition_mb`` MB (byte model); return its rows."""
    from cai_helpers.bench_setup import dataset_galaxies, synthetic_galaxies
    from cai_helpers.partition import galaxies_per_partition
    from cai_helpers.partition_io import encode_safetensors

    rows = galaxies_per_partition(partition_mb)
    galaxies = dataset_galaxies(dataset, rows) if dataset else synthetic_galaxies(rows)
    path.write_bytes(encode_safetensors(galaxies))
    return rows


def format_table(results: list[dict]) -> str:
    """Return one line per run: peak per stage (MB), the overall peak and images/s."""
    header = f"{'runtime':>9} {'batch':>5} {'mem pattern':>11} " + " ".join(f"{s:>10}" for s in STAGES)
    lines = [header + f" {'peak MB':>8} {'images/s':>8}"]
    for result in results:
        peaks = " ".join(f"{s['peak_mb']:10.0f}" for s in result["stages"])
        lines.append(f"{result['runtime']:>9} {result['batch_size']:5d} {str(result['mem_pattern']):>11} "
                     f"{peaks} {result['peak_rss_mb']:8.0f} {result['images_per_s']:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Probe one fresh process per batch size and print the table (and JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m cai_helpers.bench_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition-mb", type=float, default=100.0, help="partition size in MB (2**20 B)")
    parser.add_argument("--dataset", help="data set location for real cutouts (default: synthetic galaxies)")
    parser.add_argument("--runtime", default="onnx", choices=("torch", "onnx", "onnx-int8"), help="worker runtime")
    parser.add_argument("--model-dir", default="data/models/astromae", help="model folder")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 256, 512], help="batch sizes to probe")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the worker")
    parser.add_argument("--mem-pattern", action="store_true", help="turn ONNX Runtime's memory pattern back on")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # partition path: probe in this process
    args = parser.parse_args(argv)

    if args.child:
        result = probe_worker(args.child, args.runtime, args.model_dir, args.batch_sizes[0], args.threads,
                              args.mem_pattern)
        print(json.dumps(result))
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
        partition = Path(folder) / "partition.safetensors"
        write_partition(partition, args.partition_mb, args.dataset)
        for batch_size in args.batch_sizes:
            command = [sys.executable, "-m", "cai_helpers.bench_memory", "--child", str(partition),
                       "--runtime", args.runtime, "--model-dir", args.model_dir, "--batch-sizes", str(batch_size),
                       "--threads", str(args.threads)] + (["--mem-pattern"] if args.mem_pattern else [])
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
