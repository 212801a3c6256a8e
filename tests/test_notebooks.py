"""Every notebook runs headless with small parameters, through papermill and nbval.

Each case executes the notebook with papermill into a temporary folder, checks the key
results the notebook recorded as JSON, and re-executes the executed copy under
``pytest --nbval-lax``. Figures and stores go to the temporary folder, never into the
repository's ``figures/`` or ``data/store/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from notebook_harness import NOTEBOOKS, assert_committed_clean, parameters_cell_index, run_nbval, run_papermill

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    assert parameters_cell_index(path) >= 0
    assert_committed_clean(path)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_prepare_data_notebook(tmp_path):
    results = tmp_path / "01.json"
    params = {
        "store_location": str(tmp_path / "store"),
        "n_galaxies": 40,
        "shard_rows": 16,
        "figures_dir": str(tmp_path / "figures"),
        "results_path": str(results),
    }
    executed = run_papermill("01_prepare_data.ipynb", params, tmp_path / "executed")
    recorded = _load(results)
    assert recorded["n_rows"] == 40
    assert sum(recorded["splits"].values()) == 40
    assert recorded["n_shards"] == 3  # 40 rows at 16 rows per shard
    assert len(list((tmp_path / "figures").glob("*.png"))) >= 3
    run_nbval(executed)


def test_device_benchmarks_notebook(tmp_path):
    results = tmp_path / "03.json"
    params = {
        "quick": True,
        "model_dir": str(tmp_path / "no-model"),
        "dataset": str(tmp_path / "no-dataset"),
        "runtimes": ["torch", "onnx"],
        "batch_sizes": [8],
        "threads": [1],
        "data_sizes_gb": [0.0002],
        "fanout_partition_mb": [],
        "out_dir": str(tmp_path / "bench"),
        "figures_dir": str(tmp_path / "figures"),
        "results_path": str(results),
    }
    executed = run_papermill("03_device_benchmarks.ipynb", params, tmp_path / "executed")
    assert results.exists()
    run_nbval(executed)


def test_paper_comparison_notebook(tmp_path):
    results = tmp_path / "05.json"
    params = {"figures_dir": str(tmp_path / "figures"), "results_path": str(results)}
    executed = run_papermill("05_paper_comparison.ipynb", params, tmp_path / "executed")
    assert results.exists()
    assert len(list((tmp_path / "figures").glob("*.png"))) >= 3
    run_nbval(executed)


def test_lambda_fanout_notebook(tmp_path, local_store):
    from fanout_fixtures import write_dataset, write_tiny_onnx

    write_dataset(local_store, "ds", [30])
    write_tiny_onnx(tmp_path / "model")
    results = tmp_path / "04.json"
    params = {
        "store": local_store.uri,
        "dataset_prefix": "ds",
        "partition_mb": 0.2,
        "batch_size": 8,
        "max_concurrency": 2,
        "model_dir": str(tmp_path / "model"),
        "figures_dir": str(tmp_path / "figures"),
        "results_path": str(results),
    }
    executed = run_papermill("04_lambda_fanout.ipynb", params, tmp_path / "executed")
    recorded = _load(results)
    assert recorded["status"] == "succeeded"
    assert recorded["n_images"] == 30
    run_nbval(executed)
    catalogs = [k for k in local_store.list("runs/") if k.endswith("catalog.parquet")]
    assert len(catalogs) == 2  # one run from papermill, one from nbval


def test_notebooks_start_at_project_root():
    """Kernels start in notebooks/ under JupyterLab and nbval; default paths need the root."""
    import nbformat

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        after = nb.cells[parameters_cell_index(path) + 1]
        assert "use_project_root()" in after.source, path.name


def test_use_project_root_changes_directory(tmp_path, monkeypatch):
    from cai_helpers.notebook import PROJECT_ROOT, use_project_root

    monkeypatch.chdir(tmp_path)
    assert use_project_root() == PROJECT_ROOT
    assert Path.cwd() == PROJECT_ROOT
    assert (Path.cwd() / "pyproject.toml").is_file()


def test_astromae_notebook_load_mode(tmp_path):
    results = tmp_path / "02.json"
    params = {
        "mode": "load",
        "n_eval": 12,
        "onnx_dir": str(tmp_path / "onnx"),
        "figures_dir": str(tmp_path / "figures"),
        "results_path": str(results),
    }
    executed = run_papermill("02_astromae.ipynb", params, tmp_path / "executed")
    assert (tmp_path / "onnx" / "astromae.onnx").stat().st_size > 0
    assert (tmp_path / "onnx" / "astromae.int8.onnx").stat().st_size > 0
    assert results.exists()
    run_nbval(executed)
