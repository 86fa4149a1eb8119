"""ViT features beyond the plain model: position-embedding resampling (vs timm), the DeiT distillation
token (vs timm's VisionTransformerDistilled), MAE's patchify layout, and attention weights on request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitrina.checkpoint import load_model, save_model
from vitrina.config import from_dict, to_dict
from vitrina.models.vit import (
    EXPLICIT_BF16_MAX_KEYS,
    Attention,
    ViT,
    ViTConfig,
    attend,
    attention_weights,
    patchify,
    resize_pos_embed,
    unpatchify,
    with_image_size,
)

timm_layers = pytest.importorskip("timm.layers", reason="timm comes with the dev extra")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def _ours_from_timm(theirs: torch.nn.Module, **config) -> ViT:
    c = SMALL | config
    ours = ViT(
        ViTConfig(
            image_size=c["img_size"],
            patch_size=c["patch_size"],
            width=c["embed_dim"],
            depth=c["depth"],
            heads=c["num_heads"],
            num_classes=c["num_classes"],
            distilled=isinstance(theirs, VisionTransformerDistilled),
        )
    )
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours


def _randomise_prefix(model: torch.nn.Module) -> None:
    # timm starts [CLS] and the position embedding near zero: make them matter in the comparison
    with torch.no_grad():
        for name in ("pos_embed", "cls_token", "dist_token"):
            if getattr(model, name, None) is not None:
                getattr(model, name).normal_(std=0.5)


# ---- position embedding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "prefix"),
    [(4, 6, 1), (6, 4, 1), (4, (3, 5), 2), ((2, 3), 7, 0), (5, 5, 1)],
    ids=["up", "down", "non-square-distilled", "non-square-old-no-prefix", "same"],
)
def test_resize_pos_embed_equals_timm(old, new, prefix) -> None:
    old_hw = (old, old) if isinstance(old, int) else old
    new_hw = (new, new) if isinstance(new, int) else new
    pos_embed = torch.randn(1, prefix + old_hw[0] * old_hw[1], 16)
    ours = resize_pos_embed(pos_embed, old, new, prefix)
    theirs = timm_layers.resample_abs_pos_embed(pos_embed, new_size=new_hw, old_size=old_hw, num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new_hw[0] * new_hw[1], 16)
    assert torch.equal(ours[:, :prefix], pos_embed[:, :prefix])
    assert (ours - theirs).abs().max() <= 1e-6


def test_resize_pos_embed_rejects_a_wrong_grid() -> None:
    with pytest.raises(ValueError, match="prefix"):
        resize_pos_embed(torch.randn(1, 17, 8), 5, 6, 1)


def test_state_dict_of_another_image_size_loads_resampled() -> None:
    torch.manual_seed(0)
    small = ViT(ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2)).eval()
    _randomise_prefix(small)
    big = ViT(ViTConfig(image_size=48, patch_size=8, width=32, depth=1, heads=2)).eval()
    big.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(big.pos_embed, resize_pos_embed(small.pos_embed, 4, 6, 1))
    assert torch.equal(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    copy = with_image_size(small, 48)
    assert copy.config.image_size == 48 and not copy.training
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        # three routes to the same 48 px model: resampled at load, in with_image_size, and on the fly
        assert torch.equal(big(x), copy(x))
        assert (big(x) - small(x)).abs().max() <= 1e-6


def test_forward_at_another_size_equals_timm_dynamic_img_size() -> None:
    torch.manual_seed(0)
    theirs = VisionTransformer(**SMALL, dynamic_img_size=True).eval()
    _randomise_prefix(theirs)
    ours = _ours_from_timm(theirs).eval()
    x = torch.randn(2, 3, 48, 40)  # another size, not even square
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ours(torch.randn(1, 3, 36, 32))


# ---- DeiT distillation token ----------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [5, 0])
def test_distilled_vit_matches_timm_in_eval_and_train_mode(num_classes: int) -> None:
    torch.manual_seed(0)
    theirs = VisionTransformerDistilled(**(SMALL | dict(num_classes=num_classes)))
    _randomise_prefix(theirs)
    ours = _ours_from_timm(theirs, num_classes=num_classes)
    assert ours.num_prefix_tokens == 2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        theirs.eval(), ours.eval()
        out = ours(x)
        assert out.shape == (3, num_classes or 48)
        assert (out - theirs(x)).abs().max() <= 1e-5
        pooled_ours = ours.forward_head(ours.forward_features(x), pre_logits=True)
        assert (pooled_ours - theirs.forward_head(theirs.forward_features(x), pre_logits=True)).abs().max() <= 1e-5
        # training mode (no dropout anywhere): the two heads apart, as timm's distilled training gives them
        theirs.train(), ours.train()
        theirs.set_distilled_training(True)
        (cls_ours, dist_ours), (cls_theirs, dist_theirs) = ours(x), theirs(x)
        assert (cls_ours - cls_theirs).abs().max() <= 1e-5
        assert (dist_ours - dist_theirs).abs().max() <= 1e-5
        assert (out - (cls_ours + dist_ours) / 2).abs().max() <= 1e-6  # eval = the average of the pair


def test_distilled_config_round_trips_and_old_configs_still_load(tmp_path: Path) -> None:
    config = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, num_classes=3, distilled=True)
    assert from_dict(ViTConfig, to_dict(config)) == config
    old = to_dict(ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2))
    del old["distilled"]  # a config.json written before the field existed
    assert from_dict(ViTConfig, old).distilled is False
    with pytest.raises(ValueError, match="pool must be 'cls'"):
        ViTConfig(distilled=True, pool="mean")
    model = ViT(config)
    assert {"dist_token", "pos_embed", "cls_token"} == model.no_weight_decay()
    loaded, _ = load_model(save_model(model, tmp_path / "deit"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_distilled_train_step_reaches_both_heads() -> None:
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, num_classes=4, distilled=True))
    logits, dist_logits = model.train()(torch.randn(4, 3, 32, 32))
    labels, teacher = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    (F.cross_entropy(logits, labels) + F.cross_entropy(dist_logits, teacher)).backward()
    for name in ("dist_token", "head_dist.weight", "head.weight", "cls_token"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


# ---- patchify ---------------------------------------------------------------------------------------


def test_patchify_layout_is_maes_and_unpatchify_inverts_it() -> None:
    torch.manual_seed(0)
    B, C, p, h, w = 2, 3, 4, 3, 5
    images = torch.randn(B, C, h * p, w * p)
    patches = patchify(images, p)
    assert patches.shape == (B, h * w, p * p * C)
    # MAE: patch n = (i, j) row-major; inside it pixel (r, c) row-major, the C channels innermost
    for b, i, j, r, c, ch in [(0, 0, 0, 0, 0, 0), (1, 2, 4, 3, 1, 2), (0, 1, 3, 2, 0, 1), (1, 0, 2, 1, 3, 0)]:
        assert patches[b, i * w + j, (r * p + c) * C + ch] == images[b, ch, i * p + r, j * p + c]
    assert torch.equal(unpatchify(patches, p, grid=(h, w)), images)
    square = torch.randn(1, 1, 8, 8)
    assert torch.equal(unpatchify(patchify(square, 2), 2), square)
    with pytest.raises(ValueError, match="square grid"):
        unpatchify(patches, p)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.randn(1, 3, 10, 8), 4)


# ---- attention weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_weights_match_a_manual_computation(is_causal: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(24, 3).eval()
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        out, weights = attn(x, is_causal=is_causal, return_attention=True)
        q, k, v = attn.qkv(x).reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hs)
        manual = torch.zeros(2, 3, 7, 7)
        for b in range(2):
            for head in range(3):
                for i in range(7):
                    keys = range(i + 1) if is_causal else range(7)
                    scores = torch.stack([q[b, head, i] @ k[b, head, j] / 8**0.5 for j in keys])
                    manual[b, head, i, : len(scores)] = scores.softmax(0)
        assert (weights - manual).abs().max() <= 1e-6
        assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 7))
        assert (out - attn(x, is_causal=is_causal)).abs().max() <= 1e-5  # same output as the fused kernel


@pytest.mark.parametrize("is_causal", [False, True])
def test_a_bf16_training_attention_skips_the_fused_kernel_and_agrees_with_it(is_causal: bool, monkeypatch) -> None:
    """Over few keys, a bfloat16 pass that will be differentiated runs as the explicit product (the fused CPU
    kernel differentiates bfloat16 slowly there); its output and gradients are the fused kernel's to bf16 rounding."""
    fused = F.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    torch.manual_seed(0)
    q32, k32, v32 = (torch.randn(4, 3, 17, 16) for _ in range(3))
    upstream = torch.randn(4, 3, 17, 16)

    def output_and_grads(fn):
        q, k, v = (t.bfloat16().requires_grad_() for t in (q32, k32, v32))
        out = fn(q, k, v, is_causal=is_causal)
        (out.float() * upstream).sum().backward()
        return [out.float(), *(t.grad.float() for t in (q, k, v))]

    explicit = output_and_grads(attend)
    assert not calls  # the explicit product
    reference = output_and_grads(fused)
    for ours, theirs in zip(explicit, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.03)
    # in float32 the explicit product is the fused kernel's function to float rounding
    product = attention_weights(q32, k32, is_causal=is_causal) @ v32
    torch.testing.assert_close(product, fused(q32, k32, v32, is_causal=is_causal), rtol=1e-5, atol=1e-5)

    # everything else keeps the fused kernel: float32, inference, and long sequences
    bf16 = [t.bfloat16().requires_grad_() for t in (q32, k32, v32)]
    attend(q32.requires_grad_(), k32, v32)
    with torch.no_grad():
        attend(*bf16)
    long_keys = torch.randn(1, 1, EXPLICIT_BF16_MAX_KEYS + 1, 8, dtype=torch.bfloat16, requires_grad=True)
    attend(long_keys, long_keys, long_keys)
    assert len(calls) == 3


def test_forward_attention_gives_every_blocks_weights_without_changing_the_model() -> None:
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2, distilled=True)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        attentions = model.forward_attention(x)
        assert [a.shape for a in attentions] == [(2, 2, 18, 18)] * 3  # 2 prefix + 4 x 4 patches
        # the last block's weights, recomputed from the tokens that enter it
        tokens = model.embed(x)
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        last = model.blocks[-1]
        q, k, _ = last.attn.qkv(last.norm1(tokens)).reshape(2, 18, 3, 2, 16).permute(2, 0, 3, 1, 4)
        expected = (q @ k.transpose(-2, -1) / 4).softmax(-1)
        assert (attentions[-1] - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("distilled", [False, True])
def test_prefix_only_last_block_gives_the_full_forward(distilled: bool) -> None:
    """``forward_for_head`` skips the patch tokens' outputs in the last block: same pooled output and grads."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=32, patch_size=8, width=48, depth=3, heads=3, num_classes=5, distilled=distilled))
    pixels = torch.randn(4, 3, 32, 32)
    prefix = model.forward_for_head(pixels)
    assert prefix.shape == (4, model.num_prefix_tokens, 48)
    full = model.forward_features(pixels)
    torch.testing.assert_close(prefix, full[:, : model.num_prefix_tokens], atol=1e-6, rtol=1e-5)
    model.eval()
    torch.testing.assert_close(model(pixels), model.forward_head(model.forward_features(pixels)), atol=1e-6, rtol=1e-5)
    # training: the same gradients reach every parameter as through the full forward
    model.train()
    fast = torch.autograd.grad(
        model.forward_head(model.forward_for_head(pixels), pre_logits=True).sum(), model.blocks[0].attn.qkv.weight
    )
    slow = torch.autograd.grad(
        model.forward_head(model.forward_features(pixels), pre_logits=True).sum(), model.blocks[0].attn.qkv.weight
    )
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-4)
    mean_pooled = ViT(ViTConfig(image_size=32, patch_size=8, width=48, depth=2, heads=3, pool="mean"))
    assert mean_pooled.forward_for_head(pixels).shape == (4, 1 + 16, 48)  # mean pooling needs every token
