"""The galaxy data set on a store: safetensors shards plus a JSON manifest.

Layout under a prefix::

    manifest.json                       written last, so a listed data set is complete
    shards/shard-00000.safetensors      images, magnitudes, magnitude_errors, redshift,
    shards/shard-00001.safetensors      object_id, split (+ optional source_object_id,
    ...                                 realisation)

Tensors per shard (N rows): images float32 [N, C, H, W] (C = 5 bands u, g, r, i, z,
channels first, H = W, nanomaggies per pixel), magnitudes and magnitude_errors float32
[N, C] (dereddened AB mag), redshift float32 [N] (NaN where unknown), object_id int64
[N], split uint8 [N] (0 train, 1 validation, 2 test). No pickle is involved anywhere.
The manifest lists, per shard, its key relative to the prefix, rows, bytes, sha256 and
object-id range, plus the split counts. Readers verify size and sha256 before parsing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from cai_helpers.catalog import BANDS
from cai_helpers.errors import ChecksumError, DataFormatError, InvalidParameterError, ObjectNotFoundError
from cai_helpers.store import Store, join_key

log = logging.getLogger(__name__)

FORMAT_NAME = "cai-galaxy-dataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_TEMPLATE = "shards/shard-{:05d}.safetensors"
DEFAULT_SHARD_ROWS = 1024  # 80 MiB of 64 x 64 images per shard
PIXEL_SCALE_ARCSEC = 0.396
SPLIT_NAMES = ("train", "validation", "test")  # split value = index
UNITS = {
    "images": "nanomaggies per pixel",
    "magnitudes": "AB mag, dereddened",
    "magnitude_errors": "mag",
    "redshift": "dimensionless (spectroscopic)",
}

# Tensor name -> (dtype, shape after the row axis); images are checked apart.
REQUIRED_TENSORS: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {
    "images": (np.dtype(np.float32), None),
    "magnitudes": (np.dtype(np.float32), (len(BANDS),)),
    "magnitude_errors": (np.dtype(np.float32), (len(BANDS),)),
    "redshift": (np.dtype(np.float32), ()),
    "object_id": (np.dtype(np.int64), ()),
    "split": (np.dtype(np.uint8), ()),
}
OPTIONAL_TENSORS: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {
    "source_object_id": (np.dtype(np.int64), ()),  # catalog id of a re-rendered galaxy
    "realisation": (np.dtype(np.int16), ()),  # rendering index; 0 is the first
}


# --- splits ----------------------------------------------------------------------------

def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fixed, well-mixed 64-bit hash of each uint64 value."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def assign_splits(object_ids: np.ndarray, *, seed: int,
                  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """Assign each object to train (0), validation (1) or test (2), uint8 [N].

    The split of an object is a function of (seed, object_id) alone, so a galaxy lands
    in the same split in every rendering, realisation and data-set size.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise InvalidParameterError(f"invalid split fractions {tuple(fractions)}: "
                                    "expected three non-negative numbers that sum to 1")
    ids = np.asarray(object_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(ids ^ _splitmix64(np.full(ids.shape, seed, dtype=np.uint64)))
    uniform = (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [0, 1)
    return np.searchsorted(np.cumsum(fractions)[:2], uniform, side="right").astype(np.uint8)


# --- validation ------------------------------------------------------------------------

def check_tensors(arrays: dict[str, np.ndarray], *, source: str, image_size: int | None = None) -> int:
    """Raise DataFormatError naming ``source`` unless the tensors follow the format.

    Returns the row count. Checks presence, dtype, shape and one row count for all.
    """
    missing = [name for name in REQUIRED_TENSORS if name not in arrays]
    if missing:
        raise DataFormatError(f"{source}: missing tensor(s) {missing}; found {sorted(arrays)}")
    unknown = [name for name in arrays if name not in REQUIRED_TENSORS and name not in OPTIONAL_TENSORS]
    if unknown:
        raise DataFormatError(f"{source}: unknown tensor(s) {unknown}; allowed are "
                              f"{sorted(REQUIRED_TENSORS) + sorted(OPTIONAL_TENSORS)}")

    rows = len(arrays["object_id"]) if np.ndim(arrays["object_id"]) else -1
    for name, values in arrays.items():
        dtype, tail = {**REQUIRED_TENSORS, **OPTIONAL_TENSORS}[name]
        if values.dtype != dtype:
            raise DataFormatError(f"{source}: tensor {name!r} is {values.dtype} where {dtype} expected; "
                                  f"convert it with .astype(np.{dtype})")
        if values.ndim == 0 or values.shape[0] != rows:
            raise DataFormatError(f"{source}: tensor {name!r} has shape {list(values.shape)} "
                                  f"but object_id has {rows} rows; every tensor needs one row per object")
        if tail is not None and values.shape[1:] != tail:
            raise DataFormatError(f"{source}: tensor {name!r} has shape {list(values.shape)} "
                                  f"where [{rows}, {', '.join(map(str, tail))}] expected")
    _check_images(arrays["images"], source=source, image_size=image_size)
    if (arrays["split"] > len(SPLIT_NAMES) - 1).any():
        raise DataFormatError(f"{source}: split values above {len(SPLIT_NAMES) - 1}; use 0 train, 1 validation, 2 test")
    return rows


def _check_images(images: np.ndarray, *, source: str, image_size: int | None) -> None:
    n_bands = len(BANDS)
    if images.ndim != 4:
        raise DataFormatError(f"{source}: images have {images.ndim} dimensions where 4 [N, {n_bands}, H, W] expected")
    if images.shape[1] != n_bands and images.shape[3] == n_bands:
        raise DataFormatError(f"{source}: images are channels last {list(images.shape)} where channels first "
                              f"[N, {n_bands}, H, W] expected; transpose with images.transpose(0, 3, 1, 2)")
    if images.shape[1] != n_bands:
        raise DataFormatError(f"{source}: images have {images.shape[1]} bands where {n_bands} "
                              f"({', '.join(BANDS)}) expected")
    if images.shape[2] != images.shape[3]:
        raise DataFormatError(f"{source}: images are {images.shape[2]} x {images.shape[3]} pixels "
                              "where square expected")
    if image_size is not None and images.shape[2] != image_size:
        raise DataFormatError(f"{source}: images are {images.shape[2]} pixels wide "
                              f"where the manifest lists {image_size}")


# --- writing ---------------------------------------------------------------------------

def _encode(arrays: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(values) for name, values in arrays.items()})


@dataclass
class DatasetWriter:
    """Writes a data set shard by shard; call :meth:`add` with row blocks, then :meth:`close`.

    At most ``shard_rows`` rows plus one block are held in memory. The manifest is
    written by :meth:`close`, after every shard, so readers never see a partial set.
    """

    store: Store
    prefix: str
    shard_rows: int = DEFAULT_SHARD_ROWS
    attributes: dict[str, Any] = field(default_factory=dict)  # free-form provenance for the manifest

    def __post_init__(self) -> None:
        if self.shard_rows < 1:
            raise InvalidParameterError(f"shard_rows {self.shard_rows} must be at least 1")
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._split_counts = np.zeros(len(SPLIT_NAMES), dtype=np.int64)
        self._tensor_names: list[str] | None = None
        self._image_size: int | None = None

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        """Append a block of rows; full shards are written at once."""
        rows = check_tensors(arrays, source=f"block for {self.prefix}", image_size=self._image_size)
        if self._tensor_names is None:
            self._tensor_names = sorted(arrays)
            self._image_size = arrays["images"].shape[2]
        elif sorted(arrays) != self._tensor_names:
            raise DataFormatError(f"block for {self.prefix} has tensors {sorted(arrays)} "
                                  f"but earlier blocks had {self._tensor_names}")
        self._pending.append(arrays)
        self._pending_rows += rows
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        merged = {name: np.concatenate([block[name] for block in self._pending]) for name in self._tensor_names}
        shard = {name: values[:rows] for name, values in merged.items()}
        rest = {name: values[rows:] for name, values in merged.items()}
        self._pending = [rest] if len(rest["object_id"]) else []
        self._pending_rows -= rows

        key = SHARD_TEMPLATE.format(len(self._shards))
        data = _encode(shard)
        self.store.put(join_key(self.prefix, key), data)
        self._split_counts += np.bincount(shard["split"], minlength=len(SPLIT_NAMES))[:len(SPLIT_NAMES)]
        self._shards.append({
            "key": key,
            "rows": int(rows),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "object_id_min": int(shard["object_id"].min()),
            "object_id_max": int(shard["object_id"].max()),
        })
        log.debug("wrote %s (%d rows, %d bytes)", join_key(self.prefix, key), rows, len(data))

    def close(self) -> dict[str, Any]:
        """Write the last shard and the manifest; return the manifest."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not self._shards:
            raise InvalidParameterError(f"data set {self.prefix} has no rows; add at least one block before close()")
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "bands": list(BANDS),
            "pixel_scale_arcsec": PIXEL_SCALE_ARCSEC,
            "image_size": self._image_size,
            "units": UNITS,
            "tensors": self._tensor_names,
            "n_rows": sum(shard["rows"] for shard in self._shards),
            "splits": {name: int(count) for name, count in zip(SPLIT_NAMES, self._split_counts)},
            "shards": self._shards,
            "attributes": self.attributes,
        }
        self.store.put(join_key(self.prefix, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
        log.info("wrote data set %s: %d rows in %d shards, splits %s",
                 self.store.url_of(join_key(self.prefix, MANIFEST_NAME)), manifest["n_rows"], len(self._shards),
                 manifest["splits"])
        return manifest


def write_dataset(store: Store, prefix: str, arrays: dict[str, np.ndarray], *,
                  shard_rows: int = DEFAULT_SHARD_ROWS, attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write in-memory tensors as a data set under ``prefix``; return the manifest."""
    writer = DatasetWriter(store, prefix, shard_rows=shard_rows, attributes=attributes or {})
    writer.add(arrays)
    return writer.close()


# --- reading ---------------------------------------------------------------------------

class DatasetReader:
    """Reads a data set shard by shard, verifying size, sha256, dtypes and shapes."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        key = join_key(prefix, MANIFEST_NAME)
        try:
            raw = store.get(key)
        except ObjectNotFoundError as exc:
            raise ObjectNotFoundError(f"no data set at {store.url_of(key)}: manifest missing; "
                                      "build it with cai_helpers.dataset.build_dataset (notebook 01)") from exc
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataFormatError(f"data set manifest {store.url_of(key)} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise DataFormatError(f"{store.url_of(key)} is not a {FORMAT_NAME} manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise DataFormatError(f"{store.url_of(key)} has format version {manifest.get('version')}; "
                                  f"this reader reads version {FORMAT_VERSION}")
        self.manifest: dict[str, Any] = manifest

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def read_shard(self, entry: dict[str, Any]) -> dict[str, np.ndarray]:
        """Fetch, verify and parse one shard listed in the manifest."""
        from safetensors.numpy import load

        key = join_key(self.prefix, entry["key"])
        where = self.store.url_of(key)
        data = self.store.get(key)
        if len(data) != entry["bytes"]:
            raise ChecksumError(f"shard {where} has {len(data)} bytes where the manifest lists {entry['bytes']}; "
                                "the shard is truncated or replaced, so rebuild the data set")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ChecksumError(f"shard {where} has sha256 {digest} where the manifest lists {entry['sha256']}; "
                                "the shard is corrupted, so rebuild the data set")
        try:
            arrays = load(data)
        except Exception as exc:  # safetensors raises SafetensorError or ValueError
            raise DataFormatError(f"shard {where} is not a readable safetensors file: {exc}") from exc
        rows = check_tensors(arrays, source=f"shard {where}", image_size=self.manifest["image_size"])
        if rows != entry["rows"]:
            raise DataFormatError(f"shard {where} has {rows} rows where the manifest lists {entry['rows']}")
        return arrays

    def iter_shards(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield each shard's tensors in manifest order, one shard in memory at a time."""
        for entry in self.manifest["shards"]:
            yield self.read_shard(entry)

    def read_all(self) -> dict[str, np.ndarray]:
        """Read every shard and concatenate the tensors (the whole set in memory)."""
        shards = list(self.iter_shards())
        return {name: np.concatenate([shard[name] for shard in shards]) for name in shards[0]}


# --- building from the catalog ---------------------------------------------------------

REALISATION_ID_STRIDE = 10**12  # object_id of realisation r = catalog object_id + r * stride


def select_galaxies(catalog, n_galaxies: int | None, *, seed: int):
    """Return ``n_galaxies`` catalog rows (all when None) in a seeded random order.

    The first n rows of the order are the same for every n, so a smaller data set is a
    subset of a larger one with the same seed.
    """
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1EC7])).permutation(len(catalog))
    if n_galaxies is not None:
        if not 1 <= n_galaxies <= len(catalog):
            raise InvalidParameterError(f"invalid n_galaxies {n_galaxies}: expected None or a number "
                                        f"in [1, {len(catalog)}] (the catalog size)")
        order = order[:n_galaxies]
    return catalog.iloc[order].reset_index(drop=True)


def build_dataset(store: Store, prefix: str, catalog, *, n_galaxies: int | None = None, realisations: int = 1,
                  seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  shard_rows: int = DEFAULT_SHARD_ROWS, batch_size: int = 256, workers: int = 1,
                  progress: bool = True) -> dict[str, Any]:
    """Render catalog galaxies and write them as a data set under ``prefix``; return the manifest.

    Each realisation renders every selected galaxy again with new orientation, size
    scatter, offset, seeing and noise. Rows of realisation r get object_id + r * 10**12
    and keep the catalog id in ``source_object_id`` and the split of the catalog galaxy. Renders
    ``workers`` batches of ``batch_size`` at a time (one thread each) and writes shards as
    it goes, so memory stays near one shard.
    """
    from tqdm.auto import tqdm

    from cai_helpers.catalog import MAG_COLUMNS, MAGERR_COLUMNS
    from cai_helpers.render import render_cutouts

    if realisations < 1:
        raise InvalidParameterError(f"realisations {realisations} must be at least 1")
    galaxies = select_galaxies(catalog, n_galaxies, seed=seed)
    source_ids = galaxies["object_id"].to_numpy(np.int64)
    if source_ids.min() < 0 or source_ids.max() >= REALISATION_ID_STRIDE:
        raise InvalidParameterError(f"catalog object ids must lie in [0, {REALISATION_ID_STRIDE}) "
                                    "so that realisation ids stay unique")
    splits = assign_splits(source_ids, seed=seed, fractions=fractions)
    attributes = {"seed": seed, "realisations": realisations, "split_fractions": list(fractions),
                  "n_catalog_galaxies": len(galaxies), "renderer": "cai_helpers.render.render_cutouts"}
    writer = DatasetWriter(store, prefix, shard_rows=shard_rows, attributes=attributes)

    total = len(galaxies) * realisations
    chunk = batch_size * max(workers, 1)
    with tqdm(total=total, desc=f"render {prefix}", unit="galaxy", disable=not progress) as bar:
        for realisation in range(realisations):
            for start in range(0, len(galaxies), chunk):
                part = galaxies.iloc[start:start + chunk]
                rows = slice(start, start + len(part))
                images = render_cutouts(part, seed=seed, realisation=realisation, batch_size=batch_size,
                                        workers=workers)
                writer.add({
                    "images": images,
                    "magnitudes": part[list(MAG_COLUMNS)].to_numpy(np.float32),
                    "magnitude_errors": part[list(MAGERR_COLUMNS)].to_numpy(np.float32),
                    "redshift": part["z"].to_numpy(np.float32),
                    "object_id": source_ids[rows] + realisation * REALISATION_ID_STRIDE,
                    "split": splits[rows],
                    "source_object_id": source_ids[rows],
                    "realisation": np.full(len(part), realisation, dtype=np.int16),
                })
                bar.update(len(part))
    return writer.close()
