"""Labelled images for supervised training: the splits, the fast batch path and the model's preprocessing.

Two sources:

* ``fashion-mnist``: its own 10k test split; a seeded, stratified 10% of the 60k training images
  is held out for validation. Images stay uint8 tensors ``(N, 1, 28, 28)`` and are augmented a whole
  batch at a time with torch ops (random crop from a zero-padded image, horizontal flip, random
  erasing): on 2 cores a per-image PIL pipeline would cost more than the model's step.
* an image folder (ImageFolder / Caltech-256 layout, one folder per class): a seeded stratified
  80/10/10 train/val/test split; photos are decoded per image (random resized crop + flip).

Every batch leaves the data path as float pixels in [0, 1]; ``Preprocess`` then makes the input a
given model wants (its image size, channel count and normalisation), so a teacher and a student
with different sizes can both see the same augmented batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vitrina.data.datasets import open_source
from vitrina.data.splits import stratified_split
from vitrina.data.transforms import EvalTransform, TrainTransform
from vitrina.errors import UserError

FASHION_MNIST = "fashion-mnist"
# Per-channel statistics of the Fashion-MNIST training images (pixels in [0, 1]).
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)
PHOTO_MEAN = (0.5, 0.5, 0.5)
PHOTO_STD = (0.5, 0.5, 0.5)
FOLDER_SPLIT = (0.8, 0.1, 0.1)


# --- splits ------------------------------------------------------------------------------------


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of about ``count`` items, every class in proportion (for smoke runs)."""
    if count >= len(labels):
        return np.arange(len(labels))
    keep, _ = stratified_split(labels, (count / len(labels), 1 - count / len(labels)), seed)
    return keep


# --- the data ----------------------------------------------------------------------------------


@dataclass
class ImageSplit:
    """One split: uint8 images ``(N, 1, H, W)`` (a tensor) or image files (paths), with class indices."""

    images: torch.Tensor | list[Path]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, torch.Tensor)


@dataclass
class ClassificationData:
    """Train/val/test splits and the class names (index -> name)."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    class_names: list[str]
    source: str  # "fashion-mnist" or the folder, for the checkpoint's record

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    @property
    def mean(self) -> tuple[float, float, float]:
        return FASHION_MNIST_MEAN if self.train.in_memory else PHOTO_MEAN

    @property
    def std(self) -> tuple[float, float, float]:
        return FASHION_MNIST_STD if self.train.in_memory else PHOTO_STD


def _fashion_mnist(val_fraction: float, limit: int | None, seed: int) -> ClassificationData:
    from vitrina.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    if limit is not None:
        keep = stratified_subset(labels, limit, seed)
        images, labels = images[keep], labels[keep]
        keep = stratified_subset(test_labels, limit, seed)
        test_images, test_labels = test_images[keep], test_labels[keep]
    train_idx, val_idx = stratified_split(labels, (1 - val_fraction, val_fraction), seed)

    def split(x: np.ndarray, y: np.ndarray) -> ImageSplit:
        # a copy: the IDX arrays are read-only views of the file bytes, and torch wants writable memory
        return ImageSplit(torch.from_numpy(np.array(x, copy=True))[:, None], torch.from_numpy(y).long())

    return ClassificationData(
        train=split(images[train_idx], labels[train_idx]),
        val=split(images[val_idx], labels[val_idx]),
        test=split(test_images, test_labels),
        class_names=list(FASHION_MNIST_CLASSES),
        source=FASHION_MNIST,
    )


def _folder(root: Path, fraction: float | None, limit: int | None, seed: int) -> ClassificationData:
    from vitrina.data.folder import scan_collection, stratified_fraction

    entries = [e for e in scan_collection(root) if e.label is not None]
    if fraction is not None:
        entries = stratified_fraction(entries, fraction, seed)
    class_names = sorted({e.label for e in entries})
    if len(class_names) < 2:
        raise UserError(
            f"{root}: found {len(class_names)} class folder(s) with images; "
            "a classifier needs at least two (one sub-folder of images per class)"
        )
    label2id = {name: i for i, name in enumerate(class_names)}
    paths = np.asarray([e.path for e in entries], dtype=object)
    labels = np.asarray([label2id[e.label] for e in entries], dtype=np.int64)
    if limit is not None:
        keep = stratified_subset(labels, limit, seed)
        paths, labels = paths[keep], labels[keep]
    parts = stratified_split(labels, FOLDER_SPLIT, seed)
    train, val, test = (ImageSplit(list(paths[i]), torch.from_numpy(labels[i])) for i in parts)
    if len(val) == 0 or len(test) == 0:
        raise UserError(f"{root}: too few images per class for an 80/10/10 split; give at least 3 per class")
    return ClassificationData(train, val, test, class_names, source=os.fspath(root))


def load_classification_data(
    spec: str, *, fraction: float | None = None, limit: int | None = None, val_fraction: float = 0.1, seed: int = 0
) -> ClassificationData:
    """``fashion-mnist`` or a folder of class folders -> the three splits.

    ``fraction``: a stratified share of a folder's images (Caltech-256 is large). ``limit``: at most
    about that many images in each of the pools split (smoke runs). Splits are seeded by ``seed``.
    """
    if limit is not None and limit < 20:
        raise UserError(f"--limit {limit}: too few images to split; use at least 20")
    if spec == FASHION_MNIST:
        if fraction is not None:
            limit = round(60_000 * fraction) if limit is None else min(limit, round(60_000 * fraction))
        return _fashion_mnist(val_fraction, limit, seed)
    root = Path(spec)
    if not root.is_dir():
        raise UserError(
            f"--data {spec!r}: not 'fashion-mnist' and no such folder; give a folder with one sub-folder per class"
        )
    return _folder(root, fraction, limit, seed)


# --- from a split to batches of pixels in [0, 1] -----------------------------------------------


class IndexedImages(Dataset):
    """``(pixels, label, index)`` items; the index lets a trainer look up cached teacher outputs.

    In-memory images come out as uint8 ``(1, H, W)`` (the batch is augmented later, as a whole);
    files are decoded and transformed here into float ``(3, size, size)`` in [0, 1].
    """

    def __init__(self, split: ImageSplit, *, size: int, augment: bool) -> None:
        self.split = split
        self.transform = None
        if not split.in_memory:
            unit = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # leave pixels in [0, 1]
            self.transform = TrainTransform(size, scale=(0.35, 1.0), **unit) if augment else EvalTransform(size, **unit)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        label = int(self.split.labels[index])
        if self.transform is None:
            return self.split.images[index], label, index
        return self.transform(open_source(self.split.images[index])), label, index


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1]; float pixels pass through."""
    return pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels


def random_crop(images: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): each image shifted by up to ``pad`` px (zero padding), torch RNG."""
    B = images.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (B,))
    dx = torch.randint(0, 2 * pad + 1, (B,))
    return shifted_crop(images, dy, dx, pad)


def shifted_crop(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): the H x W window at offset (dy, dx) (each (B,), in [0, 2 pad]) of the
    image zero-padded by ``pad`` px on every side: ``dy = dx = pad`` is the image itself."""
    B, C, H, W = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy, dx = dy.view(B, 1), dx.view(B, 1)
    rows = (dy + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(W))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(B)[:, None, None, None]
    channel = torch.arange(C)[None, :, None, None]
    return padded[batch, channel, rows, cols]  # (B, C, H, W)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W): each image mirrored left-right with probability 1/2."""
    flip = torch.rand(images.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_erasing(
    images: torch.Tensor, *, p: float = 0.25, area: tuple[float, float] = (0.02, 0.25), aspect: float = 3.0
) -> torch.Tensor:
    """(B, C, H, W) in [0, 1]: with probability ``p`` a random rectangle of each image becomes noise.

    Rectangle area is a uniform share in ``area`` of the image, log-uniform aspect in [1/aspect, aspect].
    """
    B, _, H, W = images.shape
    share = torch.empty(B).uniform_(*area)
    ratio = torch.exp(torch.empty(B).uniform_(-np.log(aspect), np.log(aspect)))
    h = (share * H * W * ratio).sqrt().round().clamp(1, H).long()  # (B,)
    w = (share * H * W / ratio).sqrt().round().clamp(1, W).long()
    top = (torch.rand(B) * (H - h + 1)).long()
    left = (torch.rand(B) * (W - w + 1)).long()
    rows, cols = torch.arange(H)[None, :], torch.arange(W)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, H)
    inside_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, W)
    chosen = torch.rand(B) < p
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :] & chosen[:, None, None])[:, None]  # (B, 1, H, W)
    return torch.where(mask, torch.rand_like(images), images)


@dataclass
class BatchAugment:
    """The in-memory (Fashion-MNIST) augmentation, applied to a whole batch: crop, flip, erasing."""

    pad: int = 2
    erasing: float = 0.25

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float (B, C, H, W) -> augmented float (B, C, H, W) in [0, 1]."""
        x = random_flip(random_crop(to_unit(pixels), self.pad))
        return random_erasing(x, p=self.erasing) if self.erasing > 0 else x


@dataclass
class Preprocess:
    """Pixels in [0, 1] -> what one model takes: its image size, channel count and normalisation."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    in_channels: int = 3

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [0, 1] -> (B, in_channels, image_size, image_size) normalised."""
        x = to_unit(pixels)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB: the same plane three times
        elif x.shape[1] == 3 and self.in_channels == 1:
            x = x.mean(dim=1, keepdim=True)
        mean = torch.tensor(self.mean[: self.in_channels]).view(1, -1, 1, 1)
        std = torch.tensor(self.std[: self.in_channels]).view(1, -1, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


def unit_pixels(split: ImageSplit, size: int, batch_size: int = 512) -> torch.Tensor:
    """A whole (val/test) split as un-augmented pixels in [0, 1]: uint8 kept for in-memory data."""
    if split.in_memory:
        return split.images
    dataset = IndexedImages(split, size=size, augment=False)
    return torch.stack([dataset[i][0] for i in range(len(dataset))]) if len(dataset) else torch.zeros(0, 3, size, size)
