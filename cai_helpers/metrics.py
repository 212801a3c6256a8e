"""Photometric-redshift accuracy metrics, whole-array and mergeable (streaming) forms.

All metrics use the normalised residual dz = (z_pred - z_true) / (1 + z_true):

- ``bias`` = mean(dz)
- ``sigma_nmad`` = 1.4826 * median(|dz - median(dz)|)
- ``outlier_fraction`` = share of |dz| > 0.15, ``outlier_fraction_005`` = share of
  |dz| > 0.05 (the eta that SDSS photo-z papers such as Pasquet et al. 2019 report)
- ``mse``, ``mae`` on z itself and ``r2`` = 1 - SSE / SST.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from cai_helpers.errors import InvalidParameterError

logger = logging.getLogger(__name__)

NMAD_SCALE = 1.4826  # makes the MAD of a Gaussian equal its standard deviation
OUTLIER_THRESHOLD = 0.15
OUTLIER_THRESHOLD_005 = 0.05


def _as_pair(z_pred: Any, z_true: Any) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(z_pred, dtype=np.float64).reshape(-1)
    true = np.asarray(z_true, dtype=np.float64).reshape(-1)
    if pred.shape != true.shape:
        raise InvalidParameterError(
            f"z_pred has {pred.size} values but z_true has {true.size}; pass one "
            "prediction per galaxy")
    return pred, true


def normalized_residuals(z_pred: Any, z_true: Any) -> np.ndarray:
    """Return dz = (z_pred - z_true) / (1 + z_true) as float64."""
    pred, true = _as_pair(z_pred, z_true)
    return (pred - true) / (1.0 + true)


def photoz_metrics(z_pred: Any, z_true: Any) -> dict[str, float]:
    """Compute n, mse, mae, bias, sigma_nmad, outlier_fraction, outlier_fraction_005, r2.

    Pairs where z_true or z_pred is not finite (NaN marks an unknown redshift) are
    dropped and not counted in ``n``. With no valid pair every metric except n is NaN.
    """
    pred, true = _as_pair(z_pred, z_true)
    valid = np.isfinite(pred) & np.isfinite(true)
    pred, true = pred[valid], true[valid]
    n = int(pred.size)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "mse": nan, "mae": nan, "bias": nan, "sigma_nmad": nan,
                "outlier_fraction": nan, "outlier_fraction_005": nan, "r2": nan}

    error = pred - true
    dz = error / (1.0 + true)
    sst = float(np.sum((true - true.mean()) ** 2))
    return {
        "n": n,
        "mse": float(np.mean(error ** 2)),
        "mae": float(np.mean(np.abs(error))),
        "bias": float(np.mean(dz)),
        "sigma_nmad": float(NMAD_SCALE * np.median(np.abs(dz - np.median(dz)))),
        "outlier_fraction": float(np.mean(np.abs(dz) > OUTLIER_THRESHOLD)),
        "outlier_fraction_005": float(np.mean(np.abs(dz) > OUTLIER_THRESHOLD_005)),
        "r2": float(1.0 - np.sum(error ** 2) / sst) if sst > 0 else float("nan"),
    }


@dataclass
class PhotozSums:
    """Additive error sums from which every metric except sigma_nmad follows.

    Workers fill one each over their partition and the sums are merged by addition
    (``+`` or an allreduce of :meth:`to_vector`). sigma_nmad needs a median of all
    residuals, so it cannot be merged from sums: the summarizer computes it from the
    concatenated prediction catalog with :func:`photoz_metrics`.
    """

    n: float = 0.0
    sum_dz: float = 0.0
    sum_dz2: float = 0.0
    sum_sq_error: float = 0.0  # sum (z_pred - z_true)^2
    sum_abs_error: float = 0.0  # sum |z_pred - z_true|
    count_outlier: float = 0.0  # |dz| > 0.15
    count_outlier_005: float = 0.0  # |dz| > 0.05
    sum_z_true: float = 0.0
    sum_z_true2: float = 0.0

    @classmethod
    def from_arrays(cls, z_pred: Any, z_true: Any) -> "PhotozSums":
        """Accumulate the sums over finite pairs, as :func:`photoz_metrics` counts them."""
        pred, true = _as_pair(z_pred, z_true)
        valid = np.isfinite(pred) & np.isfinite(true)
        pred, true = pred[valid], true[valid]
        error = pred - true
        dz = error / (1.0 + true)
        return cls(
            n=float(pred.size),
            sum_dz=float(dz.sum()),
            sum_dz2=float((dz ** 2).sum()),
            sum_sq_error=float((error ** 2).sum()),
            sum_abs_error=float(np.abs(error).sum()),
            count_outlier=float((np.abs(dz) > OUTLIER_THRESHOLD).sum()),
            count_outlier_005=float((np.abs(dz) > OUTLIER_THRESHOLD_005).sum()),
            sum_z_true=float(true.sum()),
            sum_z_true2=float((true ** 2).sum()),
        )

    def __add__(self, other: "PhotozSums") -> "PhotozSums":
        return PhotozSums(*(a + b for a, b in zip(self.to_vector(), other.to_vector())))

    def to_vector(self) -> list[float]:
        """Return the sums in field order (for an allreduce of a float64 vector)."""
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_vector(cls, values: Any) -> "PhotozSums":
        values = [float(v) for v in values]
        if len(values) != len(fields(cls)):
            raise InvalidParameterError(
                f"a PhotozSums vector has {len(fields(cls))} values, got {len(values)}")
        return cls(*values)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Return the mergeable metrics; sigma_nmad is absent (see the class note).

        ``dz_std`` (population standard deviation of dz) is added because it needs only
        the sums.
        """
        nan = float("nan")
        if self.n == 0:
            return {"n": 0, "mse": nan, "mae": nan, "bias": nan, "dz_std": nan,
                    "outlier_fraction": nan, "outlier_fraction_005": nan, "r2": nan}
        n = self.n
        bias = self.sum_dz / n
        sst = self.sum_z_true2 - self.sum_z_true ** 2 / n
        return {
            "n": int(n),
            "mse": self.sum_sq_error / n,
            "mae": self.sum_abs_error / n,
            "bias": bias,
            "dz_std": max(self.sum_dz2 / n - bias ** 2, 0.0) ** 0.5,
            "outlier_fraction": self.count_outlier / n,
            "outlier_fraction_005": self.count_outlier_005 / n,
            "r2": 1.0 - self.sum_sq_error / sst if sst > 0 else nan,
        }


def residual_quantiles(z_a: Any, z_b: Any, reference: Any | None = None
                       ) -> dict[str, float]:
    """Return p50, p99 and max of |z_a - z_b| / (1 + reference) (reference defaults to
    z_b); used for the parity of two implementations of one model."""
    a, b = _as_pair(z_a, z_b)
    ref = b if reference is None else np.asarray(reference, dtype=np.float64).reshape(-1)
    dz = np.abs(a - b) / (1.0 + ref)
    return {"p50": float(np.percentile(dz, 50)), "p99": float(np.percentile(dz, 99)),
            "max": float(dz.max())}
