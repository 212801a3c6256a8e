"""Masked-autoencoder pretraining of the AstroMAE encoder (He et al. 2022 recipe).

Each sample keeps a random 25% of its patch tokens (4 of 16 at 32x32 pixels, patch 8),
the encoder sees only those, and a light decoder reconstructs the pixels of the masked
patches. The ``encoder`` attribute is the regressor's own encoder class, so
``regressor.encoder.load_state_dict(mae.encoder.state_dict())`` needs no renaming.

Shape legend: B batch, C channels (bands), H W pixels, L tokens, D width, P patch pixels.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from timm.models.vision_transformer import Block as PlainBlock
from safetensors.torch import save_file
from torch import nn

from cai_helpers.errors import CheckpointError, InvalidParameterError
from cai_helpers.model import AstroMAEConfig, AstroMAEEncoder, center_crop, sincos_pos_embed

logger = logging.getLogger(__name__)


@dataclass
class MAEConfig:
    """Pretraining settings on top of the encoder's AstroMAEConfig."""

    mask_ratio: float = 0.75
    decoder_embed_dim: int = 192
    decoder_depth: int = 4
    decoder_num_heads: int = 3
    # False: targets are the (scaled) pixels. Per-patch normalised targets, as MAE
    # offers, turn sky-only patches into pure noise targets on galaxy cutouts.
    norm_pix_loss: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise InvalidParameterError(
                f"mask_ratio {self.mask_ratio} must lie strictly between 0 and 1")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split [B, C, H, W] into patches [B, L, P * P * C], row-major over the grid."""
    B, C, H, W = images.shape
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, C, h, patch_size, w, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(B, h * w, patch_size * patch_size * C)


def unpatchify(patches: torch.Tensor, patch_size: int, in_chans: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, L, P * P * C] -> [B, C, H, W] (square grid)."""
    B, L, _ = patches.shape
    side = int(round(L ** 0.5))
    x = patches.reshape(B, side, side, patch_size, patch_size, in_chans)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(B, in_chans, side * patch_size, side * patch_size)


def random_masking(batch: int, num_patches: int, mask_ratio: float,
                   generator: torch.Generator | None = None, device: torch.device | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw a per-sample random shuffle of the patches.

    Returns ``ids_keep`` [B, L_keep] (visible patches), ``mask`` [B, L] (0 keep,
    1 masked, in the original patch order) and ``ids_restore`` [B, L] (undoes the
    shuffle).
    """
    keep = max(1, int(round(num_patches * (1 - mask_ratio))))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


class MAEPretrainer(nn.Module):
    """AstroMAE encoder plus MAE decoder; ``forward`` returns (loss, pred, mask)."""

    def __init__(self, config: AstroMAEConfig | None = None,
                 mae_config: MAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or AstroMAEConfig()
        self.mae_config = mae_config or MAEConfig()
        cfg, mcfg = self.config, self.mae_config
        num_values = cfg.patch_size ** 2 * cfg.in_chans  # 8 * 8 * 5 = 320 by default

        self.encoder = AstroMAEEncoder(cfg)
        self.encoder_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.decoder_embed = nn.Linear(cfg.embed_dim, mcfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, mcfg.decoder_embed_dim))
        table = sincos_pos_embed(mcfg.decoder_embed_dim, cfg.img_size // cfg.patch_size)
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(table).unsqueeze(0),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            PlainBlock(mcfg.decoder_embed_dim, mcfg.decoder_num_heads, cfg.mlp_ratio,
                       qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps))
            for _ in range(mcfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(mcfg.decoder_embed_dim, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(mcfg.decoder_embed_dim, num_values)
        self.register_buffer("pixel_scale", torch.ones(cfg.in_chans))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, images: torch.Tensor, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches of prepared images; returns (tokens [B, 1 + L_keep,
        D], mask [B, L], ids_restore [B, L])."""
        B = images.shape[0]
        ids_keep, mask, ids_restore = random_masking(
            B, self.config.num_patches, self.mae_config.mask_ratio, generator, images.device)
        tokens = self.encoder(images, ids_keep)
        return self.encoder_norm(tokens), mask, ids_restore

    def forward_decoder(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch's pixels [B, L, P * P * C] from the visible tokens."""
        x = self.decoder_embed(tokens)  # [B, 1 + L_keep, D_dec]
        B, L = ids_restore.shape
        fill = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        x_patches = torch.cat([x[:, 1:], fill], dim=1)  # shuffled order
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x_patches = torch.gather(x_patches, 1, index)  # original order [B, L, D_dec]
        x = torch.cat([x[:, :1], x_patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
                     ) -> torch.Tensor:
        """Mean squared error over the masked patches only."""
        target = patchify(images, self.config.patch_size)
        if self.mae_config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # [B, L]
        return (per_patch * mask).sum() / mask.sum()

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Crop raw images to img_size and apply ``pixel_scale`` (as the regressor)."""
        images = center_crop(images, self.config.img_size).float()
        return images * self.pixel_scale.view(1, -1, 1, 1)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (loss, predicted patches [B, L, P * P * C], mask [B, L]) for raw images."""
        images = self.prepare_images(images)
        tokens, mask, ids_restore = self.forward_encoder(images, generator)
        pred = self.forward_decoder(tokens, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Return every tensor outside the encoder (for shipping the decoder alone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}


MAE_FILE = "mae.safetensors"
MAE_CONFIG_FILE = "mae_config.json"


def save_mae(mae: MAEPretrainer, folder: str | Path, dtype: torch.dtype = torch.float32,
             decoder_only: bool = False) -> Path:
    """Write the pretrainer's tensors (or only those outside the encoder) and both
    configs to ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = mae.decoder_state_dict() if decoder_only else mae.state_dict()
    tensors = {k: (v.to(dtype) if v.is_floating_point() and k != "pixel_scale" else v)
               .contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / MAE_FILE))
    (folder / MAE_FILE).chmod(0o644)  # safetensors creates files readable by the owner only
    (folder / MAE_CONFIG_FILE).write_text(json.dumps(
        {"model_config": mae.config.to_dict(), "mae_config": asdict(mae.mae_config),
         "decoder_only": decoder_only}, indent=2) + "\n")
    return folder


def load_mae(folder: str | Path, encoder_state: dict[str, torch.Tensor] | None = None
             ) -> MAEPretrainer:
    """Rebuild a pretrainer saved by :func:`save_mae`; a decoder-only file needs the
    encoder's state dict (for example ``load_model(...).encoder.state_dict()``)."""
    from cai_helpers.checkpoint import check_state_dict, read_safetensors

    folder = Path(folder)
    try:
        meta = json.loads((folder / MAE_CONFIG_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder / MAE_CONFIG_FILE} is missing or invalid: {error}"
                              ) from error
    mae = MAEPretrainer(AstroMAEConfig.from_dict(meta["model_config"]),
                        MAEConfig(**meta["mae_config"]))
    state = read_safetensors(folder / MAE_FILE)
    if meta.get("decoder_only"):
        if encoder_state is None:
            raise CheckpointError(f"{folder} contains only the MAE decoder; pass encoder_state")
        state.update({f"encoder.{k}": v for k, v in encoder_state.items()})
    check_state_dict(mae, state, str(folder / MAE_FILE))
    expected = mae.state_dict()
    mae.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return mae.eval()
