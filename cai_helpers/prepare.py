"""Steps of notebook 01: build the rendered galaxy data set and record its key numbers."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cai_helpers.catalog import load_catalog
from cai_helpers.dataset import DEFAULT_SHARD_ROWS, DatasetReader, build_dataset
from cai_helpers.store import Store, open_store

log = logging.getLogger(__name__)

SMALL_TENSORS = ("magnitudes", "redshift", "object_id", "split")
FLUX_SAMPLE_SIZE = 1000  # galaxies re-rendered without noise to measure the flux inside the cutout


@dataclass
class PrepareConfig:
    """Settings of notebook 01 (the names of its parameters cell)."""

    store_location: str = "data/store"  # local folder, file://... or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint; None for AWS or a local folder
    dataset_prefix: str = "datasets/sdss-rendered"
    catalog_path: str | None = None  # None: the shipped data/catalog/sdss_galaxies.csv.gz
    n_galaxies: int | None = None  # None: every catalog galaxy (14,986)
    realisations: int = 1
    seed: int = 42
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    shard_rows: int = DEFAULT_SHARD_ROWS
    workers: int = 1  # rendering threads
    figures_dir: str = "figures"
    results_path: str = "runs/notebooks/01_prepare_data.json"


def open_config_store(config: PrepareConfig) -> Store:
    """Open the store named by the configuration."""
    return open_store(config.store_location, endpoint_url=config.endpoint_url)


def prepare_dataset(config: PrepareConfig, catalog: pd.DataFrame | None = None) -> dict[str, Any]:
    """Render the catalog into a fresh data set; return the key numbers.

    Deletes anything under the data set prefix first, so no shard of an earlier, larger
    build survives next to the new manifest. Returned keys: n_catalog, n_rows, splits
    (counts), n_shards, render_seconds (wall time of rendering and writing),
    galaxies_per_second, dataset (URL of the manifest).
    """
    catalog = load_catalog(config.catalog_path) if catalog is None else catalog
    store = open_config_store(config)
    removed = store.delete_prefix(config.dataset_prefix.rstrip("/") + "/")
    if removed:
        log.info("removed %d old objects under %s", removed, store.url_of(config.dataset_prefix))

    start = time.perf_counter()
    manifest = build_dataset(store, config.dataset_prefix, catalog, n_galaxies=config.n_galaxies,
                             realisations=config.realisations, seed=config.seed,
                             fractions=tuple(config.split_fractions), shard_rows=config.shard_rows,
                             workers=config.workers)
    seconds = time.perf_counter() - start
    return {
        "n_catalog": len(catalog),
        "n_rows": manifest["n_rows"],
        "splits": manifest["splits"],
        "n_shards": len(manifest["shards"]),
        "image_size": manifest["image_size"],
        "render_seconds": round(seconds, 2),
        "galaxies_per_second": round(manifest["n_rows"] / seconds, 1),
        "dataset": store.url_of(f"{config.dataset_prefix.rstrip('/')}/manifest.json"),
    }


def flux_inside_summary(catalog: pd.DataFrame, config: PrepareConfig, *,
                        n_sample: int = FLUX_SAMPLE_SIZE) -> dict[str, float]:
    """Measure how much r-band flux the cutouts keep, on up to ``n_sample`` data-set galaxies.

    Returns the median fraction inside the cutout (realisation 0) and the share of
    galaxies that keep less than 90% (large, nearby galaxies spill over the stamp).
    """
    from cai_helpers.dataset import select_galaxies
    from cai_helpers.render import flux_fraction_inside

    n_galaxies = len(catalog) if config.n_galaxies is None else config.n_galaxies
    sample = select_galaxies(catalog, min(n_sample, n_galaxies), seed=config.seed)
    inside_r = flux_fraction_inside(sample, seed=config.seed)[:, 2]
    return {
        "flux_inside_sample": len(sample),
        "flux_inside_r_median": round(float(np.median(inside_r)), 4),
        "share_below_90pct_inside": round(float(np.mean(inside_r < 0.9)), 4),
    }


def read_small_tensors(reader: DatasetReader) -> dict[str, np.ndarray]:
    """Read every tensor except the images, one shard in memory at a time."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SMALL_TENSORS}
    for shard in reader.iter_shards():
        for name in SMALL_TENSORS:
            parts[name].append(shard[name])
    return {name: np.concatenate(values) for name, values in parts.items()}


def read_first_images(reader: DatasetReader, n: int) -> dict[str, np.ndarray]:
    """Read the first ``n`` rows (images included) from the first shard."""
    shard = reader.read_shard(reader.manifest["shards"][0])
    return {name: values[:n] for name, values in shard.items()}


def write_results(results: dict[str, Any], config: PrepareConfig) -> Path:
    """Write the notebook's key numbers and its configuration as JSON; return the path."""
    path = Path(config.results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": asdict(config), **results}, indent=1, default=str))
    log.info("wrote %s", path)
    return path
