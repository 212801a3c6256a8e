"""Initializer, executor and summarizer handlers against a local folder and moto S3."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai_helpers.handlers import executor, initializer, summarizer
from cai_helpers.handlers import plan_key, predictions_key, rank_key, run_key
from cai_helpers.handlers.initializer import assign_partitions
from cai_helpers.runconfig import RunParams, new_run_id
from fanout_fixtures import expected_z, write_dataset, write_tiny_onnx


@pytest.fixture
def model_dir(tmp_path):
    write_tiny_onnx(tmp_path / "model")
    return str(tmp_path / "model")


def _params(store, model_dir, **overrides):
    values = dict(store=store.uri, endpoint_url=getattr(store, "endpoint_url", None), dataset_prefix="ds",
                  partition_mb=0.2, model_dir=model_dir, batch_size=4, max_concurrency=2)
    values.update(overrides)
    return RunParams(**values)


def _read_parquet(store, key):
    return pq.read_table(io.BytesIO(store.get(key))).to_pydict()


@pytest.mark.parametrize(
    "rows, world_size, expected",
    [
        ([10, 10, 10, 10], 2, [0, 1, 0, 1]),
        # 10->0, 9->1, 9->1 (9 < 10), 9->0 (10 < 18), 9->1 (18 < 19): loads 19 and 27
        ([10, 9, 9, 9, 9], 2, [0, 1, 1, 0, 1]),
        ([5], 3, [0]),
        ([3, 3, 3], 3, [0, 1, 2]),
    ],
)
def test_assign_partitions_by_hand(rows, world_size, expected):
    assert assign_partitions(rows, world_size) == expected


@pytest.mark.parametrize("n_partitions, world_size", [(1, 1), (7, 3), (517, 64), (40, 40)])
def test_assign_partitions_balanced(n_partitions, world_size):
    rows = [100 + (i % 3) for i in range(n_partitions)]
    ranks = assign_partitions(rows, world_size)
    loads = np.bincount(ranks, weights=rows, minlength=world_size)
    assert set(ranks) == set(range(world_size))
    assert loads.max() - loads.min() <= max(rows)


def test_run_ids_are_unique():
    assert len({new_run_id() for _ in range(200)}) == 200


def test_initializer_partitions_and_plans(local_store, model_dir):
    write_dataset(local_store, "ds", [13, 20, 14])  # 47 rows -> 5 partitions of <= 10
    result = initializer.handler(_params(local_store, model_dir).to_dict(), None)

    assert result["n_partitions"] == 5
    assert result["world_size"] == 2
    assert [item["rank"] for item in result["items"]] == [0, 1]
    plan = json.loads(local_store.get(plan_key(result["run_id"])))
    assert plan["world_size"] == 2
    assert sorted(p["rank"] for p in plan["partitions"]) == [0, 0, 0, 1, 1]
    assert sum(p["rows"] for p in plan["partitions"]) == 47
    assert json.dumps(result)  # the handler returns JSON-able data


def test_initializer_world_size_capped_by_partitions(local_store, model_dir):
    write_dataset(local_store, "ds", [15])
    result = initializer.initialize(_params(local_store, model_dir, max_concurrency=50))
    assert result["n_partitions"] == 2
    assert result["world_size"] == 2


def test_initializer_resume_reuses_plan(local_store, model_dir):
    write_dataset(local_store, "ds", [25])
    first = initializer.initialize(_params(local_store, model_dir))
    plan_before = local_store.get(plan_key(first["run_id"]))
    again = initializer.initialize(_params(local_store, model_dir, run_id=first["run_id"], max_concurrency=1))
    assert again["world_size"] == first["world_size"]
    assert local_store.get(plan_key(first["run_id"])) == plan_before


def _run_all(store, model_dir, **overrides):
    init = initializer.initialize(_params(store, model_dir, **overrides))
    records = [executor.run_rank(item) for item in init["items"]]
    return init, records


@pytest.mark.parametrize("store_fixture", ["local_store", "s3_store"])
def test_executor_writes_predictions(request, store_fixture, model_dir):
    store = request.getfixturevalue(store_fixture)
    source = write_dataset(store, "ds", [12, 9])
    init, records = _run_all(store, model_dir)
    run_id = init["run_id"]

    plan = json.loads(store.get(plan_key(run_id)))
    for part in plan["partitions"]:
        columns = _read_parquet(store, predictions_key(run_id, part["name"]))
        rows = np.searchsorted(source["object_id"], columns["object_id"])
        crop = source["images"][rows, :, 16:48, 16:48]
        np.testing.assert_allclose(columns["z_pred"], expected_z(crop, source["magnitudes"][rows]), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(columns["z_true"], source["redshift"][rows])
        np.testing.assert_array_equal(columns["split"], source["split"][rows])

    for record in records:
        stored = json.loads(store.get(rank_key(run_id, record["rank"])))
        assert stored["partitions_failed"] == []
        assert stored["images"] == sum(p["rows"] for p in plan["partitions"] if p["rank"] == record["rank"])
        assert stored["bits"] == stored["images"] * 164_160
        assert stored["peak_rss_mb"] > 0
        stages = {event["stage"] for event in stored["events"]}
        assert {"read", "decode", "inference", "write"} <= stages


def test_executor_rerun_skips_done_partitions(local_store, model_dir):
    write_dataset(local_store, "ds", [21])
    init, first = _run_all(local_store, model_dir)
    before = {p: local_store.get(predictions_key(init["run_id"], p)) for r in first for p in r["partitions_done"]}

    second = [executor.run_rank(item) for item in init["items"]]
    assert all(r["partitions_done"] == [] for r in second)
    assert sorted(p for r in second for p in r["partitions_skipped"]) == sorted(before)
    for name, data in before.items():
        assert local_store.get(predictions_key(init["run_id"], name)) == data
    # error sums of skipped partitions still count
    assert sum(r["error_sums"]["n"] for r in second) == sum(r["error_sums"]["n"] for r in first)


def test_bad_partition_fails_alone(local_store, model_dir):
    write_dataset(local_store, "ds", [30])
    init = initializer.initialize(_params(local_store, model_dir, max_concurrency=1))
    plan = json.loads(local_store.get(plan_key(init["run_id"])))
    bad = plan["partitions"][1]
    local_store.put(bad["key"], b"corrupted" + local_store.get(bad["key"])[9:])

    record = executor.run_rank(init["items"][0])
    assert [f["partition"] for f in record["partitions_failed"]] == [bad["name"]]
    assert "ChecksumError" in record["partitions_failed"][0]["reason"]
    assert len(record["partitions_done"]) == 2

    summary = summarizer.summarize({"run_id": init["run_id"], "store": local_store.uri})
    assert [f["partition"] for f in summary["failed_partitions"]] == [bad["name"]]
    assert "sha256" in summary["failed_partitions"][0]["reason"]
    assert summary["n_images"] == 20


def _direct_metrics(z_pred, z_true):
    dz = (z_pred - z_true) / (1 + z_true)
    return {
        "mse": np.mean((z_pred - z_true) ** 2),
        "mae": np.mean(np.abs(z_pred - z_true)),
        "bias": np.mean(dz),
        "sigma_nmad": 1.4826 * np.median(np.abs(dz - np.median(dz))),
        "outlier_fraction": np.mean(np.abs(dz) > 0.15),
    }


def test_summary_metrics_match_direct_computation(local_store, model_dir):
    source = write_dataset(local_store, "ds", [40])
    init, _ = _run_all(local_store, model_dir)
    summary = summarizer.summarize({"run_id": init["run_id"], "store": local_store.uri, "backend": "local"})

    crop = source["images"][:, :, 16:48, 16:48]
    z_pred = expected_z(crop, source["magnitudes"]).astype(np.float32).astype(np.float64)
    z_true = source["redshift"].astype(np.float64)
    test = np.isfinite(z_true) & (source["split"] == 2)
    for key, value in _direct_metrics(z_pred[test], z_true[test]).items():
        assert summary[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert summary["metrics_by_split"]["all"]["n"] == int(np.isfinite(z_true).sum())
    assert summary["n_images"] == 40
    assert summary["n_bits"] == 40 * 164_160
    assert summary["images_per_s"] == pytest.approx(40 / summary["map_wall_s"])
    assert summary["failed_partitions"] == []
    assert summary["lambda_cost_usd_estimate"] > 0

    catalog = _read_parquet(local_store, run_key(init["run_id"], "catalog.parquet"))
    assert catalog["object_id"] == sorted(source["object_id"].tolist())


def test_summarizer_reads_past_1000_objects(s3_store):
    run_id = "listing-test"
    n_objects = 1_003
    partitions = [{"name": f"part-{i:05d}", "key": f"parts/part-{i:05d}.safetensors", "rows": 1, "rank": 0}
                  for i in range(n_objects)]
    plan = {"run_id": run_id, "created_at": 0.0, "store": s3_store.uri, "partition_prefix": "parts",
            "partition_mb": 25, "world_size": 1, "n_rows": n_objects, "partitions": partitions,
            "params": RunParams(dataset_prefix="ds").to_dict()}
    s3_store.put(plan_key(run_id), json.dumps(plan).encode())

    def put_prediction(i):
        table = pa.table({"object_id": np.array([i], np.int64), "z_pred": np.array([0.1], np.float32),
                          "z_true": np.array([0.1 + i * 1e-5], np.float32), "split": np.array([2], np.uint8)})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        s3_store.put(predictions_key(run_id, partitions[i]["name"]), sink.getvalue())

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put_prediction, range(n_objects)))

    summary = summarizer.summarize({"run_id": run_id, "store": s3_store.uri, "endpoint_url": s3_store.endpoint_url,
                                    "map_started_at": 1.0, "map_finished_at": 2.0})
    assert summary["n_images"] == n_objects
    assert summary["failed_partitions"] == []
    assert summary["map_wall_s"] == pytest.approx(1.0)
    catalog = _read_parquet(s3_store, run_key(run_id, "catalog.parquet"))
    assert catalog["object_id"] == list(range(n_objects))


def test_summarizer_deduplicates_object_ids(local_store, model_dir):
    write_dataset(local_store, "ds", [12])
    init, _ = _run_all(local_store, model_dir, max_concurrency=1)
    run_id = init["run_id"]
    plan = json.loads(local_store.get(plan_key(run_id)))
    first = predictions_key(run_id, plan["partitions"][0]["name"])
    local_store.put(run_key(run_id, "predictions", "copy.parquet"), local_store.get(first))

    summary = summarizer.handler({"run_id": run_id, "store": local_store.uri}, None)
    assert summary["n_images"] == 12
    catalog = _read_parquet(local_store, run_key(run_id, "catalog.parquet"))
    assert len(set(catalog["object_id"])) == len(catalog["object_id"]) == 12


@pytest.mark.parametrize(
    "overrides",
    [
        {"dataset_prefix": None},
        {"partition_mb": 0},
        {"data_size_mb": -1},
        {"runtime": "tensorrt"},
        {"backend": "k8s"},
        {"batch_size": 0},
        {"max_concurrency": 0},
        {"lambda_memory_mb": 64},
        {"tolerated_failure_percentage": 101},
        {"run_id": "../escape"},
        {"fmi": {"channels": {}}},
    ],
)
def test_run_params_reject_invalid(overrides):
    from cai_helpers.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError):
        RunParams(**{"dataset_prefix": "ds", **overrides}).validate()


def test_run_params_round_trip_and_unknown_keys():
    from cai_helpers.errors import InvalidParameterError

    params = RunParams(dataset_prefix="ds", fmi={"channels": {"redis": {}}}, max_concurrency=3)
    assert RunParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    with pytest.raises(InvalidParameterError, match="partition_size"):
        RunParams.from_dict({"dataset_prefix": "ds", "partition_size": 25})


def test_preview_plan_matches_written_plan(local_store, model_dir):
    write_dataset(local_store, "ds", [13, 20, 14])
    params = _params(local_store, model_dir, max_concurrency=3)
    preview = initializer.preview_plan(params)
    assert local_store.list("partitions/") == []  # the preview writes nothing

    init = initializer.initialize(params)
    plan = json.loads(local_store.get(plan_key(init["run_id"])))
    assert [(p["rows"], p["rank"]) for p in preview] == [(p["rows"], p["rank"]) for p in plan["partitions"]]


def test_onnx_executor_stays_torch_free(local_store, model_dir):
    import subprocess
    import sys

    write_dataset(local_store, "ds", [12])
    init = initializer.initialize(_params(local_store, model_dir, max_concurrency=1))
    code = (
        "import json, sys\n"
        "from cai_helpers.handlers import executor\n"
        f"record = executor.run_rank({init['items'][0]!r})\n"
        "print(json.dumps([len(record['partitions_done']), 'torch' in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [2, False]


def test_partitions_are_cut_again_after_dataset_rebuild(local_store):
    """Partitions of an older build of the data set must not be reused."""
    from cai_helpers.handlers.initializer import ensure_partitions
    from cai_helpers.runconfig import RunParams

    write_dataset(local_store, "ds", [20])
    params = RunParams(store=local_store.uri, dataset_prefix="ds", partition_mb=0.2)
    prefix, first = ensure_partitions(local_store, params)
    assert first["n_rows"] == 20
    _, again = ensure_partitions(local_store, params)
    assert again["created_at"] == first["created_at"]  # same build: reused

    local_store.delete_prefix("ds/")
    write_dataset(local_store, "ds", [12], seed=1)
    _, rebuilt = ensure_partitions(local_store, params)
    assert rebuilt["n_rows"] == 12
    assert rebuilt["created_at"] != first["created_at"]
