"""Fashion-MNIST from its IDX files (Debian ``dataset-fashion-mnist``), and its export as an image folder.

IDX: a big-endian header (magic number, then one 32-bit count per dimension) followed by the raw
bytes. Magic 2051 = unsigned bytes in 3 dimensions (images), 2049 = 1 dimension (labels).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from vitrina.atomic import atomic_write
from vitrina.errors import UserError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with: sudo apt-get install dataset-fashion-mnist (or run make setup)"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# How each class reads inside a caption ("a photo of trousers.", "a photo of a t-shirt.")
FASHION_MNIST_PROMPT_NAMES = (
    "t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
_PREFIX = {"train": "train", "test": "t10k"}

Split = Literal["train", "test"]


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """The array in one IDX file (``.gz`` or plain), checked against ``magic`` and its declared size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            blob = f.read()
    except (OSError, EOFError) as error:
        raise UserError(f"{path}: cannot read ({error}); reinstall the data set, {INSTALL_HINT}") from None
    if len(blob) < 8:
        raise UserError(f"{path}: too short for an IDX header ({len(blob)} bytes); the file is damaged")
    (found,) = struct.unpack(">I", blob[:4])
    if found != magic:
        raise UserError(f"{path}: magic number {found}, expected {magic}; is this the right IDX file?")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise UserError(f"{path}: too short for an IDX header ({len(blob)} bytes); the file is damaged")
    shape = struct.unpack(f">{ndim}I", blob[4:header])
    expected = int(np.prod(shape))
    if len(blob) - header != expected:
        raise UserError(
            f"{path}: header promises {expected} data bytes, file has {len(blob) - header}; the file is damaged"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"{root / name}.gz: Fashion-MNIST not found; {INSTALL_HINT}")


def load_fashion_mnist(split: Split = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: uint8 (N, 28, 28) and int64 (N,) for the ``train`` (60k) or ``test`` (10k) split."""
    if split not in _PREFIX:
        raise UserError(f"Fashion-MNIST split {split!r}: use 'train' or 'test'")
    root = Path(root) if root is not None else DEFAULT_ROOT
    prefix = _PREFIX[split]
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), IMAGES_MAGIC)
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"{root}: {len(images)} {split} images but {len(labels)} labels; reinstall, {INSTALL_HINT}")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UserError(f"{root}: label {labels.max()} out of range 0-9; reinstall, {INSTALL_HINT}")
    return images, labels


def class_folder(label: int) -> str:
    """The folder name of a class in an exported collection (scans back to the prompt name)."""
    return FASHION_MNIST_PROMPT_NAMES[label].replace(" ", "_")


def export_fashion_mnist(
    split: Split, out: str | os.PathLike, *, limit: int | None = None, root: str | os.PathLike | None = None
) -> int:
    """Write the first ``limit`` images of ``split`` as ``out/<class>/NNNNN.png``; returns how many.

    Files already there are kept (so a re-index sees nothing changed); each new file is written to a
    temporary name and renamed, so a killed export leaves no half-written PNG.
    """
    images, labels = load_fashion_mnist(split, root)
    count = len(images) if limit is None else max(0, min(limit, len(images)))
    out = Path(out)
    for name in {class_folder(int(y)) for y in labels[:count]}:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        target = out / class_folder(int(labels[i])) / f"{i:05d}.png"
        if target.exists():
            continue
        picture = Image.fromarray(images[i], "L")
        atomic_write(target, lambda tmp, picture=picture: picture.save(tmp, format="PNG"), durable=False)
    return count
