"""Per-device AstroMAE benchmark: runtimes x batch sizes x threads x data sizes.

Run ``python -m cai_helpers.bench`` for the full sweep (``--quick`` for a smoke run);
``--help`` lists one flag per sweep axis. Every measurement warms up first, synchronises
the device (predictors return host arrays, which waits for CUDA), repeats and reports
the median. Results: images/s, bits/s at the CAI paper's 164,160 bits per galaxy,
per-stage times (read, decode, inference, write) in the data-size sweep, peak RSS, the
compute roofline of the same run, int8-vs-fp32 |dz|, the partition-size fan-out
sweep and the target ratios. A table goes to stdout and a JSON file to ``runs/bench/``.

Shape legend: N galaxies, B batch, C bands, H W pixels.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cai_helpers import bench_report, roofline
from cai_helpers.bench_setup import dataset_galaxies, make_runtime, prepare_model_dir, synthetic_galaxies
from cai_helpers.bench_timing import (PARTITION_MB_FOR_SWEEP, data_size_sweep, images_for_gb,
                                      int8_accuracy, time_inference)
from cai_helpers.errors import CAIError, InvalidParameterError

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "torch-compile", "onnx", "onnx-int8")
BITS_PER_IMAGE = bench_report.BITS_PER_IMAGE


@dataclass
class BenchConfig:
    """Settings of one benchmark run; data sizes in GB (2**30 B at 20,520 B per galaxy).

    ``threads`` None means (1, all usable cores). ``device`` "auto" picks cuda when
    available. ``data_size_runtimes`` None sweeps data size for every runtime.
    ``compile_batch_sizes`` None times torch-compile at every batch size, and each size
    costs one compilation. ``fanout_batch_size`` None runs the fan-out at the worker
    default, ``RunParams.batch_size``.
    """

    runtimes: tuple[str, ...] = RUNTIMES
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    compile_batch_sizes: tuple[int, ...] | None = None
    threads: tuple[int, ...] | None = None
    data_sizes_gb: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    data_size_batch: int = 512
    data_size_runtimes: tuple[str, ...] | None = None
    device: str = "auto"
    repeats: int = 5
    warmup_batches: int = 2
    min_images_per_repeat: int = 1024
    accuracy_images: int = 4096
    matmul_size: int = roofline.DEFAULT_MATMUL_SIZE
    model_dir: str = "data/models/astromae"
    small_model: bool = False  # random small AstroMAE when there is no checkpoint
    dataset: str | None = None
    out_dir: str = "runs/bench"
    fanout_partition_mb: tuple[float, ...] = (25, 50, 75, 100)
    fanout_data_mb: float = 400.0
    fanout_workers: int | None = None
    fanout_batch_size: int | None = None
    fanout_dataset_prefix: str | None = None
    fanout_store: str = "data/store"
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_preset(cls, **overrides) -> "BenchConfig":
        """Return a smoke-test configuration that runs in seconds on two cores.

        Its fan-out runs 0.3 MB of synthetic data in 0.1 and 0.2 MB partitions, in a
        store under ``out_dir`` so that the smoke run leaves ``data/store`` alone.
        """
        fields = dict(runtimes=("torch", "onnx", "onnx-int8"), batch_sizes=(8, 32), threads=(1,),
                      data_sizes_gb=(0.0005, 0.001), data_size_batch=32, repeats=2, warmup_batches=1,
                      min_images_per_repeat=32, accuracy_images=64, matmul_size=256, small_model=True,
                      fanout_partition_mb=(0.1, 0.2), fanout_data_mb=0.3, fanout_workers=2, quick=True)
        fields.update(overrides)
        fields.setdefault("fanout_store", str(Path(fields.get("out_dir", cls.out_dir)) / "store"))
        return cls(**fields)

    def validate(self) -> "BenchConfig":
        unknown = sorted(set(self.runtimes) - set(RUNTIMES))
        if unknown:
            raise InvalidParameterError(f"unknown runtimes {unknown}: use any of {RUNTIMES}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidParameterError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.compile_batch_sizes is not None and (not self.compile_batch_sizes or min(self.compile_batch_sizes) < 1):
            raise InvalidParameterError(f"torch-compile batch sizes must be >= 1, got {self.compile_batch_sizes}")
        if self.fanout_batch_size is not None and self.fanout_batch_size < 1:
            raise InvalidParameterError(f"fan-out batch size must be >= 1, got {self.fanout_batch_size}")
        if self.threads is not None and (not self.threads or min(self.threads) < 1):
            raise InvalidParameterError(f"thread counts must be >= 1, got {self.threads}")
        if self.repeats < 1 or self.warmup_batches < 0:
            raise InvalidParameterError("repeats must be >= 1 and warmup_batches >= 0")
        if any(size <= 0 for size in self.data_sizes_gb):
            raise InvalidParameterError(f"data sizes must be > 0 GB, got {self.data_sizes_gb}")
        return self


def resolve_device(name: str) -> str:
    """Return "cuda" or "cpu" for "auto", else check that the named device exists.

    NOTE: the cuda path (torch on the GPU, ONNX Runtime's CUDA provider when installed)
    has not run on a GPU yet, so check its rows on the first GPU run.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device 'cuda' requested but torch sees no CUDA device; use 'cpu'")
    if name not in ("cpu", "cuda"):
        raise InvalidParameterError(f"invalid device {name!r}: use 'auto', 'cpu' or 'cuda'")
    return name


def default_threads() -> tuple[int, ...]:
    """Return (1, usable cores), or (1,) on a one-core machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return (1,) if cores == 1 else (1, cores)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _inputs(config: BenchConfig, n: int) -> tuple[dict[str, np.ndarray], str]:
    if config.dataset:
        return dataset_galaxies(config.dataset, n), f"data set {config.dataset}"
    return synthetic_galaxies(n, seed=config.seed), "synthetic Gaussian galaxies (timing only)"


def run_benchmark(config: BenchConfig, *, model=None) -> dict:
    """Run every sweep of ``config`` and return the result dict (``main`` writes it as JSON).

    ``model`` replaces the checkpoint in ``config.model_dir``. It must be an AstroMAE,
    because the predictors and the fan-out workers load it from a model folder.
    """
    config.validate()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=_mkdir(config.out_dir)))
    try:
        return _run_all(config, model, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _run_all(config: BenchConfig, model, work_dir: Path) -> dict:
    import torch

    device = resolve_device(config.device)
    threads_list = config.threads or default_threads()
    max_threads = max(threads_list)
    model_dir, model_info = prepare_model_dir(config.model_dir, work_dir / "model", config.runtimes,
                                              model=model, small=config.small_model, seed=config.seed)

    from cai_helpers.checkpoint import load_model
    from cai_helpers.partition import galaxies_per_partition

    # Enough galaxies for the largest batch, one repeat, the accuracy check and the
    # partition file that the data-size sweep cycles.
    largest = max(config.batch_sizes + (config.data_size_batch,))
    sweep_rows = min(images_for_gb(max(config.data_sizes_gb, default=0.0)),
                     galaxies_per_partition(PARTITION_MB_FOR_SWEEP))
    n_inputs = max(largest, config.min_images_per_repeat, config.accuracy_images, sweep_rows)
    galaxies, input_source = _inputs(config, n_inputs)
    images, magnitudes = galaxies["images"], galaxies["magnitudes"]  # [N, C, H, W], [N, C]

    _set_threads(max_threads)
    reference = load_model(model_dir)
    flop_per_image = roofline.count_flop_per_image(
        reference, torch.from_numpy(images[:2]), torch.from_numpy(magnitudes[:2]))
    del reference
    rooflines = {t: roofline.measure_roofline(flop_per_image, device=device, threads=t, n=config.matmul_size)
                 for t in (threads_list if device == "cpu" else (max_threads,))}

    result: dict = {"config": asdict(config), "hardware": bench_report.hardware_info(device),
                    "model": model_info, "input_source": input_source, "flop_per_image": flop_per_image,
                    "roofline": [r.to_dict() for r in rooflines.values()], "inference": [],
                    "data_size": [], "fanout": [], "skipped": [], "model_load_s": {}}
    for runtime in config.runtimes:
        _run_runtime(runtime, config, device, threads_list, model_dir, images, magnitudes,
                     galaxies, rooflines, work_dir, result)

    if {"onnx", "onnx-int8"} <= set(config.runtimes):
        n = config.accuracy_images  # compared on the CPU provider, where int8 kernels run
        result["int8_accuracy"] = int8_accuracy(model_dir, images[:n], magnitudes[:n], max_threads)

    if config.fanout_partition_mb:
        from cai_helpers.bench_fanout import fanout_sweep

        result["fanout"] = fanout_sweep(config, model_dir, work_dir, result)
    result["targets"] = bench_report.compute_targets(result)
    return result


def _mkdir(path: str) -> str:
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def _run_runtime(runtime, config, device, threads_list, model_dir, images, magnitudes, galaxies,
                 rooflines, work_dir, result) -> None:
    """Time one runtime at every thread count and batch size, then its data-size sweep.

    torch.compile gets one predictor per batch size, because it compiles per input shape.
    """
    def build(batch_size: int, threads: int):
        started = time.perf_counter()
        predictor = make_runtime(runtime, model_dir, batch_size=batch_size, threads=threads, device=device)
        result["model_load_s"].setdefault(runtime, time.perf_counter() - started)
        return predictor

    batch_sizes = config.batch_sizes
    if runtime == "torch-compile" and config.compile_batch_sizes:
        batch_sizes = config.compile_batch_sizes
    for threads in threads_list:
        _set_threads(threads)
        bound = rooflines.get(threads) or next(iter(rooflines.values()))
        try:
            shared = None if runtime == "torch-compile" else build(max(batch_sizes), threads)
            for batch_size in batch_sizes:
                predictor = shared or build(batch_size, threads)
                row = time_inference(predictor, images, magnitudes, batch_size, config)
                row.update(runtime=runtime, device=device, threads=threads,
                           roofline_images_per_s=bound.bound_images_per_s,
                           roofline_fraction=roofline.efficiency(row["images_per_s"], bound.bound_images_per_s))
                result["inference"].append(row)
                logger.info("%s %s batch %d threads %d: %.1f images/s (first call %.2f s)", runtime, device,
                            batch_size, threads, row["images_per_s"], row["first_call_s"])
        except (CAIError, RuntimeError, ImportError, OSError) as error:
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            logger.warning("skipping %s on %s with %d threads: %s", runtime, device, threads, reason)
            result["skipped"].append({"runtime": runtime, "device": device, "threads": threads, "reason": reason})
            return

    sweep_runtimes = config.data_size_runtimes or config.runtimes
    if runtime not in sweep_runtimes or not config.data_sizes_gb:
        return
    threads = max(threads_list)
    _set_threads(threads)
    predictor = build(config.data_size_batch, threads)
    bound = rooflines.get(threads) or next(iter(rooflines.values()))
    for row in data_size_sweep(predictor, galaxies, config.data_sizes_gb, work_dir, config.warmup_batches):
        # The roofline compares the inference stage alone, as in the inference-only rows.
        inference_images_per_s = row["images"] / row["inference_s"]
        row.update(runtime=runtime, device=device, threads=threads, batch_size=config.data_size_batch,
                   inference_images_per_s=inference_images_per_s,
                   roofline_fraction=roofline.efficiency(inference_images_per_s, bound.bound_images_per_s))
        result["data_size"].append(row)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    """Map command-line flags onto a :class:`BenchConfig` (``--quick`` sets the smoke preset)."""
    parser = argparse.ArgumentParser(prog="python -m cai_helpers.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke preset: tiny sizes, small model if none shipped")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, help="runtimes to time")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="batch sizes (images per call)")
    parser.add_argument("--compile-batch-sizes", nargs="+", type=int,
                        help="batch sizes of torch-compile (default: --batch-sizes); one compilation each")
    parser.add_argument("--threads", nargs="+", type=int, help="CPU thread counts (default: 1 and all cores)")
    parser.add_argument("--data-sizes-gb", nargs="+", type=float, help="data sizes in GB (2**30 B) to stream")
    parser.add_argument("--data-size-batch", type=int, help="batch size of the data-size sweep")
    parser.add_argument("--data-size-runtimes", nargs="+", choices=RUNTIMES, help="runtimes of the data-size sweep")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device (auto: cuda when present)")
    parser.add_argument("--repeats", type=int, help="timed repeats per setting (the median is reported)")
    parser.add_argument("--warmup-batches", type=int, help="untimed batches before each setting")
    parser.add_argument("--min-images-per-repeat", type=int, help="images timed per repeat (at least one batch)")
    parser.add_argument("--accuracy-images", type=int, help="galaxies for the int8-vs-fp32 |dz| check")
    parser.add_argument("--model-dir", help="model folder (model.safetensors, config.json, ONNX files)")
    parser.add_argument("--dataset", help="data set location for inputs, e.g. data/store/datasets/sdss")
    parser.add_argument("--fanout-partition-mb", nargs="*", type=float, help="partition sizes in MB; none skips")
    parser.add_argument("--fanout-data-mb", type=float, help="MB of data per fan-out run")
    parser.add_argument("--fanout-workers", type=int, help="local workers of the fan-out (default: one per core)")
    parser.add_argument("--fanout-batch-size", type=int,
                        help="batch size of the fan-out workers (default: RunParams.batch_size)")
    parser.add_argument("--fanout-dataset-prefix", help="data set prefix in --fanout-store to partition")
    parser.add_argument("--fanout-store", help="store location of the fan-out data set")
    parser.add_argument("--out-dir", help="folder for the JSON results (default runs/bench)")
    args = vars(parser.parse_args(argv))
    quick = args.pop("quick")
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None}
    return BenchConfig.quick_preset(**overrides) if quick else replace(BenchConfig(), **overrides)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line, print the tables and write the JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = parse_args(argv)
    result = run_benchmark(config)
    path = bench_report.write_json(result, config.out_dir)
    print(bench_report.format_report(result))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
