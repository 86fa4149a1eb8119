"""BYOL (Grill et al., 2020): an online network (backbone, projector, predictor) learns to predict a
target network's projection of another view of the same image; the target is an exponential moving
average (EMA) of the online backbone and projector and gets no gradient.

``loss = mean over pairs of || q / ||q|| - z' / ||z'|| ||^2 = 2 - 2 cos(q, z')``, q the online
prediction of one view and z' the target projection of another (the paper's normalised MSE), both
directions of the two global views. With multi-crop, local views go through the online network only
and are compared with the target's global views (DINO's scheme).

EMA: ``target <- tau target + (1 - tau) online``, done at the start of each training step with the
online weights as the last optimiser step left them (the loop owns the optimiser, so this is one step
behind the paper's update after the step: the same average, shifted by one step). ``tau`` is
constant (``ema``); the paper's cosine schedule of tau towards 1 needs the run's length, which the
method does not see. The target's BatchNorm statistics are its own (it runs in train mode, as in the
paper), not averaged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitrina.models.vit import ViT
from vitrina.ssl.augment import MultiCrop
from vitrina.ssl.common import SSLMethod, pooled_features
from vitrina.ssl.multicrop import embed_views, fit_crops


def normalised_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_i || p_i/||p_i|| - t_i/||t_i|| ||^2`` of two (n, d) batches, i.e. ``2 - 2 cos`` per row, averaged."""
    return (F.normalize(prediction, dim=-1) - F.normalize(target, dim=-1)).pow(2).sum(dim=-1).mean()


def mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    """BYOL's projector and predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
    )


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``t <- tau t + (1 - tau) o`` for every parameter pair (same architecture); buffers are left alone."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o, 1.0 - tau)


@dataclass
class BYOLConfig:
    """Projection to ``projection_dim`` through ``hidden`` units (the predictor alike), EMA rate, multi-crop views."""

    hidden: int = 512
    projection_dim: int = 128
    ema: float = 0.99  # the paper's 0.996 is for ~100k-step runs; short CPU runs need a target that keeps up
    crops: MultiCrop = field(default_factory=MultiCrop)


class BYOL(SSLMethod):
    """Online: backbone -> projector -> predictor; target: EMA copies of backbone and projector."""

    name = "byol"

    def __init__(self, backbone: ViT, config: BYOLConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = c = config or BYOLConfig()
        if not 0.0 <= c.ema <= 1.0:
            raise ValueError(f"BYOL ema must be in [0, 1], got {c.ema}")
        c.crops = fit_crops(c.crops, backbone)
        self.projector = mlp(backbone.width, c.hidden, c.projection_dim)
        self.predictor = mlp(c.projection_dim, c.hidden, c.projection_dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def online(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, projection_dim) predictions."""
        return self.predictor(self.projector(self.features(x)))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, projection_dim) target projections (no gradient)."""
        return self.target_projector(pooled_features(self.target_backbone, x))

    def update_target(self) -> None:
        """One EMA step of the target towards the online backbone and projector."""
        ema_update(self.target_backbone, self.backbone, self.config.ema)
        ema_update(self.target_projector, self.projector, self.config.ema)

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if self.training and torch.is_grad_enabled():
            self.update_target()
        globals_, locals_ = self.config.crops(x)
        predictions = embed_views(self.online, globals_, locals_)  # 2 + local_views x (B, D)
        targets = embed_views(self.target, globals_, [])  # 2 x (B, D)
        pairs = [(j, i) for i in range(2) for j in range(len(predictions)) if j != i]  # online j predicts target i
        loss = torch.stack([normalised_mse(predictions[j], targets[i]) for j, i in pairs]).mean()
        return loss, {"cosine": 1.0 - float(loss.detach()) / 2}
