"""Image -> normalised tensor. Geometry is done on the PIL image (cheap at small sizes), then one
uint8 -> float conversion; no torchvision pipeline objects, so the transforms pickle into workers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vitrina.data.images import to_rgb

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
RESAMPLE = Image.Resampling.BICUBIC


class _ToTensor:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
        return self.normalize(pixels)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) pixels 0..255 -> float32 ``(pixels - 255 mean) / (255 std)``, in a new tensor.

        In place on one float copy: the same two roundings as ``(x - m) / s``, without allocating (and
        page-faulting) a fresh tensor per operation, which costs more than the arithmetic on a large batch.
        """
        return pixels.to(torch.float32, copy=True).sub_(self.mean).div_(self.std)


class EvalTransform:
    """Shorter side to ``size`` (bicubic), centre crop ``size`` x ``size``, normalise."""

    def __init__(self, size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> None:
        self.size, self.to_tensor = size, _ToTensor(mean, std)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def describe(self) -> dict:
        """The preprocessing as data (an index records it per version; exports carry it)."""
        return {
            "size": self.size,
            "resize": "shorter side to size, centre crop",
            "interpolation": "bicubic",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def geometry(self, image: Image.Image) -> Image.Image:
        """Shorter side to ``size`` (bicubic), centre crop: the ``size`` x ``size`` RGB picture the tower sees."""
        width, height = image.size
        scale = self.size / min(width, height)
        new = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        if new != image.size:
            image = image.resize(new, RESAMPLE)
        left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
        if new != (self.size, self.size):
            image = image.crop((left, top, left + self.size, top + self.size))
        return image

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """The geometry step only, as a (3, size, size) uint8 tensor: 4x less to move between processes,
        normalised later for a whole batch at once (``normalize``)."""
        return torch.from_numpy(np.array(to_rgb(self.geometry(image)), dtype=np.uint8)).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 -> float, normalised as ``__call__`` would (same arithmetic)."""
        return self.to_tensor.normalize(pixels)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.geometry(image))


class TrainTransform:
    """Random resized crop (area ``scale``, aspect 3/4..4/3; ``crop=False``: the centre square), horizontal flip,
    normalise.

    The crop keeps most of the picture (scale >= 0.6): captions describe the whole image, and a
    small crop of an emoji or a 28 px garment no longer shows what the caption says.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        *,
        scale: tuple[float, float] = (0.6, 1.0),
        flip: bool = True,
        crop: bool = True,
    ) -> None:
        self.size, self.scale, self.flip, self.crop = size, scale, flip, crop
        self.to_tensor = _ToTensor(mean, std)

    def _box(self, width: int, height: int) -> tuple[int, int, int, int]:
        # torch's RNG, so DataLoader workers (seeded by torch) draw different crops
        area = width * height
        for _ in range(10):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(()).item())
            log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(()).item()
            ratio = math.exp(log_ratio)
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, ()).item())
                top = int(torch.randint(0, height - h + 1, ()).item())
                return left, top, left + w, top + h
        return self._centre(width, height)  # fall back to the centre square

    @staticmethod
    def _centre(width: int, height: int) -> tuple[int, int, int, int]:
        """The centre square (what ``EvalTransform`` keeps)."""
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image) -> torch.Tensor:
        box = self._box(*image.size) if self.crop else self._centre(*image.size)
        image = image.resize((self.size, self.size), RESAMPLE, box=box)
        if self.flip and torch.rand(()).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.to_tensor(image)


def eval_transform(size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> EvalTransform:
    return EvalTransform(size, mean, std)


def train_transform(size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> TrainTransform:
    return TrainTransform(size, mean, std)


__all__ = ["EvalTransform", "TrainTransform", "eval_transform", "train_transform"]
