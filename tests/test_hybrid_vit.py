"""Hybrid ViT: a conv stem whose grid is the token grid, sequence pooling, checkpoints, explain, DeiT token,
and plain presets left as they were."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitrina.checkpoint import load_model, save_model
from vitrina.cli import main
from vitrina.distill.trainer import (
    Distiller,
    DistillSettings,
    KDKind,
    build_student,
    make_kd_loss,
    teacher_outputs,
)
from vitrina.errors import UserError
from vitrina.models.cnn import CNN, CNNConfig
from vitrina.models.explain import model_rollout, rollout_matrix, sequence_pool_rollout
from vitrina.models.hybrid import ConvStem, default_stem_channels, stems_in_bf16
from vitrina.models.registry import build_model, preset_config, preset_cost
from vitrina.models.vit import ViT, ViTConfig
from vitrina.train.classify_data import Preprocess

HYBRID = ViTConfig(image_size=28, patch_size=4, in_channels=1, width=32, depth=2, heads=2, stem="conv")
SEQPOOL = ViTConfig(image_size=28, patch_size=4, in_channels=1, width=32, depth=2, heads=2, stem="conv", pool="seq")


def _pixels(config: ViTConfig, batch: int = 3) -> torch.Tensor:
    return torch.randn(
        batch, config.in_channels, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0)
    )


def test_conv_stem_output_grid_is_the_token_grid() -> None:
    stem = ConvStem(channels=(8, 16), in_channels=1, width=32)
    assert stem(torch.zeros(2, 1, 28, 28)).shape == (2, 7 * 7, 32)  # 28 -> 14 -> 7
    assert default_stem_channels(4, 192) == (48, 96) and default_stem_channels(16, 768) == (48, 96, 192, 384)
    assert len(ViT(HYBRID).patch_embed.convs) == 2
    with pytest.raises(ValueError, match="power|2, 4, 8"):
        ViTConfig(image_size=28, patch_size=7, stem="conv")
    with pytest.raises(ValueError, match="one channel count each"):
        ViTConfig(image_size=28, patch_size=4, stem="conv", stem_channels=(8, 16, 32))
    with pytest.raises(ValueError, match="pool must be 'cls' or 'seq'"):
        ViTConfig(image_size=28, patch_size=4, stem="conv", pool="mean", distilled=True)


def test_stems_in_bf16_change_only_the_stems_arithmetic_for_a_while() -> None:
    model = ViT(dataclasses.replace(SEQPOOL, stem_refine=1)).eval()
    x = _pixels(SEQPOOL, batch=4)
    with torch.no_grad():
        exact = model(x)
        with stems_in_bf16(model):
            assert model.patch_embed.bf16
            tokens = model.patch_embed(x)
            fast = model(x)
        again = model(x)
    assert tokens.dtype == torch.float32 and fast.dtype == torch.float32  # what the transformer gets
    assert not torch.equal(fast, exact)  # the convs did run in bf16
    torch.testing.assert_close(fast, exact, rtol=0.05, atol=0.05)
    assert torch.equal(again, exact) and not model.patch_embed.bf16  # and stop doing so afterwards
    assert "bf16" not in str(model.state_dict().keys())  # a runtime switch, not a weight


def test_refined_stem_keeps_the_grid_and_starts_as_a_residual_of_the_plain_stem(tmp_path: Path) -> None:
    """``stem_refine``: residual stride-1 convs per stage; zeroed, they pass the plain stem's maps through."""
    config = ViTConfig(image_size=28, patch_size=8, in_channels=1, width=32, depth=1, heads=2, stem="conv",
                       stem_channels=(8, 16, 32), stem_refine=2, pool="seq")  # fmt: skip
    refined, plain = ViT(config).eval(), ViT(dataclasses.replace(config, stem_refine=0)).eval()
    assert plain.patch_embed.refine is None and not any(".refine." in k for k in plain.state_dict())
    assert [len(stage) for stage in refined.patch_embed.refine] == [2, 2, 2]
    x = _pixels(config)
    assert refined.forward_features(x).shape == (3, 16, 32)
    missing = refined.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".refine." in k for k in missing)  # every other tensor is the plain model's
    with torch.no_grad():
        for stage in refined.patch_embed.refine:
            for residual in stage:
                residual.layer.conv.weight.zero_()
        assert torch.allclose(refined(x), plain(x), atol=1e-6)  # BN(0) = 0 at init, GELU(0) = 0: identity
    folder = save_model(refined, tmp_path / "ckpt")
    loaded, _ = load_model(folder)
    assert loaded.config.stem_refine == 2
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), refined(x))
    with pytest.raises(ValueError, match="stem='conv' only"):
        ViTConfig(image_size=28, patch_size=7, stem_refine=1)


def test_conv_stem_grid_rounds_up_where_patches_do_not_divide() -> None:
    """28 px through three stride-2 convs: 14, 7, then 4 (padding 1 rounds up), the grid the config states."""
    config = ViTConfig(image_size=28, patch_size=8, in_channels=1, width=32, depth=1, heads=2, stem="conv", pool="seq")
    assert config.grid_size == 4 and config.num_patches == 16
    model = ViT(config)
    assert model.forward_features(_pixels(config)).shape == (3, 16, 32)
    with torch.no_grad():  # a 32 px image has the same 4 x 4 grid: no position-embedding resize, same tokens' count
        assert model.forward_features(torch.zeros(1, 1, 32, 32)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        ViTConfig(image_size=28, patch_size=8)  # a patch embedding still needs whole patches
    heat = model_rollout(model.eval(), _pixels(config, 1))
    assert heat.shape == (1, 4, 4)


@pytest.mark.parametrize("config", [HYBRID, SEQPOOL], ids=["cls", "seq"])
def test_hybrid_shapes_and_backward(config: ViTConfig) -> None:
    model = ViT(config)
    x = _pixels(config)
    tokens = model.forward_features(x)
    prefix = 0 if config.pool == "seq" else 1
    assert model.num_prefix_tokens == prefix and (model.cls_token is None) == (prefix == 0)
    assert tokens.shape == (3, prefix + 49, 32)
    pooled = model.forward_head(tokens, pre_logits=True)
    assert pooled.shape == (3, 32) and torch.isfinite(pooled).all()
    assert torch.allclose(model(x), pooled, atol=1e-6)  # forward_for_head reads the same tokens
    pooled.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_sequence_pool_weights_sum_to_one_and_pool_is_their_weighted_mean() -> None:
    model = ViT(SEQPOOL).eval()
    tokens = model.forward_features(_pixels(SEQPOOL))
    weights = model.seq_pool.weights(tokens)  # (B, N)
    assert weights.shape == (3, 49) and (weights > 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(3), atol=1e-6)
    naive = torch.stack([sum(weights[b, i] * tokens[b, i] for i in range(49)) for b in range(3)])
    assert torch.allclose(model.pool(tokens), naive, atol=1e-5)
    model.config = dataclasses.replace(SEQPOOL, pool="cls")  # a copy: SEQPOOL is shared by other tests
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        model.pool(tokens)


@pytest.mark.parametrize("config", [HYBRID, SEQPOOL], ids=["cls", "seq"])
def test_save_load_round_trip(config: ViTConfig, tmp_path: Path) -> None:
    model = ViT(config)
    x = _pixels(config)
    model.train()(x)  # BatchNorm running statistics move away from their initial values
    model.eval()
    folder = save_model(model, tmp_path / "ckpt")
    loaded, _ = load_model(folder)
    assert isinstance(loaded, ViT) and loaded.config == model.config
    assert torch.equal(loaded.patch_embed.convs[0].bn.running_mean, model.patch_embed.convs[0].bn.running_mean)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def _plain_forward(model: ViT, x: torch.Tensor) -> torch.Tensor:
    """The ViT recipe written out with the module's own weights: what a plain preset computed before the hybrid."""
    tokens = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.config.patch_size)
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, C)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1) + model.pos_embed
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)[:, 0]


def test_a_plain_preset_is_unchanged() -> None:
    model = build_model("vit-nano-32").eval()
    keys = {k.split(".")[0] for k in model.state_dict()}
    assert keys == {"cls_token", "pos_embed", "patch_embed", "blocks", "norm"}  # no stem, no pooling weights
    assert sorted(k for k in model.state_dict() if k.startswith("patch_embed")) == [
        "patch_embed.proj.bias",
        "patch_embed.proj.weight",
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), _plain_forward(model, x), atol=1e-5)
    assert preset_config("vit-fmnist-28").stem == "patch" and preset_config("vit-fmnist-28").pool == "cls"


def test_hybrid_presets_cost_and_listing(capsys: pytest.CaptureFixture) -> None:
    plain, hybrid = preset_cost(preset_config("vit-fmnist-28")), preset_cost(preset_config("vit-hybrid-fmnist"))
    assert 0.5 < hybrid.parameters / plain.parameters < 1.2 and hybrid.image_size == 28
    assert main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "conv stem 48-96 (stride 4)" in rows["vit-hybrid-fmnist"]
    assert "seq pool" in rows["vit-hybrid-fmnist-seqpool"]
    assert "conv stem 32-64-128 (stride 8) + 1 res conv/stage" in rows["vit-hybrid-fmnist-s8-r1"]


def test_sequence_pool_rollout_is_the_weighted_mix_of_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    attentions = [torch.randn(2, 2, 16, 16, generator=generator).softmax(-1) for _ in range(3)]
    weights = torch.randn(2, 16, generator=generator).softmax(-1)
    rollout = rollout_matrix(attentions)
    heat = sequence_pool_rollout(rollout, weights)
    assert heat.shape == (2, 4, 4)
    naive = torch.stack([sum(weights[b, i] * rollout[b, i] for i in range(16)) for b in range(2)])
    assert torch.allclose(heat.flatten(1), naive, atol=1e-6)
    assert torch.allclose(heat.sum((1, 2)), torch.ones(2), atol=1e-5)  # all of the pooled feature is accounted for


@pytest.mark.parametrize(
    "preset",
    [
        "vit-hybrid-fmnist",
        "vit-hybrid-fmnist-seqpool",
        "vit-hybrid-fmnist-s8",
        "vit-hybrid-fmnist-s8-r1",
        "vit-hybrid-fmnist-s8-r1-w256",
    ],
)
def test_explain_runs_on_hybrid_presets(preset: str, tmp_path: Path) -> None:
    model = build_model(preset).eval()
    grid = model.config.grid_size
    with torch.inference_mode():
        heat = model_rollout(model, torch.randn(1, 3, 28, 28))
    assert heat.shape == (1, grid, grid) and torch.isfinite(heat).all()
    image = tmp_path / "shirt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(image)
    assert main(["explain", "--model", preset, str(image), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pos-embed-similarity.png", "shirt-rollout.png"]


def test_hybrid_student_takes_a_distillation_token() -> None:
    config = preset_config("vit-hybrid-fmnist")
    config.distilled, config.num_classes, config.depth = True, 10, 1
    model = ViT(config)
    assert model.num_prefix_tokens == 2 and model.dist_token is not None
    cls_logits, dist_logits = model.train()(torch.randn(2, 3, 28, 28))
    assert cls_logits.shape == dist_logits.shape == (2, 10)
    with torch.no_grad():
        x = torch.randn(2, 3, 28, 28)
        tokens = model.eval().forward_features(x)
        assert torch.allclose(model(x), (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2, atol=1e-5)
    student = build_student("vit-hybrid-fmnist", 10, KDKind.DEIT_HARD, seed=0)
    assert student.config.stem == "conv" and student.config.distilled


def test_sequence_pooling_student_reads_its_classes_from_the_patches_and_the_teacher_from_dist() -> None:
    """No [CLS]: [DIST] is the one prefix token; the class head reads the sequence pooling of the patch tokens."""
    student = build_student("vit-hybrid-fmnist-s8", 10, KDKind.DEIT_HARD, seed=0)
    assert student.num_prefix_tokens == 1 and student.cls_token is None and student.dist_token is not None
    assert student.pos_embed.shape[1] == 1 + 16
    x = torch.randn(2, 3, 28, 28)
    cls_logits, dist_logits = student.train()(x)
    assert cls_logits.shape == dist_logits.shape == (2, 10)
    with torch.no_grad():
        tokens = student.eval().forward_features(x)  # (B, 1 + 16, C)
        by_class = student.head(student.seq_pool(tokens[:, 1:]))
        by_teacher = student.head_dist(tokens[:, 0])
        assert torch.allclose(student(x), (by_class + by_teacher) / 2, atol=1e-5)
        pooled = student.forward_head(tokens, pre_logits=True)
        assert torch.allclose(pooled, (student.seq_pool(tokens[:, 1:]) + tokens[:, 0]) / 2, atol=1e-6)
        heat = model_rollout(student, x)
    assert heat.shape == (2, 4, 4) and torch.isfinite(heat).all()
    # without distillation the same preset pools every token, as before (no prefix)
    plain = build_model("vit-hybrid-fmnist-s8").eval()
    with torch.no_grad():
        tokens = plain.forward_features(x)
        assert tokens.shape[1] == 16
        assert torch.equal(plain.forward_head(tokens, pre_logits=True), plain.seq_pool(tokens))


def test_deit_hard_distillation_into_a_hybrid_student_lowers_its_loss() -> None:
    torch.manual_seed(0)
    pixels, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 4, (16,))
    teacher = CNN(CNNConfig(image_size=28, widths=(8, 16), blocks=(1, 1), num_classes=4)).eval()
    student = ViT(
        ViTConfig(image_size=28, patch_size=4, width=32, depth=1, heads=2, stem="conv", num_classes=4, distilled=True)
    )
    pre = Preprocess(28, (0.5,) * 3, (0.5,) * 3)
    distiller = Distiller(student)
    settings = DistillSettings(kind=KDKind.DEIT_HARD)
    loss_fn = make_kd_loss(
        distiller, lambda x: teacher_outputs(teacher, x, pre), settings, student_pre=pre, label_smoothing=0.0
    )
    first = loss_fn(pixels, labels, torch.arange(16)).loss.item()
    optimizer = torch.optim.Adam(distiller.parameters(), lr=3e-3)
    distiller.train()
    for _ in range(15):
        loss = loss_fn(pixels, labels, torch.arange(16)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_fn(pixels, labels, torch.arange(16)).loss.item() < first


def test_probe_features_of_a_seqpool_vit_refuse_cls_and_take_mean() -> None:
    from torch.utils.data import TensorDataset

    from vitrina.eval.probe import extract_features

    model = ViT(SEQPOOL)
    dataset = TensorDataset(_pixels(SEQPOOL, 4), torch.arange(4))
    features, _ = extract_features(model, dataset, pool="mean")
    assert features.shape == (4, 32) and model.config.pool == "seq"  # the override is undone
    with pytest.raises(UserError, match="no \\[CLS\\] token"):
        extract_features(model, dataset, pool="cls")
