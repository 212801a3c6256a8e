"""Figures of notebook 01: cutouts per band, gri colour composites, catalog vs data set.

Shape legend: N galaxies, C bands, H W pixels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cai_helpers.catalog import BANDS

log = logging.getLogger(__name__)

ASINH_SOFTENING_NMGY = 0.1  # asinh stretch becomes logarithmic above this many nanomaggies per pixel
LUPTON_STRETCH = 0.5  # nanomaggies per pixel
LUPTON_Q = 8
# Per-band display gains (i, r, g), so an average galaxy looks neutral rather than orange.
# The stored images stay in nanomaggies.
COMPOSITE_GAINS = (1.0, 1.3, 2.2)
SPLIT_COLOURS = ("tab:blue", "tab:orange", "tab:green")


def plot_cutout_grid(images: np.ndarray, redshift: np.ndarray, *, max_rows: int = 6):
    """Plot cutouts with one row per galaxy, one column per band and an asinh stretch.

    ``images`` is float32 [N, C, H, W] in nanomaggies per pixel. Returns the figure.
    """
    import matplotlib.pyplot as plt

    n = min(len(images), max_rows)
    fig, axes = plt.subplots(n, len(BANDS), figsize=(1.6 * len(BANDS), 1.6 * n), squeeze=False)
    for row in range(n):
        stretched = np.arcsinh(images[row] / ASINH_SOFTENING_NMGY)  # [C, H, W]
        low, high = np.percentile(stretched, [1, 99.8])
        for band, name in enumerate(BANDS):
            ax = axes[row, band]
            ax.imshow(stretched[band], origin="lower", cmap="gray", vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
        axes[row, 0].set_ylabel(f"z={redshift[row]:.3f}", fontsize=8)
    fig.suptitle("Rendered cutouts (asinh stretch, common scale per galaxy)")
    fig.tight_layout()
    return fig


def plot_colour_composites(images: np.ndarray, redshift: np.ndarray, *, max_galaxies: int = 12):
    """Plot gri colour composites (Lupton et al. 2004, via astropy) of up to ``max_galaxies`` cutouts."""
    import matplotlib.pyplot as plt
    from astropy.visualization import make_lupton_rgb

    n = min(len(images), max_galaxies)
    columns = min(n, 6)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 1.9 * rows), squeeze=False)
    g, r, i = BANDS.index("g"), BANDS.index("r"), BANDS.index("i")
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        red, green, blue = (gain * images[k, band] for gain, band in zip(COMPOSITE_GAINS, (i, r, g)))
        rgb = make_lupton_rgb(red, green, blue, stretch=LUPTON_STRETCH, Q=LUPTON_Q)
        ax.imshow(rgb, origin="lower")
        ax.set_title(f"z={redshift[k]:.3f}", fontsize=8)
    fig.suptitle("gri composites (i as red, r as green, g as blue, gains " + ", ".join(map(str, COMPOSITE_GAINS)) + ")")
    fig.tight_layout()
    return fig


def plot_catalog_vs_dataset(catalog: pd.DataFrame, data: dict[str, np.ndarray]):
    """Plot redshift, r magnitude and g - r colour of the catalog and of the rendered set by split."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    g, r = BANDS.index("g"), BANDS.index("r")
    panels = [
        ("redshift", catalog["z"].to_numpy(), data["redshift"], np.linspace(0, 0.4, 41)),
        ("r (AB mag)", catalog["mag_r"].to_numpy(), data["magnitudes"][:, r], np.linspace(12, 19, 36)),
        ("g - r (mag)", (catalog["mag_g"] - catalog["mag_r"]).to_numpy(),
         data["magnitudes"][:, g] - data["magnitudes"][:, r], np.linspace(0, 1.6, 33)),
    ]
    for ax, (label, catalog_values, data_values, bins) in zip(axes, panels):
        ax.hist(catalog_values, bins=bins, density=True, histtype="stepfilled", color="0.85", label="catalog")
        for split, colour in enumerate(SPLIT_COLOURS):
            chosen = data["split"] == split
            if chosen.any():
                ax.hist(data_values[chosen], bins=bins, density=True, histtype="step", color=colour,
                        label=("train", "validation", "test")[split])
        ax.set_xlabel(label)
        ax.set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Catalog ({len(catalog):,} galaxies) vs rendered data set ({len(data['redshift']):,} rows)")
    fig.tight_layout()
    return fig


def save_figure(fig, figures_dir: str | Path, name: str) -> Path:
    """Save ``fig`` as PNG (150 dpi) under ``figures_dir``; return the path."""
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    log.info("saved %s", path)
    return path
