"""Inputs, model folder and predictors of the device benchmark.

The benchmark times the same predictors the workers use (``cai_helpers.inference``),
which load a model folder: ``model.safetensors`` + ``config.json`` for torch and
``astromae.onnx`` / ``astromae.int8.onnx`` for ONNX Runtime. When the shipped folder
lacks a file, a benchmark folder is built beside the results. It receives the shipped
checkpoint, or else a randomly initialised AstroMAE, and the exported ONNX files.
Random weights time the same operations, but their int8-vs-fp32 |dz| only compares
two versions of a random network.

Shape legend: N galaxies, C bands, H W pixels.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from cai_helpers.errors import CheckpointError, InvalidParameterError
from cai_helpers.inference import BatchedPredictor

logger = logging.getLogger(__name__)

ONNX_FILES = {"onnx": "astromae.onnx", "onnx-int8": "astromae.int8.onnx"}
CHECKPOINT_FILES = ("model.safetensors", "config.json")
CROP_PIXELS = 32
BANDS = 5
# Typical SDSS Main Galaxy Sample photometry for the synthetic galaxies (AB magnitudes).
R_MAGNITUDE_RANGE = (14.0, 17.77)
MEAN_COLOURS = (1.6, 0.8, 0.4, 0.3)  # u-g, g-r, r-i, i-z
NANOMAGGY_ZERO_POINT = 22.5  # m = 22.5 - 2.5 log10(flux in nanomaggies)
SKY_NOISE_NANOMAGGIES = 0.02


def synthetic_galaxies(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Return ``n`` synthetic galaxies in the partition format (images 32x32).

    Each is a round Gaussian profile whose total flux per band matches its magnitudes,
    plus Gaussian sky noise. These inputs are for timing only: the model's speed does
    not depend on pixel values, while its predictions on them mean nothing.
    """
    if n < 1:
        raise InvalidParameterError(f"need at least one galaxy, got n={n}")
    rng = np.random.default_rng(seed)
    r_mag = rng.uniform(*R_MAGNITUDE_RANGE, size=n)
    colours = np.asarray(MEAN_COLOURS) + rng.normal(0.0, 0.2, size=(n, 4))
    # u = r + (u-g) + (g-r), g = r + (g-r), i = r - (r-i), z = i - (i-z)
    magnitudes = np.stack([
        r_mag + colours[:, 0] + colours[:, 1], r_mag + colours[:, 1], r_mag,
        r_mag - colours[:, 2], r_mag - colours[:, 2] - colours[:, 3],
    ], axis=1).astype(np.float32)  # [N, C]

    sigma_px = rng.uniform(1.0, 3.0, size=n)
    axis = np.arange(CROP_PIXELS) - (CROP_PIXELS - 1) / 2
    radius2 = axis[None, :, None] ** 2 + axis[None, None, :] ** 2  # [1, H, W]
    profile = np.exp(-radius2 / (2 * sigma_px[:, None, None] ** 2))
    profile /= profile.sum(axis=(1, 2), keepdims=True)  # [N, H, W], sums to 1
    flux = 10 ** ((NANOMAGGY_ZERO_POINT - magnitudes) / 2.5)  # [N, C]
    images = flux[:, :, None, None] * profile[:, None]  # [N, C, H, W]
    images += rng.normal(0.0, SKY_NOISE_NANOMAGGIES, size=images.shape)

    return {
        "images": images.astype(np.float32),
        "magnitudes": magnitudes,
        "redshift": rng.uniform(0.02, 0.3, size=n).astype(np.float32),
        "object_id": np.arange(n, dtype=np.int64),
        "split": np.full(n, 2, dtype=np.uint8),
    }


def dataset_galaxies(location: str, n: int, endpoint_url: str | None = None) -> dict[str, np.ndarray]:
    """Return the first ``n`` galaxies of a data set (cropped to 32x32), repeated if it is smaller.

    ``location`` is a store location with the data set prefix, e.g. ``data/store/datasets/sdss``
    or ``s3://bucket/datasets/sdss``; the prefix contains ``manifest.json`` and ``shards/``.
    """
    from cai_helpers.partition import PARTITION_TENSORS, center_crop
    from cai_helpers.partition_io import iter_dataset_shards
    from cai_helpers.store import open_store

    store = open_store(location, endpoint_url=endpoint_url)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in PARTITION_TENSORS}
    rows = 0
    for _, arrays in iter_dataset_shards(store, ""):
        for name in PARTITION_TENSORS:
            values = arrays[name][: n - rows]
            parts[name].append(center_crop(values, CROP_PIXELS) if name == "images" else values)
        rows += len(parts["object_id"][-1])
        if rows >= n:
            break
    if rows == 0:
        raise InvalidParameterError(f"data set {location} contains no galaxies; build it first (notebook 01)")
    galaxies = {name: np.concatenate(values) for name, values in parts.items()}
    repeats = -(-n // rows)  # ceiling division
    return {name: np.concatenate([values] * repeats)[:n] for name, values in galaxies.items()}


def _has_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def _export_onnx(model, folder: Path) -> None:
    """Write ``astromae.onnx`` with cai_helpers.export, else with torch.onnx.export."""
    path = folder / ONNX_FILES["onnx"]
    try:
        from cai_helpers.export import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        export_onnx(model, path)
        return

    import torch

    logger.warning("cai_helpers.export is not importable; exporting %s with torch.onnx.export", path)
    example = (torch.zeros(2, BANDS, CROP_PIXELS, CROP_PIXELS), torch.full((2, BANDS), 18.0))
    batch_axis = {0: "batch"}
    torch.onnx.export(
        model, example, str(path), input_names=["images", "magnitudes"], output_names=["redshift"],
        dynamic_axes={"images": batch_axis, "magnitudes": batch_axis, "redshift": batch_axis},
        dynamo=False,
    )


def _quantize_int8(folder: Path) -> None:
    """Write ``astromae.int8.onnx`` with cai_helpers.export, else with ORT dynamic quantisation."""
    source, target = folder / ONNX_FILES["onnx"], folder / ONNX_FILES["onnx-int8"]
    try:
        from cai_helpers.export import quantize_int8
    except ImportError:
        quantize_int8 = None
    if quantize_int8 is not None:
        quantize_int8(source, target)
        return

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logger.warning("cai_helpers.export is not importable; quantising %s with quantize_dynamic", target)
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def prepare_model_dir(model_dir: str | Path, work_dir: str | Path, runtimes: tuple[str, ...], *,
                      model=None, small: bool = False, seed: int = 0) -> tuple[Path, dict]:
    """Return a model folder holding every file the runtimes need, and its description.

    ``model_dir`` is used as it is when complete. Otherwise ``work_dir`` receives the
    checkpoint (of ``model`` if given, else of ``model_dir``, else a random AstroMAE,
    ``AstroMAEConfig.small()`` when ``small``) and the missing ONNX files.
    """
    source = Path(model_dir)
    needed = [ONNX_FILES[r] for r in runtimes if r in ONNX_FILES]
    if model is None and _has_checkpoint(source) and all((source / f).is_file() for f in needed):
        return source, {"folder": str(source), "weights": "shipped", "description": f"shipped model in {source}"}

    import torch

    from cai_helpers.checkpoint import load_model, save_model
    from cai_helpers.model import AstroMAE, AstroMAEConfig, count_parameters

    folder = Path(work_dir)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if model is not None:
        weights = "given"
    elif _has_checkpoint(source):
        model, weights = load_model(source), "shipped"
    else:
        torch.manual_seed(seed)
        model = AstroMAE(AstroMAEConfig.small() if small else AstroMAEConfig()).eval()
        weights = "random"
        logger.warning("no checkpoint in %s: benchmarking a randomly initialised %s AstroMAE",
                       source, "small" if small else "full-size")
    model = model.eval()
    save_model(model, folder, dtype=torch.float32)

    reuse = _has_checkpoint(source) and weights == "shipped"
    for runtime in ("onnx", "onnx-int8"):
        name = ONNX_FILES[runtime]
        if name not in needed and not (runtime == "onnx" and ONNX_FILES["onnx-int8"] in needed):
            continue
        if reuse and (source / name).is_file():
            shutil.copy2(source / name, folder / name)
        elif runtime == "onnx":
            _export_onnx(model, folder)
        else:
            _quantize_int8(folder)
    if not _has_checkpoint(folder):
        raise CheckpointError(f"benchmark model folder {folder} is incomplete; check write access")
    description = (f"{weights} weights, {count_parameters(model):,} parameters"
                   f"{' (small config)' if small and weights == 'random' else ''}")
    return folder, {"folder": str(folder), "weights": weights, "description": description,
                    "parameters": count_parameters(model)}


class CompiledTorchPredictor(BatchedPredictor):
    """torch.compile of the checkpoint; the first call per batch shape is timed as compile time."""

    runtime = "torch-compile"

    def __init__(self, model_dir: Path, *, batch_size: int, threads: int, device: str) -> None:
        super().__init__(batch_size)
        import torch

        from cai_helpers.checkpoint import load_model

        torch.set_num_threads(threads)
        self.torch, self.device = torch, torch.device(device)
        self.model = torch.compile(load_model(model_dir).to(self.device).eval(), dynamic=False)

    def predict_batch(self, images: np.ndarray, magnitudes: np.ndarray) -> np.ndarray:
        """Predict z [B]; a batch smaller than ``batch_size`` is padded to it, so the
        compiled graph is reused instead of compiled again for the new shape."""
        torch = self.torch
        rows = len(images)
        if rows < self.batch_size:
            images = np.resize(images, (self.batch_size, *images.shape[1:]))
            magnitudes = np.resize(magnitudes, (self.batch_size, *magnitudes.shape[1:]))
        with torch.inference_mode():
            z = self.model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device),
                           torch.from_numpy(np.ascontiguousarray(magnitudes)).to(self.device))
        return z.float().cpu().numpy()[:rows]


def make_runtime(runtime: str, model_dir: Path, *, batch_size: int, threads: int, device: str):
    """Return a predictor for ``runtime``, built the way the workers build theirs."""
    if runtime == "torch-compile":
        return CompiledTorchPredictor(model_dir, batch_size=batch_size, threads=threads, device=device)
    if runtime == "onnx-int8" and device == "cuda":
        raise InvalidParameterError("the int8 ONNX model uses CPU-only quantised operators; skipped on cuda")
    from cai_helpers.inference import make_predictor

    return make_predictor(runtime, model_dir, batch_size=batch_size, threads=threads, device=device)
