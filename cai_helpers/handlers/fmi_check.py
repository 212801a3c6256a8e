"""The summarizer's cross-check of the ranks' FMI allreduce against its own totals.

Rank 0 records the sums of every rank's figures (:func:`cai_helpers.handlers.figures.run_figures`).
The summarizer computes the same figures without FMI and compares them:

- timings, images, bits, duration and model load: the sum over the rank records, which
  cover what each rank's final attempt did itself. A retried rank skips the partitions
  that an earlier attempt wrote, so its images and timings exclude them.
- error sums (n, sum_dz, sum_dz2, sum_sq_error, sum_abs_error, outlier counts, and the
  same for the test split): recomputed from the catalog, which contains every prediction.
- ``ranks`` and ``attempt_sum``: the number of rank records and the sum of their attempt
  numbers.

An attempt that joined the allreduce and then died before writing its record would
count twice: once in the sums and again through the attempt that replaced it. So the
comparison is made only when the allreduce included exactly the final attempts, that
is when every rank wrote a record and ``attempt_sum`` equals the records' sum (each
participant's attempt is at most its rank's final attempt, so equal sums mean equal
attempts). Otherwise ``agrees`` is None and ``reason`` says why.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from cai_helpers.handlers.figures import TIMING_NAMES, error_sums

log = logging.getLogger(__name__)

# sums of float64 values added in another order differ by far less than this
RELATIVE_TOLERANCE = 1e-9
RECORD_FIGURES = (*TIMING_NAMES, "images", "bits", "duration_s", "model_load_s")
COMPARISON_COLUMNS = ("figure", "summarizer", "allreduce", "relative_difference")


def summarizer_totals(catalog: dict[str, np.ndarray], ranks: list[dict[str, Any]]) -> dict[str, float]:
    """Return the figures the ranks allreduce, computed from the rank records and the catalog."""
    totals = {name: 0.0 for name in RECORD_FIGURES}
    for record in ranks:
        for name in TIMING_NAMES:
            totals[name] += float(record["timings"][name])
        for name in RECORD_FIGURES[len(TIMING_NAMES):]:
            totals[name] += float(record[name])
    totals["ranks"] = float(len(ranks))
    totals["attempt_sum"] = float(sum(int(record.get("attempt", 0)) for record in ranks))
    totals.update(error_sums(catalog))
    return totals


def relative_difference(name: str, allreduced: float, expected: float, totals: dict[str, float]) -> float:
    """Return |allreduced - expected| relative to the figure's magnitude.

    A sum of signed dz can cancel to near zero, so its scale is sqrt(n * sum_dz2), an
    upper bound of sum |dz| (Cauchy-Schwarz) and so of its rounding error's scale.
    """
    scale = max(abs(allreduced), abs(expected))
    if name.startswith("sum_dz") and not name.startswith("sum_dz2"):
        suffix = name.removeprefix("sum_dz")
        scale = max(scale, math.sqrt(max(totals.get(f"n{suffix}", 0.0) * totals.get(f"sum_dz2{suffix}", 0.0), 0.0)))
    if scale == 0.0:
        return 0.0
    return abs(allreduced - expected) / scale


def _not_comparable(plan: dict[str, Any], ranks: list[dict[str, Any]], allreduced: dict[str, float] | None,
                    statuses: dict[int, dict[str, Any]]) -> str | None:
    """Return why the allreduced figures cannot be compared, or None when they can."""
    if allreduced is None:
        status = statuses.get(0)
        if status is not None and status.get("reason"):
            return f"rank 0 recorded no allreduced figures: {status['reason']}"
        failed = sorted(rank for rank, item in statuses.items() if not item.get("joined"))
        return f"rank 0 recorded no allreduced figures (ranks that did not join: {failed or 'unknown'})"
    missing = sorted(set(range(plan["world_size"])) - {record["rank"] for record in ranks})
    if missing:
        return f"rank(s) {missing} wrote no record, so the summarizer cannot total their figures"
    if allreduced.get("ranks") != float(plan["world_size"]):
        return f"the allreduce summed {allreduced.get('ranks')} ranks, not the world size {plan['world_size']}"
    recorded = sum(int(record.get("attempt", 0)) for record in ranks)
    if allreduced.get("attempt_sum") != float(recorded):
        return (f"the allreduce included an earlier attempt of a retried rank (attempt sum "
                f"{allreduced.get('attempt_sum')}, final attempts sum to {recorded}), so a dead attempt's "
                "figures would count twice")
    return None


def fmi_summary(plan: dict[str, Any], ranks: list[dict[str, Any]], catalog: dict[str, np.ndarray]) -> dict[str, Any]:
    """Return the summary's ``fmi`` entry, and log a warning for each figure that differs.

    Keys: enabled, channel, world_size, allreduced, summarizer, relative_differences,
    max_relative_difference, agrees (None when not comparable or FMI was unused),
    mismatched (figure names) and reason.
    """
    run_id = plan["run_id"]
    statuses = {record["rank"]: record["fmi"] for record in ranks if record.get("fmi")}
    rank0 = next((record for record in ranks if record["rank"] == 0), {})
    allreduced = rank0.get("allreduced")
    channel = next((item["channel"] for _, item in sorted(statuses.items()) if item.get("channel")), None)
    entry: dict[str, Any] = {
        "enabled": bool(statuses) or allreduced is not None,
        "channel": channel,
        "world_size": plan["world_size"],
        "allreduced": allreduced,
        "summarizer": None,
        "relative_differences": None,
        "max_relative_difference": None,
        "agrees": None,
        "mismatched": [],
        "reason": None,
    }
    if not entry["enabled"]:
        entry["reason"] = "the run did not use FMI (fmi='off', or the AWS backend without an FMI configuration)"
        return entry

    reason = _not_comparable(plan, ranks, allreduced, statuses)
    if reason is not None:
        entry["reason"] = reason
        log.warning("run %s: the FMI figures are not checked: %s", run_id, reason)
        return entry

    totals = summarizer_totals(catalog, ranks)
    differences = {name: relative_difference(name, float(allreduced[name]), totals[name], totals)
                   for name in sorted(allreduced) if name in totals}
    unknown = sorted(set(allreduced) - set(totals))
    if unknown:
        log.warning("run %s: the summarizer does not compute the allreduced figure(s) %s", run_id, unknown)
    mismatched = [name for name, value in differences.items() if not value <= RELATIVE_TOLERANCE]
    for name in mismatched:
        log.warning("run %s: allreduced %s = %r differs from the summarizer's %r (relative difference %.3g)",
                    run_id, name, allreduced[name], totals[name], differences[name])
    entry.update(summarizer={name: totals[name] for name in differences}, relative_differences=differences,
                 max_relative_difference=max(differences.values(), default=0.0),
                 agrees=not mismatched, mismatched=mismatched)
    return entry


def comparison_rows(entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Return one row per compared figure, with the keys COMPARISON_COLUMNS, for a table."""
    if not entry or not entry.get("relative_differences"):
        return []
    return [
        dict(zip(COMPARISON_COLUMNS, (name, entry["summarizer"][name], entry["allreduced"][name], value)))
        for name, value in entry["relative_differences"].items()
    ]
