"""MAE pretraining model: patch layout, masking, loss on masked patches, encoder reuse."""

from __future__ import annotations

import pytest
import torch

from cai_helpers.mae import (MAEConfig, MAEPretrainer, load_mae, patchify, random_masking,
                             save_mae, unpatchify)
from cai_helpers.model import AstroMAE, AstroMAEConfig, AstroMAEEncoder

torch.set_num_threads(1)


@pytest.fixture
def mae():
    torch.manual_seed(0)
    return MAEPretrainer(AstroMAEConfig.small())


def test_patchify_layout():
    images = torch.arange(2 * 5 * 32 * 32, dtype=torch.float32).reshape(2, 5, 32, 32)
    patches = patchify(images, 8)
    assert patches.shape == (2, 16, 320)
    # patch 1 is row 0, column 1; values ordered (pixel row, pixel column, band)
    expected = images[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(patches[0, 1], expected)
    torch.testing.assert_close(unpatchify(patches, 8, 5), images)


def test_random_masking_keeps_quarter():
    generator = torch.Generator().manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(6, 16, 0.75, generator)
    assert ids_keep.shape == (6, 4)
    assert (mask.sum(dim=1) == 12).all()
    for row in range(6):
        assert (mask[row, ids_keep[row]] == 0).all()
        assert ids_keep[row].unique().numel() == 4
    shuffle = torch.argsort(ids_restore, dim=1)
    torch.testing.assert_close(torch.argsort(shuffle, dim=1), ids_restore)


def test_masks_differ_per_sample():
    generator = torch.Generator().manual_seed(1)
    _, mask, _ = random_masking(8, 16, 0.75, generator)
    assert len({tuple(row.tolist()) for row in mask}) > 1


def test_encoder_sees_visible_tokens_only(mae):
    images = torch.rand(3, 5, 32, 32)
    tokens, mask, _ = mae.forward_encoder(images)
    assert tokens.shape == (3, 1 + 4, 48)
    assert mask.shape == (3, 16)


def test_loss_ignores_visible_patches(mae):
    images = torch.rand(2, 5, 32, 32)
    pred = torch.zeros(2, 16, 320)
    mask = torch.zeros(2, 16)
    mask[:, :12] = 1
    target = patchify(images, 8)
    expected = (target[:, :12] ** 2).mean()
    changed = pred.clone()
    changed[:, 12:] = 5.0  # visible patches: must not count
    assert mae.forward_loss(images, pred, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert mae.forward_loss(images, changed, mask).item() == pytest.approx(expected.item(),
                                                                           rel=1e-6)


def test_norm_pix_loss_targets_normalised():
    torch.manual_seed(0)
    model = MAEPretrainer(AstroMAEConfig.small(), MAEConfig(norm_pix_loss=True))
    images = torch.rand(2, 5, 32, 32) * 100.0
    mask = torch.ones(2, 16)
    # the per-patch normalised target has unit variance, so predicting 0 costs about 1
    loss = model.forward_loss(images, torch.zeros(2, 16, 320), mask)
    assert loss.item() == pytest.approx(319 / 320, rel=1e-3)


def test_forward_returns_predictions(mae):
    loss, pred, mask = mae(torch.rand(2, 5, 64, 64))
    assert pred.shape == (2, 16, 320)
    assert loss.ndim == 0
    assert torch.isfinite(loss)
    loss.backward()
    assert mae.encoder.patch_embed.proj.weight.grad is not None


def test_encoder_loads_into_regressor(mae):
    assert type(mae.encoder) is AstroMAEEncoder
    regressor = AstroMAE(AstroMAEConfig.small())
    regressor.encoder.load_state_dict(mae.encoder.state_dict())
    for name, tensor in mae.encoder.state_dict().items():
        torch.testing.assert_close(regressor.encoder.state_dict()[name], tensor)


def test_published_decoder_shape():
    model = MAEPretrainer()
    assert len(model.decoder_blocks) == 4
    assert model.decoder_pred.out_features == 320
    assert model.decoder_embed.out_features == 192


def test_save_load_decoder_only(mae, tmp_path):
    save_mae(mae, tmp_path / "mae", decoder_only=True)
    loaded = load_mae(tmp_path / "mae", encoder_state=mae.encoder.state_dict())
    images = torch.rand(2, 5, 32, 32)
    mae.eval()
    with torch.no_grad():
        a = mae(images, torch.Generator().manual_seed(4))[1]
        b = loaded(images, torch.Generator().manual_seed(4))[1]
    torch.testing.assert_close(a, b)
