"""The authors' pickled checkpoint format: faithful import, and no code run from a file.

A subprocess builds a file of the published structure (a torch.nn.DataParallel around
``blocks.model_vit_inception.ViT_Astro`` holding ``blocks.photoz.Input_Mix_Model`` and
``NormalCell.NormalCell`` blocks, with the published state-dict names) from stand-in
classes registered in sys.modules, saves the whole object with torch.save and records
its output on fixed inputs. The importer must reproduce that output without importing
any of those modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai_helpers.authors_checkpoint import (import_authors_checkpoint,
                                            read_authors_state_dict)
from cai_helpers.errors import CheckpointError, UnsafePickleError
from cai_helpers.model import AstroMAEConfig

REPO = Path(__file__).resolve().parent.parent

BUILDER = textwrap.dedent('''
    import sys, types, torch
    from torch import nn
    from safetensors.torch import save_file
    from cai_helpers.model import AstroMAE, AstroMAEConfig

    torch.set_num_threads(1)
    torch.manual_seed(3)
    names = ["blocks", "blocks.model_vit_inception", "blocks.photoz", "NormalCell"]
    modules = {name: types.ModuleType(name) for name in names}
    sys.modules.update(modules)

    def define(module_name, name, base):
        cls = type(name, (base,), {"__module__": module_name, "__qualname__": name})
        setattr(modules[module_name], name, cls)
        return cls

    ours = AstroMAE(AstroMAEConfig.small())
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(0.05 * torch.randn_like(param))
        for name, buffer in ours.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    ours.eval()
    images = torch.rand(6, 5, 64, 64)
    magnitudes = 15 + 3 * torch.rand(6, 5)
    with torch.no_grad():
        expected = ours(images, magnitudes)

    ViT_Astro = define("blocks.model_vit_inception", "ViT_Astro", nn.Module)
    Input_Mix_Model = define("blocks.photoz", "Input_Mix_Model", nn.Module)
    vit = ViT_Astro()
    vit.patch_embed = ours.encoder.patch_embed
    vit.cls_token = ours.encoder.cls_token
    vit.pos_embed = ours.encoder.pos_embed
    vit.blocks = ours.encoder.blocks
    vit.fc_norm, vit.head, vit.vit_block = ours.fc_norm, ours.head, ours.vit_block
    mix = Input_Mix_Model()
    mix.vis_inception = ours.inception_model.vis_inception
    mix.magnitude_block = ours.inception_model.magnitude_block
    vit.inception_model = mix
    vit.concat_block = ours.concat_block

    # every class of ours becomes a class of the authors' modules
    for module in list(vit.modules()):
        cls = type(module)
        if cls.__module__.startswith("cai_helpers"):
            home = "NormalCell" if cls.__name__ in ("Block", "Attention") else "blocks.photoz"
            target = getattr(modules[home], cls.__name__, None) or define(home, cls.__name__, cls)
            module.__class__ = target
    wrapped = nn.DataParallel(vit)
    wrapped.src_device_obj = torch.device("cuda:0")  # as on the authors' GPU machine
    torch.save(wrapped, sys.argv[1])
    save_file({"images": images, "magnitudes": magnitudes, "expected": expected}, sys.argv[2])
''')


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("authors")
    model_path, io_path = folder / "authors_model.pt", folder / "io.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", BUILDER, str(model_path), str(io_path)],
                   check=True, env=env, cwd=folder, timeout=120)
    return model_path, load_file(str(io_path))


def test_authors_file_names_match_published(authors_file):
    path, _ = authors_file
    names = read_authors_state_dict(path)
    assert "module.cls_token" in names
    assert "module.blocks.0.attn.q_bias" in names
    assert "module.blocks.1.PCM.3.weight" in names
    assert "module.inception_model.magnitude_block.0.weight" in names
    assert "module.concat_block.2.bias" in names
    assert not any(name.startswith("module.encoder.") for name in names)


def test_authors_import_reproduces_output(authors_file):
    torch.set_num_threads(1)
    path, io = authors_file
    model, report = import_authors_checkpoint(path, AstroMAEConfig.small())
    assert report == {"missing": [], "unexpected": [], "mis_shaped": []}
    with torch.no_grad():
        z = model(io["images"], io["magnitudes"])
    torch.testing.assert_close(z, io["expected"], rtol=0, atol=1e-6)


def test_authors_import_config_mismatch_raises(authors_file):
    path, _ = authors_file
    with pytest.raises(CheckpointError, match="mis-shaped"):
        import_authors_checkpoint(path, AstroMAEConfig())  # file holds the small model


def test_authors_import_runs_no_module_code(authors_file, monkeypatch):
    path, _ = authors_file
    for name in ("blocks", "blocks.model_vit_inception", "blocks.photoz", "NormalCell"):
        assert name not in sys.modules
    read_authors_state_dict(path)
    for name in ("blocks", "blocks.model_vit_inception", "blocks.photoz", "NormalCell"):
        assert name not in sys.modules


class SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [SystemCall, ExecCall])
def test_malicious_pickle_rejected(tmp_path, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": payload(marker)}, path)
    with pytest.raises(UnsafePickleError) as error:
        read_authors_state_dict(path)
    assert str(path) in str(error.value)
    assert ("system" in str(error.value)) or ("exec" in str(error.value))
    assert not marker.exists()


def test_allowed_class_reduce_is_inert(tmp_path):
    class FakeLayer:
        def __reduce__(self):
            # a torch.nn class called with arguments: must become an inert stub
            return torch.nn.Linear, (2, 3)

    path = tmp_path / "stub.pt"
    torch.save(FakeLayer(), path)
    with pytest.raises(CheckpointError, match="attribute dictionary"):
        read_authors_state_dict(path)


def test_missing_authors_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_authors_state_dict(tmp_path / "absent.pt")
