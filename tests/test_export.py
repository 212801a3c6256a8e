"""ONNX export: names, dynamic batch, float32 parity on rendered cutouts, int8 variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cai_helpers.export import (FP32_FILE, INT8_FILE, export_all, onnx_parity, onnx_session,
                                predict_onnx)
from cai_helpers.model import AstroMAE, AstroMAEConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cutouts():
    from cai_helpers.catalog import MAG_COLUMNS, load_catalog
    from cai_helpers.render import render_cutouts

    catalog = load_catalog().iloc[:6]
    images = render_cutouts(catalog, seed=7, realisation=0, size=64)[:, :, 16:48, 16:48]
    return np.ascontiguousarray(images), catalog[list(MAG_COLUMNS)].to_numpy(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cutouts):
    torch.manual_seed(0)
    model = AstroMAE(AstroMAEConfig.small()).eval()
    images, mags = cutouts
    # non-identity scaling, so the parity also proves the buffers are in the graph
    model.set_input_scaling(1 / torch.from_numpy(images).std(dim=(0, 2, 3)),
                            torch.from_numpy(mags).mean(dim=0), torch.full((5,), 0.7))
    with torch.no_grad():
        model.concat_block[-1].bias.fill_(0.1)
    folder = tmp_path_factory.mktemp("onnx")
    return model, export_all(model, folder)


def test_onnx_io_names_and_dynamic_batch(exported, cutouts):
    model, paths = exported
    session = onnx_session(paths["fp32"])
    assert [i.name for i in session.get_inputs()] == ["images", "magnitudes"]
    assert [o.name for o in session.get_outputs()] == ["redshift"]
    images, mags = cutouts
    for batch in (1, 5):
        z = predict_onnx(session, images[:batch], mags[:batch], batch_size=batch)
        assert z.shape == (batch,)
        assert z.dtype == np.float32


def test_onnx_fp32_parity_on_cutouts(exported, cutouts):
    model, paths = exported
    parity = onnx_parity(model, paths["fp32"], *cutouts)
    assert parity["max"] <= 1e-5


def test_onnx_int8_close(exported, cutouts):
    model, paths = exported
    assert paths["int8"].name == INT8_FILE
    assert paths["fp32"].name == FP32_FILE
    assert paths["int8"].stat().st_size < paths["fp32"].stat().st_size
    parity = onnx_parity(model, paths["int8"], *cutouts)
    assert parity["max"] <= 0.02


def test_onnx_differs_from_other_weights(exported, cutouts):
    """Parity must be able to fail: a model with other weights disagrees."""
    _, paths = exported
    torch.manual_seed(1)
    other = AstroMAE(AstroMAEConfig.small()).eval()
    assert onnx_parity(other, paths["fp32"], *cutouts)["max"] > 1e-3


def test_exports_fit_lambda_onnxruntime(tmp_path):
    """The Lambda bundle's onnxruntime 1.16 reads IR versions up to 9 and opsets up to 19."""
    import onnx

    from cai_helpers.export import export_onnx, quantize_int8
    from cai_helpers.model import AstroMAE, AstroMAEConfig

    torch.manual_seed(0)
    fp32 = export_onnx(AstroMAE(AstroMAEConfig.small()), tmp_path / "astromae.onnx")
    int8 = quantize_int8(fp32, tmp_path / "astromae.int8.onnx")
    for path in (fp32, int8):
        graph = onnx.load(str(path))
        assert graph.ir_version <= 9, path.name
        default_opset = [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")]
        assert default_opset and max(default_opset) <= 19, path.name
