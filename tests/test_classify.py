"""Supervised classification: splits, the batch augmentation, and `vitrina train classify` / `vitrina
distill` end to end on a generated image folder and on a 200-image Fashion-MNIST subset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitrina.checkpoint import load_model, save_model
from vitrina.cli import main
from vitrina.data.fashion_mnist import DEFAULT_ROOT
from vitrina.data.splits import stratified_split
from vitrina.errors import UserError
from vitrina.models.registry import build_model
from vitrina.train.classify import (
    ClassifySettings,
    build_classifier,
    confusion_matrix,
    cross_entropy_loss,
    predict,
    shifted,
)
from vitrina.train.classify_data import (
    BatchAugment,
    Preprocess,
    load_classification_data,
    random_crop,
)

HAS_FMNIST = (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file()
CLASSES = ("circle", "square", "stripes")


def make_folder(root: Path, per_class: int = 10) -> Path:
    """Three classes of 20 px pictures that a tiny model can tell apart, with noise so none repeat."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :20]
    shapes = {
        "circle": ((yy - 10) ** 2 + (xx - 10) ** 2 < 40),
        "square": (abs(yy - 10) < 6) & (abs(xx - 10) < 6),
        "stripes": (xx // 3) % 2 == 0,
    }
    for name, mask in shapes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = (mask * 200 + rng.integers(0, 40, (20, 20))).astype(np.uint8)
            Image.fromarray(np.stack([image] * 3, -1)).save(root / name / f"{i:03d}.png")
    return root


# --- splits and the data path -------------------------------------------------------------------


def test_stratified_split_is_stratified_and_reproducible():
    labels = np.repeat(np.arange(5), [50, 30, 20, 10, 10])
    train, val, test = stratified_split(labels, (0.8, 0.1, 0.1), seed=3)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))
    for c, n in enumerate([50, 30, 20, 10, 10]):
        assert (labels[train] == c).sum() == round(0.8 * n)
        assert (labels[val] == c).sum() == max(1, round(0.1 * n))
    again = stratified_split(labels, (0.8, 0.1, 0.1), seed=3)
    other = stratified_split(labels, (0.8, 0.1, 0.1), seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test), strict=True))
    assert not np.array_equal(other[1], val)


def test_folder_split_is_80_10_10_per_class_and_seeded(tmp_path):
    root = make_folder(tmp_path / "shapes")
    data = load_classification_data(str(root), seed=0)
    assert data.class_names == sorted(CLASSES)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 3, 3)
    assert torch.bincount(data.val.labels).tolist() == [1, 1, 1]
    same = load_classification_data(str(root), seed=0)
    other = load_classification_data(str(root), seed=1)
    assert same.test.images == data.test.images and other.test.images != data.test.images


def test_batch_augmentation_keeps_shape_range_and_content():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 10:18, 10:18] = 255
    out = BatchAugment(pad=2, erasing=0.0)(images)
    assert out.shape == (64, 1, 28, 28) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.full((64,), 64.0))  # the square is shifted, never cut
    assert len({tuple(torch.nonzero(o[0])[0].tolist()) for o in out}) > 5  # many different shifts
    shifted = random_crop(torch.arange(16.0).view(1, 1, 4, 4).repeat(50, 1, 1, 1), 1)
    assert all(((s == 0) | torch.isin(s, torch.arange(16.0))).all() for s in shifted)
    erased = BatchAugment(pad=0, erasing=1.0)(torch.zeros(32, 1, 28, 28, dtype=torch.uint8))
    assert (erased > 0).any(dim=(1, 2, 3)).all()  # every image got a noise rectangle


@pytest.mark.parametrize("pad", [2, 4])
def test_crop_padding_keeps_shapes_stays_within_its_pad_and_is_seeded(pad):
    images = torch.zeros(40, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 12, 12] = 255  # one lit pixel: where it lands is the shift
    augment = BatchAugment(pad=pad, erasing=0.0)
    torch.manual_seed(7)
    out = augment(images)
    assert out.shape == (40, 1, 28, 28)
    rows, cols = torch.nonzero(out[:, 0] > 0, as_tuple=True)[1:]
    shifts = (rows - 12).abs().max(), torch.minimum((cols - 12).abs(), (cols - 15).abs()).max()  # 15: flipped
    assert max(int(s) for s in shifts) <= pad and len(rows) == 40
    torch.manual_seed(7)
    torch.testing.assert_close(augment(images), out)  # the same seed, the same crops and flips
    torch.manual_seed(8)
    assert not torch.equal(augment(images), out)
    with pytest.raises(UserError, match="crop_pad"):
        ClassifySettings(crop_pad=-1).validate()


def test_label_smoothing_is_torch_cross_entropy_with_a_smoothed_target():
    """The classifier's loss against the definition: target ``(1 - eps) one_hot + eps / K``."""
    torch.manual_seed(0)
    model = build_classifier("vit-fmnist-28-fast", 4, seed=2, in_channels=1)
    preprocess = Preprocess(28, (0.5,) * 3, (0.5,) * 3, in_channels=1)
    pixels, labels = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 0, 1])
    eps = 0.1
    got = cross_entropy_loss(model, preprocess, eps)(pixels, labels, torch.arange(6)).loss
    with torch.no_grad():
        log_p = torch.log_softmax(model(preprocess(pixels)).double(), dim=1)  # (B, K)
    target = (1 - eps) * torch.nn.functional.one_hot(labels, 4).double() + eps / 4
    assert got.detach().item() == pytest.approx(float(-(target * log_p).sum(dim=1).mean()), rel=1e-5)
    plain = cross_entropy_loss(model, preprocess, 0.0)(pixels, labels, torch.arange(6)).loss.detach()
    assert plain.item() == pytest.approx(float(-log_p[torch.arange(6), labels].mean()), rel=1e-5)


def test_preprocess_resizes_and_normalises():
    pre = Preprocess(48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = pre(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 48, 48)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    m = confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not 'fashion-mnist' and no such folder"):
        load_classification_data(str(tmp_path / "nowhere"))
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(UserError, match="at least two"):
        load_classification_data(str(tmp_path / "one"))
    with pytest.raises(UserError, match="CLIP preset"):
        build_classifier("clip-tiny", 3)
    with pytest.raises(UserError, match="unknown model preset"):
        build_classifier("vit-giant", 3)


def test_cli_errors_are_one_line(tmp_path, capsys):
    root = make_folder(tmp_path / "shapes", per_class=4)
    assert main(["train", "classify", "--data", str(root), "--out", str(tmp_path / "x")]) == 2
    assert "give --model PRESET" in capsys.readouterr().err
    args = ["train", "classify", "--model", "vit-fmnist-28-fast", "--data", str(root), "--out", str(tmp_path / "y")]
    assert main([*args, "--freeze", "first-2"]) == 2
    assert "give --init CHECKPOINT" in capsys.readouterr().err
    clip = tmp_path / "clip"
    save_model(build_model("clip-tiny"), clip)
    distill = ["distill", "--teacher", str(clip), "--student", "vit-fmnist-28-fast", "--data", str(root)]
    assert main([*distill, "--kind", "response", "--out", str(tmp_path / "z")]) == 2
    assert "not a classifier checkpoint" in capsys.readouterr().err


def test_flip_tta_logits_are_the_mean_of_the_image_and_its_flip():
    model = build_classifier("vit-fmnist-28-fast", 3, seed=1, in_channels=1)
    preprocess = Preprocess(28, (0.5,) * 3, (0.5,) * 3, in_channels=1)
    pixels = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    plain = predict(model, pixels, preprocess, batch_size=2)
    flipped = predict(model, pixels.flip(-1), preprocess, batch_size=2)
    tta = predict(model, pixels, preprocess, batch_size=2, tta=True)
    torch.testing.assert_close(tta, (plain + flipped) / 2)
    assert not torch.allclose(tta, plain, atol=1e-4)  # the flip mattered: the test can tell the two apart


def test_shifted_moves_the_content_and_fills_the_border_with_black():
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 2, 4] = 1.0  # on the right border
    image[0, 0, 0, 1] = 0.5  # on the top border
    right = shifted(image, 1, 0)
    assert right[0, 0, 2, 4] == 0 and right.sum() == 0.5 and right[0, 0, 0, 2] == 0.5  # the right one left the frame
    up = shifted(image, 0, -2)
    assert up.sum() == 1.0 and up[0, 0, 0, 4] == 1.0  # moved 2 rows up; the top one left the frame
    torch.testing.assert_close(shifted(shifted(image, -1, 0), 1, 0)[..., 1:], image[..., 1:])  # but column 0


def test_shift_tta_averages_ten_views_taken_in_pixel_space():
    model = build_classifier("vit-fmnist-28-fast", 3, seed=1, in_channels=1)
    preprocess = Preprocess(28, (0.3,) * 3, (0.4,) * 3, in_channels=1)
    pixels = (torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    unit = pixels.float() / 255

    def logits(views: torch.Tensor) -> torch.Tensor:
        return predict(model, views, preprocess, batch_size=2)

    # the shifts pad with black *before* normalisation (what the training crop does), hence the unit pixels
    moves = [(0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)]
    views = [shifted(unit, dx, dy) for dx, dy in moves]
    expected = torch.stack([logits(v) for v in views] + [logits(v.flip(-1)) for v in views]).mean(dim=0)
    got = predict(model, pixels, preprocess, batch_size=2, tta=True, tta_shift=2)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, predict(model, pixels, preprocess, batch_size=2, tta=True), atol=1e-4)
    with pytest.raises(UserError, match="--tta-shift 1 adds shifted views"):
        ClassifySettings(tta_shift=1).validate()
    with pytest.raises(UserError, match="--tta-shift -1"):
        ClassifySettings(tta=True, tta_shift=-1).validate()


# --- end to end ---------------------------------------------------------------------------------


def check_outputs(out: Path, class_names: list[str]) -> dict:
    model, config = load_model(out / "best")
    assert config["label2id"] == {name: i for i, name in enumerate(class_names)}
    assert config["id2label"] == {str(i): name for i, name in enumerate(class_names)}
    assert model.config.num_classes == len(class_names)
    assert (out / "confusion.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test_acc"] <= 1 and np.array(results["confusion"]).sum() == results["test_images"]
    return results


def test_train_classify_then_distill_and_transfer_on_an_image_folder(tmp_path):
    root = make_folder(tmp_path / "shapes")
    common = ["--data", str(root), "--epochs", "2", "--batch-size", "8", "--lr", "3e-3"]
    teacher = tmp_path / "teacher"
    assert main(["train", "classify", "--model", "vit-fmnist-28-fast", *common, "--out", str(teacher)]) == 0
    check_outputs(teacher, sorted(CLASSES))

    student = tmp_path / "student"
    args = ["distill", "--teacher", str(teacher / "best"), "--student", "vit-fmnist-28-fast", "--kind", "deit"]
    assert main([*args, *common, "--out", str(student)]) == 0
    _, config = load_model(student / "best")
    assert config["distill"]["kind"] == "deit-hard" and config["model"]["distilled"] is True
    check_outputs(student, sorted(CLASSES))

    clip = tmp_path / "clip"
    save_model(build_model("clip-tiny"), clip)
    probe = tmp_path / "probe"
    assert main(["train", "classify", "--init", str(clip), "--mode", "linear-probe", *common, "--out", str(probe)]) == 0
    model, config = load_model(probe / "best")
    assert config["preprocess"]["image_size"] == 32  # the CLIP tower's own size
    torch.testing.assert_close(
        model.blocks[0].attn.qkv.weight, build_model("clip-tiny").visual.blocks[0].attn.qkv.weight
    )
    check_outputs(probe, sorted(CLASSES))


def test_train_classify_with_a_time_budget_ema_and_tta(tmp_path):
    root = make_folder(tmp_path / "shapes", per_class=6)
    out = tmp_path / "budget"
    args = ["train", "classify", "--model", "vit-fmnist-28-fast", "--data", str(root), "--batch-size", "4"]
    budget = ["--minutes", "0.05", "--ema", "0.5", "--tta", "--tta-shift", "1", "--crop-pad", "4", "--erasing", "0"]
    assert main([*args, *budget, "--out", str(out)]) == 0
    results = check_outputs(out, sorted(CLASSES))
    assert results["tta"] is True and results["ema"] is True and results["budget_spent"] is True
    assert results["tta_views"] == 10  # flips and 1 px shifts at the test
    state = json.loads((out / "train_state.json").read_text())
    assert state["config"]["budget_minutes"] == 0.05 and state["config"]["ema_decay"] == 0.5
    settings = state["identity"]["run"]["settings"]
    assert (settings["crop_pad"], settings["erasing"]) == (4, 0.0)  # the augmentation asked for is the one used
    assert settings["tta"] is True and "tta_shift" not in settings  # the test's views do not change the training
    assert state["elapsed_s"] >= 3.0  # the budget, not the epochs (no limit without --epochs), ended it
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["ema"] for m in metrics if "eval" in m] == [True] * sum("eval" in m for m in metrics)


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST not installed (/usr/share/datasets/fashion-mnist)")
def test_train_classify_on_a_fashion_mnist_subset(tmp_path, capsys):
    out = tmp_path / "fm"
    args = ["train", "classify", "--model", "vit-fmnist-28-fast", "--data", "fashion-mnist", "--limit", "200"]
    assert main([*args, "--epochs", "1", "--batch-size", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "815,882 parameters, 815,882 trainable" in printed
    results = check_outputs(out, list(json.loads((out / "best" / "config.json").read_text())["label2id"]))
    assert results["test_images"] == 200
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in m and "val/acc" in m["eval"] for m in metrics)
