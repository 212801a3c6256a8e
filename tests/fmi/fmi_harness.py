"""Run FMI peers as separate processes and collect what each returned or raised."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

# forked from a server that has already imported numpy and the package, so a peer starts fast
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["numpy", "cai_helpers.fmi", "cai_helpers.fmi.channels.direct",
                                 "cai_helpers.fmi.channels.redis", "cai_helpers.fmi.channels.objectstore",
                                 "fmi_workers"])


@dataclass
class PeerResult:
    """What one peer process returned, or the exception it raised, and when."""

    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    elapsed_s: float = 0.0


def _entry(results, target: Callable[..., Any], rank: int, world_size: int, args: tuple) -> None:
    start = time.monotonic()
    try:
        value = target(rank, world_size, *args)
        results.put(PeerResult(rank, value, elapsed_s=time.monotonic() - start))
    except BaseException as exc:  # noqa: BLE001 - reported to the test process
        results.put(PeerResult(rank, None, type(exc).__name__, f"{exc}\n{traceback.format_exc()}",
                               time.monotonic() - start))


def run_peers(target: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0) -> dict[int, PeerResult]:
    """Start ``target(rank, world_size, *args)`` in one process per rank; return results by rank.

    A rank that exits without reporting (for example because it killed itself) is absent.
    """
    results = _CONTEXT.Queue()
    processes = [
        _CONTEXT.Process(target=_entry, args=(results, target, rank, world_size, args), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()

    collected: dict[int, PeerResult] = {}
    deadline = time.monotonic() + timeout_s
    while len(collected) < world_size and time.monotonic() < deadline:
        try:
            result = results.get(timeout=0.2)
            collected[result.rank] = result
        except queue_module.Empty:
            if all(not process.is_alive() for process in processes) and results.empty():
                break
    for process in processes:
        process.join(timeout=max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    return collected


def values_or_raise(results: dict[int, PeerResult], world_size: int) -> list[Any]:
    """Return every rank's value, or fail with the first peer's error."""
    for rank in range(world_size):
        result = results.get(rank)
        assert result is not None, f"rank {rank} reported nothing"
        assert result.error_type is None, f"rank {rank} raised {result.error_type}: {result.error}"
    return [results[rank].value for rank in range(world_size)]
