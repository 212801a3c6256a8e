"""Figures of one fan-out run: per-rank stage timelines (Gantt) and throughput per rank.

Both read the rank records (``runs/<run_id>/ranks/*.json``), whose ``events`` give each
stage's start and end in Unix seconds. Times on the plots are seconds since the
earliest rank start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai_helpers.handlers import ranks_prefix, read_json
from cai_helpers.store import Store

STAGE_COLORS = {
    "load_model": "#7f7f7f",
    "read": "#1f77b4",
    "decode": "#ff7f0e",
    "inference": "#2ca02c",
    "write": "#d62728",
}
BAR_HEIGHT = 0.8


def load_rank_records(store: Store, run_id: str) -> list[dict[str, Any]]:
    """Return the run's rank records, ordered by rank."""
    records = [read_json(store, key) for key in store.list(ranks_prefix(run_id)) if key.endswith(".json")]
    return sorted(records, key=lambda r: r["rank"])


def _axes(ax: Any, size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=size)
        return fig, ax
    return ax.figure, ax


def plot_rank_timeline(records: list[dict[str, Any]], ax: Any = None) -> Any:
    """Draw one row per rank with a bar per stage of each partition; return the figure."""
    from matplotlib.patches import Patch

    fig, ax = _axes(ax, (10, 1.5 + 0.35 * max(1, len(records))))
    if not records:
        ax.set_title("no rank records")
        return fig
    origin = min(r["started_at"] for r in records)
    for record in records:
        for stage, color in STAGE_COLORS.items():
            spans = [(e["start"] - origin, e["end"] - e["start"]) for e in record["events"] if e["stage"] == stage]
            if spans:
                ax.broken_barh(spans, (record["rank"] - BAR_HEIGHT / 2, BAR_HEIGHT), facecolors=color)
    ax.set_xlabel("time since first rank start (s)")
    ax.set_ylabel("rank")
    ax.set_yticks([r["rank"] for r in records])
    ax.invert_yaxis()
    ax.legend(handles=[Patch(color=c, label=s) for s, c in STAGE_COLORS.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize="small", ncol=len(STAGE_COLORS))
    ax.set_title(f"stages per rank, run {records[0]['run_id']}")
    return fig


def plot_throughput(records: list[dict[str, Any]], ax: Any = None) -> Any:
    """Draw each rank's images/s over its wall duration and over inference alone; return the figure."""
    import numpy as np

    fig, ax = _axes(ax, (8, 3.5))
    ranks = np.array([r["rank"] for r in records])
    wall = np.array([r["images"] / r["duration_s"] if r["duration_s"] > 0 else 0.0 for r in records])
    inference = np.array([r["images"] / r["timings"]["inference_s"] if r["timings"]["inference_s"] > 0 else 0.0
                          for r in records])
    width = 0.4
    ax.bar(ranks - width / 2, wall, width, label="images / rank wall time")
    ax.bar(ranks + width / 2, inference, width, label="images / inference time")
    ax.set_xlabel("rank")
    ax.set_xticks(ranks)
    ax.set_ylabel("images per second")
    ax.legend(fontsize="small")
    ax.set_title("throughput per rank")
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as PNG at ``path`` (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
