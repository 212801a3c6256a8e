"""Training loops for AstroMAE: MAE pretraining, then fine-tuning with a frozen encoder.

Both loops use AdamW with a linear warm-up and cosine decay per step and validate every
epoch. They stop early after ``patience`` epochs without a better validation loss. Every
epoch writes a resumable checkpoint (safetensors + JSON) and logs one JSON line.
Fine-tuning keeps the encoder frozen (no gradients, eval mode, so its BatchNorm statistics
stay fixed) and computes its pooled features once per augmented view; every epoch then
trains the heads on those cached features plus the same augmented images.

Run ``python -m cai_helpers.train --help``; the flags map onto :class:`TrainConfig`.
Shape legend: N samples, B batch, C channels (bands), H W pixels, D width.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cai_helpers.checkpoint import load_model, load_training_state, save_training_state
from cai_helpers.errors import InvalidParameterError
from cai_helpers.mae import MAEConfig, MAEPretrainer
from cai_helpers.model import AstroMAE, AstroMAEConfig
from cai_helpers.train_data import TrainArrays, augment_images, load_or_build_arrays

logger = logging.getLogger(__name__)

WARMUP_FLOOR = 1e-3  # learning-rate factor of the first warm-up step
LOSSES = ("mse", "huber")
PROGRESS_INTERVAL_S = 5.0  # seconds between progress-bar refreshes (keeps logs short)


@dataclass
class TrainConfig:
    """Settings of one training run (CLI flags carry the same names with dashes)."""

    out_dir: str = "runs/train/astromae"
    model_size: str = "default"  # "default" (published) or "small" (tests)
    init_model: str = ""  # model folder whose encoder starts fine-tuning ("" = none)
    seed: int = 0
    num_threads: int = 2
    batch_size: int = 128
    # data
    render_seed: int = 42  # seed of cai_helpers.render.render_cutouts
    split_seed: int = 42  # seed of cai_helpers.dataset.assign_splits
    realisations: int = 3  # renderings per training galaxy
    max_galaxies: int = 0  # 0 = whole catalog; small values for tests
    noise_level: float = 0.3  # augmentation noise, in units of the per-band sky sigma
    # MAE pretraining
    pretrain_epochs: int = 20
    pretrain_lr: float = 5e-4
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    # fine-tuning
    finetune_epochs: int = 10
    finetune_lr: float = 3e-4
    views: int = 1  # augmented views (encoder features cached) per training image
    loss: str = "mse"  # fine-tuning loss on z: "mse" (as published) or "huber"
    huber_delta: float = 0.02  # z difference where the Huber loss turns linear
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    patience: int = 4
    resume: bool = False

    def __post_init__(self) -> None:
        if self.model_size not in ("default", "small"):
            raise InvalidParameterError(
                f"model_size {self.model_size!r} must be 'default' or 'small'")
        if self.loss not in LOSSES:
            raise InvalidParameterError(f"loss {self.loss!r} must be one of {LOSSES}")
        if self.batch_size < 1 or self.realisations < 1 or self.views < 1:
            raise InvalidParameterError(
                "batch_size, realisations and views must be at least 1, got "
                f"{self.batch_size}, {self.realisations}, {self.views}")

    def model_config(self) -> AstroMAEConfig:
        return AstroMAEConfig.small() if self.model_size == "small" else AstroMAEConfig()


class WarmupCosine:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then cosine to 0."""

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = max(1, int(warmup_steps))
        self.total_steps = max(self.warmup_steps + 1, int(total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return max(WARMUP_FLOOR, (step + 1) / self.warmup_steps)
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float,
                   steps_per_epoch: int, epochs: int, warmup_epochs: float
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """Return AdamW (betas 0.9, 0.95) and its per-step warm-up + cosine scheduler."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    schedule = WarmupCosine(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def freeze_encoder(model: AstroMAE) -> None:
    """Stop gradients to the encoder and hold it in eval mode (BatchNorm stats fixed)."""
    for param in model.encoder.parameters():
        param.requires_grad_(False)
    model.encoder.eval()


def set_finetune_mode(model: AstroMAE) -> None:
    """Put the heads in training mode and keep the frozen encoder in eval mode."""
    model.train()
    model.encoder.eval()


def input_statistics(arrays: TrainArrays) -> dict[str, torch.Tensor]:
    """Per-band input scaling from the training split: 1 / pixel std, magnitude mean/std."""
    pixel_std = arrays.train_images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return {"pixel_scale": 1.0 / pixel_std, "mag_mean": arrays.train_mags.mean(dim=0),
            "mag_std": arrays.train_mags.std(dim=0).clamp_min(1e-6)}


def _log_epoch(phase: str, record: dict[str, Any]) -> None:
    logger.info(json.dumps({"phase": phase, **record}, sort_keys=True))


def run_epochs(phase: str, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LambdaLR, epochs: int, patience: int,
               train_epoch: Callable[[int], float], validate: Callable[[], float],
               resume: bool) -> dict[str, Any]:
    """Drive epochs with validation, early stopping and a checkpoint per epoch.

    The weights of the best validation epoch are restored at the end. Returns the
    state (epoch, best_val, best_epoch, history).
    """
    state: dict[str, Any] = {"epoch": 0, "best_val": float("inf"), "best_epoch": -1,
                             "history": []}
    if resume and (folder / "last" / "state.json").is_file():
        state = load_training_state(folder / "last", model, optimizer, scheduler)

    for epoch in range(state["epoch"], epochs):
        start = time.perf_counter()
        train_loss = train_epoch(epoch)
        val_loss = validate()
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                  "lr": optimizer.param_groups[0]["lr"],
                  "seconds": round(time.perf_counter() - start, 1)}
        state["history"].append(record)
        state["epoch"] = epoch + 1
        _log_epoch(phase, record)
        if val_loss < state["best_val"]:
            state["best_val"], state["best_epoch"] = val_loss, epoch + 1
            save_training_state(folder / "best", model, optimizer, scheduler, state)
        save_training_state(folder / "last", model, optimizer, scheduler, state)
        if state["epoch"] - state["best_epoch"] >= patience:
            logger.info("%s: early stop at epoch %d, best epoch %d", phase, epoch + 1,
                        state["best_epoch"])
            break

    if (folder / "best" / "state.json").is_file():
        load_training_state(folder / "best", model, optimizer, scheduler)
    return state


def pretrain(cfg: TrainConfig, arrays: TrainArrays) -> tuple[MAEPretrainer, dict[str, Any]]:
    """Pretrain the encoder as a masked autoencoder on the training images."""
    torch.manual_seed(cfg.seed)
    mae = MAEPretrainer(cfg.model_config(), MAEConfig(mask_ratio=cfg.mask_ratio,
                                                      norm_pix_loss=cfg.norm_pix_loss))
    mae.pixel_scale.copy_(input_statistics(arrays)["pixel_scale"])
    n = arrays.train_images.shape[0]
    steps = max(1, n // cfg.batch_size)
    optimizer, scheduler = make_optimizer(
        [p for p in mae.parameters() if p.requires_grad], cfg.pretrain_lr, cfg.weight_decay,
        steps, cfg.pretrain_epochs, cfg.warmup_epochs)
    sky = arrays.sky_sigma * cfg.noise_level
    generator = torch.Generator().manual_seed(cfg.seed)

    def train_epoch(epoch: int) -> float:
        mae.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for step in tqdm(range(steps), desc=f"pretrain {epoch + 1}", leave=False,
                         mininterval=PROGRESS_INTERVAL_S):
            index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            images = augment_images(arrays.train_images[index], generator, sky)
            loss, _, _ = mae(images, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        return total / steps

    def validate() -> float:
        mae.eval()
        val_generator = torch.Generator().manual_seed(cfg.seed + 1)  # same masks each epoch
        losses = []
        with torch.no_grad():
            for start in range(0, arrays.val_images.shape[0], cfg.batch_size):
                loss, _, _ = mae(arrays.val_images[start:start + cfg.batch_size], val_generator)
                losses.append(loss.item())
        return float(np.mean(losses))

    state = run_epochs("pretrain", Path(cfg.out_dir) / "pretrain", mae, optimizer, scheduler,
                       cfg.pretrain_epochs, cfg.patience, train_epoch, validate, cfg.resume)
    return mae, state


@torch.no_grad()
def encode(model: AstroMAE, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Return pooled encoder features [N, D] of raw images [N, C, H, W] (eval mode)."""
    model.encoder.eval()
    out = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc="encode", leave=False,
                      mininterval=PROGRESS_INTERVAL_S):
        prepared, _ = model.prepare_inputs(images[start:start + batch_size],
                                           torch.zeros(1, model.config.num_mags))
        out.append(model.forward_encoder(prepared))
    return torch.cat(out)


@torch.no_grad()
def predict(model: AstroMAE, images: torch.Tensor, magnitudes: torch.Tensor,
            batch_size: int = 256, encoded: torch.Tensor | None = None) -> np.ndarray:
    """Predict redshifts [N] in eval mode (optionally from cached encoder features)."""
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        part = slice(start, start + batch_size)
        cached = None if encoded is None else encoded[part]
        out.append(model.forward_head(model.forward_features(images[part], magnitudes[part],
                                                             cached)))
    return torch.cat(out).numpy()


def finetune(cfg: TrainConfig, arrays: TrainArrays, encoder_state: dict[str, torch.Tensor] | None,
             pixel_scale: torch.Tensor | None = None) -> tuple[AstroMAE, dict[str, Any]]:
    """Fine-tune the heads with the encoder frozen; returns the best-validation model.

    ``pixel_scale`` [C] is the scaling the encoder was pretrained with; without it the
    scaling is computed from ``arrays``.
    """
    torch.manual_seed(cfg.seed)
    model = AstroMAE(cfg.model_config())
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)
    statistics = input_statistics(arrays)
    if pixel_scale is not None:
        statistics["pixel_scale"] = pixel_scale
    model.set_input_scaling(**statistics)
    with torch.no_grad():  # start the output at the mean training redshift
        model.concat_block[-1].bias.fill_(float(arrays.train_z.mean()))
    freeze_encoder(model)
    generator = torch.Generator().manual_seed(cfg.seed + 2)

    # augmented views, each with its encoder features computed once
    sky = arrays.sky_sigma * cfg.noise_level
    view_images = torch.cat([augment_images(arrays.train_images, generator, sky)
                             for _ in range(cfg.views)])  # [N * views, C, H, W]
    view_mags = arrays.train_mags.repeat(cfg.views, 1)
    view_z = arrays.train_z.repeat(cfg.views)
    view_features = encode(model, view_images, cfg.batch_size)  # [N * views, D]
    val_features = encode(model, arrays.val_images, cfg.batch_size)

    n = view_images.shape[0]
    steps = max(1, n // cfg.batch_size)
    optimizer, scheduler = make_optimizer(model.head_parameters(), cfg.finetune_lr,
                                          cfg.weight_decay, steps, cfg.finetune_epochs,
                                          cfg.warmup_epochs)
    loss_fn = nn.MSELoss() if cfg.loss == "mse" else nn.HuberLoss(delta=cfg.huber_delta)

    def train_epoch(epoch: int) -> float:
        set_finetune_mode(model)
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for step in tqdm(range(steps), desc=f"finetune {epoch + 1}", leave=False,
                         mininterval=PROGRESS_INTERVAL_S):
            index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            features = model.forward_features(view_images[index], view_mags[index],
                                              view_features[index])
            loss = loss_fn(model.forward_head(features), view_z[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        return total / steps

    def validate() -> float:
        z_pred = predict(model, arrays.val_images, arrays.val_mags, cfg.batch_size, val_features)
        return float(np.mean((z_pred - arrays.val_z.numpy()) ** 2))

    state = run_epochs("finetune", Path(cfg.out_dir) / "finetune", model, optimizer, scheduler,
                       cfg.finetune_epochs, cfg.patience, train_epoch, validate, cfg.resume)
    return model.eval(), state


def train(cfg: TrainConfig, stages: str = "all") -> dict[str, Any]:
    """Run ``stages`` ("pretrain", "finetune" or "all") and save the results under
    ``out_dir``: ``mae/`` (encoder + decoder), ``model/`` (float32 regressor) and
    ``result.json`` (config, histories, test metrics)."""
    from cai_helpers.checkpoint import save_model
    from cai_helpers.mae import save_mae
    from cai_helpers.metrics import photoz_metrics

    torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = load_or_build_arrays(cfg)
    result: dict[str, Any] = {"config": asdict(cfg)}

    encoder_state, pixel_scale = None, None
    if stages in ("pretrain", "all"):
        mae, result["pretrain"] = pretrain(cfg, arrays)
        save_mae(mae, out / "mae")
        encoder_state, pixel_scale = mae.encoder.state_dict(), mae.pixel_scale.clone()
    elif cfg.init_model:
        initial = load_model(cfg.init_model)
        encoder_state, pixel_scale = initial.encoder.state_dict(), initial.pixel_scale.clone()

    if stages in ("finetune", "all"):
        model, result["finetune"] = finetune(cfg, arrays, encoder_state, pixel_scale)
        save_model(model, out / "model", dtype=torch.float32, extra={"train_config": asdict(cfg)})
        z_pred = predict(model, arrays.test_images, arrays.test_mags, cfg.batch_size)
        result["test_metrics"] = photoz_metrics(z_pred, arrays.test_z.numpy())
        logger.info("test metrics: %s", json.dumps(result["test_metrics"]))

    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str]:
    """Map CLI flags onto TrainConfig (one flag per field)."""
    parser = argparse.ArgumentParser(prog="python -m cai_helpers.train",
                                     description="Pretrain and/or fine-tune AstroMAE.")
    parser.add_argument("stages", choices=("pretrain", "finetune", "all"), nargs="?",
                        default="all", help="which stages to run")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")
    args = vars(parser.parse_args(argv))
    stages = args.pop("stages")
    return TrainConfig(**args), stages


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg, stages = parse_args(argv)
    train(cfg, stages)


if __name__ == "__main__":
    main()
