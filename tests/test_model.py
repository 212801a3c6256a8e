"""AstroMAE architecture: exact parameter counts, shapes, attention, PCM and scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cai_helpers.errors import InvalidParameterError
from cai_helpers.model import (AstroMAE, AstroMAEConfig, Attention, Block, count_parameters,
                               sincos_pos_embed)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def published():
    torch.manual_seed(0)
    return AstroMAE()


@pytest.fixture
def small():
    torch.manual_seed(0)
    return AstroMAE(AstroMAEConfig.small()).eval()


def test_total_parameters_published(published):
    assert count_parameters(published) == 15_902_889


def test_encoder_parameters_published(published):
    assert count_parameters(published.encoder) == 5_504_832


def test_block_parameters_published(published):
    assert count_parameters(published.encoder.blocks[0]) == 453_312


def test_head_parameters_published(published):
    assert sum(p.numel() for p in published.head_parameters()) == 10_398_057


def test_pos_embed_fixed_not_trained(published):
    assert published.encoder.pos_embed.shape == (1, 17, 192)
    assert not published.encoder.pos_embed.requires_grad


def test_input_scaling_buffers_not_parameters(published):
    names = {name for name, _ in published.named_parameters()}
    assert not {"pixel_scale", "mag_mean", "mag_std"} & names
    assert {"pixel_scale", "mag_mean", "mag_std"} <= set(published.state_dict())


@pytest.mark.parametrize("size", [32, 64])
def test_output_shape_small(small, size):
    z = small(torch.rand(3, 5, size, size), torch.rand(3, 5) + 16)
    assert z.shape == (3,)
    assert torch.isfinite(z).all()


def test_64_pixels_cropped_to_center(small):
    images = torch.rand(2, 5, 64, 64)
    mags = torch.rand(2, 5) + 16
    with torch.no_grad():
        full = small(images, mags)
        center = small(images[:, :, 16:48, 16:48], mags)
        shifted = small(images[:, :, 15:47, 16:48], mags)
    torch.testing.assert_close(full, center, rtol=0, atol=0)
    assert not torch.equal(full, shifted)


def test_magnitudes_cast_to_float32(small):
    images = torch.rand(2, 5, 32, 32)
    mags = torch.rand(2, 5, dtype=torch.float64) + 16
    with torch.no_grad():
        z64 = small(images, mags)
        z32 = small(images, mags.float())
    assert z64.dtype == torch.float32
    torch.testing.assert_close(z64, z32)


def test_sincos_table_values():
    table = sincos_pos_embed(8, 2)  # quarter width 2, omega = [1, 1/100]
    assert table.shape == (5, 8)
    assert (table[0] == 0).all()  # class token row
    # patch (row 1, col 0): column part is position 0, row part is position 1
    col0 = [0, 0, 1, 1]
    row1 = [np.sin(1.0), np.sin(0.01), np.cos(1.0), np.cos(0.01)]
    np.testing.assert_allclose(table[3], col0 + row1, atol=1e-7)


def test_attention_matches_manual():
    torch.manual_seed(1)
    attn = Attention(12, 3)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, 12)

    W = attn.qkv.weight.detach().double()
    xd = x.double()
    q = xd @ W[:12].T + attn.q_bias.detach().double()
    k = xd @ W[12:24].T  # no k bias
    v = xd @ W[24:].T + attn.v_bias.detach().double()
    heads = []
    for h in range(3):
        part = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / 2.0, dim=-1)
        heads.append(weights @ v[..., part])
    expected = torch.cat(heads, -1) @ attn.proj.weight.double().T + attn.proj.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(attn(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_pcm_changes_patch_tokens_only():
    torch.manual_seed(2)
    config = AstroMAEConfig.small()
    block = Block(config).eval()
    x = torch.randn(2, 17, config.embed_dim)
    with torch.no_grad():
        before = block(x)
        block.PCM[3].bias.add_(1.0)
        after = block(x)
    torch.testing.assert_close(before[:, 0], after[:, 0])
    assert not torch.allclose(before[:, 1:], after[:, 1:])


def test_input_scaling_applied(small):
    images = torch.rand(2, 5, 32, 32)
    mags = torch.rand(2, 5) + 16
    with torch.no_grad():
        reference = small(images * 2.0, (mags - 16.0) / 0.5)
        small.set_input_scaling(torch.full((5,), 2.0), torch.full((5,), 16.0),
                                torch.full((5,), 0.5))
        scaled = small(images, mags)
    torch.testing.assert_close(scaled, reference)


def test_small_images_rejected(small):
    with pytest.raises(InvalidParameterError, match="smaller"):
        small(torch.rand(1, 5, 16, 16), torch.rand(1, 5))


def test_config_rejects_bad_patch_size():
    with pytest.raises(InvalidParameterError, match="patch_size"):
        AstroMAEConfig(patch_size=7)


def test_config_dict_round_trip():
    config = AstroMAEConfig.small()
    assert AstroMAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InvalidParameterError, match="unknown"):
        AstroMAEConfig.from_dict({**config.to_dict(), "depht": 3})
