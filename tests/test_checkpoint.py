"""Model checkpoints: safetensors round trip, precise errors, and no unpickling."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from cai_helpers.checkpoint import CONFIG_FILE, MODEL_FILE, load_model, save_model
from cai_helpers.errors import CheckpointError
from cai_helpers.model import AstroMAE, AstroMAEConfig

torch.set_num_threads(1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = AstroMAE(AstroMAEConfig.small()).eval()
    model.set_input_scaling(torch.tensor([12.0, 3.4, 1.6, 1.1, 0.8]),
                            torch.tensor([18.9, 17.5, 16.8, 16.4, 16.1]),
                            torch.tensor([0.9, 0.8, 0.8, 0.8, 0.9]))
    return model


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(4, 5, 32, 32, generator=generator),
            16 + torch.rand(4, 5, generator=generator))


def test_round_trip_float32_exact(model, tmp_path):
    save_model(model, tmp_path, dtype=torch.float32, extra={"note": "unit test"})
    loaded = load_model(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(*_inputs()), model(*_inputs()), rtol=0, atol=0)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["extra"] == {"note": "unit test"}


def test_round_trip_float16_close(model, tmp_path):
    save_model(model, tmp_path)  # float16 weights by default
    stored = load_file(str(tmp_path / MODEL_FILE))
    assert stored["head.weight"].dtype == torch.float16
    assert stored["pixel_scale"].dtype == torch.float32  # scaling stays exact
    loaded = load_model(tmp_path)
    assert loaded.head.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.mag_mean, model.mag_mean, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*_inputs()), model(*_inputs()), rtol=0, atol=2e-3)


def _rewrite(tmp_path, change):
    tensors = load_file(str(tmp_path / MODEL_FILE))
    change(tensors)
    save_file(tensors, str(tmp_path / MODEL_FILE))


def test_missing_tensor_named(model, tmp_path):
    save_model(model, tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("concat_block.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1: \['concat_block.2.bias'\]"):
        load_model(tmp_path)


def test_unexpected_tensor_named(model, tmp_path):
    save_model(model, tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"encoder.norm.weight": torch.ones(48)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1: \['encoder.norm.weight'\]"):
        load_model(tmp_path)


def test_misshaped_tensor_names_shapes(model, tmp_path):
    save_model(model, tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"head.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"head.bias: file \(7,\), model \(48,\)"):
        load_model(tmp_path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_file_rejected_unopened(model, tmp_path):
    save_model(model, tmp_path)
    marker = tmp_path / "marker"
    with open(tmp_path / MODEL_FILE, "wb") as handle:
        pickle.dump({"weights": Payload(marker)}, handle)
    with pytest.raises(CheckpointError, match="safetensors header invalid"):
        load_model(tmp_path)
    assert not marker.exists()


def test_torch_save_file_rejected(model, tmp_path):
    save_model(model, tmp_path)
    torch.save(model.state_dict(), tmp_path / MODEL_FILE)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(tmp_path)


def test_missing_config_raises(model, tmp_path):
    save_model(model, tmp_path)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)
