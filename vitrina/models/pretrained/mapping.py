"""Other libraries' layers in our terms: timm's ``VisionTransformer`` -> our ``ViT`` (config and weights,
same parameter names), the activation names every source shares, and the image statistics CLIP
checkpoints default to. Pure functions over modules and state dicts: no files, no hub.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vitrina.models.vit import ViTConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # what OpenAI's CLIP (and most of its heirs) was trained with
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Keys of timm's plain ViT, in our names (identical): anything else is a feature we do not have.
_VIT_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm_pre\.(weight|bias)|norm\.(weight|bias)"
    r"|head\.(weight|bias)|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)


def activation_name(act: nn.Module) -> str:
    """``"gelu"`` / ``"quick_gelu"`` for an activation module of any library; ``ValueError`` otherwise."""
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if type(act).__name__ == "QuickGELU":  # timm, open_clip and ours all call it that
        return "quick_gelu"
    raise ValueError(f"activation {type(act).__name__} has no equivalent here (gelu or quick_gelu)")


def vit_state_dict_from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict -> ours (same names); ``ValueError`` naming unsupported keys."""
    unsupported = sorted(k for k in state_dict if not _VIT_KEY.match(k))
    if unsupported:
        raise ValueError(
            f"timm ViT weights use features our ViT does not have: {', '.join(unsupported[:5])}"
            + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
        )
    return dict(state_dict)


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
        pre_norm=not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity),
        act=activation_name(block.mlp.act),
        patch_bias=model.patch_embed.proj.bias is not None,
    )
