"""Predictors: batching, runtimes, thread settings and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cai_helpers.errors import CheckpointError, InvalidParameterError
from cai_helpers.inference import BITS_PER_GALAXY, make_predictor, peak_rss_mb
from fanout_fixtures import expected_z, make_dataset_arrays, write_tiny_onnx


@pytest.fixture
def model_dir(tmp_path):
    write_tiny_onnx(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
@pytest.mark.parametrize("batch_size", [1, 4, 7, 100])
def test_onnx_partition_matches_numpy(model_dir, runtime, batch_size):
    arrays = make_dataset_arrays(23, pixels=32)
    predictor = make_predictor(runtime, model_dir, batch_size=batch_size, threads=1)
    z_pred, timings = predictor.predict_partition(arrays)

    assert z_pred.dtype == np.float32
    assert z_pred.shape == (23,)
    np.testing.assert_allclose(z_pred, expected_z(arrays["images"], arrays["magnitudes"]), rtol=1e-5, atol=1e-6)
    assert timings.images == 23
    assert timings.batches == -(-23 // batch_size)
    assert timings.bits == 23 * BITS_PER_GALAXY
    assert timings.inference_s > 0


def test_empty_partition_predicts_nothing(model_dir):
    arrays = make_dataset_arrays(0, pixels=32)
    z_pred, timings = make_predictor("onnx", model_dir, batch_size=4, threads=1).predict_partition(arrays)
    assert z_pred.shape == (0,)
    assert timings.batches == 0


def test_onnx_path_does_not_import_torch(model_dir):
    code = (
        "import sys, numpy as np\n"
        "from cai_helpers.inference import make_predictor\n"
        f"p = make_predictor('onnx', {str(model_dir)!r}, batch_size=2, threads=1)\n"
        "p.predict_batch(np.zeros((2, 5, 32, 32), np.float32), np.zeros((2, 5), np.float32))\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_missing_onnx_file_names_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="export"):
        make_predictor("onnx", tmp_path / "empty", batch_size=2, threads=1)


def test_missing_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        make_predictor("onnx", tmp_path / "absent", batch_size=2, threads=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"runtime": "tensorflow"},
        {"batch_size": 0},
        {"threads": 0},
        {"device": "tpu"},
    ],
)
def test_invalid_arguments_rejected(model_dir, kwargs):
    args = {"runtime": "onnx", "batch_size": 2, "threads": 1, "device": "cpu", **kwargs}
    with pytest.raises(InvalidParameterError):
        make_predictor(args.pop("runtime"), model_dir, **args)


def test_torch_runtime_matches_model(tmp_path):
    torch = pytest.importorskip("torch")
    model_module = pytest.importorskip("cai_helpers.model")
    checkpoint = pytest.importorskip("cai_helpers.checkpoint")
    if not hasattr(checkpoint, "save_model"):
        pytest.skip("cai_helpers.checkpoint.save_model is not available")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = model_module.AstroMAE(model_module.AstroMAEConfig.small()).eval()
    checkpoint.save_model(model, tmp_path / "model", dtype=torch.float32)  # the default fp16 would round

    arrays = make_dataset_arrays(5, pixels=32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["magnitudes"])).numpy()
    z_pred, _ = make_predictor("torch", tmp_path / "model", batch_size=2, threads=1).predict_partition(arrays)
    np.testing.assert_allclose(z_pred, expected, rtol=1e-4, atol=1e-5)


def test_peak_rss_is_plausible():
    assert 1 < peak_rss_mb() < 1_000_000


def test_peak_rss_is_the_workers_own(tmp_path):
    """A worker started by a big parent reports its own peak, not the parent's."""
    import subprocess
    import sys

    script = (
        "import numpy as np, subprocess, sys\n"
        "ballast = np.ones(300 * 2**20 // 8)  # 300 MB in the parent\n"
        "out = subprocess.run([sys.executable, '-c', "
        "'from cai_helpers.inference import peak_rss_mb; print(peak_rss_mb())'], "
        "capture_output=True, text=True, check=True)\n"
        "print(out.stdout.strip())\n"
    )
    child_peak = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                      check=True).stdout.strip())
    assert 0 < child_peak < 200
