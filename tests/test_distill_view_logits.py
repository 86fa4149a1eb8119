"""Cached teacher view logits: the views are exactly those the batch augmentation draws, a lookup equals
the online teacher on the same pixels, the cache is built once per teacher and data, and `vitrina
distill --cache-teacher-views` trains on it end to end, from one teacher or the ensemble of two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitrina.checkpoint import save_model
from vitrina.cli import main
from vitrina.data.fashion_mnist import DEFAULT_ROOT
from vitrina.distill.view_logits import ShiftFlipViews, cached_view_logits
from vitrina.models.cnn import CNN, CNNConfig
from vitrina.train.classify_data import BatchAugment, Preprocess

HAS_FMNIST = (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file()
PRE = Preprocess(28, (0.5,) * 3, (0.5,) * 3)


def naive_view(image: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    """(C, H, W): the H x W window at (dy, dx) of the zero-padded image, mirrored if ``flip``."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad)
    padded[:, pad : pad + h, pad : pad + w] = image
    crop = padded[:, dy : dy + h, dx : dx + w]
    return crop.flip(-1) if flip else crop


def tiny_teacher(seed: int = 1) -> CNN:
    torch.manual_seed(seed)
    return CNN(CNNConfig(image_size=28, widths=(8, 16), blocks=(1, 1), num_classes=4)).eval()


def counting_logits(teacher: CNN) -> tuple[list[int], callable]:
    calls = [0]

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        calls[0] += len(pixels)
        with torch.no_grad():
            return teacher(PRE(pixels))

    return calls, logits


def test_every_view_is_the_naive_shift_and_flip():
    views = ShiftFlipViews(pad=2)
    assert views.count == 50
    images = torch.rand(3, 1, 6, 7)
    side = 5
    for view in range(views.count):
        got = views.apply(images, torch.full((3,), view))
        dy, dx, flip = view // 2 // side, view // 2 % side, bool(view % 2)
        for i in range(3):
            torch.testing.assert_close(got[i], naive_view(images[i], dy, dx, flip, pad=2), rtol=0, atol=0)
    every = views.apply(images[:1].expand(50, -1, -1, -1), torch.arange(50)).flatten(1)
    assert len(torch.unique(every, dim=0)) == 50  # one number per view, no two the same


def test_the_batch_augmentation_draws_only_cached_views_and_every_one_of_them():
    views = ShiftFlipViews(pad=2)
    image = torch.randint(1, 256, (1, 1, 8, 8), dtype=torch.uint8)  # no zero pixel: every shift shows
    every = views.apply(image.expand(50, -1, -1, -1), torch.arange(50)).flatten(1)  # (50, 64)
    torch.manual_seed(0)
    drawn = BatchAugment(pad=2, erasing=0.0)(image.expand(2000, -1, -1, -1)).flatten(1)  # (2000, 64)
    same = (drawn[:, None, :] == every[None, :, :]).all(dim=-1)  # (2000, 50): image i is view j, exactly
    assert bool(same.any(dim=1).all())  # each augmented image is one of the cached views
    assert bool(same.any(dim=0).all())  # and the augmentation reaches every one of them


def test_a_looked_up_logit_is_the_online_teachers_on_the_same_pixels(tmp_path):
    teacher = tiny_teacher()
    save_model(teacher, tmp_path / "teacher" / "best")
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    views = ShiftFlipViews(pad=2)
    _, logits = counting_logits(teacher)
    cached = cached_view_logits(
        logits, tmp_path / "teacher" / "best", images, views, teacher_setting="fp32", progress=False, log=lambda _: 0
    )
    assert cached.logits.shape == (10, 50, 4)
    index, drawn = torch.tensor([3, 0, 7, 3]), torch.tensor([0, 17, 49, 26])
    with torch.no_grad():
        online = teacher(PRE(views.apply(images[index], drawn)))
    torch.testing.assert_close(cached[index, drawn], online, rtol=1e-5, atol=1e-5)


def test_the_cache_is_built_once_per_teacher_and_data(tmp_path):
    best = tmp_path / "teacher" / "best"
    save_model(tiny_teacher(), best)
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    views, quiet = ShiftFlipViews(pad=1), dict(teacher_setting="fp32", progress=False, log=lambda _: 0)
    calls, logits = counting_logits(tiny_teacher())
    first = cached_view_logits(logits, best, images, views, **quiet)
    assert calls[0] == 6 * 18 and len(list((tmp_path / "teacher" / "view-logits").glob("*.safetensors"))) == 1
    again = cached_view_logits(logits, best, images, views, **quiet)
    assert calls[0] == 6 * 18  # read back, the teacher not run again
    torch.testing.assert_close(again.logits, first.logits, rtol=0, atol=0)
    assert again.build_minutes == pytest.approx(first.build_minutes)  # the build's cost travels with the logits

    cached_view_logits(logits, best, images[:5], views, **quiet)  # other data: built anew
    assert calls[0] == 6 * 18 + 5 * 18
    save_model(tiny_teacher(seed=2), best)  # the teacher retrained in place: its old logits are not served
    calls2, logits2 = counting_logits(tiny_teacher(seed=2))
    rebuilt = cached_view_logits(logits2, best, images, views, **quiet)
    assert calls2[0] == 6 * 18 and not torch.equal(rebuilt.logits, first.logits)
    cached_view_logits(logits2, best, images, views, **{**quiet, "teacher_setting": "bf16"})  # its precision too
    assert calls2[0] == 2 * 6 * 18


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST not installed (/usr/share/datasets/fashion-mnist)")
def test_distill_with_cached_teacher_views_on_a_fashion_mnist_subset(tmp_path, capsys):
    data = ["--data", "fashion-mnist", "--limit", "200", "--epochs", "1", "--batch-size", "32"]
    teacher = tmp_path / "teacher"
    assert main(["train", "classify", "--model", "resnet-mini-28", *data, "--out", str(teacher)]) == 0
    distill = ["distill", "--teacher", str(teacher / "best"), "--student", "vit-fmnist-28-fast", *data]
    student = tmp_path / "student"
    assert main([*distill, "--kind", "response", "--cache-teacher-views", "--erasing", "0", "--out", str(student)]) == 0
    results = json.loads((student / "results.json").read_text())
    assert results["teacher_view_logits_minutes"] > 0 and 0 <= results["test_acc"] <= 1
    config = json.loads((student / "best" / "config.json").read_text())
    assert config["distill"]["cache_views"] is True
    cache_files = list((teacher / "view-logits").glob("*.safetensors"))
    assert len(cache_files) == 1 and (teacher / "best").is_dir()

    # DIST reads logits only too: it trains on the same cache, which is looked up, not built again
    dist = [*distill, "--kind", "dist", "--temperature", "1", "--cache-teacher-views", "--erasing", "0"]
    assert main([*dist, "--out", str(tmp_path / "dist")]) == 0
    assert json.loads((tmp_path / "dist" / "best" / "config.json").read_text())["distill"]["kind"] == "dist"
    assert list((teacher / "view-logits").glob("*.safetensors")) == cache_files
    capsys.readouterr()

    # views no cache holds, and kinds that need more than logits, are refused before any training
    assert main([*distill, "--kind", "response", "--cache-teacher-views", "--out", str(tmp_path / "e")]) == 2
    assert "--erasing 0" in capsys.readouterr().err
    refused = [*distill, "--kind", "feature", "--cache-teacher-views", "--erasing", "0", "--out", str(tmp_path / "f")]
    assert main(refused) == 2
    assert "--kind response, dist or deit" in capsys.readouterr().err
    assert not Path(tmp_path / "e").exists() and not Path(tmp_path / "f").exists()

    # two teachers: each one's views are cached beside its own checkpoint (the first's reused, not rebuilt),
    # and the student learns their ensemble; kinds that read a teacher's features refuse an ensemble
    second = tmp_path / "teacher2"
    assert main(["train", "classify", "--model", "resnet-mini-28", *data, "--seed", "1", "--out", str(second)]) == 0
    both = ["distill", "--teacher", str(teacher / "best"), "--teacher", str(second / "best")]
    both += ["--student", "vit-fmnist-28-fast", *data]
    ensemble = tmp_path / "ensemble"
    matching = ["--kind", "response", "--alpha", "1", "--temperature", "1", "--cache-teacher-views", "--erasing", "0"]
    assert main([*both, *matching, "--out", str(ensemble)]) == 0
    assert list((teacher / "view-logits").glob("*.safetensors")) == cache_files
    assert len(list((second / "view-logits").glob("*.safetensors"))) == 1
    config = json.loads((ensemble / "best" / "config.json").read_text())
    assert config["distill"]["teacher"] == [str(teacher / "best"), str(second / "best")]
    results = json.loads((ensemble / "results.json").read_text())
    assert results["teacher_view_logits_minutes"] > 0 and 0 <= results["test_acc"] <= 1
    capsys.readouterr()
    relation = [*both, "--kind", "relation", "--out", str(tmp_path / "r")]
    assert main(relation) == 2
    assert "an ensemble answers with logits only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
