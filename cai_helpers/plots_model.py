"""Figures for the AstroMAE notebook: training curves, MAE reconstructions, predicted
against true redshift, and the normalised residual distribution.

Each function returns a matplotlib Figure and does no I/O. Shape legend: N samples,
C channels (bands), H W pixels, L patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from cai_helpers.mae import MAEPretrainer, patchify, unpatchify

BAND_NAMES = ("u", "g", "r", "i", "z")
OUTLIER_LINE = 0.05  # |dz| threshold drawn on the residual plots


def plot_training_curves(histories: dict[str, list[dict[str, Any]] | None]) -> Figure:
    """Plot train and validation loss per epoch, one panel per phase present.

    ``histories`` maps a phase ("pretrain", "finetune") to its list of epoch records
    (``epoch``, ``train_loss``, ``val_loss``), as ``python -m cai_helpers.train`` logs them.
    """
    phases = [(name, records) for name, records in histories.items() if records]
    fig = Figure(figsize=(5 * max(1, len(phases)), 3.6), layout="constrained")
    if not phases:
        fig.text(0.5, 0.5, "no training history", ha="center", va="center")
        return fig
    for i, (name, records) in enumerate(phases):
        ax = fig.add_subplot(1, len(phases), i + 1)
        epochs = [r["epoch"] for r in records]
        ax.plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
        ax.plot(epochs, [r["val_loss"] for r in records], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.set_ylabel("masked-patch MSE (scaled pixels)" if name == "pretrain"
                      else "MSE of z")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.legend()
    return fig


@torch.no_grad()
def plot_reconstructions(mae: MAEPretrainer, images: torch.Tensor, band: int = 2,
                         seed: int = 0) -> Figure:
    """Show input, visible patches and reconstruction of one band for a few images.

    ``images`` [N, C, H, W] are raw cutouts (nanomaggies per pixel); masked patches of
    the reconstruction are the decoder's predictions, visible ones the input.
    """
    mae.eval()
    generator = torch.Generator().manual_seed(seed)
    prepared = mae.prepare_images(images)
    tokens, mask, ids_restore = mae.forward_encoder(prepared, generator)
    pred = mae.forward_decoder(tokens, ids_restore)  # [N, L, P * P * C]
    patch, chans = mae.config.patch_size, mae.config.in_chans
    keep = mask.unsqueeze(-1)  # 1 masked, 0 visible
    target = patchify(prepared, patch)
    masked_input = unpatchify(target * (1 - keep), patch, chans)
    combined = unpatchify(target * (1 - keep) + pred * keep, patch, chans)

    rows = prepared.shape[0]
    fig = Figure(figsize=(7.5, 2.4 * rows), layout="constrained")
    titles = ("input", "visible (25%)", "reconstruction")
    for row in range(rows):
        panels = (prepared[row, band], masked_input[row, band], combined[row, band])
        vmin, vmax = np.percentile(prepared[row, band].numpy(), [1, 99.5])
        for col, panel in enumerate(panels):
            ax = fig.add_subplot(rows, 3, row * 3 + col + 1)
            ax.imshow(panel.numpy(), origin="lower", cmap="magma", vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{titles[col]} ({BAND_NAMES[band]} band)")
    return fig


def _metrics_text(metrics: dict[str, float]) -> str:
    return (f"N = {metrics['n']}\n"
            f"sigma_NMAD = {metrics['sigma_nmad']:.4f}\n"
            f"bias = {metrics['bias']:+.4f}\n"
            f"eta(|dz|>0.05) = {100 * metrics['outlier_fraction_005']:.2f}%\n"
            f"MSE = {metrics['mse']:.2e}")


def plot_z_comparison(z_true: np.ndarray, z_pred: np.ndarray, metrics: dict[str, float],
                      label: str = "AstroMAE") -> Figure:
    """Scatter predicted against spectroscopic redshift with the 1:1 line and metrics."""
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    top = float(max(np.max(z_true), np.max(z_pred))) * 1.05
    ax.scatter(z_true, z_pred, s=4, alpha=0.4, lw=0)
    line = np.linspace(0, top, 2)
    ax.plot(line, line, "k-", lw=1)
    for sign in (-1, 1):  # |dz| = 0.05 envelope
        ax.plot(line, line + sign * OUTLIER_LINE * (1 + line), "k:", lw=0.8)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("spectroscopic z")
    ax.set_ylabel(f"predicted z ({label})")
    ax.text(0.03, 0.97, _metrics_text(metrics), transform=ax.transAxes, va="top",
            family="monospace", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8})
    return fig


def plot_residuals(residuals: dict[str, np.ndarray], bins: int = 80) -> Figure:
    """Histogram the normalised residuals dz = (z_pred - z_true) / (1 + z_true), one
    curve per model (``{"AstroMAE": dz, "kNN": dz}``)."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    values = np.concatenate(list(residuals.values()))
    span = max(0.12, float(np.percentile(np.abs(values), 99.5)))
    edges = np.linspace(-span, span, bins + 1)
    for label, dz in residuals.items():
        ax.hist(dz, bins=edges, histtype="step", lw=1.4, label=label)
    for sign in (-1, 1):
        ax.axvline(sign * OUTLIER_LINE, color="k", ls=":", lw=0.8)
    ax.set_xlabel("dz = (z_pred - z_true) / (1 + z_true)")
    ax.set_ylabel("galaxies")
    ax.legend()
    return fig
