"""Training augmentation of a whole batch of uint8 pixels at once: random resized crop + flip.

The same distribution as ``vitrina.data.transforms.TrainTransform`` (crop area ``scale`` of the
picture, aspect 3/4..4/3, a horizontal flip with p = 0.5: drawings and garments read the same
mirrored), drawn per image but applied as one ``affine_grid`` + ``grid_sample`` over the batch, so
it costs one vectorised pass instead of a PIL resize per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitrina.data.transforms import MEAN, STD


def crop_grid(box: torch.Tensor, mirror: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4) boxes (``crop_boxes``) and (B,) +-1 mirrors -> the (B, H, W, 2) sampling grid of ``grid_sample``.

    What ``affine_grid`` gives for a scale-and-shift ``theta``, built from one row and one column per
    image (a crop has no rotation), several times cheaper than its general matrix product.
    """
    xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1  # (W,) pixel centres in [-1, 1]
    ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1  # (H,)
    grid_x = (box[:, 0] * mirror)[:, None] * xs + box[:, 2:3]  # (B, W)
    grid_y = box[:, 1:2] * ys + box[:, 3:4]  # (B, H)
    b = len(box)
    return torch.stack(
        [grid_x[:, None, :].expand(b, height, width), grid_y[:, :, None].expand(b, height, width)], dim=-1
    )  # (B, H, W, 2)


@dataclass
class BatchAugment:
    """(B, 3, H, W) uint8 -> (B, 3, H, W) float32, cropped, flipped and normalised.

    ``scale``: the crop's share of the picture's area. ``flip``: mirror half of the images. ``crop``: off,
    every image keeps its whole picture (only the flips are drawn).
    """

    mean: Sequence[float] = MEAN
    std: Sequence[float] = STD
    scale: tuple[float, float] = (0.6, 1.0)
    flip: bool = True
    crop: bool = True

    def crop_boxes(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 4) boxes as (width, height, centre x, centre y) in [-1, 1] image coordinates (sides as fractions)."""
        u = torch.rand(batch, 4, generator=generator)  # (B, 4): area, aspect, x, y draws
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
        width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # share of the picture's width
        height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        centre_x = (1 - width) * (2 * u[:, 2] - 1)  # the box stays inside the picture
        centre_y = (1 - height) * (2 * u[:, 3] - 1)
        return torch.stack([width, height, centre_x, centre_y], dim=1)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``pixels`` (B, 3, H, W) uint8; draws from ``generator`` (default: torch's global RNG)."""
        b, _, h, w = pixels.shape
        whole = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(b, 4)  # the whole picture, sampled at its pixel centres
        box = self.crop_boxes(b, generator) if self.crop else whole  # (B, 4)
        mirror = torch.ones(b)
        if self.flip:
            mirror = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)  # (B,)
        grid = crop_grid(box, mirror, h, w)  # (B, H, W, 2)
        images = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (images - mean) / std  # (B, 3, H, W)
