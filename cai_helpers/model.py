"""AstroMAE redshift regressor ("pcm-AstroMAE", Fathkouhi & Fox 2024, arXiv:2409.01825).

The default configuration has exactly 15,902,889 parameters, 5,504,832 of them in the
encoder (patch embedding, class token, fixed sine-cosine position table, 12 blocks).
Module names follow the authors' state-dict names (``fc_norm``, ``head``, ``vit_block``,
``inception_model.vis_inception``, ``inception_model.magnitude_block``, ``concat_block``,
``blocks.N.PCM``), so their weights map onto ours by prefix only.

Shape legend: B batch, C channels (bands), H W pixels, L tokens, D width.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed
from torch import nn

from cai_helpers.errors import InvalidParameterError

logger = logging.getLogger(__name__)


@dataclass
class AstroMAEConfig:
    """Architecture of the regressor; the defaults are the published model."""

    img_size: int = 32  # pixels seen by the model; larger inputs are center-cropped
    patch_size: int = 8
    in_chans: int = 5  # u, g, r, i, z
    num_mags: int = 5
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    pcm_ratio: int = 4  # PCM hidden width = pcm_ratio * embed_dim
    pcm_groups: int = 48
    drop_path_rate: float = 0.0
    head_width: int = 1096  # output width of the ViT head and of the Inception branch
    inception_stem: int = 32
    inception_widths: tuple[int, ...] = field(default_factory=lambda: (16, 16, 8, 8, 4))
    mag_width: int = 1024
    mag_layers: int = 5  # Linear layers in the magnitude block
    fusion_width: int = 1024

    def __post_init__(self) -> None:
        self.inception_widths = tuple(int(w) for w in self.inception_widths)
        if self.img_size % self.patch_size:
            raise InvalidParameterError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}; "
                "choose sizes such as 32 and 8")
        if self.embed_dim % self.num_heads:
            raise InvalidParameterError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % self.pcm_groups or self.embed_dim % 4:
            raise InvalidParameterError(
                f"embed_dim {self.embed_dim} must be divisible by pcm_groups "
                f"{self.pcm_groups} and by 4 (sine-cosine table)")
        if len(self.inception_widths) != 5 or self.img_size % 8:
            raise InvalidParameterError(
                "inception_widths needs 5 entries and img_size a multiple of 8 "
                f"(got {self.inception_widths}, {self.img_size})")

    @classmethod
    def small(cls) -> "AstroMAEConfig":
        """Return a tiny configuration (about 120k parameters) for fast tests."""
        return cls(embed_dim=48, depth=2, num_heads=3, pcm_groups=12, head_width=64,
                   inception_stem=8, inception_widths=(4, 4, 2, 2, 2), mag_width=64,
                   mag_layers=3, fusion_width=64)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inception_widths"] = list(self.inception_widths)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AstroMAEConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidParameterError(
                f"unknown AstroMAEConfig fields {unknown}; the config was written by a "
                "newer version or edited by hand")
        return cls(**data)


def sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """Build the fixed 2-D sine-cosine position table [1 + grid_size**2, embed_dim].

    Half of the width encodes the row, half the column; each half is sin then cos of the
    position times frequencies 1 / 10000**(k / (embed_dim / 4)), as in MAE. The class
    token row is zero.
    """
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                             np.arange(grid_size, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)  # [L, D/4]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [L, D/2]

    # MAE puts the column (w) encoding first, then the row (h) encoding
    table = np.concatenate([encode(cols), encode(rows)], axis=1)  # [L, D]
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table.astype(np.float32)


class Attention(nn.Module):
    """Multi-head self-attention with a bias-free qkv projection plus learned q and v
    biases (the k bias is fixed at zero), as in BEiT and the published AstroMAE encoder."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, L, 3D]
        qkv = qkv.reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, L, D/heads]
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, L, D)
        return self.proj(x)


class Block(nn.Module):
    """Transformer block with a parallel convolution module (PCM) on the patch tokens.

    The PCM is computed from the block input, skips the class token (token 0) and is
    added to the patch tokens after the attention residual, before the MLP residual.
    Its convolutions have kernel 1, so it is a per-token operation that works on any
    subset of tokens (MAE runs it on the visible tokens only).
    """

    def __init__(self, config: AstroMAEConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        dim, hidden = config.embed_dim, config.pcm_ratio * config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), act_layer=nn.GELU)
        # the authors' attribute name, kept so that their state dict maps by prefix
        self.PCM = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, groups=config.pcm_groups),
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, dim, 1, groups=config.pcm_groups),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PCM on patch tokens laid out as a column image: [B, L, D] -> [B, D, L, 1]
        patches = x[:, 1:].transpose(1, 2).unsqueeze(-1)
        local = self.PCM(patches).squeeze(-1).transpose(1, 2)  # [B, L, D]

        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = torch.cat([x[:, :1], x[:, 1:] + self.drop_path(local)], dim=1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AstroMAEEncoder(nn.Module):
    """ViT encoder shared by the MAE pretrainer and the regressor (no final norm)."""

    def __init__(self, config: AstroMAEConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans,
                                      config.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        table = sincos_pos_embed(config.embed_dim, config.img_size // config.patch_size)
        self.pos_embed = nn.Parameter(torch.from_numpy(table).unsqueeze(0),
                                      requires_grad=False)  # [1, 1 + L, D], fixed
        rates = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's choices: patch projection like a Linear layer, small normal class token
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Encode normalised images [B, C, H, W] into tokens [B, 1 + L, D].

        ``ids_keep`` [B, L_keep] selects the visible patch tokens (MAE masking); the
        class token is always token 0.
        """
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # [B, L, D]
        if ids_keep is not None:
            index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = torch.gather(x, 1, index)  # [B, L_keep, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return x


class ConvBlock(nn.Module):
    """Conv2d, BatchNorm2d, ReLU (the Inception branch's unit)."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, padding=kernel_size // 2)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Four branches (1x1; 1x1 then 3x3; 1x1 then 5x5; 3x3 max-pool then 1x1), each
    ``width`` channels wide, concatenated. With ``use_5x5=False`` the 5x5 branch keeps
    its parameters but is left out of the output (the published last block)."""

    def __init__(self, in_chans: int, width: int, use_5x5: bool = True) -> None:
        super().__init__()
        self.use_5x5 = use_5x5
        self.branch1x1 = ConvBlock(in_chans, width, 1)
        self.branch3x3 = nn.Sequential(ConvBlock(in_chans, width, 1), ConvBlock(width, width, 3))
        self.branch5x5 = nn.Sequential(ConvBlock(in_chans, width, 1), ConvBlock(width, width, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                         ConvBlock(in_chans, width, 1))

    @property
    def out_chans(self) -> int:
        return self.branch1x1.conv.out_channels * (4 if self.use_5x5 else 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1x1(x), self.branch3x3(x)]
        if self.use_5x5:
            branches.append(self.branch5x5(x))
        branches.append(self.branch_pool(x))
        return torch.cat(branches, dim=1)


class VisInception(nn.Module):
    """Inception branch on the 32x32 image: stem, five Inception blocks at 16, 8 and 4
    pixels, then an MLP from the flattened 4x4 map to ``head_width`` features."""

    def __init__(self, config: AstroMAEConfig) -> None:
        super().__init__()
        w = config.inception_widths
        self.stem = nn.Conv2d(config.in_chans, config.inception_stem, 1)
        self.inception1 = InceptionBlock(config.inception_stem, w[0])
        self.inception2 = InceptionBlock(4 * w[0], w[1])
        self.inception3 = InceptionBlock(4 * w[1], w[2])
        self.inception4 = InceptionBlock(4 * w[2], w[3])
        self.inception5 = InceptionBlock(4 * w[3], w[4], use_5x5=False)
        flat = self.inception5.out_chans * (config.img_size // 8) ** 2
        self.fc = nn.Sequential(nn.Linear(flat, config.head_width), nn.ReLU(),
                                nn.Linear(config.head_width, config.head_width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.stem(images), 2)  # [B, stem, H/2, W/2]
        x = self.inception2(self.inception1(x))
        x = F.avg_pool2d(x, 2)  # [B, 4 w1, H/4, W/4]
        x = self.inception4(self.inception3(x))
        x = F.avg_pool2d(x, 2)  # [B, 4 w3, H/8, W/8]
        x = self.inception5(x)  # [B, 3 w4, H/8, W/8]
        return self.fc(x.flatten(1))


def magnitude_mlp(config: AstroMAEConfig) -> nn.Sequential:
    """Linear num_mags -> mag_width, then Linear mag_width -> mag_width layers with ReLU
    between them and no activation after the last."""
    layers: list[nn.Module] = [nn.Linear(config.num_mags, config.mag_width)]
    for _ in range(config.mag_layers - 1):
        layers += [nn.ReLU(), nn.Linear(config.mag_width, config.mag_width)]
    return nn.Sequential(*layers)


class InputMixModel(nn.Module):
    """Holder of the image Inception branch and the magnitude block (authors' layout)."""

    def __init__(self, config: AstroMAEConfig) -> None:
        super().__init__()
        self.vis_inception = VisInception(config)
        self.magnitude_block = magnitude_mlp(config)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Crop [B, C, H, W] to the central [B, C, size, size] (no-op at H = W = size)."""
    H, W = images.shape[-2:]
    if H == size and W == size:
        return images
    if H < size or W < size:
        raise InvalidParameterError(
            f"images of {H}x{W} pixels are smaller than the model's {size}x{size} input")
    top, left = (H - size) // 2, (W - size) // 2
    return images[..., top:top + size, left:left + size]


class AstroMAE(nn.Module):
    """The fine-tuned regressor: encoder, ViT head, Inception branch, magnitude block
    and fusion MLP; ``forward(images, magnitudes) -> z``.

    Non-trainable buffers ``pixel_scale`` [C], ``mag_mean`` [M] and ``mag_std`` [M]
    rescale raw inputs (images in nanomaggies per pixel, dereddened AB magnitudes) as
    ``images * pixel_scale`` and ``(magnitudes - mag_mean) / mag_std``. They default to
    the identity, which is the published model's behaviour; a checkpoint trained by
    this project stores the statistics of its training split.
    """

    def __init__(self, config: AstroMAEConfig | None = None) -> None:
        super().__init__()
        config = config or AstroMAEConfig()
        self.config = config
        D, W = config.embed_dim, config.head_width
        self.encoder = AstroMAEEncoder(config)
        self.fc_norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.head = nn.Linear(D, D)
        self.vit_block = nn.Sequential(nn.Linear(D, W), nn.ReLU(), nn.Linear(W, W))
        self.inception_model = InputMixModel(config)
        fused = 2 * W + config.mag_width
        self.concat_block = nn.Sequential(nn.Linear(fused, config.fusion_width), nn.ReLU(),
                                          nn.Linear(config.fusion_width, 1))
        self.register_buffer("pixel_scale", torch.ones(config.in_chans))
        self.register_buffer("mag_mean", torch.zeros(config.num_mags))
        self.register_buffer("mag_std", torch.ones(config.num_mags))

    def set_input_scaling(self, pixel_scale: torch.Tensor, mag_mean: torch.Tensor,
                          mag_std: torch.Tensor) -> None:
        """Store the input statistics (per band) that the model was trained with."""
        self.pixel_scale.copy_(torch.as_tensor(pixel_scale, dtype=torch.float32))
        self.mag_mean.copy_(torch.as_tensor(mag_mean, dtype=torch.float32))
        self.mag_std.copy_(torch.as_tensor(mag_std, dtype=torch.float32))

    def prepare_inputs(self, images: torch.Tensor, magnitudes: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop to img_size, cast to float32 and apply the stored input scaling."""
        images = center_crop(images, self.config.img_size).float()
        images = images * self.pixel_scale.view(1, -1, 1, 1)
        magnitudes = (magnitudes.float() - self.mag_mean) / self.mag_std
        return images, magnitudes

    def forward_encoder(self, images: torch.Tensor) -> torch.Tensor:
        """Pool prepared images [B, C, H, W] to the mean patch token [B, D]."""
        tokens = self.encoder(images)  # [B, 1 + L, D]
        return tokens[:, 1:].mean(dim=1)

    def forward_features(self, images: torch.Tensor, magnitudes: torch.Tensor,
                         encoded: torch.Tensor | None = None) -> torch.Tensor:
        """Return the fused features [B, 2 * head_width + mag_width].

        ``images`` and ``magnitudes`` are raw inputs. ``encoded`` [B, D] may carry the
        pooled encoder output of the same prepared images, computed earlier (fine-tuning
        with a frozen encoder caches it); it skips the encoder.
        """
        images, magnitudes = self.prepare_inputs(images, magnitudes)
        if encoded is None:
            encoded = self.forward_encoder(images)
        vit = self.vit_block(self.head(self.fc_norm(encoded)))  # [B, head_width]
        inception = self.inception_model.vis_inception(images)  # [B, head_width]
        mags = self.inception_model.magnitude_block(magnitudes)  # [B, mag_width]
        return torch.cat([vit, inception, mags], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Map fused features [B, F] to redshift [B]."""
        return self.concat_block(features).squeeze(-1)

    def forward(self, images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        """Predict redshift [B] from images [B, C, 32|64, 32|64] and magnitudes [B, M]."""
        return self.forward_head(self.forward_features(images, magnitudes))

    def head_parameters(self) -> list[nn.Parameter]:
        """Return every trainable parameter outside the encoder."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.")]


def count_parameters(module: nn.Module) -> int:
    """Count every parameter, trainable or not (the fixed position table included)."""
    return sum(p.numel() for p in module.parameters())
