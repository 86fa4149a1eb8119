"""Swin: agrees with timm's SwinTransformer on copied weights; its tensor surgery and shifted-window mask do
what the paper says; every preset builds and runs."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from vitrina.config import from_json, to_json
from vitrina.models import swin
from vitrina.models.swin import (
    MASKED,
    SWIN_PRESETS,
    Swin,
    SwinBlock,
    SwinConfig,
    cyclic_shift,
    cyclic_unshift,
    relative_position_index,
    shifted_window_mask,
    swin_state_dict_from_timm,
    timm_swin_kwargs,
    window_partition,
    window_reverse,
)

# Two small shapes where windows really shift: 56 px / patch 4 -> a 14 x 14 map of 2 x 2 windows of 7
# (then one 7 x 7 window), and grey 64 px / patch 4 / M = 4 -> maps 16, 8, 4 with shifts in two stages.
PARITY_CONFIGS = [
    SwinConfig(image_size=56, patch_size=4, embed_dim=32, depths=(2, 2), heads=(2, 4), window_size=7, num_classes=5),
    SwinConfig(
        image_size=64,
        patch_size=4,
        in_channels=1,
        embed_dim=16,
        depths=(2, 2, 2),
        heads=(1, 2, 4),
        window_size=4,
        num_classes=5,
    ),
]


def _timm_swin(config: SwinConfig, **kwargs) -> SwinTransformer:
    return SwinTransformer(**timm_swin_kwargs(config), **kwargs)


def _timm_and_ours(config: SwinConfig) -> tuple[SwinTransformer, Swin]:
    """A timm Swin with random weights (perturbed well away from the init, biases and norms included) and ours
    with those weights copied in, both in eval mode."""
    torch.manual_seed(0)
    peer = _timm_swin(config).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = Swin(config).eval()
    ours.load_state_dict(swin_state_dict_from_timm(peer.state_dict()), strict=True)
    return peer, ours


def _shifted_blocks(model: Swin) -> list[SwinBlock]:
    return [b for stage in model.stages for b in stage.blocks if b.shift]


@pytest.mark.parametrize("config", PARITY_CONFIGS, ids=["56px-M7", "64px-grey-M4"])
def test_parity_with_timm(config: SwinConfig) -> None:
    peer, ours = _timm_and_ours(config)
    assert _shifted_blocks(ours), "the parity config must exercise shifted windows"
    x = torch.randn(3, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad():
        ours_map, peer_map = ours.forward_features(x), peer.forward_features(x)
        assert ours_map.shape == peer_map.shape  # both (B, H, W, C)
        assert (ours_map - peer_map).abs().max() <= 1e-5
        assert (ours.forward_head(ours_map) - peer.forward_head(peer_map)).abs().max() <= 1e-5
        pooled = ours.forward_head(ours_map, pre_logits=True)
        assert (pooled - peer.forward_head(peer_map, pre_logits=True)).abs().max() <= 1e-5
        assert (ours(x) - peer(x)).abs().max() <= 1e-5
        assert peer(x).abs().max() > 0.5  # outputs far from zero, so the tolerance means something

        # The shift mask matters here: without it our output leaves timm's.
        for block in _shifted_blocks(ours):
            block.attn_mask.zero_()
        assert (ours(x) - peer(x)).abs().max() > 1e-2


def test_stage_maps_match_timm_intermediates() -> None:
    config = PARITY_CONFIGS[1]
    peer, ours = _timm_and_ours(config)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        final, stages = ours.forward_features(x, return_stages=True)
        peer_final, peer_stages = peer.forward_intermediates(x)  # peer stages are (B, C, H, W)
    assert [tuple(s.shape) for s in stages] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64)]
    for ours_stage, peer_stage in zip(stages, peer_stages, strict=True):
        # The residual stream before the final norm grows to ~20 here, where a float32 ulp is ~2e-6: allow
        # a few ulps of the stream's largest value.
        peer_stage = peer_stage.permute(0, 2, 3, 1)
        assert (ours_stage - peer_stage).abs().max() <= 1e-6 * peer_stage.abs().max()
    assert (final - peer_final).abs().max() <= 1e-5


def test_window_partition_round_trip_and_layout() -> None:
    x = torch.randn(2, 14, 21, 5)  # (B, H, W, C), windows of 7: 2 x 3 per image
    windows = window_partition(x, 7)
    assert windows.shape == (2 * 6, 7, 7, 5)
    assert torch.equal(windows[1], x[0, 0:7, 7:14])  # row-major: second window of the first image
    assert torch.equal(windows[3], x[0, 7:14, 0:7])
    assert torch.equal(windows[6], x[1, 0:7, 0:7])
    assert torch.equal(window_reverse(windows, 7, 14, 21), x)


def test_cyclic_shift_round_trip_and_direction() -> None:
    x = torch.randn(2, 8, 8, 3)
    shifted = cyclic_shift(x, 2)
    assert torch.equal(shifted[:, 0, 0], x[:, 2, 2])  # up-left: (s, s) lands on (0, 0)
    assert torch.equal(shifted[:, -1, -1], x[:, 1, 1])  # and the top-left corner wraps to the bottom-right
    assert torch.equal(cyclic_unshift(shifted, 2), x)


def test_relative_position_index() -> None:
    M = 3
    index = relative_position_index(M)
    assert index.shape == (M * M, M * M)
    assert index.min() == 0 and index.max() == (2 * M - 1) ** 2 - 1
    assert (index.diagonal() == (M - 1) * (2 * M - 1) + (M - 1)).all()  # offset (0, 0) sits in the middle
    # Query (0, 0) = token 0, key (2, 1) = token 7: offset (-2, -1) -> row (0 * 5 + 1).
    assert index[0, 7] == 1
    # Same offset, same row: (1, 1)->(0, 0) and (2, 2)->(1, 1) are both (+1, +1).
    assert index[4, 0] == index[8, 4]


def test_shifted_window_mask_regions() -> None:
    mask = shifted_window_mask(resolution=14, window_size=7, shift=3)  # 2 x 2 windows
    assert mask.shape == (4, 49, 49)
    assert (mask[0] == 0).all()  # the top-left window holds no wrapped-around tokens
    assert set(mask.unique().tolist()) == {0.0, MASKED}
    for w in (1, 2):  # right and bottom windows: 2 regions of 4 and 3 columns (rows)
        assert (mask[w] == MASKED).sum() == 2 * (7 * 4) * (7 * 3)
    # The bottom-right window: 4 regions of 4x4, 4x3, 3x4 and 3x3 tokens; each token sees only its own.
    sizes = torch.tensor([16, 12, 12, 9])
    assert (mask[3] == 0).sum() == sizes.square().sum()


def _grad_of_corner_on_opposite_corner(block: SwinBlock) -> torch.Tensor:
    """How much the output at the map's bottom-right token depends on each input token: |d out / d x| summed
    over channels, (H, W). After the shift both corners fall into the same window, in different regions."""
    x = torch.randn(1, 14, 14, 8, requires_grad=True)
    block(x)[0, 13, 13].sum().backward()
    return x.grad[0].abs().sum(-1)


def test_mask_blocks_attention_across_wrapped_regions() -> None:
    torch.manual_seed(0)
    block = SwinBlock(
        dim=8, heads=2, resolution=14, window_size=7, shift=3, mlp_ratio=2.0, qkv_bias=True, eps=1e-5
    ).eval()
    # Input (0, 0) rolls to (11, 11) and (13, 13) to (10, 10): one window, but different regions.
    grad = _grad_of_corner_on_opposite_corner(block)
    unseen = 1e-30 * grad.max()  # a mask of -100 lets exp(-100) ~ 4e-44 through, nothing more
    assert grad[0, 0] < unseen  # the wrapped-around corner is invisible
    assert grad[11, 11] > 1e-3 and grad[12, 12] > 1e-3  # its own region (rolled to 8..10) is seen
    assert grad[13, 0] < unseen and grad[0, 13] < unseen  # wrapped in one direction only: other regions again
    assert grad[13, 10] > 1e-3  # rolls to (10, 7): same region as the output token
    # Without the mask the wrapped-around corner leaks in.
    block.attn_mask.zero_()
    assert _grad_of_corner_on_opposite_corner(block)[0, 0] > 1e-3


@pytest.mark.parametrize("shift", [0, 3])
def test_fused_and_matmul_attention_agree(shift: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A block takes the fused SDPA kernel or plain matmuls by how many (window, head) pairs a call has:
    # both must compute the same thing, shifted-window mask and relative position bias included.
    torch.manual_seed(0)
    block = SwinBlock(
        dim=16, heads=2, resolution=14, window_size=7, shift=shift, mlp_ratio=2.0, qkv_bias=True, eps=1e-5
    ).eval()
    torch.nn.init.normal_(block.attn.relative_position_bias_table, std=1.0)
    x = torch.randn(3, 14, 14, 16)  # 3 images x 4 windows x 2 heads = 24 (window, head) pairs
    outputs = {}
    for path, threshold in (("fused", 0), ("matmul", 10**9)):
        monkeypatch.setattr(swin, "FUSED_ATTENTION_MIN_PAIRS", threshold)
        with torch.no_grad():
            outputs[path] = block(x)
    torch.testing.assert_close(outputs["matmul"], outputs["fused"], atol=1e-5, rtol=1e-5)


def test_no_shift_where_the_map_fits_one_window() -> None:
    config = SwinConfig(image_size=28, patch_size=2, embed_dim=8, depths=(2, 2), heads=(1, 2), window_size=7)
    assert config.stage_window(0) == (7, 3) and config.stage_window(1) == (7, 0)
    model = Swin(config)
    assert [b.shift for b in model.stages[0].blocks] == [0, 3]
    assert [b.shift for b in model.stages[1].blocks] == [0, 0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=30, patch_size=4), "multiple of patch_size"),
        (dict(image_size=56, patch_size=4, depths=(2, 2, 2, 2, 2), heads=(1, 2, 4, 8, 16)), "cannot halve"),
        (dict(image_size=40, patch_size=4, depths=(2,), heads=(2,), window_size=4), "not tiled"),
        (dict(embed_dim=10, heads=(3, 6, 12, 24)), "not divisible"),
        (dict(depths=(2, 2), heads=(1,)), "equal length"),
    ],
)
def test_config_rejects_shapes_that_cannot_work(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SwinConfig(**kwargs)


def test_wrong_image_size_is_a_clear_error() -> None:
    model = Swin(SWIN_PRESETS["swin-nano-28"])
    with pytest.raises(ValueError, match="expects 28x28"):
        model(torch.randn(1, 3, 32, 32))


def test_config_json_round_trip() -> None:
    config = SWIN_PRESETS["swin-micro-64"]
    assert from_json(SwinConfig, to_json(config)) == config


def test_state_dict_mapping_names() -> None:
    renamed = swin_state_dict_from_timm(
        {
            "layers.1.downsample.reduction.weight": torch.zeros(1),
            "layers.0.blocks.1.attn.relative_position_index": torch.zeros(1),
            "layers.0.blocks.1.attn_mask": torch.zeros(1),
            "head.fc.bias": torch.zeros(1),
            "patch_embed.norm.weight": torch.zeros(1),
        }
    )
    assert sorted(renamed) == ["head.bias", "patch_embed.norm.weight", "stages.1.merge.reduction.weight"]


SMALL_PRESETS = [name for name, c in SWIN_PRESETS.items() if c.image_size <= 64]


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_small_presets_forward_backward(name: str) -> None:
    config = SWIN_PRESETS[name]
    model = Swin(config)
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    final, stages = model.forward_features(x, return_stages=True)
    side = config.stage_resolutions[-1]
    assert final.shape == (2, side, side, config.width)
    assert [s.shape[1:] for s in stages] == [
        (r, r, d) for r, d in zip(config.stage_resolutions, config.stage_dims, strict=True)
    ]
    out = model.forward_head(final)
    assert out.shape == (2, config.width) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_swin_t_at_224_one_image() -> None:
    model = Swin(SWIN_PRESETS["swin-t"]).eval()
    with torch.no_grad():
        final = model.forward_features(torch.randn(1, 3, 224, 224))
    assert final.shape == (1, 7, 7, 768) and torch.isfinite(final).all()


@pytest.mark.parametrize("name", ["swin-t", "swin-s", "swin-b", "swin-l"])
def test_large_presets_have_timms_parameter_count(name: str) -> None:
    """Built on the meta device (no memory, no init): same parameters, name for name, as timm's model."""
    config = SwinConfig(**{**vars(SWIN_PRESETS[name]), "num_classes": 1000})
    with torch.device("meta"):
        ours = Swin(config)
        peer = _timm_swin(config)
    ours_shapes = {n: p.shape for n, p in ours.named_parameters()}
    peer_shapes = {n: p.shape for n, p in swin_state_dict_from_timm(dict(peer.named_parameters())).items()}
    assert ours_shapes == peer_shapes
    millions = sum(p.numel() for p in ours.parameters()) / 1e6
    # The paper's table: 28M, 50M, 88M, 197M (ImageNet-1k head included).
    assert round(millions) == {"swin-t": 28, "swin-s": 50, "swin-b": 88, "swin-l": 197}[name]
