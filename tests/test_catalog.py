"""The shipped SDSS galaxy catalog: counts, ranges, ids and validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cai_helpers.catalog import COLUMNS, MAG_COLUMNS, load_catalog
from cai_helpers.errors import DataFormatError


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    return load_catalog()


def test_catalog_counts_per_source(catalog):
    # build_catalog.py printed 10,000 -> 9,986 (kcorrect) and 5,000 -> 5,000 (MLZ).
    counts = catalog["source"].value_counts()
    assert counts["kcorrect_gst"] == 9_986
    assert counts["mlz_sdss_mgs"] == 5_000
    assert len(catalog) == 14_986
    assert list(catalog.columns) == list(COLUMNS)


def test_catalog_quality_cuts_hold(catalog):
    assert (catalog["z"] > 0).all()
    assert (catalog["z"] < 0.4).all()
    mags = catalog[list(MAG_COLUMNS)].to_numpy()
    assert np.isfinite(mags).all()
    assert (mags > 10).all()
    assert (mags < 30).all()
    # Main Galaxy Sample: Petrosian r < 17.77; model magnitudes scatter a little fainter.
    assert np.quantile(catalog["mag_r"], 0.99) < 18.0


def test_catalog_ids_unique_and_stable(catalog):
    ids = catalog["object_id"].to_numpy()
    assert catalog["object_id"].dtype == np.int64
    assert len(np.unique(ids)) == len(ids)
    kcorrect = catalog[catalog["source"] == "kcorrect_gst"]
    assert kcorrect["object_id"].min() >= 100_000_000
    assert kcorrect["object_id"].max() < 100_010_000
    mlz = catalog[catalog["source"] == "mlz_sdss_mgs"]
    assert mlz["object_id"].min() >= 200_000_000
    assert mlz["object_id"].max() < 200_005_000
    assert mlz["ra"].isna().all()
    assert kcorrect["ra"].between(0, 360).all()


def test_catalog_kcorrect_magnitude_by_hand(catalog):
    # Row 0 of gst_tests_small.fits: MODELFLUX_r = 132.56783 nanomaggies, EXTINCTION_r = 0.14023204.
    row = catalog.set_index("object_id").loc[100_000_000]
    expected = 22.5 - 2.5 * np.log10(132.56783) - 0.14023204
    assert row["mag_r"] == pytest.approx(expected, abs=1e-4)
    assert row["z"] == pytest.approx(0.082659, abs=1e-6)


def test_catalog_missing_column_rejected(tmp_path, catalog):
    path = tmp_path / "bad.csv"
    catalog.drop(columns=["mag_g"]).head(5).to_csv(path, index=False)
    with pytest.raises(DataFormatError, match="mag_g"):
        load_catalog(path)


def test_catalog_duplicate_id_rejected(tmp_path, catalog):
    path = tmp_path / "dup.csv"
    rows = catalog.head(3).copy()
    rows.loc[2, "object_id"] = rows.loc[0, "object_id"]
    rows.to_csv(path, index=False)
    with pytest.raises(DataFormatError, match="repeats object_id"):
        load_catalog(path)
