"""Helpers the notebooks call before anything else."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def use_project_root() -> Path:
    """Change the working directory to the project root and return it.

    The notebooks' default paths (``data/store``, ``figures``, ``runs/...``) are relative
    to the project root, but JupyterLab and nbval start a kernel in the notebook's own
    folder. Absolute paths given as parameters are unaffected.
    """
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        log.warning("cai_helpers is not installed from a project checkout; staying in %s", Path.cwd())
        return Path.cwd()
    if Path.cwd().resolve() != PROJECT_ROOT:
        os.chdir(PROJECT_ROOT)
        log.info("working directory set to the project root %s", PROJECT_ROOT)
    return PROJECT_ROOT
