"""Colorization (Zhang et al., 2016): from the lightness L of a colour image, predict its colour.

Colour is the (a, b) of CIELAB, quantised into a ``bins`` x ``bins`` grid over [-110, 110]²; every
pixel is a classification over those cells (the paper's 313 in-gamut bins, simplified to a square
grid). Like the paper, the loss is rebalanced towards rare colours: each cell's weight is the
inverse of its (smoothed) frequency mixed half-and-half with uniform, so the mostly white
backgrounds of emoji and clip art do not teach "everything is grey". Needs colour data.

The backbone sees L repeated on its three channels; a linear layer maps each patch token to
per-pixel colour logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitrina.errors import UserError
from vitrina.models.vit import ViT, patchify
from vitrina.ssl.common import SSLMethod, to_input

AB_RANGE = 110.0
_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE_D65 = torch.tensor([0.950456, 1.0, 1.088754])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (B, 3, H, W) -> CIELAB (B, 3, H, W): L in [0, 100], a and b about [-110, 110]."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(rgb.dtype), linear) / _WHITE_D65.view(1, 3, 1, 1)
    delta = 6 / 29
    f = torch.where(xyz > delta**3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * delta**2) + 4 / 29)
    lightness = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([lightness, a, b], dim=1)


def ab_bins(lab: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, 3, H, W) Lab -> (B, H, W) int64 cell index of (a, b) in a ``bins`` x ``bins`` grid."""
    cell = ((lab[:, 1:] + AB_RANGE) / (2 * AB_RANGE) * bins).long().clamp(0, bins - 1)  # (B, 2, H, W)
    return cell[:, 0] * bins + cell[:, 1]


@dataclass
class ColorizationConfig:
    """``bins`` per ab axis (bins² colour classes); ``rebalance`` mixes inverse frequency with uniform."""

    bins: int = 10
    rebalance: float = 0.5


class Colorization(SSLMethod):
    """L (as grey RGB) -> backbone tokens -> per-pixel logits over the ab cells."""

    name = "colorization"

    def __init__(self, backbone: ViT, config: ColorizationConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = config or ColorizationConfig()
        c = backbone.config
        self.n_colours = self.config.bins**2
        self.colour_head = nn.Linear(c.width, c.patch_size**2 * self.n_colours)
        self.register_buffer("class_weights", torch.ones(self.n_colours))

    def lightness_and_colour(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> (L as a 3-channel input in [-1, 1], (B, H, W) colour cells)."""
        lab = rgb_to_lab((x + 1) / 2)
        grey = (lab[:, :1] / 50 - 1).expand(-1, 3, -1, -1)
        return grey, ab_bins(lab, self.config.bins)

    def prepare(self, pixels: torch.Tensor) -> None:
        if pixels.shape[1] != 3:
            raise UserError("colorization needs colour images (e.g. --data emoji:apple,google); these are grey")
        sample = pixels[torch.randperm(len(pixels))[:2048]]
        _, cells = self.lightness_and_colour(to_input(sample))
        counts = torch.bincount(cells.flatten(), minlength=self.n_colours).float()
        frequency = counts / counts.sum()
        mixed = (1 - self.config.rebalance) * frequency + self.config.rebalance / self.n_colours
        weights = 1.0 / mixed
        # normalised so the expected weight under the data is 1: the loss keeps its usual scale
        self.class_weights.copy_(weights / (frequency * weights).sum())

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        grey, cells = self.lightness_and_colour(x)
        p = self.backbone.config.patch_size
        tokens = self.backbone.forward_features(grey)[:, self.backbone.num_prefix_tokens :]  # (B, N, width)
        logits = self.colour_head(tokens).view(*tokens.shape[:2], p * p, self.n_colours)  # (B, N, p*p, Q)
        target = patchify(cells[:, None].float(), p).long()  # (B, N, p*p), the same pixel order
        loss = F.cross_entropy(logits.flatten(0, 2), target.flatten(), weight=self.class_weights)
        accuracy = (logits.argmax(dim=-1) == target).float().mean().item()
        return loss, {"pixel_acc": accuracy}
