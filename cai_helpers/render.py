"""Render SDSS-like ugriz cutouts of real catalog galaxies (bulge + disk, PSF, sky noise).

Each galaxy keeps its catalog flux in every band and its real redshift; its size comes
from the Shen et al. (2003, MNRAS 343, 978) size-luminosity relations, so angular size,
surface brightness and colour all carry redshift information. Profiles are rendered
analytically in Fourier space: the profile's Hankel transform (tabulated once), times the
Gaussian PSF, times the pixel response (sinc), times a phase ramp for the sub-pixel
offset, then an inverse FFT. Sampling the pixel-convolved image at pixel centres gives the
exact pixel integrals. The band limit is harmless because the PSF transform at the Nyquist
frequency is below 1e-3 for any FWHM above 1.1 arcsec.

Choices (all per galaxy, drawn from that galaxy's own random stream):

- type: early with probability logistic((u - r - 2.22) / 0.15); 2.22 is the observed
  u - r separator of Strateva et al. (2001, AJ 122, 1861).
- bulge fraction in r: Beta(6, 2.5) for early types, Beta(1.3, 5) for late types. The
  bulge-to-disk ratio scales by BULGE_COLOUR per band, so bulges are redder than disks.
- half-light radius: Shen et al. eq. 14 (early) or eq. 15 (late) with the log-normal
  scatter of eq. 16, from M_r = m_r - distance modulus. NOTE: no k-correction is applied,
  so M_r of distant red galaxies is too faint by a few tenths of a magnitude (an
  estimate) and their drawn sizes are slightly too small.
- profiles: de Vaucouleurs bulge truncated smoothly from 7 to 8 r_e and exponential disk
  truncated smoothly from 3 to 4 r_e, as in the SDSS model magnitudes. r_e is the
  circularised half-light radius. The disk's r_e is R50 and the bulge's is
  R50 * (0.5 + 0.5 * bulge fraction), so small bulges are compact.
- shape: disk axis ratio from a random inclination with intrinsic thickness 0.15, bulge
  axis ratio uniform in [0.6, 1], one position angle, offset uniform in +-0.5 pixel.
- PSF: Gaussian with per-band FWHM PSF_FWHM_ARCSEC times a per-galaxy seeing factor.
- noise: Gaussian sky noise SKY_SIGMA_NMGY per pixel. NOTE: the galaxy's own photon
  noise is left out, so the central pixels of bright galaxies are less noisy than in SDSS.

Shape legend: N galaxies, C bands, H W pixels, K frequencies.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd
from scipy.special import j0

from cai_helpers.catalog import BANDS, MAG_COLUMNS
from cai_helpers.errors import InvalidParameterError

log = logging.getLogger(__name__)

PIXEL_SCALE_ARCSEC = 0.396  # SDSS imaging camera
# Median SDSS seeing is about 1.4 arcsec FWHM in r; u is worse, i and z a bit better.
PSF_FWHM_ARCSEC = np.array([1.55, 1.45, 1.40, 1.35, 1.35])
SEEING_SCATTER_DEX = 0.04  # per-galaxy seeing factor 10**N(0, 0.04), common to all bands
# 95% completeness limits for point sources in SDSS imaging (u 22.0, g 22.2, r 22.2,
# i 21.3, z 20.5; Abazajian et al. 2009, ApJS 182, 543), read as 5-sigma limits: the
# per-pixel sky sigma is f_lim / 5 / sqrt(4 pi sigma_psf**2), the noise-equivalent area
# of a Gaussian PSF. Result in nanomaggies per pixel: u 0.053, g 0.048, r 0.049,
# i 0.118, z 0.245. Relative to galaxy flux, u and z are the noisiest bands.
POINT_SOURCE_LIMIT_MAG = np.array([22.0, 22.2, 22.2, 21.3, 20.5])
_PSF_SIGMA_PIX = PSF_FWHM_ARCSEC / (2 * np.sqrt(2 * np.log(2))) / PIXEL_SCALE_ARCSEC
_LIMIT_FLUX_NMGY = 10 ** ((22.5 - POINT_SOURCE_LIMIT_MAG) / 2.5)
SKY_SIGMA_NMGY = _LIMIT_FLUX_NMGY / 5 / np.sqrt(4 * np.pi * _PSF_SIGMA_PIX**2)

BULGE_COLOUR = np.array([0.45, 0.7, 1.0, 1.15, 1.25])  # bulge-to-disk ratio per band, relative to r
EARLY_TYPE_UR_SPLIT = 2.22
EARLY_TYPE_UR_WIDTH = 0.15
DISK_THICKNESS = 0.15  # intrinsic axis ratio of an edge-on disk
BULGE_AXIS_RATIO_RANGE = (0.6, 1.0)
R50_RANGE_ARCSEC = (0.05, 60.0)  # clip of drawn sizes; 60 arcsec is 150 pixels

# Shen et al. (2003) size-luminosity relations, R50 in kpc for H0 = 70 and M_r in AB mag.
SHEN_EARLY = {"a": 0.65, "b": -5.06}
SHEN_LATE = {"alpha": 0.21, "beta": 0.53, "gamma": -1.31, "m0": -20.52}
SHEN_SCATTER = {"sigma1": 0.48, "sigma2": 0.25, "m0": -20.52}  # ln R50; eq. 16, late-type values

H0_KM_S_MPC = 70.0
OMEGA_M = 0.3

DEV_B = 7.669249  # de Vaucouleurs: I ~ exp(-b ((r / r_e)**0.25 - 1)), r_e encloses half the light
EXP_B = 1.678347  # exponential: I ~ exp(-b r / r_e)
DEV_TRUNCATION = (7.0, 8.0)  # in r_e: taper starts, profile reaches zero
EXP_TRUNCATION = (3.0, 4.0)
HANKEL_KR_MAX = 600.0  # table range in k * r_e (radians); the PSF removes everything beyond
# FFT grid sides in pixels. Each galaxy uses the smallest one whose periodic copies miss the cutout.
FFT_SIZES = (80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)
DEFAULT_BATCH_SIZE = 256


# --- profiles in Fourier space ---------------------------------------------------------

def hankel_table(profile, r_max: float, kr_max: float = HANKEL_KR_MAX, n_k: int = 800):
    """Tabulate the 2-D Fourier transform of a circular profile of unit r_e and unit flux.

    ``profile(r)`` gives the surface brightness at radius r (units of r_e), zero beyond
    ``r_max``. Returns ``(t, F)`` with t = log1p(k) for k in radians per r_e, for use with
    ``np.interp(np.log1p(k * r_e), t, F)``.
    """
    r = np.concatenate([np.geomspace(1e-9, 1e-2, 2000, endpoint=False), np.linspace(1e-2, r_max, 30000)])
    weight = profile(r) * r
    t = np.linspace(0.0, np.log1p(kr_max), n_k)
    k = np.expm1(t)
    transform = np.empty(n_k)
    for start in range(0, n_k, 50):  # chunks keep the [k, r] Bessel matrix near 13 MB
        block = k[start:start + 50, None]
        transform[start:start + 50] = np.trapezoid(weight * j0(block * r), r, axis=1)
    return t, transform / transform[0]


def _taper(r: np.ndarray, start: float, end: float) -> np.ndarray:
    """Smooth truncation: 1 inside ``start``, (1 - x**2)**2 across, 0 beyond ``end``."""
    x = np.clip((r - start) / (end - start), 0.0, 1.0)
    return (1 - x**2) ** 2


def _dev_profile(r: np.ndarray) -> np.ndarray:
    return np.exp(-DEV_B * (r**0.25 - 1)) * _taper(r, *DEV_TRUNCATION)


def _exp_profile(r: np.ndarray) -> np.ndarray:
    return np.exp(-EXP_B * (r - 1)) * _taper(r, *EXP_TRUNCATION)


@functools.cache
def _profile_tables() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "bulge": hankel_table(_dev_profile, DEV_TRUNCATION[1]),
        "disk": hankel_table(_exp_profile, EXP_TRUNCATION[1]),
    }


# --- per-galaxy parameters --------------------------------------------------------------

@functools.cache
def _distance_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Redshift grid with luminosity and angular-diameter distances in Mpc (flat LCDM)."""
    from astropy.cosmology import FlatLambdaCDM

    cosmology = FlatLambdaCDM(H0=H0_KM_S_MPC, Om0=OMEGA_M)
    z = np.linspace(0.0, 1.0, 2001)
    return z, cosmology.luminosity_distance(z).value, cosmology.angular_diameter_distance(z).value


def shen_r50_kpc(abs_mag_r: np.ndarray, early: np.ndarray) -> np.ndarray:
    """Median half-light radius in kpc (Shen et al. 2003 eq. 14 and 15) for M_r in AB mag."""
    log_early = -0.4 * SHEN_EARLY["a"] * abs_mag_r + SHEN_EARLY["b"]
    late = SHEN_LATE
    log_late = (-0.4 * late["alpha"] * abs_mag_r
                + (late["beta"] - late["alpha"]) * np.log10(1 + 10 ** (-0.4 * (abs_mag_r - late["m0"])))
                + late["gamma"])
    return 10 ** np.where(early, log_early, log_late)


def shen_scatter_ln(abs_mag_r: np.ndarray) -> np.ndarray:
    """Scatter of ln R50 at fixed M_r (Shen et al. 2003 eq. 16)."""
    s = SHEN_SCATTER
    return s["sigma2"] + (s["sigma1"] - s["sigma2"]) / (1 + 10 ** (-0.8 * (abs_mag_r - s["m0"])))


def draw_galaxy_parameters(catalog: pd.DataFrame, *, seed: int, realisation: int = 0) -> dict[str, np.ndarray]:
    """Draw each galaxy's shape, size, PSF and offset from its own random stream.

    The stream of a galaxy is ``SeedSequence([seed, object_id, realisation])``, so the
    result for one galaxy never depends on the others. Returned arrays have N rows;
    sizes are in pixels, angles in radians. ``rngs`` contains the streams, positioned after
    the parameter draws, for the noise.
    """
    mags = catalog[list(MAG_COLUMNS)].to_numpy(np.float64)  # [N, C]
    z = catalog["z"].to_numpy(np.float64)
    n = len(catalog)
    rngs = [np.random.default_rng(np.random.SeedSequence([seed, int(oid), realisation]))
            for oid in catalog["object_id"].to_numpy(np.int64)]
    draws = np.array([rng.random(8) for rng in rngs]).reshape(n, 8)  # uniform [0, 1)
    normals = np.array([rng.standard_normal(2) for rng in rngs]).reshape(n, 2)
    betas = np.array([(rng.beta(6.0, 2.5), rng.beta(1.3, 5.0)) for rng in rngs]).reshape(n, 2)

    # Type and bulge fraction in r.
    u_minus_r = mags[:, 0] - mags[:, 2]
    p_early = 1 / (1 + np.exp(-(u_minus_r - EARLY_TYPE_UR_SPLIT) / EARLY_TYPE_UR_WIDTH))
    early = draws[:, 0] < p_early
    bulge_fraction_r = np.where(early, betas[:, 0], betas[:, 1])

    # Size: M_r without k-correction, Shen relation with log-normal scatter.
    z_grid, lum_dist, ang_dist = _distance_tables()
    distance_modulus = 5 * np.log10(np.interp(z, z_grid, lum_dist) * 1e5)  # D_L in units of 10 pc
    abs_mag_r = mags[:, 2] - distance_modulus
    r50_kpc = shen_r50_kpc(abs_mag_r, early) * np.exp(shen_scatter_ln(abs_mag_r) * normals[:, 0])
    r50_arcsec = r50_kpc / (np.interp(z, z_grid, ang_dist) * 1e3) * 206264.806
    r50_pix = np.clip(r50_arcsec, *R50_RANGE_ARCSEC) / PIXEL_SCALE_ARCSEC

    # Shapes: random inclination for the disk.
    cos_incl = draws[:, 1]
    q_disk = np.sqrt((1 - DISK_THICKNESS**2) * cos_incl**2 + DISK_THICKNESS**2)
    low, high = BULGE_AXIS_RATIO_RANGE
    q_bulge = low + (high - low) * draws[:, 2]

    return {
        "early": early,
        "bulge_fraction_r": bulge_fraction_r,
        "abs_mag_r": abs_mag_r,
        "r50_pix": r50_pix,
        "disk_re_pix": r50_pix,
        "bulge_re_pix": r50_pix * (0.5 + 0.5 * bulge_fraction_r),
        "q_disk": q_disk,
        "q_bulge": q_bulge,
        "position_angle": np.pi * draws[:, 3],
        "offset_pix": draws[:, 4:6] - 0.5,  # [N, 2] as (x, y)
        "psf_sigma_pix": _PSF_SIGMA_PIX[None, :] * 10 ** (SEEING_SCATTER_DEX * normals[:, 1:2]),  # [N, C]
        "flux_nmgy": 10 ** ((22.5 - mags) / 2.5),  # [N, C]
        "rngs": rngs,
    }


def band_bulge_fractions(bulge_fraction_r: np.ndarray) -> np.ndarray:
    """Bulge fraction per band [N, C]: the r-band bulge-to-disk ratio scaled by BULGE_COLOUR."""
    ratio = bulge_fraction_r[:, None] / np.maximum(1 - bulge_fraction_r[:, None], 1e-6) * BULGE_COLOUR[None, :]
    return ratio / (1 + ratio)


def _extent_pix(params: dict[str, np.ndarray]) -> np.ndarray:
    """Radius in pixels beyond which a galaxy has no light (profile truncation + 5 PSF sigma)."""
    bulge = DEV_TRUNCATION[1] * params["bulge_re_pix"] / np.sqrt(params["q_bulge"])
    disk = EXP_TRUNCATION[1] * params["disk_re_pix"] / np.sqrt(params["q_disk"])
    return np.maximum(bulge, disk) + 5 * params["psf_sigma_pix"].max(axis=1) + 1


# --- rendering ------------------------------------------------------------------------

def _render_on_grid(params: dict[str, np.ndarray], rows: np.ndarray, grid: int, size: int):
    """Noise-free images of galaxies ``rows`` on a grid x grid FFT box.

    Returns ``(stamps [n, C, size, size], inside [n, C])``: the central cutout and the
    fraction of each band's flux that falls inside it.
    """
    tables = _profile_tables()
    k_y = (2 * np.pi * np.fft.fftfreq(grid))[None, :, None].astype(np.float32)  # [1, K, 1] radians per pixel
    k_x = (2 * np.pi * np.fft.rfftfreq(grid))[None, None, :].astype(np.float32)  # [1, 1, K']
    cos_pa = np.cos(params["position_angle"][rows]).astype(np.float32)[:, None, None]
    sin_pa = np.sin(params["position_angle"][rows]).astype(np.float32)[:, None, None]
    k_major = cos_pa * k_x + sin_pa * k_y  # [n, K, K'] along the major axis
    k_minor = cos_pa * k_y - sin_pa * k_x

    def component(name: str, q: np.ndarray, r_e: np.ndarray) -> np.ndarray:
        q = q[rows].astype(np.float32)[:, None, None]
        r_e = r_e[rows].astype(np.float32)[:, None, None]
        # The circularised radius rho = sqrt(q x'^2 + y'^2 / q) has the transform F(kappa r_e).
        kappa_re = np.sqrt(k_major**2 * (r_e**2 / q) + k_minor**2 * (r_e**2 * q))
        t, transform = tables[name]
        return np.interp(np.log1p(kappa_re), t, transform, right=0.0).astype(np.float32)

    bulge = component("bulge", params["q_bulge"], params["bulge_re_pix"])  # [n, K, K']
    disk = component("disk", params["q_disk"], params["disk_re_pix"])
    bulge_fraction = band_bulge_fractions(params["bulge_fraction_r"][rows]).astype(np.float32)[:, :, None, None]
    profile = disk[:, None] + bulge_fraction * (bulge - disk)[:, None]  # [n, C, K, K']

    # Separable factors: flux, per-band Gaussian PSF, pixel response (sinc) and the phase
    # ramp that puts the centre at grid // 2 + offset.
    sigma = params["psf_sigma_pix"][rows][:, :, None, None]  # [n, C, 1, 1]
    centre = grid // 2 + params["offset_pix"][rows]  # [n, 2] as (x, y)
    flux = params["flux_nmgy"][rows][:, :, None, None]

    def axis_factor(k: np.ndarray, position: np.ndarray) -> np.ndarray:
        k = k.astype(np.float64)
        return (np.exp(-0.5 * sigma**2 * k**2 - 1j * k * position[:, None, None, None])
                * np.sinc(k / (2 * np.pi))).astype(np.complex64)

    row_factor = axis_factor(k_y[:, None], centre[:, 1]) * flux.astype(np.float32)  # [n, C, K, 1]
    column_factor = axis_factor(k_x[:, None], centre[:, 0])  # [n, C, 1, K']
    spectrum = profile * row_factor * column_factor

    # Inverse FFT along y, keep the cutout's rows, then along x: same as irfft2, less work.
    low = grid // 2 - size // 2
    rows_only = np.fft.ifft(spectrum, axis=-2)[:, :, low:low + size, :]  # [n, C, size, K']
    stamps = np.fft.irfft(rows_only, n=grid, axis=-1)[:, :, :, low:low + size]  # [n, C, size, size]
    inside = stamps.sum(axis=(2, 3), dtype=np.float64) / params["flux_nmgy"][rows]
    return stamps, inside


def _grid_sizes(params: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Smallest FFT box per galaxy whose periodic copies stay out of the cutout."""
    needed = _extent_pix(params) + size / 2 + 1
    # NOTE: a galaxy larger than the biggest grid (radius over about 990 pixels, possible
    # only below z = 0.01 with an upward size draw) keeps that grid, so light beyond it
    # folds back into the cutout; with seed 42 no catalog galaxy needs more than 835.
    sizes = np.array([grid for grid in FFT_SIZES if grid >= size])
    index = np.minimum(np.searchsorted(sizes, needed), len(sizes) - 1)
    return sizes[index]


def _render_batch(catalog: pd.DataFrame, seed: int, realisation: int, size: int, noise: bool):
    params = draw_galaxy_parameters(catalog, seed=seed, realisation=realisation)
    n = len(catalog)
    stamps = np.empty((n, len(BANDS), size, size), dtype=np.float32)
    inside = np.empty((n, len(BANDS)))
    grids = _grid_sizes(params, size)
    for grid in np.unique(grids):
        rows = np.flatnonzero(grids == grid)
        stamps[rows], inside[rows] = _render_on_grid(params, rows, int(grid), size)
    if noise:
        for row, rng in enumerate(params["rngs"]):
            sky = rng.standard_normal((len(BANDS), size, size), dtype=np.float32)
            stamps[row] += sky * SKY_SIGMA_NMGY[:, None, None].astype(np.float32)
    return stamps, inside


def _check_request(catalog: pd.DataFrame, size: int, batch_size: int) -> None:
    missing = [name for name in ("object_id", "z", *MAG_COLUMNS) if name not in catalog.columns]
    if missing:
        raise InvalidParameterError(f"catalog lacks columns {missing}; load it with cai_helpers.catalog.load_catalog")
    if size < 8 or size % 2 or size > FFT_SIZES[-1] // 2:
        raise InvalidParameterError(f"cutout size {size} must be even and in [8, {FFT_SIZES[-1] // 2}] pixels")
    redshift = catalog["z"].to_numpy(np.float64)
    bad = ~(np.isfinite(redshift) & (redshift > 0))
    if bad.any():
        ids = catalog["object_id"].to_numpy()[bad][:5].tolist()
        raise InvalidParameterError(f"{int(bad.sum())} galaxies have no positive redshift (object ids {ids}); "
                                    "the renderer needs z > 0 for their angular size, so drop those rows")
    if batch_size < 1:
        raise InvalidParameterError(f"batch_size {batch_size} must be at least 1")


def render_cutouts(catalog: pd.DataFrame, *, seed: int, realisation: int = 0, size: int = 64,
                   noise: bool = True, batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 1) -> np.ndarray:
    """Render ugriz cutouts in nanomaggies per pixel, float32 [N, C, size, size].

    The result for a galaxy depends only on (seed, object_id, realisation) and its
    catalog row, never on ``batch_size``, ``workers`` or the other rows. With
    ``noise=False`` band b of a cutout sums to the catalog flux times
    ``flux_fraction_inside``. ``workers`` > 1 renders batches in that many threads
    (numpy's FFT and array operations release the GIL).
    """
    _check_request(catalog, size, batch_size)
    out = np.empty((len(catalog), len(BANDS), size, size), dtype=np.float32)

    def render_part(start: int) -> None:
        part = catalog.iloc[start:start + batch_size]
        out[start:start + len(part)], _ = _render_batch(part, seed, realisation, size, noise)

    starts = range(0, len(catalog), batch_size)
    if workers <= 1:
        for start in starts:
            render_part(start)
    else:
        from concurrent.futures import ThreadPoolExecutor

        _profile_tables()  # build the shared tables once, before the threads start
        _distance_tables()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(render_part, starts))
    return out


def flux_fraction_inside(catalog: pd.DataFrame, *, seed: int, realisation: int = 0, size: int = 64,
                         batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Fraction of each galaxy's noise-free flux inside the size x size cutout, [N, C]."""
    _check_request(catalog, size, batch_size)
    out = np.empty((len(catalog), len(BANDS)))
    for start in range(0, len(catalog), batch_size):
        part = catalog.iloc[start:start + batch_size]
        _, out[start:start + len(part)] = _render_batch(part, seed, realisation, size, noise=False)
    return out
