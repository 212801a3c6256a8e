"""The main job's notebook table, its command line, and notebook 04 run headless."""

from __future__ import annotations

import ast
import json

import nbformat
import pytest

from cai_helpers.errors import InvalidParameterError
from cai_helpers.pipeline import NOTEBOOK_DIR, NOTEBOOK_STEPS, main, parse_overrides, run_pipeline
from fanout_fixtures import write_dataset, write_tiny_onnx


def _parameter_names(path):
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {target.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for target in node.targets}


def test_parse_overrides():
    assert parse_overrides(["04.partition_mb=100", "04.runtime=onnx-int8", "01.n=null"]) == {
        "04": {"partition_mb": 100, "runtime": "onnx-int8"},
        "01": {"n": None},
    }


@pytest.mark.parametrize("pair", ["partition_mb=100", "04.=1", "04.partition_mb"])
def test_parse_overrides_rejects_malformed(pair):
    with pytest.raises(InvalidParameterError):
        parse_overrides([pair])


def test_unknown_step_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["--notebooks", "99"])
    assert "unknown notebook step" in capsys.readouterr().err


@pytest.mark.parametrize("step", NOTEBOOK_STEPS, ids=lambda s: s.key)
def test_table_parameters_exist_in_notebook(step):
    path = NOTEBOOK_DIR / step.name
    if not path.is_file():
        pytest.skip(f"{step.name} is not written yet")
    names = _parameter_names(path)
    assert set(step.parameters) <= names
    if step.results_parameter:
        assert step.results_parameter in names


def test_notebook_04_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK_DIR / "04_lambda_fanout.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_04_runs_headless(tmp_path, local_store):
    write_dataset(local_store, "ds", [30])
    write_tiny_onnx(tmp_path / "model")
    step = next(s for s in NOTEBOOK_STEPS if s.key == "04")
    overrides = {"04": {"store": local_store.uri, "dataset_prefix": "ds", "partition_mb": 0.2, "batch_size": 8,
                        "max_concurrency": 2, "model_dir": str(tmp_path / "model"),
                        "figures_dir": str(tmp_path / "figures")}}

    outcome = run_pipeline([step], out_dir=tmp_path / "out", overrides=overrides)
    results = outcome["results"]["04"]
    assert results["status"] == "succeeded"
    assert results["n_images"] == 30
    assert results["n_partitions"] == 3
    assert results["world_size"] == 2
    summary = json.loads(local_store.get(f"runs/{results['run_id']}/summary.json"))
    for key in ("mse", "mae", "bias", "images_per_s"):
        assert results[key] == pytest.approx(summary[key])
    assert (tmp_path / "figures" / "04_rank_timeline.png").stat().st_size > 0
    assert (tmp_path / "out" / "04_lambda_fanout.ipynb").is_file()


def test_main_rejects_unknown_parameter_before_running(capsys):
    from cai_helpers.pipeline import main

    assert main(["-p", "04.batchsize=8"]) == 2
    err = capsys.readouterr().err
    assert "has no parameter batchsize" in err
    assert "batch_size" in err  # the list of valid names


@pytest.mark.parametrize(
    ("pair", "message"),
    [("04.batch_size=0", "batch_size must be an integer"),
     ("04.runtime=tensorrt", "invalid runtime 'tensorrt'"),
     ("04.max_concurrency=0", "max_concurrency")],
)
def test_main_rejects_invalid_run_settings_first(tmp_path, capsys, pair, message):
    from cai_helpers.pipeline import main

    # Step 01 would write here if anything ran before the check.
    assert main(["--out-dir", str(tmp_path / "out"), "-p", pair]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
