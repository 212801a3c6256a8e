"""The shipped catalog of real SDSS galaxies (photometry and spectroscopic redshift).

The catalog is derived from data files in the kcorrect 5.1.9 and MLZ 1.2 packages by
``scripts/build_catalog.py``; ``data/catalog/README.md`` lists its columns and units.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas stays out of the torch-free Lambda bundle
    import pandas as pd

from cai_helpers.errors import DataFormatError

log = logging.getLogger(__name__)

BANDS = ("u", "g", "r", "i", "z")
MAG_COLUMNS = tuple(f"mag_{band}" for band in BANDS)
MAGERR_COLUMNS = tuple(f"magerr_{band}" for band in BANDS)
COLUMNS = ("object_id", "source", "ra", "dec", *MAG_COLUMNS, *MAGERR_COLUMNS, "z")
DEFAULT_CATALOG_PATH = Path(__file__).resolve().parent.parent / "data" / "catalog" / "sdss_galaxies.csv.gz"


def load_catalog(path: str | Path | None = None) -> pd.DataFrame:
    """Read and validate the galaxy catalog (default: the shipped copy).

    Returns one row per galaxy with ``object_id`` (int64, unique), ``source``, ``ra`` and
    ``dec`` (deg, NaN where unknown), ``mag_*`` (dereddened AB mag), ``magerr_*`` (mag)
    and ``z``. Raises DataFormatError when a column is missing, ids repeat, a magnitude
    is not finite or a redshift is not positive.
    """
    path = Path(path) if path is not None else DEFAULT_CATALOG_PATH
    if not path.exists():
        raise DataFormatError(f"catalog {path} not found; rebuild it with scripts/build_catalog.py")
    import pandas as pd

    catalog = pd.read_csv(path, dtype={"object_id": np.int64, "source": str})

    missing = [name for name in COLUMNS if name not in catalog.columns]
    if missing:
        raise DataFormatError(f"catalog {path} lacks columns {missing}; rebuild it with scripts/build_catalog.py")
    if catalog["object_id"].duplicated().any():
        repeated = catalog.loc[catalog["object_id"].duplicated(), "object_id"].iloc[0]
        raise DataFormatError(f"catalog {path} repeats object_id {repeated}; object ids must be unique")
    if not np.isfinite(catalog[list(MAG_COLUMNS)].to_numpy()).all():
        raise DataFormatError(f"catalog {path} has non-finite magnitudes; drop those rows")
    if not (catalog["z"] > 0).all():
        raise DataFormatError(f"catalog {path} has redshifts <= 0 or missing; drop those rows")

    log.info("loaded %d galaxies from %s (%s)", len(catalog), path,
             ", ".join(f"{name}: {count}" for name, count in catalog["source"].value_counts().items()))
    return catalog
