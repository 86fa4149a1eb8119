"""Vision Transformer (Dosovitskiy et al., 2020), read top to bottom like the paper's figure.

image -> patches (Conv2d, stride = patch) -> prepend [CLS] -> + position embedding
      -> depth x pre-norm block (x + MSA(LN(x)); x + MLP(LN(x))) -> LN -> pool ([CLS] or mean) -> head

Parameter names and shapes are those of timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``head``), so timm weights load 1:1 (see ``vitrina.models.pretrained``). ``Block`` and
``Attention`` take an ``is_causal`` flag so the text transformer reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ViTConfig:
    """Shape of a ViT. ``num_classes=0`` means no classifier head (``forward`` returns pooled features)."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 0
    layer_norm_eps: float = 1e-6
    pool: Literal["cls", "mean"] = "cls"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, N, C): one non-overlapping patch per token, linearly projected."""

    def __init__(self, *, patch_size: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C), N = (H/p) * (W/p), row-major


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, through ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, *, is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, N, hs)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, nh, N, hs)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C): heads side by side again
        return self.proj(x)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, hidden width ``mlp_ratio * width``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + MSA(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, *, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


def init_transformer_weights(module: nn.Module) -> None:
    """timm's ViT init for linear layers: truncated normal (std 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ViT(nn.Module):
    """Vision Transformer: ``forward_features`` -> (B, 1+N, C) tokens, ``forward_head`` -> pooled/logits."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.num_prefix_tokens = 1  # [CLS]; a DeiT distillation token would add one more
        self.patch_embed = PatchEmbed(patch_size=c.patch_size, in_channels=c.in_channels, width=c.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + c.num_patches, c.width))
        self.blocks = nn.ModuleList(
            Block(width=c.width, heads=c.heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, eps=c.layer_norm_eps)
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.width, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def width(self) -> int:
        """Width of the pooled features (``forward_head(..., pre_logits=True)``)."""
        return self.config.width

    def reset_parameters(self) -> None:
        """timm-style init: small position embedding and [CLS], truncated-normal linear layers."""
        if self.pos_embed.is_meta:  # shapes only (e.g. counting parameters): nothing to fill
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_transformer_weights)

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay."""
        return {"pos_embed", "cls_token"}

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 1+N, C): patch tokens with [CLS] prepended, plus position embedding."""
        x = self.patch_embed(pixels)  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, C)
        return x + self.pos_embed

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, 1+N, C) token features after the final LayerNorm."""
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, C) -> (B, C): the [CLS] token, or the mean of the patch tokens (prefix tokens left out)."""
        if self.config.pool == "mean":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1+N, C) -> pooled (B, C) if ``pre_logits`` else head output (B, num_classes or C)."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))
