"""Bad input: malformed partitions and manifests, invalid run parameters, partitions too
large for the worker memory, and broken model checkpoints.

A bad partition must fail alone: the run's other partitions finish, and the summary's
``failed_partitions`` names the bad one with a reason that names its key. Input that
makes the whole run impossible must be rejected before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cai_helpers.errors import CAIError, CheckpointError, DataFormatError, InvalidParameterError
from cai_helpers.handlers import plan_key, predictions_key
from cai_helpers.launcher import run
from cai_helpers.runconfig import RunParams
from fanout_fixtures import write_dataset, write_tiny_onnx
from fault_fixtures import encode, partition_arrays, read_catalog, run_handlers, write_partition_set

ROWS = 10
FIRST_IDS = (1000, 2000, 3000)  # object ids of partitions 0, 1 and 2
BAD_KEY = "parts/part-00001.safetensors"


@pytest.fixture
def model_dir(tmp_path):
    write_tiny_onnx(tmp_path / "model")
    return str(tmp_path / "model")


def _params(store, model_dir, **overrides) -> RunParams:
    values = dict(store=store.uri, partition_prefix="parts", model_dir=model_dir, batch_size=4, max_concurrency=2)
    values.update(overrides)
    return RunParams(**values)


def _good(index: int) -> dict[str, np.ndarray]:
    return partition_arrays(ROWS, first_id=FIRST_IDS[index], seed=index)


def _with(index: int, **changes) -> dict[str, np.ndarray]:
    arrays = _good(index)
    arrays.update(changes)
    return arrays


def _nan_pixel() -> dict[str, np.ndarray]:
    arrays = _good(1)
    arrays["images"][3, 2, 5, 7] = np.nan
    return arrays


def _inf_magnitude() -> dict[str, np.ndarray]:
    arrays = _good(1)
    arrays["magnitudes"][2, 1] = np.inf
    return arrays


def _duplicate_ids() -> dict[str, np.ndarray]:
    arrays = _good(1)
    arrays["object_id"][4] = arrays["object_id"][3]
    return arrays


def _empty() -> dict[str, np.ndarray]:
    return {name: values[:0] for name, values in _good(1).items()}


def _without(name: str) -> dict[str, np.ndarray]:
    arrays = _good(1)
    del arrays[name]
    return arrays


GOOD_BYTES = encode(_good(1))
GOOD_SHA = hashlib.sha256(GOOD_BYTES).hexdigest()
CHANGED = _good(1)
CHANGED["images"][0, 0, 0, 0] += 1.0

# case -> (bytes of partition 1, rows its manifest lists, sha256 its manifest lists or
# None for that of the bytes, text the failure reason must contain)
BAD_PARTITIONS = {
    "truncated": (GOOD_BYTES[:-100], ROWS, GOOD_SHA, "ChecksumError"),
    "corrupt": (b"\x93NUMPY garbage that is no safetensors file" * 20, ROWS, None, "not a readable safetensors file"),
    "checksum_mismatch": (encode(CHANGED), ROWS, GOOD_SHA, "does not match the manifest"),
    "four_bands": (encode(_with(1, images=_good(1)["images"][:, :4])), ROWS, None, "images have shape (10, 4, 32, 32)"),
    "31_pixels": (encode(_with(1, images=_good(1)["images"][:, :, :31, :31])), ROWS, None, "(10, 5, 31, 31)"),
    "channels_last": (encode(_with(1, images=np.ascontiguousarray(_good(1)["images"].transpose(0, 2, 3, 1)))),
                      ROWS, None, "channels first"),
    "float64_images": (encode(_with(1, images=_good(1)["images"].astype(np.float64))), ROWS, None, "dtype float64"),
    "int16_images": (encode(_with(1, images=_good(1)["images"].astype(np.int16))), ROWS, None, "dtype int16"),
    "float64_magnitudes": (encode(_with(1, magnitudes=_good(1)["magnitudes"].astype(np.float64))), ROWS, None,
                           "'magnitudes' has dtype float64"),
    "nan_pixels": (encode(_nan_pixel()), ROWS, None, "invalid images values, e.g. row 3 (object_id 2003)"),
    "inf_magnitudes": (encode(_inf_magnitude()), ROWS, None, "invalid magnitudes values, e.g. row 2 (object_id 2002)"),
    "missing_tensor": (encode(_without("magnitudes")), ROWS, None, "missing tensor(s) ['magnitudes']"),
    "rows_differ_from_manifest": (GOOD_BYTES, ROWS - 1, None, "contains 10 rows but the manifest lists 9"),
    "empty": (encode(_empty()), 0, None, "has no rows"),
    "duplicate_ids_within": (encode(_duplicate_ids()), ROWS, None, "duplicate object_id"),
    "not_written": (None, ROWS, None, "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARTITIONS))
def test_bad_partition_fails_alone(local_store, model_dir, case):
    data, rows, sha256, reason = BAD_PARTITIONS[case]
    write_partition_set(local_store, "parts", [encode(_good(0)), data, encode(_good(2))],
                        rows=[ROWS, rows, ROWS], sha256=[None, sha256, None])

    summary = run_handlers(_params(local_store, model_dir))

    failed = summary["failed_partitions"]
    assert [f["partition"] for f in failed] == ["part-00001"]
    assert reason in failed[0]["reason"]
    assert BAD_KEY in failed[0]["reason"], "the reason does not name the partition's key"
    assert summary["status"] == "failed"  # no failure is tolerated by default
    expected_ids = [*range(FIRST_IDS[0], FIRST_IDS[0] + ROWS), *range(FIRST_IDS[2], FIRST_IDS[2] + ROWS)]
    assert read_catalog(local_store, summary["run_id"])["object_id"] == expected_ids
    assert not local_store.exists(predictions_key(summary["run_id"], "part-00001"))


@pytest.mark.parametrize("key", ["../outside/part-00001.safetensors", "/tmp/part-00001.safetensors"])
def test_partition_key_outside_store_fails_alone(tmp_path, local_store, model_dir, key):
    # a readable partition waits outside the root, so a store that followed the key would succeed
    outside = local_store.root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "part-00001.safetensors").write_bytes(GOOD_BYTES)
    write_partition_set(local_store, "parts", [encode(_good(0)), None, encode(_good(2))], rows=[ROWS] * 3,
                        keys=["parts/part-00000.safetensors", key, "parts/part-00002.safetensors"])

    summary = run_handlers(_params(local_store, model_dir))

    failed = summary["failed_partitions"]
    assert [f["key"] for f in failed] == [key]
    assert "InvalidKeyError" in failed[0]["reason"]
    assert key in failed[0]["reason"]
    assert len(read_catalog(local_store, summary["run_id"])["object_id"]) == 2 * ROWS


def test_duplicate_ids_across_partitions_reported(local_store, model_dir):
    overlapping = partition_arrays(ROWS, first_id=FIRST_IDS[0] + 5, seed=7)  # ids 1005-1014
    write_partition_set(local_store, "parts", [encode(_good(0)), encode(overlapping)], rows=[ROWS, ROWS])

    summary = run_handlers(_params(local_store, model_dir))

    assert summary["n_duplicate_rows"] == 5
    examples = summary["duplicate_object_ids"]
    assert [item["object_id"] for item in examples] == [1005, 1006, 1007, 1008, 1009]
    assert examples[0]["partitions"] == ["part-00000", "part-00001"]
    catalog = read_catalog(local_store, summary["run_id"])
    assert catalog["object_id"] == list(range(1000, 1015))  # each id once


def _manifest_cases() -> dict[str, tuple[bytes | None, str]]:
    record = {"index": 0, "key": "parts/part-00000.safetensors", "rows": ROWS, "bytes": 1, "sha256": "0" * 64}
    manifest = {"format": "cai-partitions/1", "partitions": [record]}

    def variant(**changes) -> bytes:
        return json.dumps({**manifest, **changes}).encode()

    def record_variant(**changes) -> bytes:
        return variant(partitions=[{**record, **changes}])

    without_sha = {k: v for k, v in record.items() if k != "sha256"}
    second = {**record, "key": "other/part-00000.safetensors", "index": 1}
    return {
        "missing": (None, "manifest.json"),
        "invalid_json": (b'{"format": "cai-partitions/1", ', "not valid JSON"),
        "json_list": (b"[1, 2, 3]", "not a partition manifest"),
        "wrong_format": (variant(format="something-else"), "not a partition manifest"),
        "partitions_not_a_list": (variant(partitions={"a": 1}), "partitions"),
        "record_without_sha256": (variant(partitions=[without_sha]), "sha256"),
        "rows_not_integer": (record_variant(rows="ten"), "rows"),
        "key_not_string": (record_variant(key=42), "key"),
        "duplicate_partition_names": (variant(partitions=[record, second]), "part-00000"),
    }


MANIFEST_CASES = _manifest_cases()


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifest_rejected_before_work(tmp_path, monkeypatch, local_store, model_dir, case):
    monkeypatch.chdir(tmp_path)
    content, expected = MANIFEST_CASES[case]
    local_store.put("parts/part-00000.safetensors", encode(_good(0)))
    if content is not None:
        local_store.put("parts/manifest.json", content)
    before = local_store.list()

    with pytest.raises(CAIError) as caught:
        run(_params(local_store, model_dir, run_id="bad-manifest"), progress=False)

    message = str(caught.value)
    assert isinstance(caught.value, (DataFormatError, InvalidParameterError)) or case == "missing", repr(caught.value)
    assert "parts/manifest.json" in message
    assert expected in message
    assert local_store.list() == before, "the run wrote to the store"
    assert not Path("runs").exists(), "a worker started"


def test_missing_manifest_says_what_to_do(local_store, model_dir):
    with pytest.raises(CAIError) as caught:
        run_handlers(_params(local_store, model_dir))
    assert "dataset_prefix" in str(caught.value) or "write_partitions" in str(caught.value)


def _shard(index: int, **changes) -> dict[str, np.ndarray]:
    from fanout_fixtures import make_dataset_arrays

    arrays = make_dataset_arrays(ROWS, first_id=FIRST_IDS[index], seed=index)
    arrays.update(changes)
    return arrays


def _shard_with(index: int, edit) -> dict[str, np.ndarray]:
    arrays = _shard(index)
    edit(arrays)
    return arrays


# case -> (tensors of shard 1, text the error must contain); shards 0 and 2 are valid
BAD_SHARDS = {
    "four_bands": (lambda: _shard(1, images=_shard(1)["images"][:, :4]), "images have shape"),
    "channels_last": (lambda: _shard(1, images=np.ascontiguousarray(_shard(1)["images"].transpose(0, 2, 3, 1))),
                      "channels first"),
    "float64_images": (lambda: _shard(1, images=_shard(1)["images"].astype(np.float64)), "dtype float64"),
    "nan_magnitudes": (lambda: _shard_with(1, lambda a: a["magnitudes"].__setitem__((4, 0), np.nan)),
                       "invalid magnitudes values, e.g. row 4 (object_id 2004)"),
    "duplicate_ids_within": (lambda: _shard_with(1, lambda a: a["object_id"].__setitem__(1, 2000)),
                             "duplicate object_id values [2000] within the shard"),
    "duplicate_ids_across": (lambda: _shard(1, object_id=np.arange(1000, 1000 + ROWS, dtype=np.int64)),
                             "also appears in shard"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shard_stops_run_before_plan(tmp_path, monkeypatch, local_store, model_dir, case):
    monkeypatch.chdir(tmp_path)
    make_shard, expected = BAD_SHARDS[case]
    shards = [_shard(0), make_shard(), _shard(2)]
    for index, arrays in enumerate(shards):
        local_store.put(f"ds/shards/shard-{index:05d}.safetensors", encode(arrays))
    local_store.put("ds/manifest.json", json.dumps({"n_rows": 3 * ROWS}).encode())

    with pytest.raises(DataFormatError) as caught:
        run(dict(store=local_store.uri, dataset_prefix="ds", partition_mb=0.2, model_dir=model_dir,
                 run_id="bad-shard"), progress=False)

    assert "ds/shards/shard-00001.safetensors" in str(caught.value)
    assert expected in str(caught.value)
    assert not [key for key in local_store.list("partitions/") if key.endswith("manifest.json")]
    assert not local_store.exists(plan_key("bad-shard"))
    assert not Path("runs").exists(), "a worker started"


@pytest.mark.parametrize("damage", ["truncated", "bit_flip"])
def test_damaged_dataset_shard_fails_checksum(tmp_path, monkeypatch, local_store, model_dir, damage):
    from cai_helpers.dataset import write_dataset as write_verified_dataset
    from cai_helpers.errors import ChecksumError
    from fanout_fixtures import make_dataset_arrays

    monkeypatch.chdir(tmp_path)
    manifest = write_verified_dataset(local_store, "ds", make_dataset_arrays(3 * ROWS), shard_rows=ROWS)
    key = f"ds/{manifest['shards'][1]['key']}"
    data = bytearray(local_store.get(key))
    if damage == "truncated":
        del data[-64:]
    else:
        data[-5] ^= 0x01  # inside the last image's pixels
    local_store.put(key, bytes(data))

    with pytest.raises(ChecksumError) as caught:
        run(dict(store=local_store.uri, dataset_prefix="ds", partition_mb=0.2, model_dir=model_dir,
                 run_id="bad-shard"), progress=False)

    assert key in str(caught.value)
    assert "rebuild the data set" in str(caught.value)
    assert not local_store.exists(plan_key("bad-shard"))


INVALID_PARAMETERS = {
    "batch_size_zero": ({"batch_size": 0}, "batch_size"),
    "partition_below_one_galaxy": ({"partition_mb": 0.001}, "fits no galaxy"),
    "unknown_runtime": ({"runtime": "tensorflow"}, "invalid runtime 'tensorflow'"),
    "unknown_backend": ({"backend": "slurm"}, "invalid backend 'slurm'"),
    "max_concurrency_zero": ({"max_concurrency": 0}, "max_concurrency"),
    "threads_zero": ({"threads_per_worker": 0}, "threads_per_worker"),
    "rank_timeout_zero": ({"rank_timeout_s": 0.0}, "rank_timeout_s"),
    "negative_data_size": ({"data_size_mb": -1.0}, "data_size_mb"),
    "retries_negative": ({"max_retries": -1}, "max_retries"),
    "tolerance_above_100": ({"tolerated_failure_percentage": 150.0}, "tolerated_failure_percentage"),
    "unknown_fmi_channel": ({"fmi": {"channels": {"carrier-pigeon": {}}}}, "carrier-pigeon"),
}


@pytest.mark.parametrize("case", sorted(INVALID_PARAMETERS))
def test_invalid_run_parameters_rejected_before_work(tmp_path, monkeypatch, local_store, model_dir, case):
    monkeypatch.chdir(tmp_path)
    write_dataset(local_store, "ds", [12])
    before = local_store.list()
    overrides, expected = INVALID_PARAMETERS[case]
    params = dict(store=local_store.uri, dataset_prefix="ds", partition_mb=0.2, model_dir=model_dir,
                  batch_size=4, max_concurrency=2)

    with pytest.raises(InvalidParameterError) as caught:
        run({**params, **overrides}, progress=False)

    assert expected in str(caught.value)
    assert local_store.list() == before, "the run wrote to the store"
    assert not Path("runs").exists(), "a worker started"


def test_partition_exceeding_worker_memory_rejected(tmp_path, monkeypatch, local_store, model_dir):
    monkeypatch.chdir(tmp_path)
    write_partition_set(local_store, "parts", [encode(_good(0)), encode(_good(1))], rows=[ROWS, ROWS])
    before = local_store.list()

    with pytest.raises(InvalidParameterError) as caught:
        run(_params(local_store, model_dir, lambda_memory_mb=256), progress=False)

    message = str(caught.value)
    assert "parts/part-00000.safetensors" in message
    assert "256 MB" in message
    assert "partition_mb" in message  # says how to fix it
    assert local_store.list() == before
    assert not Path("runs").exists()

    # the same partitions fit a 1,024 MB worker
    summary = run_handlers(_params(local_store, model_dir, lambda_memory_mb=1024))
    assert summary["failed_partitions"] == []


def test_oversized_partition_mb_rejected_early(tmp_path, monkeypatch, local_store, model_dir):
    monkeypatch.chdir(tmp_path)
    write_dataset(local_store, "ds", [12])
    before = local_store.list()
    params = dict(store=local_store.uri, dataset_prefix="ds", partition_mb=100.0, model_dir=model_dir,
                  lambda_memory_mb=512)
    with pytest.raises(InvalidParameterError, match="partition_mb"):
        run(params, progress=False)
    assert local_store.list() == before, "partitions were written before the check"


# ---------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def small_model_folder(tmp_path_factory):
    from cai_helpers.checkpoint import save_model
    from cai_helpers.model import AstroMAE, AstroMAEConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("small_model")
    save_model(AstroMAE(AstroMAEConfig.small()), folder, dtype=torch.float32)
    return folder


def _edit_checkpoint(source: Path, target: Path, edit) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    return target


def _first_weight(tensors) -> str:
    return sorted(name for name in tensors if name.endswith(".weight"))[0]


CHECKPOINT_EDITS = {
    "missing_tensor": (lambda t: t.pop(_first_weight(t)), "missing 1"),
    "extra_tensor": (lambda t: t.update({"extra_head.weight": torch.zeros(3)}), "unexpected 1: ['extra_head.weight']"),
    "misshaped_tensor": (lambda t: t.update({_first_weight(t): torch.zeros(7, 3)}), "mis-shaped 1"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_EDITS))
def test_checkpoint_mismatch_rejected(tmp_path, small_model_folder, case):
    from cai_helpers.checkpoint import load_model

    edit, expected = CHECKPOINT_EDITS[case]
    folder = _edit_checkpoint(small_model_folder, tmp_path / case, edit)
    with pytest.raises(CheckpointError) as caught:
        load_model(folder)
    assert expected in str(caught.value)
    assert str(folder / "model.safetensors") in str(caught.value)


class _MarkerPayload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_pickled_checkpoint_never_unpickled(tmp_path, small_model_folder):
    import shutil

    from cai_helpers.checkpoint import load_model

    folder = tmp_path / "pickled"
    shutil.copytree(small_model_folder, folder)
    marker = tmp_path / "marker"
    torch.save({"state_dict": {}, "payload": _MarkerPayload(str(marker))}, folder / "model.safetensors")

    with pytest.raises(CheckpointError) as caught:
        load_model(folder)
    assert "not a valid safetensors file" in str(caught.value)
    assert "authors_checkpoint" in str(caught.value)  # names the converter
    assert not marker.exists()


def test_pickled_checkpoint_fails_run_partitions(tmp_path, local_store, small_model_folder):
    import shutil

    folder = tmp_path / "pickled-run"
    shutil.copytree(small_model_folder, folder)
    torch.save({"weights": torch.zeros(2)}, folder / "model.safetensors")
    write_partition_set(local_store, "parts", [encode(_good(0)), encode(_good(1))], rows=[ROWS, ROWS])

    summary = run_handlers(_params(local_store, str(folder), runtime="torch", tolerated_failure_percentage=100.0))

    assert [f["partition"] for f in summary["failed_partitions"]] == ["part-00000", "part-00001"]
    for failure in summary["failed_partitions"]:
        assert "CheckpointError" in failure["reason"]
        assert str(folder / "model.safetensors") in failure["reason"]
    assert summary["n_images"] == 0


def test_corrupt_onnx_model_fails_partitions(tmp_path, local_store, model_dir):
    (Path(model_dir) / "astromae.onnx").write_bytes(b"not an onnx protobuf" * 10)
    write_partition_set(local_store, "parts", [encode(_good(0)), encode(_good(1))], rows=[ROWS, ROWS])

    summary = run_handlers(_params(local_store, model_dir, tolerated_failure_percentage=100.0))

    assert len(summary["failed_partitions"]) == 2
    for failure in summary["failed_partitions"]:
        assert "CheckpointError" in failure["reason"]
        assert "astromae.onnx" in failure["reason"]
