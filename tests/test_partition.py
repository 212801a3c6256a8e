"""Partition planning, streaming partition writes and partition decoding."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from safetensors.numpy import save

from cai_helpers.errors import ChecksumError, DataFormatError, InvalidParameterError
from cai_helpers.partition import (
    BYTES_PER_GALAXY,
    center_crop,
    decode_partition,
    galaxies_per_partition,
    plan_partitions,
    read_manifest,
    rows_for_data_size,
    write_partitions,
)
from fanout_fixtures import make_dataset_arrays, write_dataset

PAPER_GALAXIES = 659_857


@pytest.mark.parametrize(
    "partition_mb, capacity",
    # floor((mb * 2**20 - 4,096) / 20,504), computed by hand.
    # 1,278 and 5,113 are the counts the CAI paper reports for 25 and 100 MB.
    [(25, 1_278), (50, 2_556), (75, 3_835), (100, 5_113)],
)
def test_capacity_matches_byte_model(partition_mb, capacity):
    assert galaxies_per_partition(partition_mb) == capacity
    assert capacity * BYTES_PER_GALAXY + 4_096 <= partition_mb * 2**20
    assert (capacity + 1) * BYTES_PER_GALAXY + 4_096 > partition_mb * 2**20


def test_paper_data_set_partition_counts():
    plan = plan_partitions(PAPER_GALAXIES, 25)
    assert len(plan) == 517
    assert len(plan_partitions(PAPER_GALAXIES, 100)) == math.ceil(PAPER_GALAXIES / 5_113)


@pytest.mark.parametrize("n_rows", [1, 2, 1_277, 1_278, 1_279, 2_557, 10_000, PAPER_GALAXIES])
@pytest.mark.parametrize("partition_mb", [25, 50, 100, 0.05])
def test_plan_covers_rows_once_balanced(n_rows, partition_mb):
    plan = plan_partitions(n_rows, partition_mb)
    capacity = galaxies_per_partition(partition_mb)
    sizes = [stop - start for start, stop in plan]

    assert plan[0][0] == 0
    assert plan[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    assert len(plan) == math.ceil(n_rows / capacity)
    assert max(sizes) <= capacity
    assert max(sizes) - min(sizes) <= 1


def test_plan_of_zero_rows_is_empty():
    assert plan_partitions(0, 25) == []


@pytest.mark.parametrize("partition_mb", [0, -1, 0.01])
def test_plan_rejects_sizes_below_one_galaxy(partition_mb):
    with pytest.raises(InvalidParameterError):
        plan_partitions(10, partition_mb)


def test_rows_for_data_size():
    assert rows_for_data_size(25) == 1_278  # 26,214,400 // 20,504; no header allowance
    assert rows_for_data_size(1) == 51  # 1,048,576 // 20,504


def test_center_crop_takes_middle_pixels():
    images = np.arange(2 * 5 * 64 * 64, dtype=np.float32).reshape(2, 5, 64, 64)
    cropped = center_crop(images)
    assert cropped.shape == (2, 5, 32, 32)
    np.testing.assert_array_equal(cropped, images[:, :, 16:48, 16:48])


def test_write_partitions_streams_and_covers(local_store):
    # 0.2 MB fits 10 galaxies; 47 rows in uneven shards -> 5 partitions of 9-10 rows
    source = write_dataset(local_store, "ds", [13, 20, 3, 11])
    manifest = write_partitions(local_store, "ds", "parts/p", 0.2)

    assert manifest["n_partitions"] == 5
    assert [p["rows"] for p in manifest["partitions"]] == [10, 10, 9, 9, 9]
    assert read_manifest(local_store, "parts/p") == json.loads(json.dumps(manifest))

    ids = []
    for record in manifest["partitions"]:
        data = local_store.get(record["key"])
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        assert record["bytes"] == len(data)
        arrays = decode_partition(data, key=record["key"], expected_sha256=record["sha256"])
        assert set(arrays) == {"images", "magnitudes", "redshift", "object_id", "split"}
        assert arrays["images"].shape[1:] == (5, 32, 32)
        assert record["object_id_min"] == arrays["object_id"].min()
        assert record["object_id_max"] == arrays["object_id"].max()
        ids.append(arrays["object_id"])

        rows = np.searchsorted(source["object_id"], arrays["object_id"])
        np.testing.assert_array_equal(arrays["images"], source["images"][rows, :, 16:48, 16:48])
        np.testing.assert_array_equal(arrays["magnitudes"], source["magnitudes"][rows])
        np.testing.assert_array_equal(arrays["redshift"], source["redshift"][rows])
        np.testing.assert_array_equal(arrays["split"], source["split"][rows])

    all_ids = np.concatenate(ids)
    assert len(all_ids) == 47
    assert len(np.unique(all_ids)) == 47


def test_write_partitions_counts_rows_without_manifest_count(local_store):
    write_dataset(local_store, "ds", [5, 6], with_count=False)
    manifest = write_partitions(local_store, "ds", "parts", 25)
    assert manifest["n_rows"] == 11
    assert [p["rows"] for p in manifest["partitions"]] == [11]


def test_write_partitions_max_rows(local_store):
    write_dataset(local_store, "ds", [8, 8])
    manifest = write_partitions(local_store, "ds", "parts", 0.2, max_rows=12)
    assert manifest["n_rows"] == 12
    assert [p["rows"] for p in manifest["partitions"]] == [6, 6]
    last = decode_partition(local_store.get(manifest["partitions"][-1]["key"]), key="last")
    assert last["object_id"].max() == 1011


def test_write_partitions_to_s3(s3_store):
    write_dataset(s3_store, "ds", [4, 4])
    manifest = write_partitions(s3_store, "ds", "parts", 0.2)
    assert manifest["n_rows"] == 8
    assert s3_store.exists("parts/manifest.json")


def _put_shard(store, name, arrays):
    store.put(f"ds/shards/{name}.safetensors", save(arrays))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda a: a["images"].__setitem__((3, 1, 5, 5), np.nan), "invalid images"),
        (lambda a: a["magnitudes"].__setitem__((2, 0), np.inf), "invalid magnitudes"),
        (lambda a: a.__setitem__("images", a["images"][:, :4]), "expected [N, 5, H, H]"),
        (lambda a: a.__setitem__("images", a["images"][:, :, :48, :48]), "expected [N, 5, H, H]"),
        (lambda a: a.__setitem__("images", a["images"].astype(np.float64)), "dtype float64"),
        (lambda a: a.__setitem__("object_id", np.full(6, 7, dtype=np.int64)), "duplicate object_id"),
        (lambda a: a.pop("split"), "missing tensor"),
    ],
)
def test_bad_shard_is_named(local_store, corrupt, message):
    good = make_dataset_arrays(6, first_id=0)
    bad = make_dataset_arrays(6, first_id=100, seed=1)
    corrupt(bad)
    _put_shard(local_store, "shard-00000", good)
    _put_shard(local_store, "shard-00001", bad)
    local_store.put("ds/manifest.json", json.dumps({"n_rows": 12}).encode())

    with pytest.raises(DataFormatError) as caught:
        write_partitions(local_store, "ds", "parts", 25)
    assert "shard-00001" in str(caught.value)
    assert message in str(caught.value)
    assert not local_store.exists("parts/manifest.json")


def test_duplicate_across_shards_names_both(local_store):
    _put_shard(local_store, "shard-00000", make_dataset_arrays(6, first_id=0))
    _put_shard(local_store, "shard-00001", make_dataset_arrays(6, first_id=4))
    local_store.put("ds/manifest.json", json.dumps({"n_rows": 12}).encode())
    with pytest.raises(DataFormatError, match="shard-00001.*object_id 4.*shard-00000"):
        write_partitions(local_store, "ds", "parts", 25)


def test_decode_partition_rejects_checksum_mismatch():
    arrays = make_dataset_arrays(3, pixels=32)
    arrays.pop("magnitude_errors")
    data = save(arrays)
    with pytest.raises(ChecksumError, match="part-7"):
        decode_partition(data, key="part-7", expected_sha256="0" * 64)


def test_decode_partition_rejects_garbage():
    with pytest.raises(DataFormatError, match="part-9"):
        decode_partition(b"not a safetensors file", key="part-9")


def test_decode_partition_rejects_64_pixel_images():
    arrays = make_dataset_arrays(3, pixels=64)
    with pytest.raises(DataFormatError, match="images have shape"):
        decode_partition(save(arrays), key="p")


def test_partitions_from_dataset_module(local_store):
    dataset = pytest.importorskip("cai_helpers.dataset")
    arrays = make_dataset_arrays(30, first_id=500)
    dataset.write_dataset(local_store, "real", arrays, shard_rows=8)
    manifest = write_partitions(local_store, "real", "parts", 0.2)
    assert [p["rows"] for p in manifest["partitions"]] == [10, 10, 10]
    first = decode_partition(local_store.get(manifest["partitions"][0]["key"]), key="first")
    np.testing.assert_array_equal(first["images"], arrays["images"][:10, :, 16:48, 16:48])


def test_corrupted_dataset_shard_fails_checksum(local_store):
    dataset = pytest.importorskip("cai_helpers.dataset")
    dataset.write_dataset(local_store, "real", make_dataset_arrays(12), shard_rows=6)
    key = "real/shards/shard-00001.safetensors"
    data = bytearray(local_store.get(key))
    data[-1] ^= 0xFF
    local_store.put(key, bytes(data))
    with pytest.raises(ChecksumError, match="shard-00001"):
        write_partitions(local_store, "real", "parts", 25)
