"""Peer programs that the FMI tests run in separate processes (importable by forkserver)."""

from __future__ import annotations

import copy
import operator
import os
import signal
import time

import numpy as np

from cai_helpers.fmi import Communicator, UserOp

# associative but not commutative: folded in rank order on every channel
MATMUL = UserOp(np.matmul, commutative=False, associative=True, name="matmul")
CONCAT = UserOp(operator.add, commutative=False, associative=True, name="concat")
# neither: x0 - x1 - ... - x(n-1), strictly from the left
SUBTRACT = UserOp(operator.sub, name="subtract")


def array_of(rank: int) -> np.ndarray:
    return np.arange(6, dtype=np.float64).reshape(2, 3) * (rank + 1) - 4.0 * rank


def matrix_of(rank: int) -> np.ndarray:
    return np.array([[rank + 1, 1], [1, 0]], dtype=np.int64)


def bytes_of(rank: int) -> bytes:
    return b"%d," % rank


def figures_of(rank: int) -> dict:
    return {"seconds": 0.5 * (rank + 1), "galaxies": float(100 * rank)}


class AlternatingHint:
    """Wrap a communicator so that the policy objective flips after every call."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.channels_used: set[str] = set()

    def __getattr__(self, name: str):
        method = getattr(self.comm, name)

        def call(*args, **kwargs):
            self.channels_used.add(self.comm.channel_for(name))
            result = method(*args, **kwargs)
            self.comm.hint("fast" if self.comm.objective == "cheap" else "cheap")
            return result

        return call


def all_collectives(rank: int, world_size: int, config: dict, comm_name: str, alternate: bool = False) -> dict:
    """Run every collective once, in a fixed order, and return the results by name.

    With ``alternate``, the hint flips between fast and cheap after every call, so a
    config whose objectives pick different channels mixes channels within one job.
    """
    root = world_size - 1  # differs from 0 whenever world_size > 1
    inputs = {
        "array": array_of(rank),
        "matrix": matrix_of(rank),
        "bytes": bytes_of(rank),
        "figures": figures_of(rank),
        "scatter": [b"part-%d" % i for i in range(world_size)],
    }
    snapshot = copy.deepcopy(inputs)
    out: dict = {}

    with Communicator(rank, world_size, config, comm_name) as communicator:
        comm = AlternatingHint(communicator) if alternate else communicator
        comm.barrier()
        out["bcast_0"] = comm.bcast({"array": inputs["array"], "from": rank} if rank == 0 else None, 0)
        out["bcast_root"] = comm.bcast(inputs["bytes"] if rank == root else b"ignored", root)
        out["gather"] = comm.gather(inputs["array"], root)
        out["scatter"] = comm.scatter(inputs["scatter"] if rank == root else None, root)

        out["reduce_sum"] = comm.reduce(inputs["array"], "sum", root)
        out["reduce_max_0"] = comm.reduce(inputs["array"], "max", 0)
        out["reduce_matmul"] = comm.reduce(inputs["matrix"], MATMUL, root)
        out["reduce_concat"] = comm.reduce(inputs["bytes"], CONCAT, root)
        out["reduce_subtract"] = comm.reduce(rank * rank + 1, SUBTRACT, root)

        out["allreduce_sum"] = comm.allreduce(inputs["array"], "sum")
        out["allreduce_max"] = comm.allreduce(inputs["array"], "max")
        out["allreduce_min"] = comm.allreduce(float(rank) - 2.5, "min")
        out["allreduce_prod"] = comm.allreduce(rank + 1, "prod")
        out["allreduce_matmul"] = comm.allreduce(inputs["matrix"], MATMUL)
        out["allreduce_concat"] = comm.allreduce(inputs["bytes"], CONCAT)
        out["allreduce_subtract"] = comm.allreduce(rank * rank + 1, SUBTRACT)
        out["allreduce_figures"] = comm.allreduce(inputs["figures"], "sum")

        out["scan_sum"] = comm.scan(inputs["array"], "sum")
        out["scan_max"] = comm.scan(inputs["array"], "max")
        out["scan_matmul"] = comm.scan(inputs["matrix"], MATMUL)
        out["scan_concat"] = comm.scan(inputs["bytes"], CONCAT)

        # point to point around a ring: everyone sends first, then receives
        comm.send(inputs["array"], (rank + 1) % world_size)
        comm.send(inputs["bytes"], (rank + 1) % world_size)
        out["ring_array"] = comm.recv((rank - 1) % world_size)
        out["ring_bytes"] = comm.recv((rank - 1) % world_size)
        comm.barrier()
        out["channels_used"] = sorted(comm.channels_used) if alternate else None

    out["inputs_unchanged"] = all(
        np.array_equal(inputs[key], snapshot[key]) if isinstance(snapshot[key], np.ndarray)
        else inputs[key] == snapshot[key]
        for key in snapshot
    )
    return out


def fail_before_barrier(rank: int, world_size: int, config: dict, comm_name: str, victim: int, mode: str) -> str:
    """Join, then the victim dies (mode "kill") or stays silent ("silent") while the others wait at a barrier."""
    with Communicator(rank, world_size, config, comm_name) as comm:
        comm.bcast(b"ready", 0)  # every peer has joined and talked once
        if rank == victim and mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == victim:
            time.sleep(config["timeouts"]["io_s"] + 0.5)
            return "silent"
        start = time.monotonic()
        comm.barrier()
        return f"barrier passed after {time.monotonic() - start:.1f} s"


def two_jobs(index: int, process_count: int, config: dict, comm_names: list) -> list:
    """Run process ``index`` as a peer of one of two jobs that share every server.

    Job j's peers contribute values offset by 1000 * (j + 1), so a message that
    crossed from the other job shows up in the results.
    """
    world_size = process_count // 2
    job, rank = divmod(index, world_size)
    offset = 1000 * (job + 1)
    results = []
    with Communicator(rank, world_size, config, comm_names[job]) as comm:
        for step in range(3):
            results.append(comm.allreduce(offset + rank + step, "sum"))
            results.append(comm.gather(offset + rank, 0))
            results.append(comm.bcast(offset * 10 + step if rank == 0 else None, 0))
    return results


def sum_figures(rank: int, process_count: int, config: dict, comm_name: str, world_size: int, timeout_s: float):
    """Call the executor's helper in a job of ``world_size`` peers of which ``process_count`` run."""
    from cai_helpers.fmi import allreduce_run_figures

    return allreduce_run_figures(config, rank, world_size, comm_name, figures_of(rank), timeout_s)


def large_messages(rank: int, world_size: int, config: dict, comm_name: str, elements: int) -> dict:
    """Send large arrays both ways at once and allreduce them; return checksums."""
    values = np.full(elements, float(rank + 1))
    with Communicator(rank, world_size, config, comm_name) as comm:
        partner = rank ^ 1
        if partner < world_size:
            comm.send(values, partner)  # both partners send before either receives
            received = comm.recv(partner)
        else:
            received = values
        total = comm.allreduce(values, "sum")
    return {"received_sum": float(received.sum()), "total_first": float(total[0]),
            "total_last": float(total[-1]), "total_size": int(total.size)}
