"""Our ViT equals timm's VisionTransformer with the same weights copied in (max abs diff <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

from vitrina.models.pretrained import vit_config_from_timm, vit_state_dict_from_timm
from vitrina.models.vit import ViT

timm_vit = pytest.importorskip("timm.models.vision_transformer", reason="timm comes with the dev extra")

CONFIGS = {
    # class token, classifier head, qkv bias
    "cls-head": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7),
    # mean pooling over patches (norm before pooling), no head, no qkv bias, other MLP ratio
    "mean-nohead": dict(
        img_size=48,
        patch_size=16,
        embed_dim=64,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
        qkv_bias=False,
        num_classes=0,
        global_pool="avg",
        fc_norm=False,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vit_matches_timm(name: str) -> None:
    torch.manual_seed(0)
    theirs = timm_vit.VisionTransformer(**CONFIGS[name]).eval()
    with torch.no_grad():  # timm inits the position embedding and [CLS] near zero: make them matter
        theirs.pos_embed.normal_(std=0.5)
        theirs.cls_token.normal_(std=0.5)
    ours = ViT(vit_config_from_timm(theirs)).eval()
    ours.load_state_dict(vit_state_dict_from_timm(theirs.state_dict()), strict=True)
    size = CONFIGS[name]["img_size"]
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        features_ours, features_theirs = ours.forward_features(x), theirs.forward_features(x)
        assert features_ours.shape == features_theirs.shape
        assert (features_ours - features_theirs).abs().max() <= 1e-5
        pooled = ours.forward_head(features_ours, pre_logits=True)
        assert (pooled - theirs.forward_head(features_theirs, pre_logits=True)).abs().max() <= 1e-5
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
    if CONFIGS[name]["num_classes"]:
        assert ours(x).shape == (4, CONFIGS[name]["num_classes"])


def test_unsupported_timm_features_are_named() -> None:
    theirs = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0, reg_tokens=2, init_values=0.1
    )
    with pytest.raises(ValueError, match="reg_token"):
        vit_state_dict_from_timm(theirs.state_dict())
    with pytest.raises(ValueError, match="fc_norm"):
        vit_config_from_timm(
            timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, global_pool="avg")
        )
