"""SimCLR (Chen et al., 2020): two random views of every image, a projection MLP g on the
backbone's pooled features h, and NT-Xent pulling the two views' z = g(h) together against the
other 2N - 2 views of the batch. The probe uses h (g is thrown away, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vitrina.models.vit import ViT
from vitrina.ssl.augment import SimCLRAugment
from vitrina.ssl.common import SSLMethod
from vitrina.ssl.contrastive_losses import nt_xent


@dataclass
class SimCLRConfig:
    """Projection to ``projection_dim`` through one hidden layer of ``hidden`` units; NT-Xent at ``temperature``."""

    temperature: float = 0.2
    hidden: int = 512
    projection_dim: int = 128
    augment: SimCLRAugment = field(default_factory=SimCLRAugment)


class SimCLR(SSLMethod):
    """f = backbone, g = Linear-BN-ReLU-Linear, loss = NT-Xent(g(f(t(x))), g(f(t'(x))))."""

    name = "simclr"

    def __init__(self, backbone: ViT, config: SimCLRConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = c = config or SimCLRConfig()
        self.projection = nn.Sequential(
            nn.Linear(backbone.width, c.hidden),
            nn.BatchNorm1d(c.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(c.hidden, c.projection_dim),
        )

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        views = torch.cat([self.config.augment(x), self.config.augment(x)])  # (2B, C, H, W)
        z1, z2 = self.projection(self.features(views)).chunk(2)  # 2 x (B, projection_dim)
        with torch.no_grad():
            # share of view-1 items whose nearest view-2 item is their own other view
            similarity = nn.functional.normalize(z1, dim=1) @ nn.functional.normalize(z2, dim=1).T
            top1 = (similarity.argmax(dim=1) == torch.arange(len(z1))).float().mean().item()
        return nt_xent(z1, z2, self.config.temperature), {"pair_top1": top1}
