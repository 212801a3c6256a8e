"""Dead and silent peers raise FMITimeoutError in time; concurrent jobs never mix."""

from __future__ import annotations

import time
import uuid

import pytest

from fmi_harness import run_peers, values_or_raise
from fmi_workers import figures_of, fail_before_barrier, sum_figures, two_jobs

IO_TIMEOUT_S = 2.0
# process start, pairing and teardown on a loaded 2-core machine (s)
SLACK_S = 6.0
FAST_TIMEOUTS = {"pairing_s": 5.0, "io_s": IO_TIMEOUT_S}


@pytest.mark.parametrize(
    "channel,mode",
    [("direct", "kill"), ("direct", "silent"), ("redis", "kill"), ("objectstore", "kill"), ("redis", "silent")],
)
def test_lost_peer_raises_timeout(channel, mode, make_config, comm_name):
    world_size, victim = 3, 2
    config = make_config(channel, FAST_TIMEOUTS)
    results = run_peers(fail_before_barrier, world_size, config, comm_name, victim, mode, timeout_s=30)

    for rank in range(world_size):
        if rank == victim:
            continue
        result = results.get(rank)
        assert result is not None, f"survivor {rank} reported nothing"
        assert result.error_type in ("FMITimeoutError", "FMIPeerLostError"), (
            f"survivor {rank} got {result.error_type}: {result.error or result.value}"
        )
        assert result.elapsed_s < IO_TIMEOUT_S + SLACK_S, f"survivor {rank} took {result.elapsed_s:.1f} s"
        assert "barrier" in result.error, result.error
        assert channel in result.error, result.error
    # rank 0 waits on the victim directly on every channel
    assert f"peer {victim}" in results[0].error, results[0].error


@pytest.mark.parametrize("channel", ["direct", "redis", "objectstore"])
def test_concurrent_jobs_never_mix(channel, make_config):
    world_size = 3
    names = [f"job-a-{uuid.uuid4().hex[:8]}", f"job-b-{uuid.uuid4().hex[:8]}"]
    results = values_or_raise(run_peers(two_jobs, 2 * world_size, make_config(channel), names, timeout_s=60),
                              2 * world_size)

    for index, got in enumerate(results):
        job, rank = divmod(index, world_size)
        offset = 1000 * (job + 1)
        expected = []
        for step in range(3):
            expected.append(sum(offset + r + step for r in range(world_size)))
            expected.append([offset + r for r in range(world_size)] if rank == 0 else None)
            expected.append(offset * 10 + step)
        assert got == expected, f"job {job} rank {rank}"


def test_run_figures_summed_on_every_rank(make_config, comm_name):
    world_size = 3
    results = values_or_raise(
        run_peers(sum_figures, world_size, make_config("redis"), comm_name, world_size, 10.0, timeout_s=30),
        world_size,
    )
    expected = {key: sum(figures_of(rank)[key] for rank in range(world_size)) for key in figures_of(0)}
    for rank, totals in enumerate(results):
        assert totals == pytest.approx(expected), f"rank {rank}"


@pytest.mark.parametrize("channel", ["direct", "redis"])
def test_run_figures_none_when_peer_missing(channel, make_config, comm_name):
    # a job of 3 workers of which only 2 start, as when Lambda concurrency runs out
    results = run_peers(sum_figures, 2, make_config(channel), comm_name, 3, 1.5, timeout_s=30)
    for rank in range(2):
        assert results[rank].error_type is None, results[rank].error
        assert results[rank].value is None, f"rank {rank} got {results[rank].value}"
        assert results[rank].elapsed_s < 1.5 + SLACK_S


def test_pairing_timeout_separate_from_io(make_config, comm_name):
    from cai_helpers.errors import FMITimeoutError
    from cai_helpers.fmi import Communicator

    config = make_config("direct", {"pairing_s": 0.5, "io_s": 60.0})
    start = time.monotonic()
    with Communicator(0, 2, config, comm_name) as comm:
        with pytest.raises(FMITimeoutError) as caught:
            comm.barrier()
    elapsed = time.monotonic() - start
    assert elapsed < 0.5 + SLACK_S, f"waited {elapsed:.1f} s, beyond the pairing timeout"
    message = str(caught.value)
    assert "barrier" in message
    assert "pairing rank 0 with peer 1 timed out" in message
    assert "direct" in message


def test_io_timeout_names_operation_and_peer(make_config, comm_name):
    from cai_helpers.errors import FMITimeoutError
    from cai_helpers.fmi import Communicator

    config = make_config("objectstore", {"pairing_s": 60.0, "io_s": 0.3})
    with Communicator(1, 3, config, comm_name) as comm:
        with pytest.raises(FMITimeoutError) as caught:
            comm.bcast(None, 2)
    message = str(caught.value)
    assert "bcast" in message
    assert "peer 2" in message
    assert "objectstore" in message
    assert "timed out after 0.3 s" in message


def test_hint_rejects_unknown_objective(make_config, comm_name):
    from cai_helpers.errors import InvalidParameterError
    from cai_helpers.fmi import Communicator

    with Communicator(0, 1, make_config("objectstore"), comm_name) as comm:
        comm.hint("fast")
        assert comm.objective == "fast"
        with pytest.raises(InvalidParameterError):
            comm.hint("fastest")
        with pytest.raises(InvalidParameterError):
            comm.send(b"x", 1)
        with pytest.raises(InvalidParameterError):
            comm.scatter([1, 2], 0)
