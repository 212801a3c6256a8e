"""Local fan-out with real worker processes: results, resume, failures, retries, Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cai_helpers.errors import InvalidParameterError, ToleratedFailureExceededError
from cai_helpers.handlers import plan_key, predictions_key, rank_key, run_key
from cai_helpers.launcher import run
from cai_helpers.local_backend import threads_per_worker
from cai_helpers.runconfig import RunParams
from fanout_fixtures import expected_z, write_dataset, write_tiny_onnx


@pytest.fixture
def setup(fanout_run_setup):
    """The shared small fan-out set-up of tests/conftest.py: (store, source, params)."""
    return fanout_run_setup


def _catalog(store, run_id):
    return pq.read_table(io.BytesIO(store.get(run_key(run_id, "catalog.parquet")))).to_pydict()


@pytest.mark.parametrize("world_size, cores, expected", [(1, 16, 16), (3, 16, 5), (32, 16, 1), (2, 1, 1)])
def test_threads_per_worker(world_size, cores, expected):
    assert threads_per_worker(world_size, cores) == expected


def test_local_run_end_to_end(setup):
    store, source, params = setup
    summary = run(RunParams(**params), progress=False)

    assert summary["status"] == "succeeded"
    assert summary["backend"] == "local"
    assert summary["world_size"] == 2
    assert summary["n_partitions"] == 5
    assert summary["n_images"] == 47

    catalog = _catalog(store, summary["run_id"])
    assert catalog["object_id"] == source["object_id"].tolist()
    crop = source["images"][:, :, 16:48, 16:48]
    z_pred = expected_z(crop, source["magnitudes"])
    np.testing.assert_allclose(catalog["z_pred"], z_pred, rtol=1e-5, atol=1e-6)

    # metrics equal a direct computation on the stored predictions
    z_pred = np.asarray(catalog["z_pred"], np.float64)
    z_true = np.asarray(catalog["z_true"], np.float64)
    test = np.isfinite(z_true) & (np.asarray(catalog["split"]) == 2)
    error = z_pred[test] - z_true[test]
    dz = error / (1 + z_true[test])
    assert summary["mse"] == pytest.approx(np.mean(error**2), rel=1e-6)
    assert summary["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-6)
    assert summary["bias"] == pytest.approx(np.mean(dz), rel=1e-6, abs=1e-9)
    assert summary["sigma_nmad"] == pytest.approx(1.4826 * np.median(np.abs(dz - np.median(dz))), rel=1e-6)

    for rank in range(2):
        record = json.loads(store.get(rank_key(summary["run_id"], rank)))
        assert record["threads"] == threads_per_worker(2)
        assert record["pid"] != os.getpid()


def test_rerun_same_run_id_is_idempotent(setup):
    store, _, params = setup
    first = run(RunParams(**params), progress=False)
    catalog_before = store.get(run_key(first["run_id"], "catalog.parquet"))
    predictions_before = store.list(run_key(first["run_id"], "predictions") + "/")

    second = run(RunParams(**params, run_id=first["run_id"]), progress=False)
    assert second["run_id"] == first["run_id"]
    assert second["n_images"] == 47
    assert store.list(run_key(first["run_id"], "predictions") + "/") == predictions_before
    after = _catalog(store, first["run_id"])
    before = pq.read_table(io.BytesIO(catalog_before)).to_pydict()
    assert len(after["object_id"]) == len(set(after["object_id"])) == 47
    for column in before:
        np.testing.assert_array_equal(after[column], before[column])  # NaN equals NaN here
    for rank in range(2):
        record = json.loads(store.get(rank_key(first["run_id"], rank)))
        assert record["partitions_done"] == []
        assert record["partitions_skipped"]


def _corrupt_second_partition(store, run_id):
    plan = json.loads(store.get(plan_key(run_id)))
    bad = plan["partitions"][1]
    store.put(bad["key"], store.get(bad["key"])[:-100])
    return bad


def test_bad_partition_tolerated_and_listed(setup):
    store, _, params = setup
    # Partition first with a run that only plans, then corrupt one partition.
    from cai_helpers.handlers import initializer

    init = initializer.initialize(RunParams(**params, tolerated_failure_percentage=25.0))
    bad = _corrupt_second_partition(store, init["run_id"])

    summary = run(RunParams(**params, tolerated_failure_percentage=25.0, run_id=init["run_id"]), progress=False)
    assert summary["status"] == "succeeded"
    assert [f["partition"] for f in summary["failed_partitions"]] == [bad["name"]]
    assert summary["n_images"] == 47 - bad["rows"]
    assert not store.exists(predictions_key(init["run_id"], bad["name"]))


def test_failures_beyond_tolerance_raise(setup):
    store, _, params = setup
    from cai_helpers.handlers import initializer

    init = initializer.initialize(RunParams(**params))
    bad = _corrupt_second_partition(store, init["run_id"])
    with pytest.raises(ToleratedFailureExceededError, match="1 of 5 partitions") as caught:
        run(RunParams(**params, run_id=init["run_id"]), progress=False)
    assert caught.value.summary["status"] == "failed"
    assert json.loads(store.get(run_key(init["run_id"], "summary.json")))["status"] == "failed"


def test_timed_out_ranks_are_retried_then_fail(setup):
    store, _, params = setup
    params = {**params, "rank_timeout_s": 0.05, "max_retries": 1}
    with pytest.raises(ToleratedFailureExceededError) as caught:
        run(RunParams(**params), progress=False)
    summary = caught.value.summary
    assert len(summary["failed_partitions"]) == 5
    assert summary["rank_attempts"] == 4  # 2 ranks x (1 try + 1 retry)
    logs = sorted(path.name for path in Path("runs", "logs", summary["run_id"]).iterdir())
    assert logs == [f"rank-{r:05d}.attempt-{a}.log" for r in range(2) for a in range(2)]


DRIVER = """
import sys
from cai_helpers.launcher import run
from cai_helpers.runconfig import RunParams
from cai_helpers.logs import setup_logging
setup_logging()
run(RunParams(**{params!r}), progress=False)
"""


def test_sigint_stops_workers_and_rerun_resumes(setup, tmp_path):
    store, source, params = setup
    # A slow worker: the executor sleeps before each partition, set through sitecustomize.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time, cai_helpers.handlers.executor as e\n"
        "_orig = e._predict_one\n"
        "def _slow(*a, **k):\n    time.sleep(30)\n    return _orig(*a, **k)\n"
        "e._predict_one = _slow\n"
    )
    run_id = "sigint-test"
    code = DRIVER.format(params={**params, "run_id": run_id})
    env = {**os.environ, "PYTHONPATH": str(hook)}
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)

    deadline = time.monotonic() + 60
    while not store.exists(plan_key(run_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # let the workers start
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=30)
    assert driver.returncode != 0
    assert "interrupted" in stderr

    # no worker of this run is left running
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert run_id not in ps

    summary = run(RunParams(**params, run_id=run_id), progress=False)
    assert summary["n_images"] == 47
    assert summary["failed_partitions"] == []


def test_local_run_on_s3_store(tmp_path, monkeypatch, s3_store):
    monkeypatch.chdir(tmp_path)
    write_tiny_onnx(tmp_path / "model")
    source = write_dataset(s3_store, "ds", [25])
    params = RunParams(store=s3_store.uri, endpoint_url=s3_store.endpoint_url, dataset_prefix="ds",
                       partition_mb=0.2, model_dir=str(tmp_path / "model"), batch_size=8, max_concurrency=2)
    summary = run(params, progress=False)
    assert summary["n_images"] == 25
    assert _catalog(s3_store, summary["run_id"])["object_id"] == source["object_id"].tolist()


def test_fmi_allreduce_sums_rank_figures(setup):
    store, _, params = setup
    fmi = {"channels": {"objectstore": {"location": store.uri, "prefix": "fmi", "poll_interval_s": 0.02}},
           "pin": "objectstore", "timeouts": {"pairing_s": 30, "io_s": 30}}
    summary = run(RunParams(**params, fmi=fmi), progress=False)

    records = [json.loads(store.get(rank_key(summary["run_id"], rank))) for rank in range(2)]
    reduced = records[0]["allreduced"]
    assert reduced is not None
    assert records[1]["allreduced"] is None  # only rank 0 records the sums
    assert reduced["images"] == 47
    assert reduced["images"] == sum(r["images"] for r in records)
    assert reduced["n"] == pytest.approx(sum(r["error_sums"]["n"] for r in records))
    assert reduced["sum_sq_error"] == pytest.approx(sum(r["error_sums"]["sum_sq_error"] for r in records))
    assert summary["allreduced"] == reduced


def test_rank_without_peers_still_writes(setup):
    store, _, params = setup
    from cai_helpers.handlers import executor, initializer

    fmi = {"channels": {"objectstore": {"location": store.uri, "poll_interval_s": 0.02}},
           "pin": "objectstore", "timeouts": {"pairing_s": 1, "io_s": 1}}
    init = initializer.initialize(RunParams(**params, fmi=fmi))
    record = executor.run_rank(init["items"][0])  # rank 1 never starts
    assert record["allreduced"] is None
    assert json.loads(store.get(rank_key(init["run_id"], 0)))["partitions_done"] == record["partitions_done"]
    assert record["partitions_done"]


def test_aws_backend_needs_stack_name(setup):
    _, _, params = setup
    with pytest.raises(InvalidParameterError, match="stack_name"):
        run(RunParams(**params), backend="aws", progress=False)


def test_local_backend_rejects_options(setup):
    _, _, params = setup
    with pytest.raises(InvalidParameterError, match="no options"):
        run(RunParams(**params), progress=False, stack_name="cai")
