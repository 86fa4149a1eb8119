"""DINO (Caron et al., 2021): self-distillation with no labels. A student network (backbone + head)
learns to give every view of an image the distribution over ``prototypes`` outputs that a teacher
gives the image's global views; the teacher is an exponential moving average (EMA) of the student
and gets no gradient.

For a teacher output ``t`` of global view i and a student output ``s`` of any other view j:

* teacher probabilities ``P_t = softmax((t - c) / tau_t)``, ``c`` the centre: an EMA over batches of
  the teacher's mean output (``c <- m c + (1 - m) mean(t)``), updated after the loss;
* student log-probabilities ``log P_s = log_softmax(s / tau_s)``;
* ``loss = mean over pairs (i, j != i) of mean over the batch of - sum_k P_t[k] log P_s[k]``.

Centring keeps one prototype from winning every image; sharpening (``tau_t < tau_s``) keeps the
teacher from spreading uniformly: together they stop the collapse without negatives. The head is
the paper's: a 3-layer MLP with GELU to a ``bottleneck``, L2 normalisation, then a weight-normalised
linear layer (no bias, its norm fixed to 1: the paper's ``norm_last_layer``) to ``prototypes``
outputs. Multi-crop: 2 global views go through teacher and student, local views through the student
only (``vitrina.ssl.multicrop``).

EMA: ``teacher <- tau teacher + (1 - tau) student`` at the start of each training step, one step
behind the paper's update after the step, as in ``vitrina.ssl.byol``; ``tau`` is constant (``ema``),
since the paper's cosine schedule towards 1 needs the run's length, which the method does not see.
The probe uses the student backbone's pooled features (the paper probes the teacher's; at a
constant 0.99 EMA over a few thousand steps the two are close), and the head is thrown away.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitrina.models.vit import ViT
from vitrina.ssl.augment import MultiCrop
from vitrina.ssl.byol import ema_update
from vitrina.ssl.common import SSLMethod, pooled_features
from vitrina.ssl.multicrop import embed_views, fit_crops


class DINOHead(nn.Module):
    """MLP (Linear-GELU x 2, Linear to ``bottleneck``) -> L2 normalise -> weight-normalised prototypes."""

    def __init__(self, width: int, *, hidden: int, bottleneck: int, prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        # the prototypes: a direction per output, compared with the normalised bottleneck by a dot product
        self.prototypes = nn.Linear(bottleneck, prototypes, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, width) -> (B, prototypes) logits: cosines of the bottleneck with each prototype."""
        z = F.normalize(self.mlp(features), dim=-1)
        return F.linear(z, F.normalize(self.prototypes.weight, dim=-1))


def teacher_targets(teacher: torch.Tensor, centre: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """The teacher's centred, sharpened distribution ``softmax((t - c) / tau_t)`` over the prototypes."""
    return F.softmax((teacher - centre) / teacher_temp, dim=-1)


def dino_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    centre: torch.Tensor,
    *,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Mean over pairs (teacher view i, student view j != i) of the cross-entropy H(P_t(i), P_s(j)).

    ``teacher`` holds the global views' outputs (views 0 and 1 of ``student`` are the same images).
    """
    targets = [teacher_targets(t, centre, teacher_temp) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [
        -(targets[i] * log_probs[j]).sum(dim=-1).mean()
        for i in range(len(targets))
        for j in range(len(log_probs))
        if j != i
    ]
    return torch.stack(terms).mean()


@dataclass
class DINOConfig:
    """The head's sizes (the paper's 2048-2048-256 and 65536 prototypes, scaled to small models), the
    temperatures, the centre's and the teacher's EMA rates, multi-crop views."""

    hidden: int = 512
    bottleneck: int = 128
    prototypes: int = 1024
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    centre_momentum: float = 0.9
    ema: float = 0.99  # the paper's 0.996 is for ~100k-step runs; short CPU runs need a teacher that keeps up
    crops: MultiCrop = field(default_factory=MultiCrop)


class DINO(SSLMethod):
    """Student: backbone -> head; teacher: EMA copies of both; the centre is a buffer saved with the heads."""

    name = "dino"

    def __init__(self, backbone: ViT, config: DINOConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = c = config or DINOConfig()
        if not 0.0 <= c.ema <= 1.0 or not 0.0 <= c.centre_momentum <= 1.0:
            raise ValueError(f"DINO ema and centre_momentum must be in [0, 1], got {c.ema}, {c.centre_momentum}")
        c.crops = fit_crops(c.crops, backbone)
        self.head = DINOHead(backbone.width, hidden=c.hidden, bottleneck=c.bottleneck, prototypes=c.prototypes)
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("centre", torch.zeros(c.prototypes))

    def student(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prototypes) student logits."""
        return self.head(self.features(x))

    @torch.no_grad()
    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prototypes) teacher logits (no gradient)."""
        return self.teacher_head(pooled_features(self.teacher_backbone, x))

    def update_teacher(self) -> None:
        """One EMA step of the teacher towards the student backbone and head."""
        ema_update(self.teacher_backbone, self.backbone, self.config.ema)
        ema_update(self.teacher_head, self.head, self.config.ema)

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        training = self.training and torch.is_grad_enabled()
        if training:
            self.update_teacher()
        globals_, locals_ = c.crops(x)
        student = embed_views(self.student, globals_, locals_)  # 2 + local_views x (B, K)
        teacher = embed_views(self.teacher, globals_, [])  # 2 x (B, K)
        loss = dino_loss(student, teacher, self.centre, student_temp=c.student_temp, teacher_temp=c.teacher_temp)
        with torch.no_grad():
            targets = teacher_targets(teacher[0], self.centre, c.teacher_temp)
            # collapse shows as entropy -> 0 (one prototype wins) or -> log K (uniform targets)
            metrics = {
                "teacher_entropy": float(-(targets * targets.clamp_min(1e-12).log()).sum(dim=-1).mean()),
                "prototypes_used": float(targets.argmax(dim=-1).unique().numel()),
            }
            if training:
                batch_centre = torch.cat(teacher).mean(dim=0)
                self.centre.mul_(c.centre_momentum).add_(batch_centre, alpha=1.0 - c.centre_momentum)
        return loss, metrics
