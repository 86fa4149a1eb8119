"""Counted MACs agree with the hand formula; `vitrina models` lists every preset with its cost."""

from __future__ import annotations

import pytest
import torch

from vitrina.cli import main
from vitrina.models.flops import count_macs, count_parameters, on_meta
from vitrina.models.registry import CLIP_PRESETS, build_model, list_presets, preset_config, preset_cost
from vitrina.models.vit import ViT, ViTConfig


def _vit_macs_by_hand(c: ViTConfig) -> int:
    """Matrix products of one image: patch projection, then per block qkv, q k^T, attn v, proj, MLP; then the head.

    The last block computes only the P prefix tokens' outputs (keys and values still come from all T tokens).
    """
    N, P = c.num_patches, c.num_prefix_tokens
    T = P + N
    C, hidden = c.width, int(c.width * c.mlp_ratio)
    patch = N * c.patch_size**2 * c.in_channels * C

    def block(queries: int) -> int:
        return T * C * 3 * C + 2 * queries * T * C + queries * C * C + 2 * queries * C * hidden

    return patch + (c.depth - 1) * block(T) + block(P) + C * c.num_classes * (2 if c.distilled else 1)


@pytest.mark.parametrize(
    "config",
    [
        ViTConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, num_classes=10),
        ViTConfig(image_size=48, patch_size=16, width=96, depth=3, heads=3, mlp_ratio=2.0, distilled=True),
    ],
    ids=["plain-head", "distilled"],
)
def test_counted_macs_of_a_vit_equal_the_hand_formula(config: ViTConfig) -> None:
    counted = count_macs(on_meta(lambda: ViT(config)), (1, 3, config.image_size, config.image_size))
    assert abs(counted - _vit_macs_by_hand(config)) <= 0.01 * _vit_macs_by_hand(config)
    real = ViT(config).eval()  # meta and real models are counted alike
    assert count_macs(real, (1, 3, config.image_size, config.image_size)) == counted
    assert count_parameters(on_meta(lambda: ViT(config))) == count_parameters(real)


def test_preset_cost_of_a_clip_is_its_image_tower_and_both_towers_params() -> None:
    config = preset_config("clip-small")
    cost = preset_cost(config)
    model = build_model("clip-small")
    assert cost.parameters == sum(p.numel() for p in model.parameters())
    assert cost.macs == count_macs(model.visual.eval(), (1, 3, 64, 64))
    assert cost.image_size == 64


def test_vitrina_models_lists_every_preset_with_its_cost(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.split() and line.split()[0] in list_presets()}
    assert set(rows) == set(list_presets())
    cost = preset_cost(preset_config("vit-ti16"))
    assert rows["vit-ti16"][3] == f"{cost.parameters / 1e6:.2f}M"
    assert float(rows["vit-ti16"][4]) == pytest.approx(cost.macs / 1e9, abs=1e-3)
    assert all(rows[name][4].endswith("*") for name in CLIP_PRESETS)  # flagged: image tower only


def test_meta_models_hold_no_storage() -> None:
    model = on_meta(lambda: build_model("vit-b16"))
    assert all(p.is_meta for p in model.parameters())
    assert not model.training
    assert torch.empty(0).device.type == "cpu"  # the meta default ends with the build
