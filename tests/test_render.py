"""The cutout renderer: flux, profile transforms, a real-space cross-check, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter

from cai_helpers import render
from cai_helpers.catalog import MAG_COLUMNS, load_catalog

SEED = 7


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    return load_catalog()


def _catalog_flux(rows: pd.DataFrame) -> np.ndarray:
    return 10 ** ((22.5 - rows[list(MAG_COLUMNS)].to_numpy()) / 2.5)  # [N, C] nanomaggies


def test_hankel_table_matches_exponential():
    # Untruncated exponential of scale h: F(k) = (1 + (k h)^2)^(-3/2).
    t, transform = render.hankel_table(lambda r: np.exp(-render.EXP_B * r), r_max=40.0)
    k = np.expm1(t)
    expected = (1 + (k / render.EXP_B) ** 2) ** -1.5
    np.testing.assert_allclose(transform, expected, atol=1e-5)


def test_flux_conserved_per_band(catalog):
    rows = catalog[catalog["z"] > 0.05].sample(24, random_state=1)
    stamps = render.render_cutouts(rows, seed=SEED, size=256, noise=False)
    ratio = stamps.sum(axis=(2, 3), dtype=np.float64) / _catalog_flux(rows)
    np.testing.assert_allclose(ratio, 1.0, rtol=0.01)


def test_flux_fraction_matches_stamp_sum(catalog):
    rows = catalog.sample(16, random_state=2)
    stamps = render.render_cutouts(rows, seed=SEED, size=64, noise=False)
    inside = render.flux_fraction_inside(rows, seed=SEED, size=64)
    assert inside.shape == (16, 5)
    assert (inside <= 1 + 1e-4).all()
    assert (inside > 0).all()
    np.testing.assert_allclose(stamps.sum(axis=(2, 3), dtype=np.float64), inside * _catalog_flux(rows), rtol=1e-4)


def _real_space_render(p: dict, row: int, size: int, oversample: int = 8) -> np.ndarray:
    """Brute-force [C, size, size] image: profile on a fine grid, Gaussian blur, pixel sums."""
    fine = size * oversample
    coords = (np.arange(fine) + 0.5) / oversample - 0.5  # fine-pixel centres in coarse pixels
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - (size // 2 + p["offset_pix"][row, 0]), y - (size // 2 + p["offset_pix"][row, 1])
    pa = p["position_angle"][row]
    major, minor = np.cos(pa) * dx + np.sin(pa) * dy, -np.sin(pa) * dx + np.cos(pa) * dy

    def taper(r, start, end):
        s = np.clip((r - start) / (end - start), 0, 1)
        return (1 - s**2) ** 2

    q, r_e = p["q_bulge"][row], p["bulge_re_pix"][row]
    rho = np.sqrt(q * major**2 + minor**2 / q) / r_e
    bulge = np.exp(-7.669249 * (rho**0.25 - 1)) * taper(rho, 7, 8)
    q, r_e = p["q_disk"][row], p["disk_re_pix"][row]
    rho = np.sqrt(q * major**2 + minor**2 / q) / r_e
    disk = np.exp(-1.678347 * rho) * taper(rho, 3, 4)
    bulge, disk = bulge / bulge.sum(), disk / disk.sum()

    fractions = render.band_bulge_fractions(p["bulge_fraction_r"][row:row + 1])[0]
    out = []
    for band in range(5):
        image = fractions[band] * bulge + (1 - fractions[band]) * disk
        image = gaussian_filter(image, p["psf_sigma_pix"][row, band] * oversample, mode="constant")
        image = image.reshape(size, oversample, size, oversample).sum(axis=(1, 3))
        out.append(p["flux_nmgy"][row, band] * image)
    return np.array(out)


def test_render_matches_real_space_rendering(catalog):
    rows = catalog[(catalog["z"] > 0.08) & (catalog["z"] < 0.12)].head(40)
    p = render.draw_galaxy_parameters(rows, seed=SEED)
    # A flattened, rotated, resolved galaxy with a real bulge tests every convention.
    ok = (p["q_disk"] < 0.7) & (p["r50_pix"] > 3) & (p["r50_pix"] < 6) & (p["bulge_fraction_r"] > 0.2)
    row = int(np.flatnonzero(ok)[0])
    expected = _real_space_render(p, row, size=64)
    got = render.render_cutouts(rows.iloc[[row]], seed=SEED, size=64, noise=False)[0]
    for band in range(5):
        peak = expected[band].max()
        assert np.abs(got[band] - expected[band]).max() < 0.01 * peak, f"band {band}"


def test_render_independent_of_batch(catalog):
    rows = catalog.sample(12, random_state=3)
    whole = render.render_cutouts(rows, seed=SEED, batch_size=12)
    batched = render.render_cutouts(rows, seed=SEED, batch_size=5)
    threaded = render.render_cutouts(rows, seed=SEED, batch_size=3, workers=2)
    reversed_single = render.render_cutouts(rows.iloc[::-1], seed=SEED, batch_size=1)[::-1]
    np.testing.assert_array_equal(whole, batched)
    np.testing.assert_array_equal(whole, threaded)
    np.testing.assert_array_equal(whole, reversed_single)


def test_render_varies_with_seed_and_realisation(catalog):
    rows = catalog.sample(4, random_state=4)
    base = render.render_cutouts(rows, seed=SEED)
    again = render.render_cutouts(rows, seed=SEED)
    np.testing.assert_array_equal(base, again)
    assert not np.allclose(base, render.render_cutouts(rows, seed=SEED + 1))
    assert not np.allclose(base, render.render_cutouts(rows, seed=SEED, realisation=1))


def test_sky_noise_level_per_band(catalog):
    rows = catalog.sample(6, random_state=5)
    noisy = render.render_cutouts(rows, seed=SEED)
    clean = render.render_cutouts(rows, seed=SEED, noise=False)
    std = (noisy - clean).std(axis=(0, 2, 3))
    # f_lim / 5 / sqrt(4 pi sigma_psf^2) by hand for r: 22.2 mag limit, 1.4 arcsec FWHM.
    sigma_r = 10 ** ((22.5 - 22.2) / 2.5) / 5 / np.sqrt(4 * np.pi * (1.4 / 2.3548 / 0.396) ** 2)
    assert std[2] == pytest.approx(sigma_r, rel=0.03)
    np.testing.assert_allclose(std, render.SKY_SIGMA_NMGY, rtol=0.03)
    assert std.argmax() == 4  # z has the largest sky noise


def test_shen_relation_by_hand():
    # M_r = -21: early 0.65 * 0.4 * 21 - 5.06 = 0.40; late 1.764 + 0.32 * log10(1 + 10**0.192) - 1.31.
    radii = render.shen_r50_kpc(np.array([-21.0, -21.0]), np.array([True, False]))
    assert radii[0] == pytest.approx(10**0.40, rel=1e-6)
    assert radii[1] == pytest.approx(10 ** (1.764 + 0.32 * np.log10(1 + 10**0.192) - 1.31), rel=1e-6)


def test_sizes_shrink_with_redshift(catalog):
    # In a magnitude-limited sample distant galaxies are more luminous, yet look smaller.
    near = catalog[(catalog["z"] > 0.03) & (catalog["z"] < 0.06)]
    far = catalog[(catalog["z"] > 0.2) & (catalog["z"] < 0.3)]
    r_near = np.median(render.draw_galaxy_parameters(near, seed=SEED)["r50_pix"])
    r_far = np.median(render.draw_galaxy_parameters(far, seed=SEED)["r50_pix"])
    assert r_far < 0.8 * r_near
