"""Training arrays for AstroMAE: rendered cutouts of the catalog galaxies, by split.

Training galaxies (split 0) are rendered ``realisations`` times; validation (1) and test
(2) galaxies once, as realisation 0. No validation or test galaxy appears in any training
rendering. Cutouts are rendered at 64x64 pixels and center-cropped to the model's
32x32 input. The arrays are cached in ``<out_dir>/arrays.safetensors`` so a resumed run
renders nothing.

Shape legend: N samples, C channels (bands), H W pixels.
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cai_helpers.errors import DataFormatError

if TYPE_CHECKING:
    from cai_helpers.train import TrainConfig

logger = logging.getLogger(__name__)

RENDER_SIZE = 64  # pixels of the stored cutouts, as in the Pasquet et al. 2019 set
RENDER_CHUNK = 512  # galaxies per rendering task
NMAD_SCALE = 1.4826
SPLIT_TRAIN, SPLIT_VALIDATION, SPLIT_TEST = 0, 1, 2


@dataclass
class TrainArrays:
    """Float32 tensors per split: images [N, C, 32, 32] in nanomaggies per pixel,
    dereddened AB magnitudes [N, 5] and redshift [N]; ``sky_sigma`` [C] is the robust
    per-band pixel noise of the training images (nanomaggies)."""

    train_images: torch.Tensor
    train_mags: torch.Tensor
    train_z: torch.Tensor
    val_images: torch.Tensor
    val_mags: torch.Tensor
    val_z: torch.Tensor
    test_images: torch.Tensor
    test_mags: torch.Tensor
    test_z: torch.Tensor
    test_ids: torch.Tensor
    sky_sigma: torch.Tensor

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        save_file({f.name: getattr(self, f.name).contiguous() for f in fields(self)}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "TrainArrays":
        tensors = load_file(str(path))
        missing = [f.name for f in fields(cls) if f.name not in tensors]
        if missing:
            raise DataFormatError(f"{path} lacks tensors {missing}; delete it to re-render")
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})


def split_codes(object_ids: np.ndarray, seed: int) -> np.ndarray:
    """Return the project's split code per catalog galaxy (0 train, 1 validation, 2 test),
    as ``cai_helpers.dataset.assign_splits`` assigns it for the same seed."""
    from cai_helpers.dataset import assign_splits

    return np.asarray(assign_splits(object_ids, seed=seed), dtype=np.uint8)


def _render_chunk(catalog_path: str, rows: list[int], seed: int, realisation: int,
                  out_path: str, crop: int) -> str:
    """Render catalog rows into a safetensors file (worker process; returns the path)."""
    import torch as worker_torch

    from cai_helpers.catalog import load_catalog
    from cai_helpers.render import render_cutouts

    worker_torch.set_num_threads(1)
    catalog = load_catalog(catalog_path or None).iloc[rows]
    images = render_cutouts(catalog, seed=seed, realisation=realisation, size=RENDER_SIZE,
                            noise=True)
    start = (RENDER_SIZE - crop) // 2
    images = np.ascontiguousarray(images[:, :, start:start + crop, start:start + crop])
    save_file({"images": torch.from_numpy(images)}, out_path)
    return out_path


def render_rows(rows: np.ndarray, realisation: int, seed: int, crop: int, workers: int,
                catalog_path: str = "") -> torch.Tensor:
    """Render catalog rows (positions) in parallel processes; returns [N, C, crop, crop].

    Workers hand their cutouts back as safetensors files, so nothing is pickled
    except the task arguments.
    """
    chunks = [rows[i:i + RENDER_CHUNK].tolist() for i in range(0, len(rows), RENDER_CHUNK)]
    with tempfile.TemporaryDirectory(prefix="cai-render-") as tmp:
        paths = [os.path.join(tmp, f"chunk-{i:05d}.safetensors") for i in range(len(chunks))]
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            done = list(pool.map(_render_chunk, [catalog_path] * len(chunks), chunks,
                                 [seed] * len(chunks), [realisation] * len(chunks), paths,
                                 [crop] * len(chunks)))
        return torch.cat([load_file(path)["images"] for path in done])


def robust_sky_sigma(images: torch.Tensor) -> torch.Tensor:
    """Per-band 1.4826 * MAD of the border pixels [C] (mostly sky in a cutout)."""
    border = torch.cat([images[:, :, :2].flatten(2), images[:, :, -2:].flatten(2)], dim=2)
    values = border.transpose(0, 1).reshape(images.shape[1], -1)  # [C, N * pixels]
    median = values.median(dim=1, keepdim=True).values
    return NMAD_SCALE * (values - median).abs().median(dim=1).values


def build_arrays(cfg: "TrainConfig") -> TrainArrays:
    """Render every split of the catalog (or its first ``max_galaxies`` rows)."""
    from cai_helpers.catalog import MAG_COLUMNS, load_catalog

    catalog = load_catalog()
    if cfg.max_galaxies:
        catalog = catalog.iloc[:cfg.max_galaxies]
    ids = catalog["object_id"].to_numpy()
    splits = split_codes(ids, cfg.split_seed)
    mags = torch.from_numpy(catalog[list(MAG_COLUMNS)].to_numpy(np.float32))
    z = torch.from_numpy(catalog["z"].to_numpy(np.float32))
    crop = cfg.model_config().img_size
    workers = max(1, cfg.num_threads)
    logger.info("rendering %d galaxies (%s) with %d workers", len(catalog),
                np.bincount(splits, minlength=3).tolist(), workers)

    def rows_of(code: int) -> np.ndarray:
        return np.flatnonzero(splits == code)

    train_rows = rows_of(SPLIT_TRAIN)
    train_images = torch.cat([render_rows(train_rows, r, cfg.render_seed, crop, workers)
                              for r in range(cfg.realisations)])
    val_rows, test_rows = rows_of(SPLIT_VALIDATION), rows_of(SPLIT_TEST)
    return TrainArrays(
        train_images=train_images,
        train_mags=mags[train_rows].repeat(cfg.realisations, 1),
        train_z=z[train_rows].repeat(cfg.realisations),
        val_images=render_rows(val_rows, 0, cfg.render_seed, crop, workers),
        val_mags=mags[val_rows], val_z=z[val_rows],
        test_images=render_rows(test_rows, 0, cfg.render_seed, crop, workers),
        test_mags=mags[test_rows], test_z=z[test_rows],
        test_ids=torch.from_numpy(ids[test_rows]),
        sky_sigma=robust_sky_sigma(train_images),
    )


def render_split(code: int, n_galaxies: int, *, render_seed: int = 42, split_seed: int = 42,
                 crop: int = 32, workers: int = 1) -> dict[str, torch.Tensor]:
    """Render the first ``n_galaxies`` catalog galaxies of one split (realisation 0).

    Returns ``images`` [N, C, crop, crop], ``magnitudes`` [N, 5], ``redshift`` [N] and
    ``object_id`` [N]; ``n_galaxies`` 0 means the whole split.
    """
    from cai_helpers.catalog import MAG_COLUMNS, load_catalog

    catalog = load_catalog()
    rows = np.flatnonzero(split_codes(catalog["object_id"].to_numpy(), split_seed) == code)
    if n_galaxies:
        rows = rows[:n_galaxies]
    part = catalog.iloc[rows]
    return {"images": render_rows(rows, 0, render_seed, crop, workers),
            "magnitudes": torch.from_numpy(part[list(MAG_COLUMNS)].to_numpy(np.float32)),
            "redshift": torch.from_numpy(part["z"].to_numpy(np.float32)),
            "object_id": torch.from_numpy(part["object_id"].to_numpy())}


def load_or_build_arrays(cfg: "TrainConfig") -> TrainArrays:
    """Load ``<out_dir>/arrays.safetensors`` if present, else render and cache it."""
    path = Path(cfg.out_dir) / "arrays.safetensors"
    if path.is_file():
        logger.info("using cached training arrays %s", path)
        return TrainArrays.load(path)
    arrays = build_arrays(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays.save(path)
    return arrays


def augment_images(images: torch.Tensor, generator: torch.Generator,
                   noise_sigma: torch.Tensor) -> torch.Tensor:
    """Apply a random flip, a random 90-degree rotation and Gaussian noise per sample.

    ``noise_sigma`` [C] is the per-band noise standard deviation (nanomaggies). The
    transform acts on images only; magnitudes and redshift are invariant under it.
    """
    N = images.shape[0]
    flips = torch.randint(0, 2, (N,), generator=generator)
    turns = torch.randint(0, 4, (N,), generator=generator)
    out = torch.empty_like(images)
    for flip in (0, 1):
        for k in range(4):
            index = torch.nonzero((flips == flip) & (turns == k)).flatten()
            if index.numel() == 0:
                continue
            part = images[index]
            if flip:
                part = part.flip(-1)
            out[index] = torch.rot90(part, k, dims=(-2, -1))
    noise = torch.randn(out.shape, generator=generator) * noise_sigma.view(1, -1, 1, 1)
    return out + noise
