"""CLIP training on the shared loop: a few steps of ``clip-tiny`` on coloured shapes the test draws."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vitrina.checkpoint import load_encoder
from vitrina.config import TrainConfig
from vitrina.data.transforms import eval_transform
from vitrina.errors import UserError
from vitrina.losses import clip_loss
from vitrina.models.clip import CLIP
from vitrina.models.registry import build_model, preset_config
from vitrina.train.clip import (
    BYTE_LEVEL_VOCAB,
    ClipTrainSettings,
    TextFeatureCache,
    clip_step,
    fingerprint,
    make_embedder,
    retrieval_recall,
    split_pairs,
    train_clip,
)
from vitrina.train.loop import CheckpointInfo

# The per-sample file path (``ImageCaptionDataset`` + PIL transforms); the in-memory path is
# tested in test_train_clip_memory.py.
PER_SAMPLE = ClipTrainSettings(in_memory=False)
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def shape_image(colour: str, shape: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A coloured shape at a random place and size on white: (size, size, 3) uint8."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    r = int(rng.integers(size // 4, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return np.asarray(image)


def shape_pairs(n: int = 36, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    return [(shape_image(c, s, rng), f"a {c} {s}") for c, s in (combos[i % len(combos)] for i in range(n))]


def tiny_config(**changes) -> TrainConfig:
    base = dict(epochs=6, batch_size=8, lr=3e-3, warmup_steps=2, log_every=2, seed=0, val_fraction=0.12)
    return TrainConfig(**{**base, **changes})


def locked_tiny_clip() -> CLIP:
    """clip-tiny with its (random) text transformer frozen: a tiny lockable tower for cache tests."""
    torch.manual_seed(0)
    return CLIP(dataclasses.replace(preset_config("clip-tiny"), text_locked=True))


def batch_of(model: CLIP, pairs) -> tuple[torch.Tensor, list[str]]:
    c = model.config
    transform = eval_transform(c.vision.image_size, c.image_mean, c.image_std)
    pixels = torch.stack([transform(Image.fromarray(a)) for a, _ in pairs])  # (B, 3, H, W)
    return pixels, [caption for _, caption in pairs]


def loss_on(model: CLIP, pairs) -> float:
    model.eval()
    with torch.no_grad():
        pixels, captions = batch_of(model, pairs)
        return clip_loss(*model(pixels, model.tokenize(captions))).item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """clip-tiny trained 6 short epochs; every checkpoint is opened with ``load_encoder`` as it lands."""
    out = tmp_path_factory.mktemp("clip")
    pairs = shape_pairs()
    model = build_model("clip-tiny")
    opened = []

    def on_checkpoint(info: CheckpointInfo) -> None:
        encoder = load_encoder(str(out))
        pixels, captions = batch_of(model, pairs[:4])
        model.eval()
        with torch.no_grad():
            want = model.encode_image(pixels)
        model.train()
        opened.append((info.epoch, torch.allclose(encoder.encode_image(pixels), want, atol=1e-5)))

    summary = train_clip(
        model=model,
        pairs=pairs,
        out_dir=out,
        train_config=tiny_config(),
        settings=PER_SAMPLE,
        progress=False,
        on_checkpoint=on_checkpoint,
    )
    return out, pairs, model, summary, opened


def test_training_lowers_the_loss(trained):
    out, pairs, model, summary, _ = trained
    fresh = build_model("clip-tiny")
    fresh.set_tokenizer(model.tokenizer)  # same tokens, untrained weights
    assert loss_on(model, pairs[:16]) < loss_on(fresh, pairs[:16]) - 0.3
    assert summary.epochs_done == 6 and summary.steps == 6 * 4  # 32 training pairs / 8
    assert {"val/loss", "val/t2i_r1", "val/t2i_r5", "train/loss"} <= set(summary.metrics)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in log if "eval" in r]) == 6
    assert all("logit_scale" in r and "t2i_batch_r1" in r for r in log if "loss" in r)


def test_every_epoch_checkpoint_opens_with_load_encoder(trained):
    *_, opened = trained
    assert opened == [(epoch, True) for epoch in range(1, 7)]


def test_checkpoint_reloads_with_the_same_embeddings(trained):
    out, pairs, model, *_ = trained
    encoder = load_encoder(str(out))
    pixels, captions = batch_of(model, pairs[:6])
    model.eval()
    with torch.no_grad():
        want_img = model.encode_image(pixels)
        want_txt = model.encode_text(model.tokenize(captions))
    assert torch.allclose(encoder.encode_image(pixels), want_img, atol=1e-5)
    assert torch.allclose(encoder.encode_text(captions), want_txt, atol=1e-5)
    # the BPE tokenizer learnt from the captions travelled with the weights
    assert model.tokenizer.get_vocab_size() > BYTE_LEVEL_VOCAB
    assert encoder.model.tokenizer.to_str() == model.tokenizer.to_str()


def test_resume_after_time_cap_matches_uninterrupted(tmp_path: Path):
    pairs = shape_pairs(20)  # 18 for training: 2 steps per epoch
    config = tiny_config(epochs=2)
    train_clip(
        model=build_model("clip-tiny"), pairs=pairs, out_dir=tmp_path / "whole", train_config=config, progress=False
    )
    first = train_clip(
        model=build_model("clip-tiny"),
        pairs=pairs,
        out_dir=tmp_path / "cut",
        train_config=tiny_config(epochs=2, max_minutes=1e-9),
        progress=False,
    )
    assert first.stopped_early and first.steps == 1
    # a new process would rebuild the preset: the tokenizer must come back from the checkpoint
    second = train_clip(
        model=build_model("clip-tiny"), pairs=pairs, out_dir=tmp_path / "cut", train_config=config, progress=False
    )
    assert second.resumed_from_step == 1 and second.steps == 4
    a, b = load_encoder(str(tmp_path / "whole")), load_encoder(str(tmp_path / "cut"))
    pixels, captions = batch_of(a.model, pairs[:6])
    assert torch.allclose(a.encode_image(pixels), b.encode_image(pixels), atol=1e-6)
    assert torch.allclose(a.encode_text(captions), b.encode_text(captions), atol=1e-6)


def test_other_data_refuses_to_resume(trained):
    out, pairs, *_ = trained
    with pytest.raises(UserError, match="other settings.*data"):
        train_clip(
            model=build_model("clip-tiny"),
            pairs=pairs[:-1],
            out_dir=out,
            train_config=tiny_config(),
            settings=PER_SAMPLE,
            progress=False,
        )
    with pytest.raises(UserError, match="other settings.*text_locked: False -> True"):
        train_clip(
            model=locked_tiny_clip(),
            pairs=pairs,
            out_dir=out,
            train_config=tiny_config(),
            settings=PER_SAMPLE,
            progress=False,
        )


def test_cached_text_features_give_the_uncached_loss_and_gradients():
    model = locked_tiny_clip()
    pairs = shape_pairs(8)
    pixels, captions = batch_of(model, pairs)
    model.train()
    results = []
    for cache in (None, TextFeatureCache(model, [c for _, c in pairs], batch_size=3)):
        model.zero_grad()
        out = clip_step(model, (pixels, captions), make_embedder(model, cache))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.item(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and "text_projection.weight" in grads_a
    assert not any(n.startswith("text.") for n in grads_a)
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-6) for n in grads_a)


def test_bf16_towers_feed_a_float32_loss_that_matches_the_plain_step():
    # Under the loop's bf16 autocast the towers run in bf16, but the logits (similarity x a temperature
    # up to 100) and the loss stay float32: the loss equals the one computed from the same embeddings in fp32.
    model = locked_tiny_clip()
    pairs = shape_pairs(8)
    pixels, captions = batch_of(model, pairs)
    embed = make_embedder(model, TextFeatureCache(model, [c for _, c in pairs]))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clip_step(model, (pixels, captions), embed)
        image_emb, text_emb = model.encode_image(pixels), embed(list(captions))
    assert image_emb.dtype == torch.bfloat16  # the towers did run in bf16
    assert out.loss.dtype == torch.float32
    expected = clip_loss(image_emb.float(), text_emb.float(), model.scale())
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_a_demo_rerun_keeps_the_precision_its_checkpoint_was_trained_at(tmp_path: Path, monkeypatch):
    # `make demo` resumes what it trained; a checkpoint of the other precision would refuse to resume
    import vitrina.models.precision
    from vitrina.demo import demo_precision

    monkeypatch.setattr(vitrina.models.precision, "native_bf16", lambda: True)
    assert demo_precision(tmp_path / "none-yet") == "bf16"  # a fresh demo on a bf16 CPU
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        config = tiny_config(epochs=1, precision=precision)
        train_clip(model=locked_tiny_clip(), pairs=shape_pairs(20), out_dir=out, train_config=config, progress=False)
        assert demo_precision(out) == precision
    monkeypatch.setattr(vitrina.models.precision, "native_bf16", lambda: False)
    assert demo_precision(tmp_path / "none-yet") == "fp32"


def test_locked_text_tower_trains_only_what_sits_above_it(tmp_path: Path):
    model = locked_tiny_clip()
    text_before = {n: p.clone() for n, p in model.text.state_dict().items()}
    proj_before = model.text_projection.weight.clone()
    train_clip(model=model, pairs=shape_pairs(20), out_dir=tmp_path, train_config=tiny_config(epochs=1), progress=False)
    assert all(torch.equal(text_before[n], p) for n, p in model.text.state_dict().items())
    assert not torch.equal(proj_before, model.text_projection.weight)


def test_retrieval_recall_counts_images_with_the_same_caption():
    image_emb = torch.eye(3)
    # caption 0 points at image 1, which carries the same caption: a hit
    text_emb = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.9, 0.1], [1.0, 0.0, 0.0]])
    captions = ["a cat", "a cat", "a dog"]
    assert retrieval_recall(image_emb, text_emb, captions, 1) == pytest.approx(2 / 3)
    assert retrieval_recall(image_emb, text_emb, captions, 3) == pytest.approx(1.0)


def test_split_is_seeded_and_fingerprint_sees_pixels():
    pairs = shape_pairs(20)
    train_a, val_a = split_pairs(pairs, 0.2, seed=1)
    train_b, val_b = split_pairs(pairs, 0.2, seed=1)
    assert [c for _, c in val_a] == [c for _, c in val_b] and len(val_a) == 4 and len(train_a) == 16
    assert {id(a) for a, _ in train_a + val_a} == {id(a) for a, _ in pairs}
    changed = [(a.copy(), c) for a, c in pairs]
    assert fingerprint(changed) == fingerprint(pairs)
    changed[3][0][0, 0, 0] ^= 1
    assert fingerprint(changed) != fingerprint(pairs)
    with pytest.raises(UserError, match="too few"):
        split_pairs(pairs[:3], 0.5, seed=0)
