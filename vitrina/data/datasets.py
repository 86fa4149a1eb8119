"""Torch datasets over image-caption pairs and labelled image arrays.

An image source is a file path, a PIL image or a uint8 array (H, W) / (H, W, C). A file that cannot
be decoded is reported once (a warning naming it and the reason) and replaced by the next readable
item, so one bad file never stops a training run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitrina.data.images import BadImageError, load_image, to_rgb
from vitrina.errors import UserError

ImageSource = str | os.PathLike | np.ndarray | Image.Image
Caption = str | Sequence[str]  # several captions: one is drawn each time the item is read
Transform = Callable[[Image.Image], torch.Tensor]


def open_source(source: ImageSource) -> Image.Image:
    """The RGB picture of one image source (``BadImageError`` for an unusable file)."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return to_rgb(Image.fromarray(source))
    return load_image(source)


def _describe(source: ImageSource) -> str:
    return os.fspath(source) if isinstance(source, str | Path | os.PathLike) else type(source).__name__


class ImageCaptionDataset(Dataset):
    """``(pixels, caption)`` items; ``bad`` maps the index of each unreadable item to its reason."""

    def __init__(self, items: Sequence[tuple[ImageSource, Caption]], transform: Transform) -> None:
        for i, (source, caption) in enumerate(items):
            texts = [caption] if isinstance(caption, str) else list(caption)
            if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
                raise UserError(f"item {i} ({_describe(source)}): empty caption; every image needs a caption text")
        self.items, self.transform = list(items), transform
        self.bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _caption(self, caption: Caption) -> str:
        if isinstance(caption, str):
            return caption
        return caption[int(torch.randint(len(caption), ()).item())]  # torch RNG: seeded per worker

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        for step in range(len(self.items)):
            i = (index + step) % len(self.items)
            if i in self.bad:
                continue
            source, caption = self.items[i]
            try:
                image = open_source(source)
            except BadImageError as error:
                self.bad[i] = error.reason
                warnings.warn(f"{error}; skipped, the next readable item is used instead", UserWarning, stacklevel=2)
                continue
            return self.transform(image), self._caption(caption)
        raise UserError(f"none of the {len(self.items)} images can be read; see the warnings above")


class LabelledImageDataset(Dataset):
    """``(pixels, class index)`` over an array of images (N, H, W[, C]) or a list of image sources."""

    def __init__(self, images: np.ndarray | Sequence[ImageSource], labels: Sequence[int], transform: Transform) -> None:
        if len(images) != len(labels):
            raise UserError(f"{len(images)} images but {len(labels)} labels; give one label per image")
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_source(self.images[index])), int(self.labels[index])
