"""Reading and checking the tensors of data set shards and partitions.

Shards follow the data set format: ``<prefix>/manifest.json`` plus
``<prefix>/shards/shard-NNNNN.safetensors``. This module reads them from a store, one
shard at a time, and checks every tensor before the partitioner or an executor uses it. Shape legend: N rows, C bands, H W pixels.
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Any, Iterable, Iterator

import numpy as np

from cai_helpers.errors import DataFormatError, ObjectNotFoundError
from cai_helpers.store import Store, join_key

log = logging.getLogger(__name__)

N_BANDS = 5
MAX_SPLIT_VALUE = 2  # 0 train, 1 validation, 2 test
SHARD_FOLDER = "shards"
SHARD_SUFFIX = ".safetensors"
SAFETENSORS_HEADER_BYTES = 8  # little-endian u64 length of the JSON header
MAX_BAD_ROWS_SHOWN = 5

# Each tensor's dtype and the shape after the row axis (None: checked apart).
EXPECTED_TENSORS: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {
    "images": (np.dtype(np.float32), None),
    "magnitudes": (np.dtype(np.float32), (N_BANDS,)),
    "magnitude_errors": (np.dtype(np.float32), (N_BANDS,)),
    "redshift": (np.dtype(np.float32), ()),
    "object_id": (np.dtype(np.int64), ()),
    "split": (np.dtype(np.uint8), ()),
}


def encode_safetensors(arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise named numpy arrays to safetensors bytes (no pickle involved)."""
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(values) for name, values in arrays.items()})


def decode_safetensors(data: bytes, *, source: str) -> dict[str, np.ndarray]:
    """Parse safetensors bytes; raise DataFormatError naming ``source`` if unreadable."""
    from safetensors.numpy import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError or ValueError
        raise DataFormatError(
            f"{source} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "rewrite it from its source"
        ) from exc


def safetensors_rows(data: bytes, *, source: str, tensor: str = "object_id") -> int:
    """Return the leading dimension of ``tensor`` from a safetensors header alone."""
    try:
        (length,) = struct.unpack("<Q", data[:SAFETENSORS_HEADER_BYTES])
        header = json.loads(data[SAFETENSORS_HEADER_BYTES:SAFETENSORS_HEADER_BYTES + length])
        return int(header[tensor]["shape"][0])
    except (struct.error, ValueError, KeyError, IndexError, TypeError) as exc:
        raise DataFormatError(f"{source}: cannot read the row count of {tensor!r} from the header") from exc


def check_arrays(
    arrays: dict[str, np.ndarray],
    *,
    source: str,
    pixels: Iterable[int],
    required: Iterable[str],
) -> None:
    """Raise DataFormatError naming ``source`` unless the tensors are well formed.

    Checks presence, dtype and shape of every tensor (images [N, C, H, W] with C=5 and
    H=W in ``pixels``), one row count for all, finite images and magnitudes, redshift
    finite or NaN, and split values 0-2.
    """
    missing = [name for name in required if name not in arrays]
    if missing:
        raise DataFormatError(f"{source}: missing tensor(s) {missing}; found {sorted(arrays)}")
    allowed_pixels = tuple(pixels)

    rows = len(arrays["object_id"])
    for name, values in arrays.items():
        if name not in EXPECTED_TENSORS:
            continue
        dtype, tail = EXPECTED_TENSORS[name]
        if values.dtype != dtype:
            raise DataFormatError(f"{source}: tensor {name!r} has dtype {values.dtype}, expected {dtype}")
        if values.ndim == 0 or values.shape[0] != rows:
            raise DataFormatError(
                f"{source}: tensor {name!r} has shape {values.shape} but object_id has {rows} rows"
            )
        if tail is not None and values.shape[1:] != tail:
            raise DataFormatError(
                f"{source}: tensor {name!r} has shape {values.shape}, expected [{rows}, {', '.join(map(str, tail))}]"
            )

    images = arrays["images"]
    ok_shape = images.ndim == 4 and images.shape[1] == N_BANDS and images.shape[2] == images.shape[3]
    if not ok_shape or images.shape[2] not in allowed_pixels:
        raise DataFormatError(
            f"{source}: images have shape {images.shape}, expected [N, {N_BANDS}, H, H] "
            f"with H in {allowed_pixels} (bands u, g, r, i, z, channels first)"
        )

    ids = arrays["object_id"]
    _report_bad_rows(source, "images", ids, ~np.isfinite(images).all(axis=(1, 2, 3)))
    _report_bad_rows(source, "magnitudes", ids, ~np.isfinite(arrays["magnitudes"]).all(axis=1))
    _report_bad_rows(source, "redshift (inf)", ids, np.isinf(arrays["redshift"]))
    _report_bad_rows(source, "split (> 2)", ids, arrays["split"] > MAX_SPLIT_VALUE)


def _report_bad_rows(source: str, what: str, ids: np.ndarray, bad: np.ndarray) -> None:
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    shown = ", ".join(f"row {r} (object_id {int(ids[r])})" for r in rows[:MAX_BAD_ROWS_SHOWN])
    raise DataFormatError(
        f"{source}: {len(rows)} row(s) with invalid {what} values, e.g. {shown}; "
        "fix or drop these rows in the data set"
    )


def shard_keys(store: Store, dataset_prefix: str) -> list[str]:
    """Return the data set's shard keys in order; raise if there are none."""
    keys = [k for k in store.list(join_key(dataset_prefix, SHARD_FOLDER) + "/") if k.endswith(SHARD_SUFFIX)]
    if not keys:
        raise DataFormatError(
            f"no shards under {store.url_of(join_key(dataset_prefix, SHARD_FOLDER))}; "
            "build the data set first (notebook 01)"
        )
    return keys


def iter_dataset_shards(store: Store, dataset_prefix: str) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Yield (shard key, tensors) for each shard of the data set, one in memory at a time.

    A ``cai-galaxy-dataset`` manifest is read through ``cai_helpers.dataset.DatasetReader``,
    which verifies each shard's size and sha256; otherwise the shards under
    ``<prefix>/shards/`` are read in key order.
    """
    from cai_helpers.dataset import FORMAT_NAME, DatasetReader

    if _read_manifest(store, dataset_prefix).get("format") == FORMAT_NAME:
        reader = DatasetReader(store, dataset_prefix)
        for entry in reader.manifest["shards"]:
            yield join_key(dataset_prefix, entry["key"]), reader.read_shard(entry)
        return
    for key in shard_keys(store, dataset_prefix):
        yield key, decode_safetensors(store.get(key), source=store.url_of(key))


def _read_manifest(store: Store, dataset_prefix: str) -> dict[str, Any]:
    """Return the data set's manifest.json, or {} when it has none."""
    key = join_key(dataset_prefix, "manifest.json")
    try:
        manifest = json.loads(store.get(key))
    except ObjectNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"data set manifest {store.url_of(key)} is not valid JSON: {exc}") from exc
    return manifest if isinstance(manifest, dict) else {}


def _manifest_rows(manifest: dict[str, Any]) -> int | None:
    for name in ("n_rows", "rows", "n_galaxies", "n_objects"):
        if isinstance(manifest.get(name), int):
            return manifest[name]
    shards = manifest.get("shards")
    if isinstance(shards, list) and shards and all(isinstance(s, dict) for s in shards):
        for name in ("rows", "n_rows"):
            if all(isinstance(s.get(name), int) for s in shards):
                return sum(s[name] for s in shards)
    return None


def dataset_fingerprint(store: Store, dataset_prefix: str) -> str | None:
    """Return the sha256 of the data set's manifest.json, or None when it has none.

    Rebuilding a data set rewrites its manifest (new shard checksums or row counts), so
    partitions cut from an older build can be recognised and not reused.
    """
    import hashlib

    try:
        return hashlib.sha256(store.get(join_key(dataset_prefix, "manifest.json"))).hexdigest()
    except ObjectNotFoundError:
        return None


def dataset_row_count(store: Store, dataset_prefix: str) -> int:
    """Return the number of rows in a data set, from its manifest or the shard headers."""
    manifest = _read_manifest(store, dataset_prefix)
    rows = _manifest_rows(manifest)
    if rows is not None:
        return rows
    # NOTE: without a row count in the manifest every shard is read twice.
    log.info("data set %s has no row count in its manifest; reading shard headers", dataset_prefix)
    return sum(safetensors_rows(store.get(k), source=store.url_of(k)) for k in shard_keys(store, dataset_prefix))
