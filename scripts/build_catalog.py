#!/usr/bin/env python
"""Rebuild ``data/catalog/sdss_galaxies.csv`` from two PyPI packages.

The derived catalog is committed, so the project never needs these packages at run
time. This script records how it was made:

- kcorrect 5.1.9 (wheel, BSD-3): ``kcorrect/data/test/gst_tests_small.fits``, 10,000
  SDSS galaxies with model fluxes (nanomaggies), inverse variances, Galactic
  extinction (mag) and spectroscopic redshift.
- MLZ 1.2 (sdist, NCSA): ``mlz/test/SDSS_MGS.train``, 5,000 galaxies of the SDSS Main
  Galaxy Sample with extinction-corrected model magnitudes, their errors and
  spectroscopic redshift. The file's header omits the ``eu`` column, so the column
  names come from ``SDSS_MGS.inputs``.

Usage: ``.venv/bin/python scripts/build_catalog.py [--out data/catalog]``. It needs
pip access to PyPI and prints the row counts before and after the quality cuts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits

KCORRECT_VERSION = "5.1.9"
MLZ_VERSION = "1.2"
KCORRECT_TABLE = "kcorrect/data/test/gst_tests_small.fits"
MLZ_TABLE = f"MLZ-{MLZ_VERSION}/mlz/test/SDSS_MGS.train"
MLZ_INPUTS = f"MLZ-{MLZ_VERSION}/mlz/test/SDSS_MGS.inputs"
KCORRECT_LICENSE = f"kcorrect-{KCORRECT_VERSION}.dist-info/licenses/LICENSE"
MLZ_LICENSE = f"MLZ-{MLZ_VERSION}/LICENSE.txt"

BANDS = ("u", "g", "r", "i", "z")
Z_MIN, Z_MAX = 0.0, 0.4  # quality cut: 0 < z < 0.4, exclusive
# Object-id bases keep the two sources apart: id = base + row number in the source file.
KCORRECT_ID_BASE = 100_000_000
MLZ_ID_BASE = 200_000_000
POGSON = 2.5 / np.log(10.0)  # mag per unit relative flux error


def download(tmp: Path) -> tuple[Path, Path]:
    """Download the kcorrect wheel and the MLZ sdist into ``tmp`` with pip."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp)]
    subprocess.run([*pip, "--only-binary=:all:", f"kcorrect=={KCORRECT_VERSION}"], check=True)
    subprocess.run([*pip, "--no-build-isolation", f"MLZ=={MLZ_VERSION}"], check=True)
    wheel = next(tmp.glob(f"kcorrect-{KCORRECT_VERSION}-*.whl"))
    sdist = next(tmp.glob(f"[Mm][Ll][Zz]-{MLZ_VERSION}.tar.gz"))
    return wheel, sdist


def read_kcorrect(wheel: Path, tmp: Path) -> tuple[pd.DataFrame, str]:
    """Read the kcorrect test table: dereddened AB magnitudes and their errors."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(KCORRECT_TABLE, tmp)
        license_text = archive.read(KCORRECT_LICENSE).decode()
    with fits.open(tmp / KCORRECT_TABLE) as hdus:
        table = hdus[1].data
        flux = np.asarray(table["MODELFLUX"], dtype=np.float64)  # nanomaggies
        ivar = np.asarray(table["MODELFLUX_IVAR"], dtype=np.float64)  # nanomaggies**-2
        extinction = np.asarray(table["EXTINCTION"], dtype=np.float64)  # mag
        frame = pd.DataFrame({
            "object_id": KCORRECT_ID_BASE + np.arange(len(table), dtype=np.int64),
            "source": "kcorrect_gst",
            "ra": np.asarray(table["RA"], dtype=np.float64),
            "dec": np.asarray(table["DEC"], dtype=np.float64),
        })
        redshift = np.asarray(table["Z"], dtype=np.float64)

    # Non-positive fluxes give NaN magnitudes, which the quality cut removes.
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = 22.5 - 2.5 * np.log10(np.where(flux > 0, flux, np.nan)) - extinction
        magerr = POGSON / (flux * np.sqrt(np.where(ivar > 0, ivar, np.nan)))
    for k, band in enumerate(BANDS):
        frame[f"mag_{band}"] = mag[:, k]
    for k, band in enumerate(BANDS):
        frame[f"magerr_{band}"] = magerr[:, k]
    frame["z"] = redshift
    return frame, license_text


def read_mlz(sdist: Path, tmp: Path) -> tuple[pd.DataFrame, str]:
    """Read the MLZ SDSS Main Galaxy Sample training table."""
    with tarfile.open(sdist) as archive:
        members = [archive.getmember(name) for name in (MLZ_TABLE, MLZ_INPUTS, MLZ_LICENSE)]
        archive.extractall(tmp, members=members, filter="data")
    license_text = (tmp / MLZ_LICENSE).read_text()
    columns = None
    for line in (tmp / MLZ_INPUTS).read_text().splitlines():
        if line.startswith("Columns ") or line.startswith("Columns:"):
            columns = line.split(":", 1)[1].split("#")[0].strip().split(",")
    if columns is None:
        raise RuntimeError(f"no 'Columns' line in {MLZ_INPUTS}; the MLZ package layout changed")

    table = pd.read_csv(tmp / MLZ_TABLE, sep=r"\s+", comment="#", header=None, names=columns)
    frame = pd.DataFrame({
        "object_id": MLZ_ID_BASE + np.arange(len(table), dtype=np.int64),
        "source": "mlz_sdss_mgs",
        "ra": np.nan,
        "dec": np.nan,
    })
    for band in BANDS:
        frame[f"mag_{band}"] = table[band].to_numpy(np.float64)
    for band in BANDS:
        frame[f"magerr_{band}"] = table[f"e{band}"].to_numpy(np.float64)
    frame["z"] = table["zs"].to_numpy(np.float64)
    return frame, license_text


def apply_cuts(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep rows with Z_MIN < z < Z_MAX and finite magnitudes in all five bands."""
    mags = frame[[f"mag_{band}" for band in BANDS]].to_numpy()
    keep = (frame["z"] > Z_MIN) & (frame["z"] < Z_MAX) & np.isfinite(mags).all(axis=1)
    return frame[keep.to_numpy()].reset_index(drop=True)


def write_licenses(out: Path, kcorrect_license: str, mlz_license: str) -> None:
    """Write LICENSES.md with both packages' notices, copied verbatim."""
    text = (
        "# Licences of the derived galaxy catalog\n\n"
        "`sdss_galaxies.csv` is derived from data files shipped in two PyPI packages;\n"
        "`scripts/build_catalog.py` rebuilds it from them.\n\n"
        f"## kcorrect {KCORRECT_VERSION} (`{KCORRECT_TABLE}`)\n\n"
        f"```\n{kcorrect_license.strip()}\n```\n\n"
        f"## MLZ {MLZ_VERSION} (`{MLZ_TABLE.split('/', 1)[1]}`)\n\n"
        f"```\n{mlz_license.strip()}\n```\n"
    )
    (out / "LICENSES.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/catalog"),
                        help="output folder for sdss_galaxies.csv and LICENSES.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        wheel, sdist = download(tmp)
        kcorrect, kcorrect_license = read_kcorrect(wheel, tmp)
        mlz, mlz_license = read_mlz(sdist, tmp)

    print(f"{'source':<14} {'rows':>7} {'after cuts':>10}")
    parts = []
    for frame in (kcorrect, mlz):
        selected = apply_cuts(frame)
        print(f"{frame['source'].iloc[0]:<14} {len(frame):>7} {len(selected):>10}")
        parts.append(selected)
    catalog = pd.concat(parts, ignore_index=True)
    print(f"{'total':<14} {len(kcorrect) + len(mlz):>7} {len(catalog):>10}")

    # Round to the data's own precision: 1e-6 deg is 3.6 mas, 1e-5 mag is far below the errors.
    catalog = catalog.round({"ra": 6, "dec": 6, "z": 6}
                            | {f"mag_{band}": 5 for band in BANDS}
                            | {f"magerr_{band}": 5 for band in BANDS})
    catalog.to_csv(args.out / "sdss_galaxies.csv.gz", index=False,
                   compression={"method": "gzip", "mtime": 0})
    write_licenses(args.out, kcorrect_license, mlz_license)
    print(f"wrote {args.out / 'sdss_galaxies.csv.gz'} and {args.out / 'LICENSES.md'}")


if __name__ == "__main__":
    main()
