"""Context prediction (Doersch et al., 2015): given the centre tile of a 3 x 3 grid and one of its
8 neighbours, predict where the neighbour lies (8-way).

Tiles are cut with a gap and a random jitter inside their cells (no matching of touching edges),
each is resized to the backbone's input size and embedded *separately* by the shared backbone (the
paper's siamese pair), and an MLP on the two concatenated features predicts the position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitrina.models.vit import ViT
from vitrina.ssl.augment import cut_tiles
from vitrina.ssl.common import SSLMethod

CENTRE = 4
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)  # label k <-> grid cell NEIGHBOURS[k], row-major


def relative_position_pairs(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (centre tiles, neighbour tiles, labels): tiles (B, C, tile, tile), labels in 0..7."""
    tiles = cut_tiles(x, grid=3, tile=tile, jitter=True)  # (B, 9, C, t, t)
    labels = torch.randint(0, len(NEIGHBOURS), (x.shape[0],))
    cells = torch.tensor(NEIGHBOURS)[labels]
    return tiles[:, CENTRE], tiles[torch.arange(x.shape[0]), cells], labels


@dataclass
class RelativePositionConfig:
    """Tiles of ``tile`` px from cells of image_size // 3 px; ``hidden`` width of the pair MLP."""

    tile: int = 7
    hidden: int = 256


class RelativePosition(SSLMethod):
    """Siamese backbone on (centre, neighbour) -> concatenated features -> MLP -> 8 positions."""

    name = "relative-position"

    def __init__(self, backbone: ViT, config: RelativePositionConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = config or RelativePositionConfig()
        self.head = nn.Sequential(
            nn.Linear(2 * backbone.width, self.config.hidden), nn.GELU(), nn.Linear(self.config.hidden, len(NEIGHBOURS))
        )

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        centre, neighbour, labels = relative_position_pairs(x, self.config.tile)
        size = x.shape[-2:]
        both = F.interpolate(torch.cat([centre, neighbour]), size=size, mode="bilinear", align_corners=False)
        features = self.features(both)  # (2B, width)
        f_centre, f_neighbour = features.chunk(2)
        logits = self.head(torch.cat([f_centre, f_neighbour], dim=1))  # (B, 8)
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        return F.cross_entropy(logits, labels), {"pretext_acc": accuracy}
