"""Per-rank run figures: error sums for metrics, and their FMI allreduce across ranks.

Error sums are additive, so ranks (or an FMI allreduce) can combine them into MSE, MAE,
bias and outlier fractions without moving predictions. Only galaxies with a known
redshift and a finite prediction count. The summarizer computes the reported metrics
from the catalog, and checks the allreduced sums against it.

The allreduce starts after a rank's last partition, so the first rank to get there
waits for the last one. :func:`allreduce_timeout_s` sizes that wait from the plan.
``FMI_BASE_WAIT_S`` covers process start, model load and the restart of a retried rank.
``FMI_WAIT_PER_MB_S`` is added for every MB of partitions of the busiest rank, because
a peer can be up to one rank's work behind. A ``timeouts.pairing_s`` in the
caller's FMI configuration replaces that sum. The wait always ends before the rank's
own time limit, so that the rank still writes its record (see ``rank_time_left_s``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from cai_helpers.errors import CAIError
from cai_helpers.metrics import PhotozSums

log = logging.getLogger(__name__)

TEST_SPLIT = 2
SUM_NAMES = tuple(field.name for field in dataclasses.fields(PhotozSums))
TIMING_NAMES = ("read_s", "decode_s", "inference_s", "write_s")
FMI_BASE_WAIT_S = 120.0
# NOTE: an estimate, not a measurement. 4 s per MB allows about 13 galaxies per second
# per rank under the partition byte model; resize it from benchmark runs of the real model.
FMI_WAIT_PER_MB_S = 4.0
# share of the rank's time limit that the wait may use; the rest is for writing the record
RANK_TIME_SHARE = 0.8
MIN_WAIT_S = 0.01
MB = 2**20
BYTES_PER_GALAXY = 20_504  # partition byte model, for plans whose partitions lack "bytes"

TOKEN_ENV = "CAI_FMI_TOKEN"  # the local backend passes its rendezvous token in this variable
REDACTED = "[redacted]"


def comm_name(run_id: str) -> str:
    """Return the communicator name of a run: unique per run, shared by its ranks."""
    return f"cai-{run_id}"


def error_sums(columns: dict[str, np.ndarray] | None, previous: dict[str, float] | None = None) -> dict[str, float]:
    """Add one partition's error sums (all galaxies with truth, and the test split) to ``previous``.

    dz = (z_pred - z_true) / (1 + z_true). Keys are the fields of
    :class:`~cai_helpers.metrics.PhotozSums` (n, sum_dz, sum_dz2, sum_sq_error,
    sum_abs_error, count_outlier for |dz| > 0.15, count_outlier_005 for |dz| > 0.05,
    sum_z_true, sum_z_true2), and the same with a ``_test`` suffix.
    """
    sums = {f"{name}{suffix}": 0.0 for suffix in ("", "_test") for name in SUM_NAMES}
    if previous:
        sums.update(previous)
    if columns is None:
        return sums

    # float32 as stored in the predictions objects, so the catalog gives the same sums
    z_pred = np.asarray(columns["z_pred"], np.float32).astype(np.float64)
    z_true = np.asarray(columns["z_true"], np.float32).astype(np.float64)
    test = np.asarray(columns["split"]) == TEST_SPLIT
    for suffix, mask in (("", slice(None)), ("_test", test)):
        partial = PhotozSums.from_arrays(z_pred[mask], z_true[mask]).to_dict()
        for name, value in partial.items():
            sums[f"{name}{suffix}"] += value
    return sums


def run_figures(record: dict[str, Any]) -> dict[str, float]:
    """Return the additive figures of one rank record that FMI allreduces."""
    figures = {name: float(record["timings"][name]) for name in TIMING_NAMES}
    figures.update(images=float(record["images"]), bits=float(record["bits"]),
                   duration_s=float(record["duration_s"]), model_load_s=float(record["model_load_s"]))
    # these identify who took part: "ranks" sums to the world size, "attempt_sum" to the attempts' numbers
    figures.update(ranks=1.0, attempt_sum=float(record["attempt"]))
    figures.update(record["error_sums"])
    return figures


def fmi_config_for(event: dict[str, Any], plan: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """Return (configuration, None) for a rank that allreduces, else (None, reason or None).

    The event's ``fmi`` (set by the local backend) wins over the plan's: a dict is the
    configuration, ``"off"`` skips the allreduce for the reason in ``fmi_skip_reason``.
    A direct channel with neither ``token`` nor ``token_file`` gets the token from the
    ``CAI_FMI_TOKEN`` environment variable, in memory only.
    """
    chosen = event.get("fmi", plan.get("fmi"))
    if chosen == "off":
        return None, event.get("fmi_skip_reason") or "FMI is off for this rank"
    if not isinstance(chosen, dict):
        return None, None

    token = os.environ.get(TOKEN_ENV)
    direct = (chosen.get("channels") or {}).get("direct")
    if token and isinstance(direct, dict) and direct.get("token") is None and direct.get("token_file") is None:
        chosen = {**chosen, "channels": {**chosen["channels"], "direct": {**direct, "token": token}}}
    return chosen, None


def rank_time_left_s(plan: dict[str, Any], elapsed_s: float) -> float:
    """Return the seconds a rank may still spend before its time limit stops it.

    On the local backend ``rank_timeout_s`` counts from the last finished partition, so
    the whole limit is left after it. On Lambda it bounds the whole invocation.
    """
    params = plan["params"]
    limit = float(params["rank_timeout_s"])
    if params.get("backend", "local") == "local":
        return limit
    return limit - elapsed_s


def allreduce_timeout_s(plan: dict[str, Any], config: dict[str, Any], elapsed_s: float) -> float:
    """Return the seconds (pairing and each message) that a rank waits for its peers."""
    explicit = (config.get("timeouts") or {}).get("pairing_s")
    if explicit is not None:
        requested = float(explicit)
    else:
        rank_bytes: dict[int, int] = {}
        for partition in plan["partitions"]:
            size = partition.get("bytes") or partition["rows"] * BYTES_PER_GALAXY
            rank_bytes[partition["rank"]] = rank_bytes.get(partition["rank"], 0) + size
        requested = FMI_BASE_WAIT_S + FMI_WAIT_PER_MB_S * max(rank_bytes.values(), default=0) / MB
    return min(requested, RANK_TIME_SHARE * rank_time_left_s(plan, elapsed_s))


def redact(text: str, secret: str | None) -> str:
    """Return ``text`` with every occurrence of ``secret`` replaced."""
    return text.replace(secret, REDACTED) if secret else text


def _sum_over_communicator(config: dict[str, Any], rank: int, world_size: int, name: str,
                           figures: dict[str, float], timeout_s: float) -> tuple[dict[str, float], str]:
    from cai_helpers.fmi import Communicator, load_config

    parsed = load_config(config)
    parsed = dataclasses.replace(
        parsed, timeouts=dataclasses.replace(parsed.timeouts, pairing_s=timeout_s, io_s=timeout_s))
    with Communicator(rank, world_size, parsed, name) as comm:
        # the barrier pairs the peers, so a peer dying later is noticed at once
        comm.barrier()
        totals = comm.allreduce(figures, "sum")
        channel = comm.channel_for("allreduce")
    return {key: float(value) for key, value in totals.items()}, channel


def allreduce_run_figures(
    record: dict[str, Any], *, plan: dict[str, Any], rank: int, config: dict[str, Any], elapsed_s: float = 0.0,
) -> tuple[dict[str, float] | None, dict[str, Any]]:
    """Sum the ranks' figures over an FMI communicator; return (sums at rank 0 else None, status).

    The communicator has one peer per rank (world size = number of ranks, never the
    number of partitions), named after the run id. A rank that cannot join logs the
    error and gets None, so it still writes its results. The status (channel,
    comm_name, world_size, timeout_s, joined, reason) goes into the rank record.
    """
    run_id, world_size = plan["run_id"], plan["world_size"]
    name = comm_name(run_id)
    timeout_s = allreduce_timeout_s(plan, config, elapsed_s)
    status: dict[str, Any] = {"channel": None, "comm_name": name, "world_size": world_size,
                              "timeout_s": timeout_s, "joined": False, "reason": None}
    if timeout_s < MIN_WAIT_S:
        status["reason"] = f"no time left before the rank's limit of {plan['params']['rank_timeout_s']} s"
        log.warning("run %s rank %d: skipping the allreduce of run figures: %s", run_id, rank, status["reason"])
        return None, status

    try:
        reduced, channel = _sum_over_communicator(config, rank, world_size, name, run_figures(record), timeout_s)
    except (CAIError, OSError) as exc:
        # CAIError covers FMIError and its timeout, and InvalidParameterError for a bad configuration
        reason = redact(f"{type(exc).__name__}: {exc}", os.environ.get(TOKEN_ENV))
        status["reason"] = f"rank {rank} could not sum run figures within {timeout_s:.1f} s: {reason}"
        log.warning("run %s rank %d of %d could not sum run figures over communicator %r within %.1f s; "
                    "its results are kept: %s", run_id, rank, world_size, name, timeout_s, reason)
        return None, status

    status.update(channel=channel, joined=True)
    log.info("run %s rank %d: summed run figures of %d ranks over the %s channel", run_id, rank, world_size, channel)
    return (reduced if rank == 0 else None), status
