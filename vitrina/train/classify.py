"""Supervised image classification on the shared loop (``vitrina train classify``).

1. ``load_classification_data`` gives the train/val/test splits (``classify_data``).
2. Each step augments the batch (in-memory images: as one tensor op; files: per image), turns it into
   the model's input with its ``Preprocess``, and takes the loss (label-smoothed cross-entropy, or
   a distillation objective that a caller passes in).
3. After each epoch: validation accuracy and loss. The best-on-validation model is copied to
   ``OUT/best`` (a complete checkpoint folder) whenever it improves.
4. At the end the best model is evaluated on the test split: ``OUT/results.json`` (accuracy,
   per-class accuracy, confusion matrix) and ``OUT/confusion.png``.

With ``ClassifySettings.tta`` every evaluation (validation and test) averages the logits of each
image and of its horizontal flip (``results.json``: ``"tta": true``). ``tta_shift`` adds, at the
final test only, the image shifted by that many px up, down, left and right, each with its flip: 10
views instead of 2 (``"tta_views": 10``); the per-epoch validation keeps the 2 flip views, 5x cheaper.
With ``TrainConfig.ema_decay`` the model evaluated and saved is the loop's weight average (``"ema": true``).

Under ``torchrun`` the loop trains data-parallel (``--batch-size`` is the global batch); rank 0
keeps ``OUT/best``, runs the test and writes the results, which every rank returns.

A checkpoint's ``config.json`` carries ``label2id`` / ``id2label`` and the ``preprocess`` (image
size, mean, std) its inputs need, so it can be used without the data it was trained on.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitrina.atomic import atomic_write
from vitrina.checkpoint import CONFIG, WEIGHTS, load_model, save_model
from vitrina.config import TrainConfig, to_dict
from vitrina.errors import UserError
from vitrina.models.registry import build_from_config, kind_of, preset_config
from vitrina.train import distributed
from vitrina.train.checkpointing import read_train_meta
from vitrina.train.classify_data import (
    BatchAugment,
    ClassificationData,
    IndexedImages,
    Preprocess,
    to_unit,
    unit_pixels,
)
from vitrina.train.loop import CheckpointInfo, StepOutput, TrainSummary, train

BEST = "best"
RESULTS = "results.json"
CONFUSION_PNG = "confusion.png"

# loss_fn(pixels in [0, 1] (B, C, H, W), labels (B,), item indices (B,)) -> StepOutput
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], StepOutput]


@dataclass
class ClassifySettings:
    """Classification settings on top of ``TrainConfig``.

    ``augment``: crop/flip/erasing for in-memory images, random resized crop + flip for files.
    ``crop_pad``: max shift in px of the in-memory random crop. ``erasing``: probability of random
    erasing per image. ``eval_batch_size``: images per forward pass when evaluating. ``tta``:
    evaluate on the mean logits of each image and its horizontal flip. ``tta_shift`` (px, with
    ``tta``): the test also averages the views shifted by that much in each of 4 directions, and their
    flips (``tta_views``); validation, run every epoch, keeps the flips only.
    """

    label_smoothing: float = 0.1
    augment: bool = True
    crop_pad: int = 2
    erasing: float = 0.25
    eval_batch_size: int = 500
    tta: bool = False
    tta_shift: int = 0

    def validate(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing {self.label_smoothing}: must be in [0, 1)")
        if self.crop_pad < 0:
            raise UserError(f"--crop-pad {self.crop_pad} (crop_pad): a shift in px, must be >= 0")
        if not 0 <= self.erasing <= 1:
            raise UserError(f"--erasing {self.erasing}: a probability, must be in [0, 1]")
        if self.tta_shift < 0:
            raise UserError(f"--tta-shift {self.tta_shift}: a shift in px, must be >= 0")
        if self.tta_shift and not self.tta:
            raise UserError(f"--tta-shift {self.tta_shift} adds shifted views to the flip TTA: give --tta too")


def build_classifier(preset: str, num_classes: int, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A fresh ViT / Swin / CNN of ``preset`` with a ``num_classes``-way head (``overrides`` set config fields)."""
    config = preset_config(preset)
    if kind_of(config) == "clip":
        raise UserError(f"{preset} is a CLIP preset; classify with an image model, or use --init CLIP_CHECKPOINT")
    config.num_classes = num_classes
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise UserError(f"{preset}: a {kind_of(config)} has no setting {name!r}")
        setattr(config, name, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_from_config(config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def logits_of(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A model's class logits; a DeiT-style (cls, dist) pair in train mode counts as their average."""
    return (output[0] + output[1]) / 2 if isinstance(output, tuple) else output


def tta_view_count(tta: bool, shift: int = 0) -> int:
    """Views per image of a test-time augmentation: 1 without, 2 with flips, 10 with flips and shifts."""
    return 1 if not tta else 10 if shift else 2


def shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(B, C, H, W) moved ``dx`` px right and ``dy`` px down, the uncovered border zero (as the training crop pads)."""
    pad = max(abs(dx), abs(dy))
    height, width = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad))
    return padded[..., pad - dy : pad - dy + height, pad - dx : pad - dx + width]


def tta_views(images: torch.Tensor, shift: int = 0) -> list[torch.Tensor]:
    """The views flip TTA averages: each image and its horizontal flip; with ``shift`` (px) also the images
    shifted that far right, left, down and up, and their flips (10 views)."""
    views = [images]
    if shift:
        views += [shifted(images, dx, dy) for dx, dy in ((shift, 0), (-shift, 0), (0, shift), (0, -shift))]
    return views + [view.flip(-1) for view in views]


@torch.no_grad()
def predict(
    model: nn.Module,
    pixels: torch.Tensor,
    preprocess: Preprocess,
    batch_size: int = 500,
    *,
    tta: bool = False,
    tta_shift: int = 0,
) -> torch.Tensor:
    """(N, C, H, W) pixels (uint8 or [0, 1]) -> (N, classes) logits, in eval mode.

    ``tta``: the mean logits over the image and its flip; ``tta_shift``: also over its shifted views
    (``tta_views``; the shifts are taken in pixel space, before normalisation, so the border is black).
    """
    was_training = model.training
    model.eval()

    def forward(unit: torch.Tensor) -> torch.Tensor:
        if not tta:
            return logits_of(model(preprocess(unit)))
        views = tta_views(to_unit(unit), tta_shift)
        return torch.stack([logits_of(model(preprocess(view))) for view in views]).mean(dim=0)

    try:
        chunks = [forward(x) for x in pixels.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes).numpy()


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.55 * n))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def checkpoint_extra(data: ClassificationData, preprocess: Preprocess, **more: Any) -> dict[str, Any]:
    """What a classifier checkpoint records beside the weights: the labels and the input it needs."""
    return {
        "label2id": data.label2id,
        "id2label": {str(i): name for i, name in enumerate(data.class_names)},
        "preprocess": preprocess.to_dict(),
        "data": data.source,
        **more,
    }


def preprocess_of(config: dict[str, Any], model: nn.Module) -> Preprocess:
    """The ``Preprocess`` a classifier checkpoint recorded (or its model's image size, mean/std 0.5)."""
    saved = config.get("preprocess") or {}
    mc = model.config
    size = saved.get("image_size", mc.image_size)
    mean, std = tuple(saved.get("mean", (0.5,) * 3)), tuple(saved.get("std", (0.5,) * 3))
    return Preprocess(size, mean, std, in_channels=mc.in_channels)


def _copy_checkpoint(folder: Path, target: Path) -> None:
    """Make ``target`` a copy of checkpoint ``folder``'s model files, switched in by one rename."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in (WEIGHTS, CONFIG, "tokenizer.json"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, tmp / name)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def keep_best(out_dir: Path) -> Callable[[CheckpointInfo], None]:
    """An ``on_checkpoint`` hook: copy the checkpoint to ``out_dir/best`` when it is the best so far."""

    def hook(info: CheckpointInfo) -> None:
        best = read_train_meta(info.path).get("best")
        if best is not None and best["step"] == info.step:
            _copy_checkpoint(info.path, out_dir / BEST)

    return hook


def test_report(
    model: nn.Module,
    data: ClassificationData,
    preprocess: Preprocess,
    out_dir: Path,
    *,
    batch_size: int = 500,
    tta: bool = False,
    tta_shift: int = 0,
) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix on the test split; writes the JSON and the PNG."""
    pixels = unit_pixels(data.test, preprocess.image_size)
    logits = predict(model, pixels, preprocess, batch_size, tta=tta, tta_shift=tta_shift)
    labels = data.test.labels
    predicted = logits.argmax(dim=1)
    matrix = confusion_matrix(labels, predicted, len(data.class_names))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    results = {
        "test_acc": float((predicted == labels).float().mean()),
        "test_loss": float(F.cross_entropy(logits, labels)),
        "test_images": len(labels),
        "tta": tta,
        "tta_views": tta_view_count(tta, tta_shift),
        "per_class_acc": {name: float(a) for name, a in zip(data.class_names, per_class, strict=True)},
        "class_names": data.class_names,
        "confusion": matrix.tolist(),
    }
    plot_confusion(matrix, data.class_names, out_dir / CONFUSION_PNG, f"test accuracy {results['test_acc']:.2%}")
    (out_dir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return results


def make_eval_fn(
    classifier: nn.Module, data: ClassificationData, preprocess: Preprocess, batch_size: int, *, tta: bool = False
) -> Callable[[nn.Module], dict[str, float]]:
    """The loop's ``eval_fn``: validation accuracy and loss of ``classifier`` (pixels fixed once)."""
    pixels = unit_pixels(data.val, preprocess.image_size)
    labels = data.val.labels

    def evaluate(_: nn.Module) -> dict[str, float]:
        logits = predict(classifier, pixels, preprocess, batch_size, tta=tta)
        return {
            "val/acc": float((logits.argmax(dim=1) == labels).float().mean()),
            "val/loss": float(F.cross_entropy(logits, labels)),
        }

    return evaluate


def cross_entropy_loss(model: nn.Module, preprocess: Preprocess, label_smoothing: float) -> LossFn:
    """The plain supervised objective: label-smoothed cross-entropy of ``model``'s logits."""

    def loss_fn(pixels: torch.Tensor, labels: torch.Tensor, _: torch.Tensor) -> StepOutput:
        logits = model(preprocess(pixels))
        if isinstance(logits, tuple):  # a distilled ViT trained without a teacher: both heads learn the labels
            loss = sum(F.cross_entropy(lg, labels, label_smoothing=label_smoothing) for lg in logits) / len(logits)
        else:
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        with torch.no_grad():
            acc = float((logits_of(logits).argmax(dim=1) == labels).float().mean())
        return StepOutput(loss, len(labels), {"train_acc": acc})

    return loss_fn


@dataclass
class ClassifyOutcome:
    """What ``fit_classifier`` did: the loop's summary and the test results of the best model."""

    summary: TrainSummary
    results: dict[str, Any]
    best_dir: Path


def fit_classifier(
    *,
    trainable: nn.Module,
    classifier: nn.Module,
    loss_fn: LossFn,
    data: ClassificationData,
    preprocess: Preprocess,
    out_dir: str | os.PathLike,
    train_config: TrainConfig,
    settings: ClassifySettings | None = None,
    train_dataset: torch.utils.data.Dataset | None = None,
    prepare_batch: Callable[[torch.Tensor], torch.Tensor] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    identity: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    extra_results: dict[str, Any] | None = None,
    progress: bool = True,
) -> ClassifyOutcome:
    """Train ``trainable`` (the classifier, or a module holding it and extra trained parts) with ``loss_fn``.

    ``classifier`` is what is evaluated and saved. ``train_dataset`` replaces the default image
    dataset (e.g. cached features), ``prepare_batch`` the default augmentation and ``eval_fn`` the
    validation of ``classifier`` on the val images (it must report ``val/acc``; with ``settings.tta``
    the default one and the test report use flip TTA, a replacement decides for itself).
    ``extra_results`` join the test results (``results.json``), e.g. what a teacher cache cost.
    """
    settings = settings or ClassifySettings()
    settings.validate()
    out_dir = Path(out_dir)
    if train_dataset is None:
        train_dataset = IndexedImages(data.train, size=preprocess.image_size, augment=settings.augment)
    if prepare_batch is None:
        augment = BatchAugment(settings.crop_pad, settings.erasing)
        use_batch_augment = settings.augment and data.train.in_memory
        prepare_batch = augment if use_batch_augment else (lambda x: x)

    def step_fn(_: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> StepOutput:
        pixels, labels, index = batch
        return loss_fn(prepare_batch(pixels), labels, index)

    extra = checkpoint_extra(data, preprocess, train=to_dict(train_config), **(extra_config or {}))

    def save(_: nn.Module, folder: Path) -> None:
        save_model(classifier, folder, extra_config=extra)

    run_identity = {
        "model": to_dict(classifier.config),
        "data": {"source": data.source, "train": len(data.train), "val": len(data.val)},
        # tta picks the best epoch, so it is part of the run; left out when off, as runs before it were
        # tta_shift (the test's extra views) does not: a run may resume with another
        "settings": {k: v for k, v in to_dict(settings).items() if k != "tta_shift" and (k != "tta" or v)},
        **(identity or {}),
    }
    summary = train(
        model=trainable,
        step_fn=step_fn,
        train_data=train_dataset,
        out_dir=out_dir,
        config=train_config,
        save_fn=save,
        eval_fn=eval_fn or make_eval_fn(classifier, data, preprocess, settings.eval_batch_size, tta=settings.tta),
        param_groups=param_groups,
        run_identity=run_identity,
        best_metric="val/acc",
        higher_is_better=True,
        on_checkpoint=keep_best(out_dir),
        progress=progress,
    )
    best_dir = out_dir / BEST
    results = None
    if distributed.is_main():  # under torchrun rank 0 tests and writes; the others receive its results
        best, _ = load_model(best_dir)
        results = test_report(
            best,
            data,
            preprocess,
            out_dir,
            batch_size=settings.eval_batch_size,
            tta=settings.tta,
            tta_shift=settings.tta_shift,
        )
        results.update(
            ema=train_config.ema_decay is not None,
            best_epoch=summary.best["epoch"] if summary.best else None,
            best_val_acc=summary.best["value"] if summary.best else None,
            train_minutes=summary.total_minutes,
            epochs_done=summary.epochs_done,
            stopped_early=summary.stopped_early,
            budget_spent=summary.budget_spent,
            **(extra_results or {}),
        )
        (out_dir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return ClassifyOutcome(summary, distributed.broadcast_json(results), best_dir)


def train_classifier(
    *,
    model: nn.Module,
    data: ClassificationData,
    out_dir: str | os.PathLike,
    train_config: TrainConfig,
    settings: ClassifySettings | None = None,
    preprocess: Preprocess | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = True,
) -> ClassifyOutcome:
    """Supervised training of ``model`` (its head sized to the data's classes) with cross-entropy."""
    settings = settings or ClassifySettings()
    if model.config.num_classes != len(data.class_names):
        raise UserError(
            f"the model has {model.config.num_classes} outputs but the data {len(data.class_names)} classes"
        )
    if preprocess is None:
        preprocess = Preprocess(model.config.image_size, data.mean, data.std, in_channels=model.config.in_channels)
    return fit_classifier(
        trainable=model,
        classifier=model,
        loss_fn=cross_entropy_loss(model, preprocess, settings.label_smoothing),
        data=data,
        preprocess=preprocess,
        out_dir=out_dir,
        train_config=train_config,
        settings=settings,
        param_groups=param_groups,
        identity=identity,
        progress=progress,
    )
