"""Runtime faults of a local fan-out run: a killed worker, a hung worker, an S3 outage,
an S3 endpoint that stays down, and Ctrl-C in the driver followed by a resume.

Workers are real processes. A test kills them by pid; the worker hook of
``fault_fixtures`` only slows partitions down, marks their start, or hangs one worker.
Every test ends with a catalog checked row by row: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cai_helpers.errors import StoreUnavailableError
from cai_helpers.handlers import plan_key, predictions_prefix
from cai_helpers.launcher import run
from cai_helpers.runconfig import RunParams
from cai_helpers.store import S3Store
from fanout_fixtures import write_dataset, write_tiny_onnx
from fault_fixtures import free_port, hook_env, read_catalog, read_rank_records, wait_for

N_ROWS = 47  # 5 partitions at 0.2 MB; rank 0 gets partitions 0, 2, 4 and rank 1 gets 1, 3
RUN_TIMEOUT_S = 120


@pytest.fixture
def setup(fanout_run_setup):
    """The shared small fan-out set-up of tests/conftest.py: (store, source, params)."""
    return fanout_run_setup


def _use_hook(monkeypatch, tmp_path: Path, spec: dict) -> None:
    for name, value in hook_env(tmp_path / "hook", spec).items():
        monkeypatch.setenv(name, value)


def _assert_catalog_complete(store, run_id: str, source_ids: list[int]) -> None:
    """Every source row once in the catalog, and once across the predictions objects."""
    catalog = read_catalog(store, run_id)
    assert catalog["object_id"] == sorted(source_ids)
    stored_ids = []
    for key in store.list(predictions_prefix(run_id)):
        stored_ids += pq.read_table(io.BytesIO(store.get(key))).column("object_id").to_pylist()
    assert sorted(stored_ids) == sorted(source_ids), "predictions objects hold a row twice or miss one"


def _started(marker_dir: Path, rank: int, attempt: int) -> list[Path]:
    return sorted(marker_dir.glob(f"{rank}-{attempt}-*.started"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _worker_pids(run_id: str) -> list[int]:
    """Return the pids of running executor processes of ``run_id``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "cai_helpers.handlers.executor" in command and run_id in command and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def test_worker_killed_mid_partition_is_retried(setup, tmp_path, monkeypatch):
    store, source, params = setup
    markers = tmp_path / "markers"
    markers.mkdir()
    _use_hook(monkeypatch, tmp_path, {"marker_dir": str(markers), "partition_delay_s": 0.5})
    run_id = "killed-worker"

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run, RunParams(**params, run_id=run_id), progress=False)
        # rank 0 has finished its first partition and is inside its second
        second = wait_for(lambda: _started(markers, 0, 0)[1:], "rank 0 to start its second partition")[0]
        victim = int(second.read_text())
        os.kill(victim, signal.SIGKILL)
        summary = job.result(timeout=RUN_TIMEOUT_S)

    assert not _alive(victim)
    assert summary["status"] == "succeeded"
    assert summary["failed_partitions"] == []
    _assert_catalog_complete(store, run_id, source["object_id"].tolist())
    assert Path("runs", "logs", run_id, "rank-00000.attempt-1.log").exists()
    rank0 = read_rank_records(store, run_id)[0]
    assert rank0["attempt"] == 1
    first_done = _started(markers, 0, 0)[0].name.split("-", 2)[2].removesuffix(".started")
    assert first_done in rank0["partitions_skipped"]  # written before the kill, not redone
    assert first_done not in rank0["partitions_done"]
    assert len(rank0["partitions_skipped"]) + len(rank0["partitions_done"]) == 3


def test_hung_worker_is_stopped_and_retried(setup, tmp_path, monkeypatch):
    store, source, params = setup
    markers = tmp_path / "markers"
    markers.mkdir()
    _use_hook(monkeypatch, tmp_path, {"marker_dir": str(markers), "hang": {"rank": 1, "attempt": 0}})
    run_id = "hung-worker"

    summary = run(RunParams(**{**params, "rank_timeout_s": 5.0, "run_id": run_id}), progress=False)

    hung_pid = int(_started(markers, 1, 0)[0].read_text())
    assert not _alive(hung_pid), "the hung worker was left running"
    assert summary["status"] == "succeeded"
    assert summary["failed_partitions"] == []
    assert summary["rank_attempts"] >= 3
    _assert_catalog_complete(store, run_id, source["object_id"].tolist())
    assert Path("runs", "logs", run_id, "rank-00001.attempt-1.log").exists()
    assert read_rank_records(store, run_id)[1]["attempt"] >= 1


@pytest.fixture
def own_s3_server():
    """A moto S3 server on a fixed free port that a test may stop and restart; yields a controller."""
    from moto.server import ThreadedMotoServer

    class Controller:
        def __init__(self) -> None:
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self.server = None

        def start(self) -> None:
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self.server.start()

        def stop(self) -> None:
            if self.server is not None:
                self.server.stop()
                self.server = None

    controller = Controller()
    yield controller
    controller.stop()


OUTAGE_S = 1.5  # plus about 0.5 s that the server takes to stop; below the 3.875 s retry window


def test_s3_outage_during_run_is_ridden_out(tmp_path, monkeypatch, own_s3_server):
    import boto3

    monkeypatch.chdir(tmp_path)
    own_s3_server.start()
    boto3.client("s3", endpoint_url=own_s3_server.endpoint).create_bucket(Bucket="cai-outage")
    store = S3Store("cai-outage", "outage", endpoint_url=own_s3_server.endpoint)
    write_tiny_onnx(tmp_path / "model")
    source = write_dataset(store, "ds", [20, 27])
    _use_hook(monkeypatch, tmp_path, {"partition_delay_s": 0.4})
    run_id = "s3-outage"
    params = RunParams(store=store.uri, endpoint_url=own_s3_server.endpoint, dataset_prefix="ds", partition_mb=0.2,
                       model_dir=str(tmp_path / "model"), batch_size=8, max_concurrency=2, run_id=run_id)

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run, params, progress=False)
        wait_for(lambda: store.list(predictions_prefix(run_id)), "the first predictions object")
        own_s3_server.stop()
        time.sleep(OUTAGE_S)
        own_s3_server.start()
        summary = job.result(timeout=RUN_TIMEOUT_S)

    assert summary["status"] == "succeeded"
    assert summary["failed_partitions"] == []
    _assert_catalog_complete(store, run_id, source["object_id"].tolist())
    logs = "".join(path.read_text() for path in Path("runs", "logs", run_id).iterdir())
    assert "retrying in" in logs, "no worker met the outage, so the test proved nothing"
    assert "EndpointConnectionError" in logs


def test_s3_down_fails_before_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    params = RunParams(store="s3://cai-down/x", endpoint_url=endpoint, dataset_prefix="ds", partition_mb=0.2,
                       model_dir=str(tmp_path), run_id="s3-down")
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        run(params, progress=False)
    message = str(caught.value)
    assert "runs/s3-down/plan.json" in message
    assert endpoint in message
    assert "failed after 6 attempts" in message
    assert "retry the run with the same run id" in message
    assert time.monotonic() - started >= 3.875  # the minimum retry window was waited out
    assert not Path("runs", "logs").exists(), "a worker started although the store was down"


def test_damaged_predictions_redone_on_resume(setup):
    from fault_fixtures import run_handlers

    store, source, params = setup
    first = run_handlers(RunParams(**params, run_id="damaged"))
    damaged, intact = store.list(predictions_prefix("damaged"))[:2]
    store.put(damaged, store.get(damaged)[:50])  # cut short outside CAI
    intact_bytes = store.get(intact)

    summary = run_handlers(RunParams(**params, run_id="damaged"))

    assert first["n_images"] == summary["n_images"] == N_ROWS
    _assert_catalog_complete(store, "damaged", source["object_id"].tolist())
    redone = {name for record in read_rank_records(store, "damaged") for name in record["partitions_done"]}
    assert redone == {damaged.rsplit("/", 1)[1].removesuffix(".parquet")}
    assert store.get(intact) == intact_bytes


def test_corrupt_plan_on_resume_rejected(setup):
    from cai_helpers.errors import DataFormatError

    store, _, params = setup
    store.put(plan_key("corrupt-plan"), b'{"format": "cai-plan/1", "partitions": [')
    with pytest.raises(DataFormatError) as caught:
        run(RunParams(**params, run_id="corrupt-plan"), progress=False)
    assert plan_key("corrupt-plan") in str(caught.value)
    assert "not valid JSON" in str(caught.value)
    assert not Path("runs", "logs").exists(), "a worker started"


def test_s3_dropped_connection_is_retried():
    """An endpoint that accepts and then drops every connection is retried, then reported."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def drop_connections() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(connection.recv(65536))  # read the request, send no response
            connection.close()

    thread = threading.Thread(target=drop_connections, daemon=True)
    thread.start()
    store = S3Store("cai-dropped", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=3)
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            store.get("runs/x/plan.json")
    finally:
        stop.set()
        thread.join(5)
        listener.close()

    assert len(accepted) == 3, "each attempt must reach the endpoint once"
    assert all(request.startswith(b"GET /cai-dropped/runs/x/plan.json") for request in accepted)
    assert "failed after 3 attempts" in str(caught.value)
    assert "ConnectionClosedError" in str(caught.value)


DRIVER = """
from cai_helpers.launcher import run
from cai_helpers.logs import setup_logging
from cai_helpers.runconfig import RunParams
setup_logging()
run(RunParams(**{params!r}), progress=False)
"""


def test_sigint_resume_skips_done_partitions(setup, tmp_path):
    store, source, params = setup
    run_id = "interrupted"
    env = {**os.environ, **hook_env(tmp_path / "hook", {"partition_delay_s": 1.0})}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(params={**params, "run_id": run_id})],
                              env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_for(lambda: len(store.list(predictions_prefix(run_id))) >= 2, "two finished partitions")
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode != 0
    assert "interrupted" in stderr
    assert f"run_id={run_id!r}" in stderr
    assert _worker_pids(run_id) == [], "workers outlived the interrupted driver"

    written = {}
    for key in store.list(predictions_prefix(run_id)):
        written[key] = (store.get(key), (store.root / key).stat().st_mtime_ns)
    assert 2 <= len(written) < 5, f"the interrupt came too late to test a resume: {sorted(written)}"

    summary = run(RunParams(**params, run_id=run_id), progress=False)

    assert summary["status"] == "succeeded"
    _assert_catalog_complete(store, run_id, source["object_id"].tolist())
    for key, (data, mtime_ns) in written.items():
        assert store.get(key) == data, f"{key} was rewritten on resume"
        assert (store.root / key).stat().st_mtime_ns == mtime_ns, f"{key} was rewritten on resume"
    finished = {key.rsplit("/", 1)[1].removesuffix(".parquet") for key in written}
    records = read_rank_records(store, run_id)
    skipped = {name for record in records for name in record["partitions_skipped"]}
    redone = {name for record in records for name in record["partitions_done"]}
    assert finished <= skipped
    assert not finished & redone
    plan = json.loads(store.get(plan_key(run_id)))
    assert skipped | redone == {p["name"] for p in plan["partitions"]}
