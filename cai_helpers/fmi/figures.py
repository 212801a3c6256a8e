"""One-call helper for the executor: sum every worker's run figures across the job."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

from cai_helpers.errors import FMIError, InvalidParameterError
from cai_helpers.fmi.communicator import Communicator
from cai_helpers.fmi.config import FMIConfig, load_config

log = logging.getLogger(__name__)


def allreduce_run_figures(
    config: Mapping[str, Any] | str | os.PathLike | FMIConfig,
    rank: int,
    world_size: int,
    comm_name: str,
    figures: Mapping[str, float],
    timeout_s: float,
) -> dict[str, float] | None:
    """Join the job's communicator, wait at a barrier, and return the per-key sums of ``figures``.

    Every worker must pass the same keys. ``timeout_s`` (seconds) bounds pairing and
    each wait. If a peer never joins, as when a job has more workers than can run at
    once, this logs a warning and returns None instead of raising, so a worker can
    still report its own figures.
    """
    parsed = load_config(config)
    parsed = dataclasses.replace(
        parsed, timeouts=dataclasses.replace(parsed.timeouts, pairing_s=timeout_s, io_s=timeout_s)
    )
    values = {str(key): float(value) for key, value in figures.items()}
    try:
        with Communicator(rank, world_size, parsed, comm_name) as comm:
            comm.barrier()
            totals = comm.allreduce(values, "sum")
    except InvalidParameterError:
        raise
    except FMIError as exc:
        log.warning(
            "rank %d of %d could not sum run figures over communicator %r within %.1f s: %s",
            rank, world_size, comm_name, timeout_s, exc,
        )
        return None
    return {key: float(value) for key, value in totals.items()}
