"""Fast CPU path: which layers the int8 model keeps in float32, and the worker's
ONNX Runtime session options."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cai_helpers.export import FLOAT_MAX_IN_FEATURES, export_onnx, float_layers, quantize_int8
from cai_helpers.inference import session_options
from cai_helpers.model import AstroMAE, AstroMAEConfig

torch.set_num_threads(1)

WEIGHT_OPS = ("MatMul", "Gemm")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    torch.manual_seed(0)
    model = AstroMAE(AstroMAEConfig.small()).eval()
    folder = tmp_path_factory.mktemp("int8")
    fp32 = export_onnx(model, folder / "fp32.onnx")
    int8 = quantize_int8(fp32, folder / "int8.onnx")
    return model.config, onnx.load(str(fp32)), onnx.load(str(int8))


def _float_weight_shapes(graph) -> list[tuple[int, ...]]:
    """Shapes of the float32 weights that MatMul/Gemm nodes of ``graph`` still multiply by."""
    weights = {init.name: numpy_helper.to_array(init) for init in graph.graph.initializer}
    shapes = []
    for node in graph.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in weights:
            weight = weights[node.input[1]]
            if weight.dtype == np.float32 and weight.ndim == 2:
                shapes.append(weight.shape)
    return shapes


def test_float_layers_finds_magnitude_input_layer(graphs):
    config, fp32, _ = graphs
    names = float_layers(fp32)
    nodes = {node.name: node for node in fp32.graph.node}
    originals = [name for name in names if name in nodes]
    assert len(originals) == 1
    weights = {init.name: tuple(init.dims) for init in fp32.graph.initializer}
    weight_shape = weights[nodes[originals[0]].input[1]]
    # torch's Linear(num_mags, mag_width) stores [out, in]; the exporter may transpose it
    assert sorted(weight_shape) == sorted((config.mag_width, config.num_mags))


def test_float_layers_threshold_moves_the_cut(graphs):
    config, fp32, _ = graphs
    assert config.num_mags <= FLOAT_MAX_IN_FEATURES < config.embed_dim
    assert float_layers(fp32, max_in_features=config.num_mags - 1) == []
    wider = {n for n in float_layers(fp32, max_in_features=config.embed_dim) if not n.endswith("_MatMul")}
    assert len(wider) > 1


def test_int8_keeps_only_small_layers_float(graphs):
    config, fp32, int8 = graphs
    before = _float_weight_shapes(fp32)
    after = _float_weight_shapes(int8)
    assert len(before) > 10
    assert len(after) == 1
    assert sorted(after[0]) == sorted((config.mag_width, config.num_mags))
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for node in int8.graph.node)


def test_session_options_for_workers():
    options = session_options(threads=3)
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.enable_mem_pattern is False
    assert options.enable_cpu_mem_arena is True
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
