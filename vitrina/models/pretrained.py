"""Map other libraries' weights onto our models. For now: timm's ``VisionTransformer`` -> our ``ViT``.

Our ViT keeps timm's parameter names and shapes, so the mapping is 1:1; what this module adds is
the check that a timm state dict has nothing our ViT cannot represent (register tokens, a DeiT
distillation token, LayerScale, q/k norms, a pre-norm, or an ``fc_norm`` applied after pooling),
and the reading of a ViT config from a timm model.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vitrina.models.vit import ViTConfig

# Keys of timm's plain ViT, in our names (identical): anything else is a feature we do not have.
_VIT_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|head\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)


def vit_state_dict_from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict -> ours (same names); ``ValueError`` naming unsupported keys."""
    unsupported = sorted(k for k in state_dict if not _VIT_KEY.match(k))
    if unsupported:
        raise ValueError(
            f"timm ViT weights use features our ViT does not have: {', '.join(unsupported[:5])}"
            + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
        )
    return {k: v for k, v in state_dict.items()}


def vit_config_from_timm(model: nn.Module) -> ViTConfig:
    """Read the ``ViTConfig`` of a timm ``VisionTransformer`` (plain class-token or fc_norm-free avg pool)."""
    pool = {"token": "cls", "avg": "mean"}.get(model.global_pool)
    if pool is None:
        raise ValueError(f"timm global_pool {model.global_pool!r} has no equivalent here (use 'token' or 'avg')")
    if not isinstance(model.fc_norm, nn.Identity):
        raise ValueError("timm ViT with fc_norm (norm after pooling) has no equivalent here; use fc_norm=False")
    block = model.blocks[0]
    width = model.embed_dim
    return ViTConfig(
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        in_channels=model.patch_embed.proj.in_channels,
        width=width,
        depth=len(model.blocks),
        heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / width,
        qkv_bias=block.attn.qkv.bias is not None,
        num_classes=model.num_classes,
        layer_norm_eps=model.norm.eps,
        pool=pool,
    )
