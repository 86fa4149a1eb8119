"""RotNet (Gidaris et al., 2018): rotate each image by 0/90/180/270° and predict which (4-way).

One random rotation per image and step (the paper shows all four; one keeps a step as cheap as a
supervised one, and over the epochs every image meets every rotation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitrina.models.vit import ViT
from vitrina.ssl.augment import rotate90
from vitrina.ssl.common import SSLMethod

N_ROTATIONS = 4


def rotation_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (rotated images, labels): image i turned ``labels[i]`` x 90° counter-clockwise."""
    labels = torch.randint(0, N_ROTATIONS, (x.shape[0],))
    return rotate90(x, labels), labels


class Rotation(SSLMethod):
    """Backbone -> pooled features -> linear 4-way head."""

    name = "rotation"

    def __init__(self, backbone: ViT) -> None:
        super().__init__(backbone)
        self.head = nn.Linear(backbone.width, N_ROTATIONS)

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        rotated, labels = rotation_batch(x)
        logits = self.head(self.features(rotated))  # (B, 4)
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        return F.cross_entropy(logits, labels), {"pretext_acc": accuracy}
