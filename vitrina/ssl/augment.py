"""Batched image augmentations on normalised tensors (B, C, H, W) in [-1, 1].

Each draws its random choices per image from torch's global generator (seeded by the training
loop), so a run is reproducible and the whole batch is transformed in a few tensor ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def rotate90(x: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Rotate image i by ``quarter_turns[i]`` x 90° counter-clockwise (negative turns: clockwise)."""
    out = x.clone()
    turns = quarter_turns % 4
    for k in range(1, 4):
        chosen = turns == k
        if chosen.any():
            out[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
    return out


def random_resized_crop(
    x: torch.Tensor,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    size: int | None = None,
) -> torch.Tensor:
    """Crop a random box (area share in ``scale``, aspect in ``ratio``), resize it to ``size`` x ``size``
    (default: back to H x W), and mirror it left-right with probability ``flip_p`` — one affine
    resampling per image. (B, C, H, W) -> (B, C, size, size)."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale)
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # box size as a share of the side
    height = (area / aspect).sqrt().clamp(max=1.0)
    centre_x = (torch.rand(b) * 2 - 1) * (1 - width)  # in affine_grid's [-1, 1] coordinates
    centre_y = (torch.rand(b) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(b) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    out_shape = list(x.shape) if size is None else [*x.shape[:2], size, size]
    grid = F.affine_grid(theta.to(x.dtype), out_shape, align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(
    x: torch.Tensor, *, brightness: float, contrast: float, saturation: float, p: float = 0.8
) -> torch.Tensor:
    """Random brightness, contrast and (colour images) saturation factors in ``[1-s, 1+s]``, applied
    with probability ``p`` per image. For grey data only brightness and contrast change anything."""
    b = x.shape[0]
    unit = (x + 1) / 2  # [0, 1]

    def factor(strength: float) -> torch.Tensor:
        f = torch.empty(b).uniform_(1 - strength, 1 + strength)
        return torch.where(torch.rand(b) < p, f, torch.ones(b)).view(b, 1, 1, 1).to(x.dtype)

    unit = unit * factor(brightness)
    grey = unit.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    unit = (unit - grey.mean(dim=(2, 3), keepdim=True)) * factor(contrast) + grey.mean(dim=(2, 3), keepdim=True)
    if saturation > 0 and x.shape[1] == 3:
        grey = unit.mean(dim=1, keepdim=True)
        unit = grey + (unit - grey) * factor(saturation)
    return unit.clamp(0, 1) * 2 - 1


def random_grayscale(x: torch.Tensor, *, p: float) -> torch.Tensor:
    """Replace image i by its channel mean with probability ``p``."""
    chosen = (torch.rand(x.shape[0]) < p).view(-1, 1, 1, 1)
    return torch.where(chosen, x.mean(dim=1, keepdim=True).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, *, sigma: tuple[float, float], p: float, kernel_size: int = 3) -> torch.Tensor:
    """Blur image i with a Gaussian of σ ~ U(sigma) with probability ``p`` (separable, per-image kernels)."""
    b, c, h, w = x.shape
    s = torch.empty(b).uniform_(*sigma)
    s = torch.where(torch.rand(b) < p, s, torch.full((b,), 1e-3))  # σ → 0: the identity kernel
    offsets = torch.arange(kernel_size, dtype=x.dtype) - kernel_size // 2
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * s[:, None] ** 2))  # (B, k)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="replicate")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)  # along W
    y = F.conv2d(y, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)  # along H
    return y.view(b, c, h, w)


@dataclass
class SimCLRAugment:
    """The SimCLR view distribution, scaled down for small images (28-64 px)."""

    crop_scale: tuple[float, float] = (0.25, 1.0)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)

    def __call__(
        self, x: torch.Tensor, *, scale: tuple[float, float] | None = None, size: int | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) -> one random view of each image, (B, C, size, size) (default: same shape).

        ``scale`` overrides ``crop_scale`` (multi-crop's small local views)."""
        x = random_resized_crop(x, scale=scale or self.crop_scale, flip_p=self.flip_p, size=size)
        x = color_jitter(
            x, brightness=self.brightness, contrast=self.contrast, saturation=self.saturation, p=self.jitter_p
        )
        if x.shape[1] == 3 and self.grayscale_p > 0:
            x = random_grayscale(x, p=self.grayscale_p)
        return gaussian_blur(x, sigma=self.blur_sigma, p=self.blur_p)


@dataclass
class MultiCrop:
    """Multi-crop (Caron et al., 2020, SwAV): 2 global views at full size plus ``local_views`` small views,
    each cropped from a small share of the image (``local_scale``) and resized to ``local_size`` px.

    ``local_size`` must be set (``vitrina.ssl.multicrop.fit_crops`` sets it for a backbone) when
    there are local views. Every view otherwise draws from ``view``'s distribution (flip, colour
    jitter, grey, blur). Local views are cheap (a 16 px view of a 4 px-patch ViT is 16 tokens
    instead of 49), so they add positive pairs at little cost; the methods compare them only with
    the global views.
    """

    local_views: int = 0
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    local_size: int | None = None  # px; None: about half the image, in whole patches (see vitrina.ssl.multicrop)
    view: SimCLRAugment = field(default_factory=SimCLRAugment)

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, C, H, W) -> ([2 global views (B, C, H, W)], [``local_views`` views (B, C, s, s)])."""
        if self.local_views and self.local_size is None:
            raise ValueError("MultiCrop.local_size is unset: fit it to the backbone first (multicrop.fit_crops)")
        globals_ = [self.view(x, scale=self.global_scale) for _ in range(2)]
        locals_ = [self.view(x, scale=self.local_scale, size=self.local_size) for _ in range(self.local_views)]
        return globals_, locals_


def cut_tiles(x: torch.Tensor, *, grid: int, tile: int, jitter: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid², C, tile, tile): one tile per cell of a grid x grid layout, row-major.

    Cells are ``H // grid`` pixels; a tile smaller than its cell leaves a gap to its neighbours, so
    a network cannot match tiles by their touching edges (Doersch et al., Noroozi & Favaro). With
    ``jitter`` each tile's place inside its cell is random per image, else centred.
    """
    b, c, h, w = x.shape
    cell = min(h, w) // grid
    if tile > cell:
        raise ValueError(f"tile {tile} px does not fit a {cell} px cell")
    batch = torch.arange(b)[:, None, None]
    span = torch.arange(tile)
    tiles = []
    for r in range(grid):
        for col in range(grid):
            if jitter:
                dy, dx = torch.randint(0, cell - tile + 1, (2, b))
            else:
                dy = dx = torch.full((b,), (cell - tile) // 2)
            rows = r * cell + dy[:, None] + span  # (B, tile)
            cols = col * cell + dx[:, None] + span  # (B, tile)
            patch = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, tile, tile, C)
            tiles.append(patch.permute(0, 3, 1, 2))
    return torch.stack(tiles, dim=1)
