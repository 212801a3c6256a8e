"""Training loops on tiny random arrays: frozen encoder, resume, schedule, augmentation."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cai_helpers.model import AstroMAE
from cai_helpers.train import (TrainConfig, WarmupCosine, finetune, make_optimizer,
                               parse_args, pretrain)
from cai_helpers.train_data import TrainArrays, augment_images, robust_sky_sigma

torch.set_num_threads(1)


def tiny_arrays(n_train=48, n_val=16, n_test=16) -> TrainArrays:
    generator = torch.Generator().manual_seed(0)

    def split(n):
        z = 0.02 + 0.3 * torch.rand(n, generator=generator)
        images = torch.rand(n, 5, 32, 32, generator=generator) * (1 + 5 * z.view(-1, 1, 1, 1))
        mags = 17 + torch.rand(n, 5, generator=generator) + 3 * z.view(-1, 1)
        return images, mags, z

    train, val, test = split(n_train), split(n_val), split(n_test)
    return TrainArrays(*train, *val, *test, test_ids=torch.arange(n_test),
                       sky_sigma=torch.full((5,), 0.1))


@pytest.fixture
def config(tmp_path):
    return TrainConfig(out_dir=str(tmp_path), model_size="small", num_threads=1,
                       batch_size=16, pretrain_epochs=2, finetune_epochs=2,
                       warmup_epochs=0.5, patience=5)


def test_finetune_keeps_encoder_frozen(config):
    torch.manual_seed(0)
    initial = AstroMAE(config.model_config())
    encoder_state = {k: v.clone() for k, v in initial.encoder.state_dict().items()}
    model, state = finetune(config, tiny_arrays(), encoder_state)

    for name, tensor in model.encoder.state_dict().items():  # parameters and buffers
        assert torch.equal(tensor, encoder_state[name]), name
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert len(state["history"]) == 2


def test_finetune_updates_heads(config):
    torch.manual_seed(0)
    reference = AstroMAE(config.model_config())
    torch.manual_seed(0)
    model, _ = finetune(config, tiny_arrays(), None)
    assert not torch.equal(model.head.weight, reference.head.weight)
    trained_bn = model.inception_model.vis_inception.inception1.branch1x1.bn
    initial_bn = reference.inception_model.vis_inception.inception1.branch1x1.bn
    assert not torch.equal(trained_bn.running_mean, initial_bn.running_mean)


def test_finetune_stores_input_scaling(config):
    arrays = tiny_arrays()
    model, _ = finetune(config, arrays, None)
    torch.testing.assert_close(model.mag_mean, arrays.train_mags.mean(dim=0))
    torch.testing.assert_close(model.pixel_scale, 1 / arrays.train_images.std(dim=(0, 2, 3)))


def test_finetune_keeps_pretrained_pixel_scale(config):
    scale = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    model, _ = finetune(config, tiny_arrays(), None, pixel_scale=scale)
    torch.testing.assert_close(model.pixel_scale, scale)


def test_pretrain_logs_json_per_epoch(config, caplog):
    with caplog.at_level(logging.INFO, logger="cai_helpers.train"):
        mae, state = pretrain(config, tiny_arrays())
    records = [json.loads(r.getMessage()) for r in caplog.records
               if r.getMessage().startswith("{")]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["phase"] == "pretrain" for r in records)
    assert state["best_epoch"] in (1, 2)


def test_resume_continues_after_last_epoch(config):
    arrays = tiny_arrays()
    finetune(config, arrays, None)
    resumed_cfg = TrainConfig(**{**config.__dict__, "finetune_epochs": 3, "resume": True})
    _, state = finetune(resumed_cfg, arrays, None)
    assert [r["epoch"] for r in state["history"]] == [1, 2, 3]


def test_training_state_restores_optimizer(config, tmp_path):
    from cai_helpers.checkpoint import load_training_state, save_training_state

    torch.manual_seed(0)
    model = AstroMAE(config.model_config())
    optimizer, scheduler = make_optimizer(list(model.parameters()), 1e-3, 0.05, 4, 2, 0.5)
    model(torch.rand(2, 5, 32, 32), torch.rand(2, 5)).sum().backward()
    optimizer.step()
    scheduler.step()
    save_training_state(tmp_path / "ckpt", model, optimizer, scheduler, {"epoch": 1})

    torch.manual_seed(1)
    other = AstroMAE(config.model_config())
    other_opt, other_sched = make_optimizer(list(other.parameters()), 1e-3, 0.05, 4, 2, 0.5)
    state = load_training_state(tmp_path / "ckpt", other, other_opt, other_sched)
    assert state == {"epoch": 1}
    assert other_sched.last_epoch == scheduler.last_epoch
    first = next(iter(optimizer.state.values()))
    restored = next(iter(other_opt.state.values()))
    torch.testing.assert_close(restored["exp_avg"], first["exp_avg"])
    assert torch.equal(other.head.weight, model.head.weight)


def test_warmup_cosine_by_hand():
    schedule = WarmupCosine(warmup_steps=4, total_steps=12)
    assert schedule(0) == pytest.approx(0.25)
    assert schedule(3) == pytest.approx(1.0)
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(8) == pytest.approx(0.5)  # half-way through the cosine
    assert schedule(12) == pytest.approx(0.0)


def test_augment_is_dihedral_plus_noise():
    images = torch.rand(64, 5, 32, 32)
    generator = torch.Generator().manual_seed(0)
    out = augment_images(images, generator, torch.zeros(5))
    for i in range(64):
        variants = [torch.rot90(img, k, dims=(-2, -1)) for img in (images[i], images[i].flip(-1))
                    for k in range(4)]
        assert any(torch.equal(out[i], v) for v in variants), i
    assert not torch.equal(out, images)  # 64 samples: some are transformed

    noisy = augment_images(torch.zeros(200, 5, 32, 32), generator,
                           torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    stds = noisy.std(dim=(0, 2, 3))
    torch.testing.assert_close(stds, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), rtol=0.02, atol=0)


def test_robust_sky_sigma_ignores_galaxy():
    generator = torch.Generator().manual_seed(0)
    images = 0.5 * torch.randn(100, 5, 32, 32, generator=generator)
    images[:, :, 12:20, 12:20] += 50.0  # a bright centre does not inflate the estimate
    torch.testing.assert_close(robust_sky_sigma(images), torch.full((5,), 0.5), rtol=0.05,
                               atol=0)


def test_cli_flags_map_to_config():
    cfg, stages = parse_args(["finetune", "--model-size", "small", "--finetune-epochs", "3",
                              "--no-norm-pix-loss", "--resume", "--finetune-lr", "1e-4"])
    assert stages == "finetune"
    assert cfg.model_size == "small"
    assert cfg.finetune_epochs == 3
    assert cfg.resume is True
    assert cfg.finetune_lr == 1e-4


def test_recorded_command_reproduces_config():
    from dataclasses import asdict

    from cai_helpers.model_release import train_command

    cfg = TrainConfig(model_size="small", realisations=2, norm_pix_loss=True, loss="huber")
    words = train_command(asdict(cfg)).split()
    assert words[:4] == ["python", "-m", "cai_helpers.train", "all"]
    parsed, stages = parse_args(words[3:])
    assert stages == "all"
    assert parsed == cfg
