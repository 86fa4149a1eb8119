"""Attention rollout against a naive reference, position-embedding similarity, the PNGs, and `vitrina explain`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitrina.checkpoint import save_model
from vitrina.cli import main
from vitrina.errors import UserError
from vitrina.models.clip import CLIP
from vitrina.models.explain import (
    attention_rollout,
    clip_image_tower,
    discard_lowest,
    fuse_heads,
    pos_embed_similarity,
    query_heatmap,
    query_similarity,
    rollout_matrix,
    save_pos_embed_similarity,
    save_rollout_overlay,
    vision_transformer,
)
from vitrina.models.registry import build_model
from vitrina.models.vit import ViT, ViTConfig


def _random_attentions(batch: int, heads: int, tokens: int, depth: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, tokens, generator=generator).mul(2).softmax(-1) for _ in range(depth)]


def _naive_rollout(attentions: list[torch.Tensor]) -> np.ndarray:
    """Abnar & Zuidema's recipe written out per image: 0.5 W + 0.5 I per layer, multiplied from the first."""
    B, _, T, _ = attentions[0].shape
    out = np.zeros((B, T, T))
    for b in range(B):
        joint = np.eye(T)
        for attention in attentions:
            fused = attention[b].double().numpy().mean(axis=0)
            joint = (0.5 * fused + 0.5 * np.eye(T)) @ joint
        out[b] = joint
    return out


def test_rollout_equals_the_naive_recipe_and_rows_are_distributions() -> None:
    attentions = _random_attentions(batch=2, heads=3, tokens=1 + 16, depth=4)
    rollout = rollout_matrix(attentions)
    assert rollout.shape == (2, 17, 17)
    assert np.abs(rollout.double().numpy() - _naive_rollout(attentions)).max() <= 1e-5
    assert torch.allclose(rollout.sum(-1), torch.ones(2, 17), atol=1e-5)
    heat = attention_rollout(attentions)
    assert heat.shape == (2, 4, 4)
    assert torch.allclose(heat.flatten(1), rollout[:, 0, 1:])


def test_rollout_of_uniform_and_identity_attention() -> None:
    T, grid = 1 + 9, 3
    uniform = [torch.full((1, 2, T, T), 1 / T) for _ in range(3)]
    heat = attention_rollout(uniform)
    assert heat.shape == (1, grid, grid)
    assert torch.allclose(heat, heat.flatten()[0].expand(1, grid, grid)) and heat.min() > 0  # every patch alike
    identity = [torch.eye(T).expand(1, 2, T, T) for _ in range(3)]
    assert torch.equal(rollout_matrix(identity)[0], torch.eye(T))  # no token mixes: [CLS] sees no patch
    assert torch.equal(attention_rollout(identity), torch.zeros(1, grid, grid))


def test_distilled_prefix_is_left_out_of_the_map() -> None:
    attentions = _random_attentions(batch=1, heads=2, tokens=2 + 4, depth=2, seed=1)
    heat = attention_rollout(attentions, num_prefix_tokens=2)
    assert heat.shape == (1, 2, 2)
    assert torch.allclose(heat.flatten(), rollout_matrix(attentions)[0, 0, 2:])


def test_head_fusion_and_discarding() -> None:
    attention = _random_attentions(batch=2, heads=4, tokens=5, depth=1)[0]
    assert torch.equal(fuse_heads(attention, "max"), attention.max(dim=1).values)
    assert torch.equal(fuse_heads(attention, "min"), attention.min(dim=1).values)
    with pytest.raises(ValueError, match="head_fusion"):
        fuse_heads(attention, "median")
    fused = fuse_heads(attention)
    kept = discard_lowest(fused, 0.5)
    for b in range(2):
        threshold = fused[b].flatten().sort().values[12]  # 25 weights, int(25 * 0.5) = 12 dropped
        expected = torch.where(fused[b] >= threshold, fused[b], 0.0)
        expected[0, 0] = fused[b, 0, 0]  # [CLS] -> [CLS] is never dropped
        assert torch.equal(kept[b], expected)
    rows = rollout_matrix([attention], discard_ratio=0.5).sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows))
    with pytest.raises(ValueError, match="discard_ratio"):
        discard_lowest(fused, 1.0)


def test_pos_embed_similarity_tiles() -> None:
    model = ViT(ViTConfig(image_size=24, patch_size=8, width=16, depth=1, heads=2))
    with torch.no_grad():  # patch n's embedding = basis vector n: each tile lights up only its own patch
        model.pos_embed.zero_()
        model.pos_embed[0, 1:, :9] = torch.eye(9)
    similarity = pos_embed_similarity(model)
    assert similarity.shape == (9, 3, 3)
    assert torch.equal(similarity.reshape(9, 9), torch.eye(9))
    trained_like = ViT(ViTConfig(image_size=24, patch_size=8, width=16, depth=1, heads=2))
    diagonal = pos_embed_similarity(trained_like).reshape(9, 9).diagonal()
    assert torch.allclose(diagonal, torch.ones(9))


def _decodes(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        image.load()
        return image.size


def test_pngs_are_written_and_decode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    size = _decodes(save_pos_embed_similarity(torch.rand(16, 4, 4) * 2 - 1, tmp_path / "pos.png"))
    assert min(size) > 100
    image = np.random.default_rng(0).random((32, 32, 3))
    size = _decodes(save_rollout_overlay(image, torch.rand(4, 4), tmp_path / "overlay.png", title="x"))
    assert size[0] > size[1] > 100  # two panels side by side


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name in ("cat.png", "dog.jpg"):
        path = tmp_path / "in" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cli_explain_with_a_preset_and_a_clip_checkpoint(tmp_path: Path, images: list[Path]) -> None:
    out = tmp_path / "vit"
    assert main(["explain", "--model", "vit-nano-32", *map(str, images), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cat-rollout.png", "dog-rollout.png", "pos-embed-similarity.png"]
    for path in out.iterdir():
        _decodes(path)
    checkpoint = save_model(build_model("clip-tiny"), tmp_path / "clip")
    out = tmp_path / "clip-out"
    assert main(["explain", "--model", str(checkpoint), str(images[0]), "--out", str(out), "--head-fusion", "max"]) == 0
    assert {p.name for p in out.iterdir()} == {"cat-rollout.png", "pos-embed-similarity.png"}


def test_cli_explain_refuses_what_has_no_cls_attention(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture
) -> None:
    assert main(["explain", "--model", "swin-nano-28", str(images[0]), "--out", str(tmp_path / "o")]) == 2
    assert "attention rollout needs a ViT" in capsys.readouterr().err
    with pytest.raises(UserError, match="attention rollout needs a ViT"):
        vision_transformer(build_model("resnet-mini-28"))
    assert main(["explain", "--model", "nope", str(images[0]), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint folder or model preset" in capsys.readouterr().err
    bad_ratio = ["explain", "--model", "vit-nano-32", str(images[0]), "--out", str(tmp_path / "o")]
    assert main([*bad_ratio, "--discard-ratio", "1.5"]) == 2
    assert "--discard-ratio" in capsys.readouterr().err
    assert main(["explain", "--model", "vit-nano-32", str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2


# ---- query heat map ----------------------------------------------------------------------------------


def _text_vector(model, text: str) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval().encode_text(model.tokenize([text]))[0]


def test_query_map_has_the_patch_grid_shape_is_finite_and_follows_the_query() -> None:
    model = build_model("clip-tiny").eval()  # 32 px, 8 px patches: a 4 x 4 grid
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    red, boat = _text_vector(model, "a red circle"), _text_vector(model, "a boat at sea")
    with torch.inference_mode():
        heat = query_similarity(model.visual, model.image_projection, pixels, red)
        other = query_similarity(model.visual, model.image_projection, pixels, boat)
        larger = query_similarity(model.visual, model.image_projection, torch.randn(1, 3, 48, 32), red)
    assert heat.shape == (2, 4, 4) and larger.shape == (1, 6, 4)  # the grid of this image size
    assert torch.isfinite(heat).all() and heat.abs().max() <= 1 + 1e-5  # cosines
    assert (heat - other).abs().max() > 1e-3  # another query, another map
    # each cell is the cosine of that patch token, projected like the pooled token, with the text
    with torch.inference_mode():
        token = model.visual.forward_features(pixels)[1, 1 + 2 * 4 + 3]  # row 2, column 3 of image 1
        expected = torch.nn.functional.cosine_similarity(model.image_projection(token), red, dim=0)
    assert torch.allclose(heat[1, 2, 3], expected, atol=1e-5)


def test_with_mean_pooling_the_unnormalised_map_averages_to_the_global_score() -> None:
    config = build_model("clip-tiny").config
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, pool="mean"))
    torch.manual_seed(0)
    model = CLIP(config).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = _text_vector(model, "a green square")
    with torch.inference_mode():
        dots = query_similarity(model.visual, model.image_projection, pixels, text, normalize=False)  # (3, 4, 4)
        pooled = model.project_image(model.image_features(pixels))  # (3, D): the mean of the projected patches
        global_cosine = model.encode_image(pixels) @ torch.nn.functional.normalize(text, dim=0)  # (3,)
    assert torch.allclose(dots.mean(dim=(1, 2)) / pooled.norm(dim=-1), global_cosine, atol=1e-5)


def test_query_heatmap_and_overlays(tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture) -> None:
    model = build_model("clip-tiny")
    overlay = query_heatmap(model, Image.open(images[0]), _text_vector(model, "a cat").numpy(), size=64)
    assert overlay.size == (64, 64) and overlay.mode == "RGB" and np.asarray(overlay).std() > 1
    with pytest.raises(UserError, match="needs a CLIP checkpoint whose image tower is a ViT"):
        clip_image_tower(build_model("vit-nano-32"))
    checkpoint = save_model(model, tmp_path / "clip")
    out = tmp_path / "query-out"
    args = ["explain", "--model", str(checkpoint), *map(str, images), "--out", str(out)]
    assert main([*args, "--query", 'a cat -"a dog"^0.5']) == 0
    assert {"cat-query.png", "dog-query.png", "cat-rollout.png"} <= {p.name for p in out.iterdir()}
    assert _decodes(out / "cat-query.png")[0] > 100
    capsys.readouterr()
    assert main([*args, "--query", "cat -cat"]) == 2
    assert "cancel each other out" in capsys.readouterr().err
    vit_args = ["explain", "--model", "vit-nano-32", str(images[0]), "--out", str(tmp_path / "v")]
    assert main([*vit_args, "--query", "a cat"]) == 2  # a ViT classifier has no text tower
    assert "needs a CLIP checkpoint" in capsys.readouterr().err
