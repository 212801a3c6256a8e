"""Partitioning of a data set into inference partitions of a target size in MB.

A partition is one safetensors object with the data set's tensors minus
``magnitude_errors`` and with images center-cropped to 32x32:

    images      float32 [N, C, H, W]  C=5 bands (u, g, r, i, z), H=W=32 pixels, nanomaggies
    magnitudes  float32 [N, C]        dereddened AB magnitudes
    redshift    float32 [N]           spectroscopic z, NaN where unknown
    object_id   int64   [N]
    split       uint8   [N]           0 train, 1 validation, 2 test

Sizes follow the byte model of Staylor et al. 2025 (arXiv:2501.06249), 20,504 B per galaxy (a float32 5x32x32 image,
5 float32 magnitudes and a float32 redshift) with MB = 2**20 B, less a 4 KiB allowance
per partition for the file header, so a 25 MB partition holds at most 1,278 galaxies
and a 100 MB partition 5,113, as in the paper. Without the allowance, 100 MB / 20,504 B
would give 5,114. The byte model leaves out the 9 B per galaxy of object_id and split,
so a stored partition can exceed its target by up to 0.05%. The partitions of one run
have near-equal sizes: ceil(N / capacity) partitions, never many full ones plus a tiny
remainder. ``<out_prefix>/manifest.json`` lists every partition's key, rows, bytes,
sha256 and object-id range.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any, Iterator

import numpy as np

from cai_helpers.errors import ChecksumError, DataFormatError, InvalidParameterError, ObjectNotFoundError
from cai_helpers.partition_io import (
    check_arrays,
    decode_safetensors,
    encode_safetensors,
    iter_dataset_shards,
    dataset_fingerprint,
    dataset_row_count,
)
from cai_helpers.store import Store, join_key

log = logging.getLogger(__name__)

MB = 2**20
BYTES_PER_GALAXY = 20_504  # 5*32*32*4 image + 5*4 magnitudes + 4 redshift
PARTITION_HEADER_ALLOWANCE_BYTES = 4_096
CROP_PIXELS = 32
MANIFEST_NAME = "manifest.json"
PARTITION_FORMAT = "cai-partitions/1"
PARTITION_TENSORS = ("images", "magnitudes", "redshift", "object_id", "split")
MAX_IDS_SHOWN = 5  # object ids quoted in an error message


def galaxies_per_partition(partition_mb: float) -> int:
    """Return how many galaxies fit in ``partition_mb`` MB under the byte model."""
    if not partition_mb > 0:
        raise InvalidParameterError(f"partition_mb must be > 0 MB, got {partition_mb}")
    capacity = (int(partition_mb * MB) - PARTITION_HEADER_ALLOWANCE_BYTES) // BYTES_PER_GALAXY
    if capacity < 1:
        smallest = (BYTES_PER_GALAXY + PARTITION_HEADER_ALLOWANCE_BYTES) / MB
        raise InvalidParameterError(
            f"partition_mb={partition_mb} MB fits no galaxy: one galaxy takes "
            f"{BYTES_PER_GALAXY} B plus a {PARTITION_HEADER_ALLOWANCE_BYTES} B header "
            f"allowance, so use at least {smallest:.4f} MB"
        )
    return capacity


def rows_for_data_size(data_size_mb: float) -> int:
    """Return how many galaxies make ``data_size_mb`` MB under the byte model."""
    if not data_size_mb > 0:
        raise InvalidParameterError(f"data_size_mb must be > 0 MB, got {data_size_mb}")
    return max(1, int(data_size_mb * MB) // BYTES_PER_GALAXY)


def plan_partitions(n_rows: int, partition_mb: float) -> list[tuple[int, int]]:
    """Split rows 0..n_rows into ceil(n_rows / capacity) near-equal [start, stop) ranges.

    Sizes differ by at most one row, and none exceeds the capacity of ``partition_mb``.
    """
    if n_rows < 0:
        raise InvalidParameterError(f"n_rows must be >= 0, got {n_rows}")
    if n_rows == 0:
        return []
    capacity = galaxies_per_partition(partition_mb)
    count = math.ceil(n_rows / capacity)
    base, extra = divmod(n_rows, count)

    ranges = []
    start = 0
    for index in range(count):
        stop = start + base + (1 if index < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def partition_key(out_prefix: str, index: int) -> str:
    """Return the store key of partition ``index`` under ``out_prefix``."""
    return join_key(out_prefix, f"part-{index:05d}.safetensors")


def center_crop(images: np.ndarray, size: int = CROP_PIXELS) -> np.ndarray:
    """Return the central ``size`` x ``size`` pixels of images [N, C, H, W]."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise DataFormatError(f"cannot crop {height}x{width} images to {size}x{size}")
    top = (height - size) // 2
    left = (width - size) // 2
    return np.ascontiguousarray(images[..., top:top + size, left:left + size])


def decode_partition(
    data: bytes,
    *,
    key: str,
    expected_sha256: str | None = None,
    expected_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """Verify and decode one partition object; ``key`` names it in every error.

    Raises ChecksumError when the sha256 differs from the manifest's, and
    DataFormatError when the tensors are missing, mis-shaped or not finite.
    """
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ChecksumError(
                f"partition {key}: sha256 {actual} does not match the manifest's "
                f"{expected_sha256}; the object changed after partitioning, so re-run "
                "partitioning into a fresh prefix"
            )
    arrays = decode_safetensors(data, source=key)
    check_arrays(arrays, source=key, pixels=(CROP_PIXELS,), required=PARTITION_TENSORS)
    rows = len(arrays["object_id"])
    if expected_rows is not None and rows != expected_rows:
        raise DataFormatError(
            f"partition {key}: contains {rows} rows but the manifest lists {expected_rows}; "
            "re-run partitioning into a fresh prefix"
        )
    if rows == 0:
        raise DataFormatError(
            f"partition {key}: has no rows; drop it from the manifest or re-run partitioning into a fresh prefix"
        )
    unique, counts = np.unique(arrays["object_id"], return_counts=True)
    if (counts > 1).any():
        duplicates = unique[counts > 1][:MAX_IDS_SHOWN].tolist()
        raise DataFormatError(
            f"partition {key}: duplicate object_id values {duplicates} within the partition; every "
            "galaxy must appear once, so fix the data set and re-run partitioning into a fresh prefix"
        )
    return arrays


def read_manifest(store: Store, prefix: str) -> dict[str, Any]:
    """Read and check ``<prefix>/manifest.json`` of a partition set."""
    key = join_key(prefix, MANIFEST_NAME)
    try:
        manifest = json.loads(store.get(key))
    except ObjectNotFoundError:
        raise ObjectNotFoundError(
            f"no partition manifest at {store.url_of(key)}: partition a data set there with "
            "write_partitions, or run with dataset_prefix instead of partition_prefix"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"partition manifest {store.url_of(key)} is not valid JSON: {exc}") from exc
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if not isinstance(manifest, dict) or found != PARTITION_FORMAT or "partitions" not in manifest:
        raise DataFormatError(
            f"{store.url_of(key)} is not a partition manifest (format {found!r}, "
            f"expected {PARTITION_FORMAT!r}); create one with write_partitions"
        )
    _check_manifest_entries(manifest["partitions"], store.url_of(key))
    return manifest


def _check_manifest_entries(entries: Any, where: str) -> None:
    """Raise DataFormatError naming the manifest ``where`` unless every entry is usable."""
    if not isinstance(entries, list):
        raise DataFormatError(f"{where}: 'partitions' must be a list of entries, got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        problem = None
        if not isinstance(entry, dict):
            problem = f"it is a {type(entry).__name__}, not an object"
        elif not isinstance(entry.get("key"), str):
            problem = f"'key' must be a string, got {entry.get('key')!r}"
        elif isinstance(entry.get("rows"), bool) or not isinstance(entry.get("rows"), int) or entry["rows"] < 0:
            problem = f"'rows' must be an integer >= 0, got {entry.get('rows')!r}"
        elif not isinstance(entry.get("sha256"), str):
            problem = f"'sha256' must be a hex string, got {entry.get('sha256')!r}"
        if problem:
            raise DataFormatError(
                f"{where}: partition entry {index} is invalid: {problem}; "
                "re-run partitioning into a fresh prefix"
            )


class _RowBuffer:
    """Rows read from shards but not yet written, as a list of array dicts."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, np.ndarray]] = []
        self.rows = 0

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        self.chunks.append(arrays)
        self.rows += len(arrays["object_id"])

    def take(self, rows: int) -> dict[str, np.ndarray]:
        joined = {name: np.concatenate([c[name] for c in self.chunks]) for name in PARTITION_TENSORS}
        head = {name: values[:rows] for name, values in joined.items()}
        tail = {name: values[rows:] for name, values in joined.items()}
        self.chunks = [tail] if len(tail["object_id"]) else []
        self.rows -= rows
        return head


class _DuplicateChecker:
    """Finds object ids already seen in an earlier shard (sorted-array lookup)."""

    def __init__(self) -> None:
        self.ids = np.empty(0, dtype=np.int64)
        self.shard_of = np.empty(0, dtype=np.int64)
        self.shard_names: list[str] = []

    def add(self, object_id: np.ndarray, source: str) -> None:
        unique, counts = np.unique(object_id, return_counts=True)
        if (counts > 1).any():
            dupes = unique[counts > 1][:5].tolist()
            raise DataFormatError(f"shard {source}: duplicate object_id values {dupes} within the shard")
        if len(self.ids):
            where = np.searchsorted(self.ids, unique).clip(0, len(self.ids) - 1)
            hits = self.ids[where] == unique
            if hits.any():
                first = int(unique[hits][0])
                other = self.shard_names[int(self.shard_of[where[hits][0]])]
                raise DataFormatError(
                    f"shard {source}: object_id {first} (and {int(hits.sum()) - 1} more) also "
                    f"appears in shard {other}; every galaxy must be in exactly one shard"
                )
        self.shard_names.append(source)
        ids = np.concatenate([self.ids, unique])
        shard_of = np.concatenate([self.shard_of, np.full(len(unique), len(self.shard_names) - 1)])
        order = np.argsort(ids, kind="stable")
        self.ids, self.shard_of = ids[order], shard_of[order]


def _partition_record(key: str, index: int, data: bytes, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    ids = arrays["object_id"]
    return {
        "index": index,
        "key": key,
        "rows": int(len(ids)),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "object_id_min": int(ids.min()),
        "object_id_max": int(ids.max()),
    }


def _cropped_rows(store: Store, dataset_prefix: str, max_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield validated, cropped rows shard by shard until ``max_rows`` rows are out."""
    duplicates = _DuplicateChecker()
    remaining = max_rows
    for shard_key, arrays in iter_dataset_shards(store, dataset_prefix):
        if remaining <= 0:
            break
        source = store.url_of(shard_key)
        check_arrays(arrays, source=source, pixels=(64, CROP_PIXELS), required=PARTITION_TENSORS)
        duplicates.add(arrays["object_id"], source)
        rows = {name: arrays[name][:remaining] for name in PARTITION_TENSORS}
        rows["images"] = center_crop(rows["images"])
        remaining -= len(rows["object_id"])
        yield rows


def write_partitions(
    store: Store,
    dataset_prefix: str,
    out_prefix: str,
    partition_mb: float,
    *,
    max_rows: int | None = None,
) -> dict[str, Any]:
    """Partition the data set at ``dataset_prefix`` into ``out_prefix``; return the manifest.

    Streams the data set shard by shard, so memory holds at most one partition plus one
    shard. ``max_rows`` keeps only the leading rows (None keeps all). Raises
    DataFormatError naming the shard for a wrong shape or dtype, a non-finite value or
    a duplicate object id. The manifest is written last, so a prefix with a manifest
    holds a complete partition set.
    """
    started = time.perf_counter()
    fingerprint = dataset_fingerprint(store, dataset_prefix)
    n_dataset = dataset_row_count(store, dataset_prefix)
    n_rows = n_dataset if max_rows is None else min(n_dataset, max_rows)
    if n_rows == 0:
        raise DataFormatError(f"data set {store.url_of(dataset_prefix)} has no rows to partition")
    plan = plan_partitions(n_rows, partition_mb)
    log.info("partitioning %d of %d rows from %s into %d partitions of <= %s MB under %s",
             n_rows, n_dataset, dataset_prefix, len(plan), partition_mb, out_prefix)

    buffer = _RowBuffer()
    records: list[dict[str, Any]] = []
    for rows in _cropped_rows(store, dataset_prefix, n_rows):
        buffer.append(rows)
        while len(records) < len(plan) and buffer.rows >= _size(plan[len(records)]):
            records.append(_write_one(store, out_prefix, len(records), buffer.take(_size(plan[len(records)]))))
    if len(records) != len(plan):
        raise DataFormatError(
            f"data set {store.url_of(dataset_prefix)} yielded fewer rows than its manifest "
            f"lists ({n_rows}); rebuild the data set"
        )

    manifest = {
        "format": PARTITION_FORMAT,
        "store": store.uri,
        "dataset_prefix": dataset_prefix,
        "dataset_manifest_sha256": fingerprint,
        "partition_prefix": out_prefix,
        "partition_mb": partition_mb,
        "galaxies_per_partition": galaxies_per_partition(partition_mb),
        "bytes_per_galaxy": BYTES_PER_GALAXY,
        "n_rows": n_rows,
        "n_partitions": len(records),
        "created_at": time.time(),
        "partitions": records,
    }
    store.put(join_key(out_prefix, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    log.info("wrote %d partitions (%d rows) in %.1f s", len(records), n_rows, time.perf_counter() - started)
    return manifest


def _size(bounds: tuple[int, int]) -> int:
    return bounds[1] - bounds[0]


def _write_one(store: Store, out_prefix: str, index: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    key = partition_key(out_prefix, index)
    data = encode_safetensors(arrays)
    store.put(key, data)
    return _partition_record(key, index, data, arrays)
