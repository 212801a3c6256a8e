"""FMI faults: a peer killed mid-collective, the rendezvous server down or restarted, Redis
down, and two runs sharing one store and one rendezvous server.

Peers run as real processes (or threads where a test must stop a server between two
collectives of the same peers), against a real rendezvous server and a real redis-server
on 127.0.0.1. Run-level tests use the local backend with the tiny ONNX model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cai_helpers.errors import FMIError, FMITimeoutError
from cai_helpers.fmi import Communicator
from cai_helpers.fmi.rendezvous import RendezvousServer
from cai_helpers.launcher import run
from cai_helpers.runconfig import RunParams
from fault_fixtures import (
    free_port,
    hook_env,
    read_catalog,
    read_rank_records,
    redis_server,
    write_single_shard_dataset,
)

IO_TIMEOUT_S = 2.0
PAIRING_TIMEOUT_S = 3.0
# process start, pairing and teardown on a loaded 2-core machine (s)
SLACK_S = 8.0
FAST_TIMEOUTS = {"pairing_s": PAIRING_TIMEOUT_S, "io_s": IO_TIMEOUT_S}
ALLREDUCE_ELEMENTS = 1000

# One peer of a 4-rank job. A first allreduce pairs every peer with its partners. In the
# second, rank ``late`` joins 1 s after the others, so the victim, killed 0.3 s into it,
# dies while it waits inside the allreduce for the late rank's value.
PEER_PROGRAM = r"""
import json, os, signal, sys, threading, time
import numpy as np
from cai_helpers.fmi import Communicator

rank, world_size, config, comm_name, victim, late, elements = json.loads(sys.argv[1])
result = {"rank": rank}
try:
    with Communicator(rank, world_size, config, comm_name) as comm:
        comm.allreduce(np.zeros(elements), "sum")
        if rank == late:
            time.sleep(1.0)
        if rank == victim:
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
        started = time.monotonic()
        try:
            total = comm.allreduce(np.full(elements, float(rank + 1)), "sum")
            result["value"] = [float(total[0]), float(total[-1]), int(total.size)]
        finally:
            result["elapsed_s"] = time.monotonic() - started
except Exception as exc:
    result.update(error_type=type(exc).__name__, error=str(exc))
print(json.dumps(result), flush=True)
"""


@pytest.fixture
def rendezvous_server():
    """A rendezvous server served from a thread on a free loopback port."""
    server = RendezvousServer("127.0.0.1", 0)
    server.start_in_thread()
    yield server
    server.stop_thread()


def _direct(port: int, timeouts: dict | None = None) -> dict:
    return {"channels": {"direct": {"host": "127.0.0.1", "port": port, "punch_window_s": 0.05}},
            "timeouts": timeouts or FAST_TIMEOUTS}


def _redis(port: int, timeouts: dict | None = None) -> dict:
    return {"channels": {"redis": {"host": "127.0.0.1", "port": port, "prefix": "faults"}},
            "timeouts": timeouts or FAST_TIMEOUTS}


def _run_peer_processes(world_size: int, config: dict, comm_name: str, victim: int, late: int) -> dict[int, dict]:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PEER_PROGRAM,
             json.dumps([rank, world_size, config, comm_name, victim, late, ALLREDUCE_ELEMENTS])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(world_size)
    ]
    results = {}
    for rank, process in enumerate(processes):
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            pytest.fail(f"peer {rank} hung past 60 s; stderr:\n{stderr[-2000:]}")
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        results[rank] = {"returncode": process.returncode, "stderr": stderr,
                         **(json.loads(lines[-1]) if lines else {})}
    return results


@pytest.mark.parametrize("channel", ["direct", "redis"])
def test_peer_killed_mid_allreduce(channel, rendezvous_server):
    world_size, victim, late = 4, 3, 2
    comm_name = f"mid-{channel}-{os.getpid()}"
    if channel == "direct":
        results = _run_peer_processes(world_size, _direct(rendezvous_server.port), comm_name, victim, late)
    else:
        with redis_server() as (_, redis_port):
            results = _run_peer_processes(world_size, _redis(redis_port), comm_name, victim, late)

    assert results[victim]["returncode"] == -signal.SIGKILL
    assert "rank" not in results[victim], f"the victim was not killed inside the allreduce: {results}"
    expected_total = float(sum(rank + 1 for rank in range(world_size)))
    raised = 0
    for rank in range(world_size):
        if rank == victim:
            continue
        result = results[rank]
        assert "elapsed_s" in result, f"survivor {rank} never reached the allreduce: {result}"
        # bounded: the late rank's 1 s, one pairing and two chained I/O waits
        assert result["elapsed_s"] < PAIRING_TIMEOUT_S + 2 * IO_TIMEOUT_S + SLACK_S, result
        if "error_type" not in result:
            # The victim's value had already reached this peer: the sum must be complete.
            assert result["value"] == [expected_total, expected_total, ALLREDUCE_ELEMENTS]
            continue
        raised += 1
        assert result["error_type"] in ("FMITimeoutError", "FMIPeerLostError"), result
        assert "allreduce" in result["error"], result["error"]
        assert channel in result["error"], result["error"]
    if channel == "direct":
        # Rank 1 exchanges with the victim in the second doubling step, after its death.
        assert raised >= 1


def _peer_threads(config: dict, comm_name: str, steps, world_size: int = 2) -> list:
    """Run ``steps(comm)`` for every rank on its own thread; return the results by rank."""

    def peer(rank: int):
        with Communicator(rank, world_size, config, comm_name) as comm:
            return steps(comm)

    with ThreadPoolExecutor(world_size) as pool:
        futures = [pool.submit(peer, rank) for rank in range(world_size)]
        return [future.result(timeout=60) for future in futures]


def test_rendezvous_restart_keeps_and_makes_pairs():
    port = free_port()
    first = RendezvousServer("127.0.0.1", port)
    first.start_in_thread()
    config = _direct(port)
    server_down = threading.Event()

    def steps(comm):
        comm.barrier()  # pairs through the first server
        server_down.wait(30)
        return comm.allreduce(comm.rank + 1, "sum")  # existing connections only

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(_peer_threads, config, "restart-old", steps)
        deadline = time.monotonic() + 30
        while first.pairs < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.pairs == 1
        first.stop_thread()
        server_down.set()
        assert job.result(timeout=60) == [3, 3]

    # While the server is down, a new communicator fails fast and names the server.
    started = time.monotonic()
    with Communicator(0, 2, config, "restart-down") as comm:
        with pytest.raises(FMIError) as caught:
            comm.barrier()
    assert time.monotonic() - started < PAIRING_TIMEOUT_S + SLACK_S
    message = str(caught.value)
    assert f"rendezvous server 127.0.0.1:{port}" in message
    assert "barrier" in message

    # A new server on the same port serves new communicators.
    second = RendezvousServer("127.0.0.1", port)
    second.start_in_thread()
    try:
        assert _peer_threads(config, "restart-new", lambda comm: comm.allreduce(comm.rank + 10, "sum")) == [21, 21]
        assert second.pairs == 1
    finally:
        second.stop_thread()


def test_redis_killed_between_collectives_raises():
    with redis_server() as (process, port):
        config = _redis(port)
        redis_dead = threading.Event()

        def steps(comm):
            comm.barrier()
            redis_dead.wait(30)
            started = time.monotonic()
            try:
                comm.allreduce(1, "sum")
            except FMIError as exc:
                return type(exc).__name__, str(exc), time.monotonic() - started
            return "no error", "", time.monotonic() - started

        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(_peer_threads, config, "redis-dies", steps)
            time.sleep(1.0)  # both peers pass the barrier (each needs a few ms)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            redis_dead.set()
            outcomes = job.result(timeout=60)

    for rank, (error_type, message, elapsed_s) in enumerate(outcomes):
        assert error_type == "FMIError", f"rank {rank}: {error_type} {message}"
        assert f"127.0.0.1:{port}" in message
        assert "check that the Redis server is running" in message
        assert elapsed_s < IO_TIMEOUT_S + SLACK_S  # redis-py retries a refused connection a few times


@pytest.fixture
def run_setup(fanout_run_setup):
    """The shared small fan-out set-up of tests/conftest.py: (store, source, params)."""
    return fanout_run_setup


def _assert_complete(store, summary, source_ids) -> None:
    assert summary["status"] == "succeeded"
    assert summary["failed_partitions"] == []
    catalog = read_catalog(store, summary["run_id"])
    assert catalog["object_id"] == sorted(source_ids)


@pytest.mark.parametrize("channel", ["direct", "redis"])
def test_run_survives_fmi_server_down(channel, run_setup):
    store, source, params = run_setup
    port = free_port()  # nothing listens here
    fmi = _direct(port) if channel == "direct" else _redis(port)
    summary = run(RunParams(**params, fmi=fmi), progress=False)

    _assert_complete(store, summary, source["object_id"].tolist())
    assert summary["allreduced"] is None
    records = read_rank_records(store, summary["run_id"])
    assert [record["rank"] for record in records] == [0, 1]
    assert sum(record["images"] for record in records) == 47
    logs = "".join(path.read_text() for path in Path("runs", "logs", summary["run_id"]).iterdir())
    assert "could not sum run figures" in logs
    assert f"127.0.0.1:{port}" in logs


def test_run_survives_peer_killed_in_allreduce(run_setup, rendezvous_server, tmp_path, monkeypatch):
    store, source, params = run_setup
    for name, value in hook_env(tmp_path / "hook", {"kill_in_allreduce": {"rank": 1, "attempt": 0}}).items():
        monkeypatch.setenv(name, value)
    summary = run(RunParams(**params, fmi=_direct(rendezvous_server.port)), progress=False)

    _assert_complete(store, summary, source["object_id"].tolist())
    logs = sorted(path.name for path in Path("runs", "logs", summary["run_id"]).iterdir())
    assert "rank-00001.attempt-1.log" in logs  # the killed rank was retried
    records = read_rank_records(store, summary["run_id"])
    assert [record["rank"] for record in records] == [0, 1]
    assert records[1]["attempt"] == 1
    # the retried rank skipped what its killed attempt had written
    assert records[1]["partitions_done"] == []
    assert records[1]["partitions_skipped"]
    assert all(record.get("allreduced") is None for record in records)


def test_two_runs_share_store_and_rendezvous(run_setup, rendezvous_server):
    store, source_a, params = run_setup
    source_b = write_single_shard_dataset(store, "ds-b", 23, first_id=90_000, seed=5)
    fmi = _direct(rendezvous_server.port, {"pairing_s": 20.0, "io_s": 20.0})
    runs = {
        "run-a": RunParams(**params, fmi=fmi, run_id="run-a"),
        "run-b": RunParams(**{**params, "dataset_prefix": "ds-b"}, fmi=fmi, run_id="run-b"),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {run_id: pool.submit(run, run_params, progress=False) for run_id, run_params in runs.items()}
        summaries = {run_id: future.result(timeout=120) for run_id, future in futures.items()}

    expected = {"run-a": source_a["object_id"], "run-b": source_b["object_id"]}
    for run_id, summary in summaries.items():
        _assert_complete(store, summary, expected[run_id].tolist())
        allreduced = summary["allreduced"]
        assert allreduced is not None, f"{run_id}: the FMI allreduce did not run"
        assert allreduced["images"] == len(expected[run_id])
        records = read_rank_records(store, run_id)
        assert allreduced["images"] == sum(record["images"] for record in records)
        np.testing.assert_allclose(allreduced["read_s"], sum(r["timings"]["read_s"] for r in records))
    assert rendezvous_server.pairs == 2  # one pair per run of world size 2
