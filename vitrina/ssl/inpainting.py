"""Context encoder (Pathak et al., 2016): blank out a square region and reconstruct it from its
surroundings; the loss is the pixel MSE on the blanked region only.

The backbone sees the masked image; a linear layer turns each output patch token back into that
patch's pixels (MAE's decoder at its lightest), and the patches are put back into an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitrina.models.vit import ViT, unpatchify
from vitrina.ssl.common import SSLMethod


def square_mask(batch: int, size: int, hole: int, *, central: bool) -> torch.Tensor:
    """(B, 1, size, size) float mask, 1 on a ``hole`` x ``hole`` square (centred or at a random place)."""
    mask = torch.zeros(batch, 1, size, size)
    if central:
        tops = lefts = torch.full((batch,), (size - hole) // 2)
    else:
        tops, lefts = torch.randint(0, size - hole + 1, (2, batch))
    for i in range(batch):
        mask[i, :, tops[i] : tops[i] + hole, lefts[i] : lefts[i] + hole] = 1.0
    return mask


@dataclass
class InpaintingConfig:
    """The hole's side as a share of the image side; ``central`` or at a random place."""

    hole_fraction: float = 0.5
    central: bool = False


class Inpainting(SSLMethod):
    """Masked image -> backbone tokens -> per-patch linear pixel head -> image; MSE inside the hole."""

    name = "inpainting"

    def __init__(self, backbone: ViT, config: InpaintingConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = config or InpaintingConfig()
        c = backbone.config
        self.pixel_head = nn.Linear(c.width, c.patch_size**2 * c.in_channels)

    def reconstruct(self, masked: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) masked image -> (B, C, H, W) predicted image."""
        tokens = self.backbone.forward_features(masked)[:, self.backbone.num_prefix_tokens :]  # (B, N, width)
        return unpatchify(self.pixel_head(tokens), self.backbone.config.patch_size)

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        size = x.shape[-1]
        hole = max(1, round(self.config.hole_fraction * size))
        mask = square_mask(x.shape[0], size, hole, central=self.config.central)  # (B, 1, H, W)
        masked = x * (1 - mask)  # the hole becomes 0: mid-grey, the data's middle value
        error = (self.reconstruct(masked) - x).pow(2) * mask  # (B, C, H, W), zero outside the hole
        return error.sum() / (mask.sum() * x.shape[1]), {}
