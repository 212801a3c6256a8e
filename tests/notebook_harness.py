"""Run a notebook headless through papermill, then again under nbval.

papermill injects the parameters after the cell tagged ``parameters`` and writes the
executed copy; nbval (``--nbval-lax``) then re-executes that copy cell by cell in a
fresh kernel, so the notebook must run top to bottom with the injected parameters
alone. Both run in subprocesses, the way a user runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL_TIMEOUT_S = 600


def parameters_cell_index(path: Path) -> int:
    """Return the index of the cell tagged ``parameters``; fail if there is none."""
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return index
    raise AssertionError(f"{path.name} has no cell tagged 'parameters'")


def assert_committed_clean(path: Path) -> None:
    """Fail if the notebook was committed with outputs or execution counts."""
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name} cell {index} has outputs"
        assert cell.get("execution_count") is None, f"{path.name} cell {index} has an execution count"


def run_papermill(name: str, params: dict, out_dir: Path) -> Path:
    """Execute ``notebooks/<name>`` with ``params`` into ``out_dir``; return the copy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / name
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOKS / name), str(out), "--cwd", str(ROOT),
           "--kernel", "python3", "--log-level", "WARNING"]
    for key, value in params.items():
        cmd += ["-y", json.dumps({key: value})]
    env = dict(os.environ, PYTHONHASHSEED="0", MPLBACKEND="Agg")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=KERNEL_TIMEOUT_S, env=env)
    assert result.returncode == 0, f"papermill failed on {name}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return out


def run_nbval(path: Path) -> None:
    """Re-execute an executed notebook under ``pytest --nbval-lax``; fail on any error."""
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
           "--rootdir", str(path.parent), str(path)]
    env = dict(os.environ, MPLBACKEND="Agg")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=KERNEL_TIMEOUT_S, cwd=ROOT, env=env)
    # The first failing cell contains the cause; later cells usually fail with NameErrors.
    first = result.stdout.find("Cell execution caused an exception")
    excerpt = result.stdout[max(first - 200, 0):first + 6000] if first >= 0 else result.stdout[-6000:]
    assert result.returncode == 0, f"nbval failed on {path.name}:\n{excerpt}\n{result.stderr[-3000:]}"
