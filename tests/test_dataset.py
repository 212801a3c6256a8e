"""The data set format: splits, shards and manifest on local and S3 stores, checksums, builder."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from cai_helpers.catalog import load_catalog
from cai_helpers.dataset import (
    REALISATION_ID_STRIDE,
    DatasetReader,
    assign_splits,
    build_dataset,
    write_dataset,
)
from cai_helpers.errors import ChecksumError, DataFormatError, ObjectNotFoundError


def _arrays(n: int = 25, size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = 1_000 + np.arange(n, dtype=np.int64)
    return {
        "images": rng.normal(size=(n, 5, size, size)).astype(np.float32),
        "magnitudes": rng.uniform(14, 20, size=(n, 5)).astype(np.float32),
        "magnitude_errors": rng.uniform(0, 0.1, size=(n, 5)).astype(np.float32),
        "redshift": np.where(np.arange(n) % 7 == 3, np.nan, rng.uniform(0, 0.4, n)).astype(np.float32),
        "object_id": ids,
        "split": assign_splits(ids, seed=1),
    }


# --- splits ----------------------------------------------------------------------------

def test_splits_fixed_by_seed_and_id():
    ids = np.arange(100_000_000, 100_010_000, dtype=np.int64)
    splits = assign_splits(ids, seed=42)
    subset = ids[::-7]
    np.testing.assert_array_equal(assign_splits(subset, seed=42), splits[::-7])
    assert not np.array_equal(assign_splits(ids, seed=43), splits)


def test_splits_follow_fractions():
    ids = np.arange(20_000, dtype=np.int64)
    counts = np.bincount(assign_splits(ids, seed=3, fractions=(0.7, 0.2, 0.1)), minlength=3) / len(ids)
    # Binomial standard error at n = 20,000 is below 0.0033; allow 4 of them.
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.013)
    assert assign_splits(ids, seed=3).dtype == np.uint8


# --- round trip --------------------------------------------------------------------------

def _check_round_trip(store, prefix: str):
    arrays = _arrays()
    manifest = write_dataset(store, prefix, arrays, shard_rows=10)
    assert [shard["rows"] for shard in manifest["shards"]] == [10, 10, 5]
    assert manifest["n_rows"] == 25
    assert manifest["splits"] == dict(zip(("train", "validation", "test"),
                                          np.bincount(arrays["split"], minlength=3).tolist()))
    for shard in manifest["shards"]:
        data = store.get(f"{prefix}/{shard['key']}")
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
    assert manifest["shards"][1]["object_id_min"] == 1_010
    assert manifest["shards"][1]["object_id_max"] == 1_019

    reader = DatasetReader(store, prefix)
    assert len(reader) == 25
    assert json.loads(store.get(f"{prefix}/manifest.json")) == reader.manifest
    back = reader.read_all()
    assert sorted(back) == sorted(arrays)
    for name, values in arrays.items():
        np.testing.assert_array_equal(back[name], values)
        assert back[name].dtype == values.dtype


def test_round_trip_local(local_store):
    _check_round_trip(local_store, "datasets/tiny")


def test_round_trip_s3(s3_store):
    _check_round_trip(s3_store, "datasets/tiny")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_shard_detected(local_store, damage):
    write_dataset(local_store, "ds", _arrays(), shard_rows=10)
    key = "ds/shards/shard-00001.safetensors"
    data = bytearray(local_store.get(key))
    if damage == "flip":
        data[-3] ^= 0xFF
    else:
        del data[-4:]
    local_store.put(key, bytes(data))
    shards = DatasetReader(local_store, "ds").iter_shards()
    next(shards)  # shard 0 is intact
    with pytest.raises(ChecksumError, match="shard-00001"):
        next(shards)


def test_corrupted_shard_detected_s3(s3_store):
    write_dataset(s3_store, "ds", _arrays(), shard_rows=10)
    key = "ds/shards/shard-00000.safetensors"
    data = bytearray(s3_store.get(key))
    data[100] ^= 0x01
    s3_store.put(key, bytes(data))
    with pytest.raises(ChecksumError, match="shard-00000"):
        DatasetReader(s3_store, "ds").read_all()


def test_missing_manifest_named(local_store):
    with pytest.raises(ObjectNotFoundError, match="nothing-here/manifest.json"):
        DatasetReader(local_store, "nothing-here")


# --- validation --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(images=a["images"][:, :4]), "4 bands where 5"),
        (lambda a: a.update(images=a["images"].astype(np.float64)), "float64 where float32"),
        (lambda a: a.update(images=np.ascontiguousarray(a["images"].transpose(0, 2, 3, 1))), "channels last"),
        (lambda a: a.update(redshift=a["redshift"][:-1]), "24"),
        (lambda a: a.pop("split"), "missing tensor"),
        (lambda a: a.update(object_id=a["object_id"].astype(np.int32)), "int32 where int64"),
    ],
)
def test_malformed_tensors_rejected(local_store, change, message):
    arrays = _arrays()
    change(arrays)
    with pytest.raises(DataFormatError, match=message):
        write_dataset(local_store, "bad", arrays)
    assert not local_store.exists("bad/manifest.json")


def test_malformed_shard_rejected_on_read(local_store):
    # A shard written by another tool with float64 images but a matching checksum.
    from safetensors.numpy import save

    write_dataset(local_store, "ds", _arrays(n=4), shard_rows=10)
    arrays = _arrays(n=4)
    arrays["images"] = arrays["images"].astype(np.float64)
    data = save(arrays)
    manifest = json.loads(local_store.get("ds/manifest.json"))
    manifest["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    local_store.put("ds/shards/shard-00000.safetensors", data)
    local_store.put("ds/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(DataFormatError, match="shard-00000.*float64 where float32"):
        DatasetReader(local_store, "ds").read_all()


# --- builder ----------------------------------------------------------------------------

def test_build_dataset_realisations(local_store):
    catalog = load_catalog()
    manifest = build_dataset(local_store, "built", catalog, n_galaxies=9, realisations=2, seed=5,
                             shard_rows=7, batch_size=4, progress=False)
    data = DatasetReader(local_store, "built").read_all()
    assert manifest["n_rows"] == 18
    assert data["images"].shape == (18, 5, 64, 64)
    assert len(np.unique(data["object_id"])) == 18

    first, second = data["realisation"] == 0, data["realisation"] == 1
    np.testing.assert_array_equal(data["source_object_id"][first], data["source_object_id"][second])
    np.testing.assert_array_equal(data["object_id"][second], data["source_object_id"][second] + REALISATION_ID_STRIDE)
    np.testing.assert_array_equal(data["split"][first], data["split"][second])
    np.testing.assert_array_equal(data["split"][first], assign_splits(data["source_object_id"][first], seed=5))
    assert not np.allclose(data["images"][first], data["images"][second])

    by_id = catalog.set_index("object_id").loc[data["source_object_id"][first]]
    np.testing.assert_allclose(data["redshift"][first], by_id["z"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(data["magnitudes"][first][:, 2], by_id["mag_r"].to_numpy(), rtol=1e-6)


def test_build_dataset_smaller_set_is_subset(local_store):
    catalog = load_catalog()
    small = build_dataset(local_store, "small", catalog, n_galaxies=3, seed=5, progress=False)
    large = build_dataset(local_store, "large", catalog, n_galaxies=6, seed=5, progress=False)
    a = DatasetReader(local_store, "small").read_all()
    b = DatasetReader(local_store, "large").read_all()
    np.testing.assert_array_equal(a["object_id"], b["object_id"][:3])
    np.testing.assert_array_equal(a["images"], b["images"][:3])
    assert small["n_rows"] == 3
    assert large["n_rows"] == 6
