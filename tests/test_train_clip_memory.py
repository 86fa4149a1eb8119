"""The in-memory CLIP path: batch augmentation on tensors, caption concepts, and a tiny end-to-end run
that keeps the best model by a watch set's R@10 in ``out/best``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train_clip import batch_of, locked_tiny_clip, shape_pairs, tiny_config

from vitrina.checkpoint import BEST_FOLDER, best_checkpoint, load_encoder
from vitrina.data.batch_augment import BatchAugment, crop_grid
from vitrina.data.memory import decode_all, fits_in_memory
from vitrina.data.transforms import EvalTransform, TrainTransform
from vitrina.errors import UserError
from vitrina.models.registry import build_model
from vitrina.train import clip as clip_trainer
from vitrina.train.clip import ClipTrainSettings, train_clip
from vitrina.train.clip_data import caption_concepts


def test_batch_augment_keeps_shape_and_dtype_and_is_seeded():
    pixels, kept = decode_all([a for a, _ in shape_pairs(6)], 32)  # (6, 3, 32, 32) uint8
    assert pixels.dtype == torch.uint8 and pixels.shape == (6, 3, 32, 32) and kept == list(range(6))
    augment = BatchAugment()
    a = augment(pixels, torch.Generator().manual_seed(1))
    b = augment(pixels, torch.Generator().manual_seed(1))
    c = augment(pixels, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a crop of a flat colour is that colour, normalised as the index normalises it
    flat = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    want = EvalTransform(32).normalize(flat)
    assert torch.allclose(augment(flat, torch.Generator().manual_seed(0)), want, atol=1e-5)


def test_batch_augment_mirrors_about_half_the_images():
    left_dark = torch.full((64, 3, 16, 16), 255, dtype=torch.uint8)
    left_dark[..., :8] = 0  # the left half black
    out = BatchAugment(scale=(0.95, 1.0))(left_dark, torch.Generator().manual_seed(0))
    mirrored = (out[..., :, :4].mean(dim=(1, 2, 3)) > out[..., :, -4:].mean(dim=(1, 2, 3))).sum().item()
    assert 20 <= mirrored <= 44  # the bright half moved left in about half of 64


def test_memory_budget_and_caption_concepts():
    assert fits_in_memory(10_000, 48) and not fits_in_memory(100_000, 224)
    pairs = [("a.png", "an emoji of a cat"), ("b.png", "an emoji of a cat"), ("c.png", ["a dog", "a puppy"])]
    assert caption_concepts(pairs, None) == {"an emoji of a cat": 0, "a dog": 1, "a puppy": 1}
    by_key = caption_concepts([*pairs, ("d.png", "a hound")], ["cat", "cat", "dog", "dog"])
    assert by_key == {"an emoji of a cat": 0, "a dog": 1, "a puppy": 1, "a hound": 1}


def test_in_memory_run_keeps_the_best_watch_model_in_a_folder_load_encoder_opens(tmp_path: Path):
    pairs, watch = shape_pairs(36), shape_pairs(12, seed=1)  # the watch set: new drawings of the shapes
    model = build_model("clip-tiny")
    summary = train_clip(
        model=model,
        pairs=pairs,
        out_dir=tmp_path,
        train_config=tiny_config(epochs=4, lr=1e-3),
        watch_sets={"new-drawings": watch},
        settings=ClipTrainSettings(watch_max_items=12, best_metric="new-drawings/t2i_r1"),
        progress=False,
    )
    assert summary.steps == 4 * 4 and {"new-drawings/t2i_r10", "val/t2i_r10"} <= set(summary.metrics)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scores = [r["eval"]["new-drawings/t2i_r1"] for r in log if "eval" in r]
    best = json.loads((tmp_path / BEST_FOLDER / "config.json").read_text())["best"]
    assert best["metric"] == "new-drawings/t2i_r1" and best["value"] == max(scores)
    assert best["epoch"] == scores.index(max(scores)) + 1, scores  # the first epoch that reached it
    assert best_checkpoint(tmp_path) == tmp_path / BEST_FOLDER
    encoder = load_encoder(str(best_checkpoint(tmp_path)))
    pixels, captions = batch_of(model, watch[:4])
    assert encoder.encode_image(pixels).shape == (4, 64) and encoder.encode_text(captions).shape == (4, 64)


def test_crop_grid_is_the_affine_grid_of_a_scale_and_shift():
    augment = BatchAugment()
    box = augment.crop_boxes(5, torch.Generator().manual_seed(0))  # (5, 4)
    mirror = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    theta = torch.zeros(5, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = box[:, 0] * mirror, box[:, 2]
    theta[:, 1, 1], theta[:, 1, 2] = box[:, 1], box[:, 3]
    want = torch.nn.functional.affine_grid(theta, [5, 3, 12, 16], align_corners=False)  # (5, 12, 16, 2)
    assert torch.allclose(crop_grid(box, mirror, 12, 16), want, atol=1e-6)


def test_flips_alone_keep_every_picture_whole_on_both_paths():
    """``crop=False``: each augmented image is the index's view of the picture or its mirror, pixel for pixel."""
    sources = [a for a, _ in shape_pairs(8)]
    pixels, _ = decode_all(sources, 32)  # (8, 3, 32, 32) uint8
    index_view = EvalTransform(32).normalize(pixels)  # (8, 3, 32, 32)
    out = BatchAugment(crop=False)(pixels, torch.Generator().manual_seed(0))
    same = [torch.allclose(o, v, atol=1e-4) for o, v in zip(out, index_view, strict=True)]
    mirrored = [torch.allclose(o, v.flip(-1), atol=1e-4) for o, v in zip(out, index_view, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(mirrored) and any(same)
    per_sample = TrainTransform(32, crop=False)
    torch.manual_seed(0)
    images = [Image.fromarray(a) for a in sources]
    for image in images:
        want = EvalTransform(32)(image)  # (3, 32, 32)
        got = per_sample(image)
        assert torch.allclose(got, want, atol=1e-5) or torch.allclose(got, want.flip(-1), atol=1e-5)


def test_a_flips_only_run_trains_and_a_cropping_run_refuses_to_resume_it(tmp_path: Path):
    run = dict(pairs=shape_pairs(36), out_dir=tmp_path, train_config=tiny_config(epochs=2, lr=1e-3), progress=False)
    summary = train_clip(model=build_model("clip-tiny"), settings=ClipTrainSettings(crop=False), **run)
    assert summary.steps == 2 * 4 and math.isfinite(summary.metrics["val/loss"])
    with pytest.raises(UserError, match="other settings.*crop"):  # other crops: another trajectory
        train_clip(model=build_model("clip-tiny"), settings=ClipTrainSettings(crop=True), **run)


@pytest.fixture
def caption_sets_made(monkeypatch) -> list:
    """Every ``CaptionSet`` the trainer builds from now on (one per run with caption negatives)."""
    made = []

    class Spy(clip_trainer.CaptionSet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(clip_trainer, "CaptionSet", Spy)
    return made


def test_caption_negatives_train_against_the_training_captions_only(tmp_path: Path, caption_sets_made: list):
    """negatives='captions': every training caption is an image's negative, and nothing of a watch set (held-out
    concepts) is among them; a trainable text tower (no cached features) is refused with a hint."""
    pairs = shape_pairs(36)
    held_out = [(image, caption.replace("a ", "a held-out ", 1)) for image, caption in shape_pairs(6, seed=2)]
    summary = train_clip(
        model=locked_tiny_clip(),
        pairs=pairs,
        out_dir=tmp_path / "run",
        train_config=tiny_config(epochs=2, lr=1e-3),
        watch_sets={"held-out": held_out},
        settings=ClipTrainSettings(negatives="captions", watch_max_items=6),
        progress=False,
    )
    assert summary.steps == 2 * 4 and math.isfinite(summary.metrics["val/loss"])
    (caption_set,) = caption_sets_made
    trained_captions = {caption for _, caption in pairs}
    assert set(caption_set.captions) <= trained_captions and len(caption_set.captions) >= len(trained_captions) - 4
    assert not {caption for _, caption in held_out} & set(caption_set.captions)
    assert caption_set.embeddings().shape == (len(caption_set.captions), 64)
    with pytest.raises(UserError, match="negatives='captions' needs a locked text tower"):
        train_clip(
            model=build_model("clip-tiny"),
            pairs=pairs,
            out_dir=tmp_path / "trainable",
            train_config=tiny_config(epochs=1),
            settings=ClipTrainSettings(negatives="captions"),
            progress=False,
        )
    with pytest.raises(UserError, match="negatives='everything'"):
        ClipTrainSettings(negatives="everything")


def test_auto_negatives_are_the_captions_for_a_locked_text_tower_and_the_batch_for_a_trained_one(
    tmp_path: Path, caption_sets_made: list
):
    run = dict(pairs=shape_pairs(36), train_config=tiny_config(epochs=1, lr=1e-3), progress=False)
    auto = ClipTrainSettings(negatives="auto")
    train_clip(model=locked_tiny_clip(), out_dir=tmp_path / "locked", settings=auto, **run)
    assert len(caption_sets_made) == 1  # the locked tower's cached features: every training caption is a negative
    summary = train_clip(model=build_model("clip-tiny"), out_dir=tmp_path / "trainable", settings=auto, **run)
    assert len(caption_sets_made) == 1  # a trained tower: no caption set, CLIP's batch loss
    assert math.isfinite(summary.metrics["val/loss"])
    # the run records what auto chose: the explicit choice is the same run (it resumes), the other one is not
    resumed = train_clip(
        model=locked_tiny_clip(), out_dir=tmp_path / "locked", settings=ClipTrainSettings(negatives="captions"), **run
    )
    assert resumed.steps == 4
    with pytest.raises(UserError, match="other settings"):
        train_clip(
            model=locked_tiny_clip(), out_dir=tmp_path / "locked", settings=ClipTrainSettings(negatives="batch"), **run
        )
