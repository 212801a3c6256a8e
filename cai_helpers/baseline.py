"""k-nearest-neighbour photo-z baseline on r magnitude and the four colours.

A 10-neighbour regressor (scikit-learn, uniform weights, Euclidean distance on
r, u-g, g-r, r-i, i-z in magnitudes) is fitted on the training split. It is the floor
that a magnitude-only model reaches on an SDSS Main Galaxy Sample catalog, so the
image model should beat it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.neighbors import KNeighborsRegressor

from cai_helpers.errors import InvalidParameterError
from cai_helpers.metrics import photoz_metrics

logger = logging.getLogger(__name__)

KNN_NEIGHBORS = 10
R_BAND = 2  # index of r in (u, g, r, i, z)


def colour_features(magnitudes: Any) -> np.ndarray:
    """Return [N, 5] features (r, u-g, g-r, r-i, i-z) from ugriz magnitudes [N, 5]."""
    mags = np.asarray(magnitudes, dtype=np.float64)
    if mags.ndim != 2 or mags.shape[1] != 5:
        raise InvalidParameterError(
            f"magnitudes must have shape [N, 5] (u, g, r, i, z), got {mags.shape}")
    colours = mags[:, :-1] - mags[:, 1:]  # [N, 4]
    return np.column_stack([mags[:, R_BAND], colours])


def fit_knn(train_mags: Any, train_z: Any, k: int = KNN_NEIGHBORS) -> KNeighborsRegressor:
    """Fit the k-nearest-neighbour regressor on training magnitudes and redshifts."""
    model = KNeighborsRegressor(n_neighbors=k)
    model.fit(colour_features(train_mags), np.asarray(train_z, dtype=np.float64))
    return model


def predict_knn(model: KNeighborsRegressor, magnitudes: Any) -> np.ndarray:
    """Predict redshift [N] from ugriz magnitudes [N, 5]."""
    return model.predict(colour_features(magnitudes))


def knn_baseline(train_mags: Any, train_z: Any, test_mags: Any, test_z: Any,
                 k: int = KNN_NEIGHBORS) -> dict[str, float]:
    """Fit on the training split and return :func:`photoz_metrics` on the test split."""
    model = fit_knn(train_mags, train_z, k)
    metrics = photoz_metrics(predict_knn(model, test_mags), test_z)
    logger.info("kNN baseline (k=%d): sigma_nmad %.4f, outlier_fraction_005 %.4f on %d galaxies",
                k, metrics["sigma_nmad"], metrics["outlier_fraction_005"], metrics["n"])
    return metrics


def catalog_knn_baseline(split_seed: int = 42, k: int = KNN_NEIGHBORS) -> dict[str, float]:
    """Run the baseline on the shipped catalog with the project's split for ``split_seed``."""
    from cai_helpers.catalog import MAG_COLUMNS, load_catalog
    from cai_helpers.dataset import assign_splits

    catalog = load_catalog()
    splits = assign_splits(catalog["object_id"].to_numpy(), seed=split_seed)
    mags = catalog[list(MAG_COLUMNS)].to_numpy()
    z = catalog["z"].to_numpy()
    train, test = splits == 0, splits == 2
    return knn_baseline(mags[train], z[train], mags[test], z[test], k)
