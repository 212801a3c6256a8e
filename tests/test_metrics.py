"""Photo-z metrics against values worked out by hand, and the mergeable sums."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cai_helpers.errors import InvalidParameterError
from cai_helpers.metrics import PhotozSums, photoz_metrics, residual_quantiles

# dz = (z_pred - z_true) / (1 + z_true) = [0.01/1.1, 0.09/1.2, 0, 0.3/1.5, 0]
#    = [0.0090909, 0.075, 0, 0.2, 0]; median 0.0090909
# |dz - median| sorted = [0, 0.0090909, 0.0090909, 0.0659091, 0.1909091]; median 0.0090909
Z_TRUE = [0.1, 0.2, 0.0, 0.5, 0.25]
Z_PRED = [0.11, 0.29, 0.0, 0.8, 0.25]
EXPECTED = {
    "n": 5,
    "mse": (0.01 ** 2 + 0.09 ** 2 + 0.3 ** 2) / 5,  # 0.01964
    "mae": (0.01 + 0.09 + 0.3) / 5,  # 0.08
    "bias": (0.01 / 1.1 + 0.075 + 0.2) / 5,  # 0.0568182
    "sigma_nmad": 1.4826 * 0.01 / 1.1,  # 0.0134782
    "outlier_fraction": 1 / 5,  # only 0.2 > 0.15
    "outlier_fraction_005": 2 / 5,  # 0.075 and 0.2 > 0.05
    # mean z_true 0.21, SST = 0.0121 + 0.0001 + 0.0441 + 0.0841 + 0.0016 = 0.142
    "r2": 1 - 0.0982 / 0.142,
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_photoz_metrics_by_hand(key):
    metrics = photoz_metrics(Z_PRED, Z_TRUE)
    assert metrics[key] == pytest.approx(EXPECTED[key], rel=1e-9, abs=1e-12)


def test_photoz_metrics_perfect_prediction():
    metrics = photoz_metrics([0.1, 0.2, 0.3, 0.05], [0.1, 0.2, 0.3, 0.05])
    assert metrics["mse"] == 0.0
    assert metrics["sigma_nmad"] == 0.0
    assert metrics["outlier_fraction_005"] == 0.0
    assert metrics["r2"] == 1.0


def test_photoz_metrics_drops_nan_pairs():
    metrics = photoz_metrics(Z_PRED + [0.3, float("nan")], Z_TRUE + [float("nan"), 0.1])
    assert metrics["n"] == 5
    assert metrics["mse"] == pytest.approx(EXPECTED["mse"])


def test_photoz_metrics_empty_is_nan():
    metrics = photoz_metrics([], [])
    assert metrics["n"] == 0
    assert math.isnan(metrics["sigma_nmad"])


def test_photoz_metrics_length_mismatch_raises():
    with pytest.raises(InvalidParameterError, match="z_true has 4"):
        photoz_metrics([0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4])


def test_sums_merge_matches_whole():
    rng = np.random.default_rng(5)
    z_true = rng.uniform(0.01, 0.4, 101)
    z_pred = z_true + rng.normal(0, 0.03, 101)
    parts = [PhotozSums.from_arrays(z_pred[a:b], z_true[a:b])
             for a, b in ((0, 30), (30, 31), (31, 101))]
    merged = parts[0] + parts[1] + parts[2]
    whole = photoz_metrics(z_pred, z_true)
    streamed = merged.metrics()
    for key in ("n", "mse", "mae", "bias", "outlier_fraction", "outlier_fraction_005", "r2"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-9), key
    dz = (z_pred - z_true) / (1 + z_true)
    assert streamed["dz_std"] == pytest.approx(np.std(dz), rel=1e-9)
    assert "sigma_nmad" not in streamed


def test_sums_vector_round_trip():
    sums = PhotozSums.from_arrays(Z_PRED, Z_TRUE)
    assert PhotozSums.from_vector(sums.to_vector()) == sums
    assert sums.count_outlier_005 == 2
    assert sums.sum_abs_error == pytest.approx(0.4)
    with pytest.raises(InvalidParameterError):
        PhotozSums.from_vector([1.0, 2.0])


def test_residual_quantiles_by_hand():
    quantiles = residual_quantiles([0.1, 0.2, 0.4], [0.1, 0.2, 0.3])
    assert quantiles["max"] == pytest.approx(0.1 / 1.3)
    assert quantiles["p50"] == 0.0
