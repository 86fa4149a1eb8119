"""The teacher's logits for every view the training augmentation can draw, computed once (FKD-style).

The in-memory augmentation of ``classify_data.BatchAugment`` without random erasing draws each
image's view from a finite set: a shift (dy, dx) of the ``pad``-px zero-padded image, each in
[0, 2 pad], and a horizontal flip: (2 pad + 1)^2 x 2 views, 50 at the default pad of 2. So the
teacher's answer for any training step is one of N x 50 vectors, which are computed once, stored
beside the teacher checkpoint and looked up: the student then trains at the rate of a scratch run,
on exactly the soft targets an online teacher would give (up to bf16 rounding, when the teacher runs
under it). The teacher's work does not vanish, it moves out of the student's budget: the build's
minutes are kept with the logits and reported next to the teacher's training minutes.

A view is an integer ``((dy * (2 pad + 1)) + dx) * 2 + flip``; ``ShiftFlipViews.draw`` draws them
uniformly, which is the distribution of ``random_flip(random_crop(x, pad))`` (dy, dx and the flip
independent and uniform).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vitrina.atomic import atomic_write
from vitrina.checkpoint import read_config, weights_digest
from vitrina.train.classify_data import shifted_crop, to_unit

# pixels (B, C, H, W) in [0, 1] -> the teacher's logits (B, K), float32
TeacherLogits = Callable[[torch.Tensor], torch.Tensor]

FORMAT = "vitrina-teacher-view-logits-1"


@dataclass(frozen=True)
class ShiftFlipViews:
    """The views of a ``pad``-px shift crop and a horizontal flip, numbered 0 .. ``count`` - 1."""

    pad: int

    @property
    def count(self) -> int:
        return (2 * self.pad + 1) ** 2 * 2

    def draw(self, batch: int) -> torch.Tensor:
        """(B,) view numbers, uniform (torch's global RNG, as the batch augmentation draws)."""
        return torch.randint(0, self.count, (batch,))

    def apply(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels and (B,) view numbers -> (B, C, H, W) float in [0, 1]: each image's view."""
        side = 2 * self.pad + 1
        flip, offset = views % 2, views // 2
        x = shifted_crop(to_unit(images), offset // side, offset % side, self.pad)
        return torch.where(flip.bool()[:, None, None, None], x.flip(-1), x)


def cache_key(teacher_dir: Path, images: torch.Tensor, views: ShiftFlipViews, teacher_setting: str) -> str:
    """What the cached logits depend on: the teacher's weights (the digest its checkpoint records), the
    training images, the views and ``teacher_setting`` (how the teacher runs: its precision); sha256,
    hex, 16 characters."""
    digest = hashlib.sha256()
    weights = weights_digest(teacher_dir, read_config(teacher_dir))
    digest.update(f"{FORMAT}|{weights}|pad={views.pad}|{teacher_setting}|{tuple(images.shape)}|".encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def teacher_view_logits(
    teacher_logits: TeacherLogits,
    images: torch.Tensor,
    views: ShiftFlipViews,
    *,
    batch_size: int = 128,
    progress: bool = True,
) -> torch.Tensor:
    """(N, V, K) float32: the teacher's logits for every image (N, C, H, W) in every view."""
    n = len(images)
    out: torch.Tensor | None = None
    bar = tqdm(total=n * views.count, desc="teacher view logits", unit="img", disable=not progress, mininterval=5)
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        for view in range(views.count):
            logits = teacher_logits(views.apply(batch, torch.full((len(batch),), view)))
            if out is None:
                out = torch.empty(n, views.count, logits.shape[1])
            out[start : start + len(batch), view] = logits
            bar.update(len(batch))
    bar.close()
    return out


@dataclass
class ViewLogits:
    """The cached logits (N, V, K) and the minutes their build took; ``self[index, view]`` -> (B, K)."""

    logits: torch.Tensor
    build_minutes: float

    def __getitem__(self, key: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        index, view = key
        return self.logits[index, view]

    def save(self, path: Path) -> None:
        metadata = {"format": FORMAT, "build_minutes": repr(self.build_minutes)}
        atomic_write(path, lambda tmp: save_file({"logits": self.logits}, os.fspath(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> ViewLogits:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return cls(load_file(os.fspath(path))["logits"], float(metadata.get("build_minutes", "nan")))


def cached_view_logits(
    teacher_logits: TeacherLogits,
    teacher_dir: Path,
    images: torch.Tensor,
    views: ShiftFlipViews,
    *,
    teacher_setting: str,
    progress: bool = True,
    log=print,
) -> ViewLogits:
    """The view logits of the teacher checkpoint ``teacher_dir`` for ``images``: read from beside it when
    built before, else built and written there (``<teacher_dir>/../view-logits/<key>.safetensors``, next
    to the checkpoint folder, which stays as it was saved; a read-only folder only logs)."""
    key = cache_key(teacher_dir, images, views, teacher_setting)
    path = teacher_dir.parent / "view-logits" / f"{key}.safetensors"
    if path.is_file():
        cached = ViewLogits.load(path)
        log(f"teacher view logits: {path} ({cached.build_minutes:.1f} min to build, reused)")
        return cached
    started = time.perf_counter()
    log(f"teacher view logits: {len(images):,} images x {views.count} views, built once into {path}")
    logits = teacher_view_logits(teacher_logits, images, views, progress=progress)
    cached = ViewLogits(logits, (time.perf_counter() - started) / 60)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cached.save(path)
    except OSError as err:
        log(f"teacher view logits: not saved ({err}); the next run builds them again")
    return cached
