"""Images for pretraining and probing, decoded once into a uint8 tensor at the backbone's size.

    fashion-mnist[:train|test[:N]]   grey (C = 1), the 10 garment classes; the train split by default
    emoji:STYLE[,STYLE...]           colour drawings, labelled by emoji category
    PATH/TO/FOLDER                   images in class folders, labelled by folder

Labels are never used by pretraining; probes use them, and ``probe_splits`` says where their train
and test sets come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitrina.data import emoji as emoji_data
from vitrina.data import fashion_mnist as fm
from vitrina.data.datasets import ImageSource, open_source
from vitrina.data.folder import scan_collection
from vitrina.data.images import BadImageError
from vitrina.data.splits import stratified_indices
from vitrina.errors import UserError

DATA_FORMS = "fashion-mnist[:train|test[:N]], emoji:STYLE[,STYLE...] or a folder of images in class folders"


@dataclass
class ImageSet:
    """``pixels`` uint8 (N, C, H, W); ``labels`` int64 (N,) indexing ``class_names``."""

    pixels: torch.Tensor
    labels: np.ndarray
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray, name: str | None = None) -> ImageSet:
        return ImageSet(
            self.pixels[torch.from_numpy(indices)], self.labels[indices], self.class_names, name or self.name
        )


def _square_uint8(image: Image.Image, size: int) -> np.ndarray:
    """Centre square crop, resize to ``size`` (bicubic) -> uint8 (3, size, size)."""
    width, height = image.size
    side = min(width, height)
    box = ((width - side) // 2, (height - side) // 2, (width - side) // 2 + side, (height - side) // 2 + side)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def decode_images(sources: Sequence[ImageSource], size: int) -> tuple[torch.Tensor, list[int]]:
    """RGB uint8 (M, 3, size, size) of every readable source, and the positions of those read."""
    arrays, kept = [], []
    for i, source in enumerate(sources):
        try:
            arrays.append(_square_uint8(open_source(source), size))
        except BadImageError:
            continue  # an unreadable file is skipped, as the training datasets do
        kept.append(i)
    if not arrays:
        raise UserError(f"none of the {len(sources)} images could be read")
    return torch.from_numpy(np.stack(arrays)), kept


def _fashion(options: list[str], size: int, seed: int) -> ImageSet:
    split = options[0] if options else "train"
    if split not in ("train", "test") or len(options) > 2:
        raise UserError(f"fashion-mnist:{':'.join(options)}: write fashion-mnist, fashion-mnist:train[:N] or :test[:N]")
    images, labels = fm.load_fashion_mnist(split)
    if len(options) == 2:
        if not options[1].isdigit() or int(options[1]) < 1:
            raise UserError(f"fashion-mnist:{split}:{options[1]}: N must be a positive whole number")
        keep = stratified_indices(labels, int(options[1]), seed)
        images, labels = images[keep], labels[keep]
    pixels = torch.from_numpy(np.array(images, dtype=np.uint8))[:, None]  # (N, 1, 28, 28), a writable copy
    if size != pixels.shape[-1]:
        resized = torch.nn.functional.interpolate(pixels.float(), size=(size, size), mode="bicubic", antialias=True)
        pixels = resized.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(pixels, labels.astype(np.int64), list(fm.FASHION_MNIST_CLASSES), f"fashion-mnist:{split}")


def _labelled(paths: Sequence[Path], names: Sequence[str], size: int, data_name: str) -> ImageSet:
    class_names = sorted(set(names))
    ids = {n: i for i, n in enumerate(class_names)}
    pixels, kept = decode_images(paths, size)
    labels = np.array([ids[names[i]] for i in kept], dtype=np.int64)
    return ImageSet(pixels, labels, class_names, data_name)


def load_image_set(spec: str, image_size: int, *, seed: int = 0) -> ImageSet:
    """The images (and labels) ``spec`` names, at ``image_size`` (see the module docstring)."""
    name, *options = spec.strip().split(":")
    if name == "fashion-mnist":
        return _fashion(options, image_size, seed)
    if name == "emoji":
        if len(options) != 1 or not options[0]:
            raise UserError(f"--data {spec!r}: emoji needs styles, e.g. emoji:apple,google")
        paths, categories = [], []
        for style in options[0].split(","):
            for item in emoji_data.load_emoji(style):
                paths.append(item.path)
                categories.append(item.category)
        return _labelled(paths, categories, image_size, spec)
    if Path(spec).is_dir():
        entries = [e for e in scan_collection(spec) if e.label]
        if not entries:
            raise UserError(f"{spec}: no image inside a class folder; sort the images into one folder per class")
        return _labelled([e.path for e in entries], [e.label for e in entries], image_size, spec)
    raise UserError(f"--data {spec!r}: not a known source or folder; use {DATA_FORMS}")


def probe_splits(spec: str, image_size: int, *, seed: int = 0, test_fraction: float = 0.3) -> tuple[ImageSet, ImageSet]:
    """(train, test) for a probe: Fashion-MNIST's own train/test splits; for any other source a
    seeded stratified split holding out ``test_fraction`` of every class."""
    name = spec.split(":")[0]
    if name == "fashion-mnist":
        if spec not in ("fashion-mnist", "fashion-mnist:train", "fashion-mnist:test"):
            raise UserError(f"--data {spec!r}: probes use both splits; write just fashion-mnist (use --limit-train)")
        return _fashion(["train"], image_size, seed), _fashion(["test"], image_size, seed)
    full = load_image_set(spec, image_size, seed=seed)
    test = stratified_indices(full.labels, round(test_fraction * len(full)), seed)
    train = np.setdiff1d(np.arange(len(full)), test)
    return full.subset(train, f"{full.name} (train part)"), full.subset(test, f"{full.name} (test part)")


def cross_source_splits(
    train_spec: str, test_spec: str, image_size: int, *, seed: int = 0
) -> tuple[ImageSet, ImageSet]:
    """(train, test) from two sources, e.g. three emoji styles -> the fourth: how well features carry
    over to a drawing style (or collection) the probe never saw. Labels are matched by class name;
    test images of a class the train source lacks are left out (the count is in the set's name)."""
    train = load_image_set(train_spec, image_size, seed=seed)
    test = load_image_set(test_spec, image_size, seed=seed)
    ids = {name: i for i, name in enumerate(train.class_names)}
    names = [test.class_names[label] for label in test.labels]
    keep = np.array([i for i, name in enumerate(names) if name in ids], dtype=np.int64)
    if len(keep) == 0:
        raise UserError(f"--data {test_spec!r} shares no class name with --train-data {train_spec!r}")
    left_out = len(test) - len(keep)
    name = test.name + (f" ({left_out} of an unseen class left out)" if left_out else "")
    labels = np.array([ids[names[i]] for i in keep], dtype=np.int64)
    return train, replace(test.subset(keep, name), labels=labels, class_names=train.class_names)
