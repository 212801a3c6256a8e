"""Per-rank run figures: error sums for metrics, and their FMI allreduce across ranks.

Error sums are additive, so ranks (or an FMI allreduce) can combine them into MSE, MAE
and bias without moving predictions. Only galaxies with a known redshift count.
The summarizer computes the reported metrics from the catalog, not from these sums.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cai_helpers.errors import CAIError

log = logging.getLogger(__name__)

TEST_SPLIT = 2
SUM_NAMES = ("n", "sum_abs_error", "sum_sq_error", "sum_dz")
TIMING_NAMES = ("read_s", "decode_s", "inference_s", "write_s")
DEFAULT_TIMEOUT_S = 30.0  # pairing and per-message wait when the FMI config sets none


def comm_name(run_id: str) -> str:
    """Return the communicator name of a run: unique per run, shared by its ranks."""
    return f"cai-{run_id}"


def error_sums(columns: dict[str, np.ndarray] | None, previous: dict[str, float] | None = None) -> dict[str, float]:
    """Add one partition's error sums (all galaxies with truth, and the test split) to ``previous``.

    dz = (z_pred - z_true) / (1 + z_true). Keys: n, sum_abs_error, sum_sq_error,
    sum_dz, and the same with a ``_test`` suffix.
    """
    sums = {f"{name}{suffix}": 0.0 for suffix in ("", "_test") for name in SUM_NAMES}
    if previous:
        sums.update(previous)
    if columns is None:
        return sums

    z_true = columns["z_true"].astype(np.float64)
    z_pred = columns["z_pred"].astype(np.float64)
    known = np.isfinite(z_true)
    for suffix, mask in (("", known), ("_test", known & (columns["split"] == TEST_SPLIT))):
        error = z_pred[mask] - z_true[mask]
        sums[f"n{suffix}"] += float(mask.sum())
        sums[f"sum_abs_error{suffix}"] += float(np.abs(error).sum())
        sums[f"sum_sq_error{suffix}"] += float((error**2).sum())
        sums[f"sum_dz{suffix}"] += float((error / (1.0 + z_true[mask])).sum())
    return sums


def run_figures(record: dict[str, Any]) -> dict[str, float]:
    """Return the additive figures of one rank record that FMI allreduces."""
    figures = {name: float(record["timings"][name]) for name in TIMING_NAMES}
    figures.update(images=float(record["images"]), bits=float(record["bits"]),
                   duration_s=float(record["duration_s"]), model_load_s=float(record["model_load_s"]))
    figures.update(record["error_sums"])
    return figures


def allreduce_run_figures(record: dict[str, Any], *, plan: dict[str, Any], rank: int) -> dict[str, float] | None:
    """Sum the ranks' figures over an FMI communicator; return them at rank 0, else None.

    The communicator has one peer per rank (world size = number of ranks, never the
    number of partitions), named after the run id. A rank that cannot join logs the
    error and returns None, so it still writes its results.
    """
    try:
        from cai_helpers.fmi import allreduce_run_figures as fmi_allreduce
    except ImportError:
        log.warning("run %s rank %d: cai_helpers.fmi is not importable; skipping the allreduce of run figures",
                    plan["run_id"], rank)
        return None

    config = plan["fmi"]
    timeout_s = float(config.get("timeouts", {}).get("pairing_s", DEFAULT_TIMEOUT_S))
    try:
        reduced = fmi_allreduce(config=config, rank=rank, world_size=plan["world_size"],
                                comm_name=comm_name(plan["run_id"]), figures=run_figures(record),
                                timeout_s=timeout_s)
    except (CAIError, OSError) as exc:
        log.error("run %s rank %d: FMI allreduce of run figures failed, results are kept: %s",
                  plan["run_id"], rank, exc)
        return None
    if reduced is None:
        log.warning("run %s rank %d: not every rank joined communicator %s within %.1f s; results are kept",
                    plan["run_id"], rank, comm_name(plan["run_id"]), timeout_s)
        return None
    return dict(reduced) if rank == 0 else None
