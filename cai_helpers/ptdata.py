"""Import the CAI paper's pickled ``TensorDataset`` files through a restricted loader.

The original CAI code stores galaxies as ``torch.save(TensorDataset(images, magnitudes,
redshift))``: images float32 [N, C, 32, 32] or [N, 64, 64, C] (channels last),
magnitudes [N, C], redshift [N]. A ``.pt`` file is a pickle, and a plain pickle load runs
any code the file names. This module loads with ``torch.load(weights_only=True)``,
whose unpickler accepts only tensors, plain containers and the globals allowed here
(``TensorDataset``), and turns every refusal into UnsafePickleError.

Shape legend: N rows, C bands, H W pixels.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cai_helpers.catalog import BANDS
from cai_helpers.dataset import DEFAULT_SHARD_ROWS, assign_splits, write_dataset
from cai_helpers.errors import DataFormatError, UnsafePickleError
from cai_helpers.store import Store

log = logging.getLogger(__name__)

PT_IMAGE_SIZES = (32, 64)
PT_OBJECT_ID_BASE = 0  # imported rows get object_id = base + row number in the file


def _unpickler_reason(exc: Exception) -> str:
    """Extract the specific line of torch's weights-only error (e.g. 'Unsupported global: ...')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if line.startswith("Unsupported") or "GLOBAL" in line]
    if specific:
        # torch's line goes on to suggest allow-listing the global, which is the wrong advice here.
        return specific[0].split(". Please", 1)[0].split(" was not an allowed global", 1)[0]
    if lines:
        return lines[-1]
    return type(exc).__name__


def load_pt_tensors(path: str | Path) -> tuple[np.ndarray, ...]:
    """Load the tensors of a pickled TensorDataset (or tuple/list of tensors) safely.

    Returns the tensors as numpy arrays in file order. Raises UnsafePickleError when the
    file requests any global beyond tensors and TensorDataset, and DataFormatError when it
    contains something other than a tensor collection.
    """
    import torch
    from torch.utils.data import TensorDataset

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f".pt file {path} not found; pass the path of a saved TensorDataset")
    try:
        with torch.serialization.safe_globals([TensorDataset]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"{path} was rejected by the restricted loader: it asks for more than tensors and "
            f"TensorDataset ({_unpickler_reason(exc)}). Loading it with weights_only=False would run "
            "that code, so do so only for a file from a trusted author; better, re-save the data "
            "as plain tensors or convert it to the data set format where it was made") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise DataFormatError(f"{path} is not a readable torch file: {exc}") from exc

    tensors: Any = obj.tensors if isinstance(obj, TensorDataset) else obj
    if isinstance(tensors, dict):
        raise DataFormatError(f"{path} contains a dict; expected a TensorDataset(images, magnitudes, redshift)")
    if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise DataFormatError(f"{path} contains a {type(obj).__name__}; "
                              "expected a TensorDataset(images, magnitudes, redshift)")
    return tuple(t.detach().cpu().numpy() for t in tensors)


def pt_to_arrays(tensors: tuple[np.ndarray, ...], *, source: str, seed: int,
                 fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 object_id_base: int = PT_OBJECT_ID_BASE) -> dict[str, np.ndarray]:
    """Convert (images, magnitudes, redshift) to the data set's tensors.

    Images become float32 [N, C, H, W] (channels-last input is transposed); a 64- or
    32-pixel side is kept as it is. The files carry no magnitude errors and no object ids,
    so magnitude_errors is NaN and object_id is ``object_id_base`` + row number.
    """
    if len(tensors) != 3:
        raise DataFormatError(f"{source} contains {len(tensors)} tensors; expected 3 (images, magnitudes, redshift)")
    images, magnitudes, redshift = tensors
    n_bands = len(BANDS)
    n = images.shape[0]

    if images.ndim == 4 and images.shape[1] != n_bands and images.shape[3] == n_bands:
        images = images.transpose(0, 3, 1, 2)  # [N, H, W, C] -> [N, C, H, W]
    if images.ndim != 4 or images.shape[1] != n_bands or images.shape[2] != images.shape[3]:
        raise DataFormatError(f"{source}: images have shape {list(images.shape)}; expected [N, {n_bands}, H, H] "
                              f"or [N, H, H, {n_bands}]")
    if images.shape[2] not in PT_IMAGE_SIZES:
        raise DataFormatError(f"{source}: images are {images.shape[2]} pixels wide; expected one of {PT_IMAGE_SIZES}")
    magnitudes = np.asarray(magnitudes).reshape(len(magnitudes), -1)
    if magnitudes.shape != (n, n_bands):
        raise DataFormatError(f"{source}: magnitudes have shape {list(magnitudes.shape)}; expected [{n}, {n_bands}]")
    redshift = np.asarray(redshift).reshape(-1)
    if redshift.shape != (n,):
        raise DataFormatError(f"{source}: redshift has shape {list(redshift.shape)}; expected [{n}]")

    object_id = object_id_base + np.arange(n, dtype=np.int64)
    return {
        "images": np.ascontiguousarray(images, dtype=np.float32),
        "magnitudes": magnitudes.astype(np.float32),
        "magnitude_errors": np.full((n, n_bands), np.nan, dtype=np.float32),
        "redshift": redshift.astype(np.float32),
        "object_id": object_id,
        "split": assign_splits(object_id, seed=seed, fractions=fractions),
    }


def import_pt_dataset(path: str | Path, store: Store, prefix: str, *, seed: int = 42,
                      fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                      object_id_base: int = PT_OBJECT_ID_BASE,
                      shard_rows: int = DEFAULT_SHARD_ROWS) -> dict[str, Any]:
    """Import a pickled TensorDataset file as a data set under ``prefix``; return the manifest."""
    arrays = pt_to_arrays(load_pt_tensors(path), source=str(path), seed=seed, fractions=fractions,
                          object_id_base=object_id_base)
    log.info("importing %d galaxies (%d x %d pixels) from %s", len(arrays["object_id"]),
             arrays["images"].shape[2], arrays["images"].shape[3], path)
    attributes = {"source_file": Path(path).name, "seed": seed, "split_fractions": list(fractions)}
    return write_dataset(store, prefix, arrays, shard_rows=shard_rows, attributes=attributes)
