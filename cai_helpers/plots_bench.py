"""Seaborn figures of benchmark results, with the CAI paper's published points beside ours.

The paper is Staylor et al., arXiv:2501.06249; its points come from ``cai_helpers.paper``.

Each function takes a bench result dict (``python -m cai_helpers.bench`` JSON) and
returns a matplotlib Figure; ``save_figure`` writes PNG files. Paper points are drawn
as open markers with dashed lines, ours as filled markers with solid lines, and the
compute roofline of the same run as a dotted horizontal line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display on workers and CI; notebooks show the returned Figure

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from cai_helpers import paper  # noqa: E402

logger = logging.getLogger(__name__)

FIGURE_SIZE = (7.0, 4.5)
PAPER_STYLE = dict(linestyle="--", marker="o", markerfacecolor="none")


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows) if rows else pd.DataFrame()


def _roofline_lines(ax, result: dict, label_unit: str = "images/s") -> None:
    for roof in result.get("roofline", []):
        ax.axhline(roof["bound_images_per_s"], linestyle=":", color="grey")
        ax.annotate(f"roofline {roof['device']} {roof['threads']}T: {roof['bound_images_per_s']:.0f} {label_unit}",
                    (0.01, roof["bound_images_per_s"]), xycoords=("axes fraction", "data"),
                    fontsize=7, color="grey", va="bottom")


def plot_throughput_vs_batch(result: dict, *, with_paper: bool = True) -> plt.Figure:
    """Plot images/s against batch size per runtime and thread count, with the roofline.

    The paper's points are its Lambda fan-out at 1 GB (bit/s as it defines them, over
    164,160 bits per image), so they compare shapes, not absolute speed per core.
    """
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    ours = _frame(result.get("inference", []))
    if not ours.empty:
        ours = ours.assign(setting=ours["runtime"] + " " + ours["device"] + " " + ours["threads"].astype(str) + "T")
        sns.lineplot(data=ours, x="batch_size", y="images_per_s", hue="setting", marker="o", ax=ax)
    _roofline_lines(ax, result)
    if with_paper:
        points = _frame(paper.batch_sweep_rows())
        ax.plot(points["batch_size"], points["images_per_s"], color="black",
                label="paper: Lambda fan-out, 1 GB", **PAPER_STYLE)
    ax.set(xscale="log", yscale="log", xlabel="batch size (images)", ylabel="throughput (images/s)",
           title="Throughput vs batch size")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks([32, 64, 128, 256, 512], labels=["32", "64", "128", "256", "512"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_time_vs_data_size(result: dict, *, with_paper: bool = True) -> plt.Figure:
    """Plot inference time (s) against data size (GB) per runtime, beside the paper's devices.

    The dotted line is the time at the compute bound of the run's largest thread count:
    galaxies / (FLOP/s / FLOP per image).
    """
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    ours = _frame(result.get("data_size", []))
    if not ours.empty:
        ours = ours.assign(setting="ours: " + ours["runtime"] + " " + ours["device"] + " " +
                           ours["threads"].astype(str) + "T")
        sns.lineplot(data=ours, x="data_gb", y="seconds", hue="setting", marker="o", ax=ax)
        sizes = sorted(ours["data_gb"].unique())
        for roof in result.get("roofline", [])[-1:]:
            bound = [paper.galaxies_for_gb(size) / roof["bound_images_per_s"] for size in sizes]
            ax.plot(sizes, bound, linestyle=":", color="grey", label=f"roofline bound ({roof['threads']}T)")
    if with_paper:
        points = _frame(paper.time_vs_data_size_rows())
        for device, group in points.groupby("device", sort=False):
            ax.plot(group["data_gb"], group["seconds"], label=f"paper: {device}", **PAPER_STYLE)
    ax.set(xscale="log", yscale="log", xlabel="data size (GB, 20,520 B per galaxy)", ylabel="time (s)",
           title="Inference time vs data size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_partition_sweep(result: dict, *, with_paper: bool = True) -> plt.Figure:
    """Plot worker time and throughput per worker against partition size, ours beside the paper's.

    Per-worker throughput compares like with like, because the paper ran 517 Lambdas
    at 25 MB and a local run has a few workers. The paper's fan-out totals are in
    ``cai_helpers.paper.PARTITION_SWEEP_12_6_GB``.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIGURE_SIZE[0] * 1.6, FIGURE_SIZE[1]))
    ours = _frame(result.get("fanout", []))
    if not ours.empty:
        sns.lineplot(data=ours, x="partition_mb", y="worker_mean_s", marker="o", ax=left,
                     label="ours: local worker wall time")
        sns.lineplot(data=ours, x="partition_mb", y="worker_images_per_s", marker="o", ax=right,
                     label="ours: images / worker wall time")
    if with_paper:
        points = _frame(paper.partition_sweep_rows())
        left.plot(points["partition_mb"], points["worker_seconds"], color="black",
                  label="paper: Lambda CPU time, 10,240 MB", **PAPER_STYLE)
        right.plot(points["partition_mb"], points["worker_images_per_s"], color="black",
                   label="paper: images / Lambda CPU time", **PAPER_STYLE)
    left.set(xlabel="partition size (MB)", ylabel="time per worker (s)", title="Worker time vs partition size")
    right.set(xlabel="partition size (MB)", ylabel="throughput per worker (images/s)",
              title="Worker throughput vs partition size")
    for ax in (left, right):
        ax.set_xticks([25, 50, 75, 100])
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_scale_model(rows: list[dict]) -> plt.Figure:
    """Plot predicted whole-run time and cost per partition size at each memory setting."""
    frame = _frame(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIGURE_SIZE[0] * 1.6, FIGURE_SIZE[1]))
    if not frame.empty:
        frame = frame[frame["feasible"]]
        sns.lineplot(data=frame, x="partition_mb", y="total_seconds", hue="data", style="memory_mb",
                     marker="o", ax=left)
        sns.lineplot(data=frame, x="partition_mb", y="cost_usd", hue="data", style="memory_mb",
                     marker="o", ax=right, legend=False)
    left.set(xlabel="partition size (MB)", ylabel="whole run (s)", yscale="log", title="SIMULATION: run time")
    right.set(xlabel="partition size (MB)", ylabel="cost (USD)", yscale="log", title="SIMULATION: cost")
    left.legend(fontsize=6)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (150 dpi) to ``path``, creating its folder; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    logger.info("saved figure %s", path)
    return path
