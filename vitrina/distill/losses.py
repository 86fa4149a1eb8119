"""Knowledge-distillation losses, one small function (or module) per kind.

Convention (written once, used everywhere): soft targets compare ``softmax(teacher / T)`` with the
student's ``log_softmax(student / T)`` as ``KL(teacher || student)`` averaged over the batch
(``reduction="batchmean"``) and multiplied by ``T**2``, so the gradient scale does not shrink as T
grows (Hinton et al., 2015). Teachers are run in ``eval()`` under ``no_grad()`` by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: ``KL(softmax(t/T) || softmax(s/T)) * T**2``, mean over the batch.

    (B, K) logits -> scalar.
    """
    T = temperature
    log_student = F.log_softmax(student_logits / T, dim=-1)
    teacher = F.softmax(teacher_logits / T, dim=-1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * T**2


def response_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Response-based KD: ``(1 - alpha) * CE(student, labels) + alpha * soft_target_kl``."""
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return (1 - alpha) * hard + alpha * soft_target_kl(student_logits, teacher_logits, temperature)


def _mean_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (the cosine of the centred rows),
    averaged. (N, M), (N, M) -> scalar."""
    return F.cosine_similarity(a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True), dim=1).mean()


def dist_relation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """DIST (Huang et al., 2022, "knowledge distillation from a stronger teacher"): match *relations*, not the
    exact distribution. Inter-class: each image's class probabilities should correlate (Pearson) with the
    teacher's; intra-class: each class's probabilities over the batch's images should correlate with the
    teacher's. ``(1 - inter) + (1 - intra)``, times ``T**2`` as the soft-target convention. Correlation is blind
    to shift and scale, so a student less sure than its teacher is not pushed to copy its confidence.
    (B, K) logits -> scalar."""
    T = temperature
    student = F.softmax(student_logits / T, dim=-1)
    teacher = F.softmax(teacher_logits / T, dim=-1)
    inter = 1 - _mean_pearson(student, teacher)
    intra = 1 - _mean_pearson(student.T, teacher.T)
    return (inter + intra) * T**2


class HintLoss(nn.Module):
    """FitNets (Romero et al., 2015): the student's intermediate map, through a learned 1x1 conv
    regressor, should match the teacher's "hint" map: ``MSE(regressor(student), teacher)``.

    The teacher map is resized (bilinear) to the student's grid when the two differ.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.regressor = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """(B, Cs, h, w) student and (B, Ct, H, W) teacher maps -> scalar."""
        if teacher_map.shape[-2:] != student_map.shape[-2:]:
            teacher_map = F.interpolate(teacher_map, size=student_map.shape[-2:], mode="bilinear", align_corners=False)
        return F.mse_loss(self.regressor(student_map), teacher_map)


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances (zero diagonal, gradient-safe at 0)."""
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1)  # (B, B)
    return squared.clamp_min(1e-12).sqrt() * (1 - torch.eye(len(x), device=x.device))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance (Park et al., 2019): pairwise distances, each divided by their mean over the
    off-diagonal pairs, compared with the smooth-L1 (Huber) loss. (B, Ds), (B, Dt) -> scalar."""
    off_diagonal = ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    with torch.no_grad():
        t = _pairwise_distances(teacher)
        t = t / t[off_diagonal].mean()
    s = _pairwise_distances(student)
    s = s / s[off_diagonal].mean()
    return F.smooth_l1_loss(s[off_diagonal], t[off_diagonal])


def _angles(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B, B): cosine of the angle at j between i and k, ``<e_ij, e_kj>`` with unit e."""
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # (B, B, D): [j, i] = x_i - x_j, unit
    return torch.bmm(diff, diff.transpose(1, 2))  # (B, B, B): [j, i, k]


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle (Park et al., 2019): Huber loss between the triplet angle cosines. (B, D) -> scalar."""
    with torch.no_grad():
        t = _angles(teacher)
    return F.smooth_l1_loss(_angles(student), t)


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SP (Tung & Mori, 2019): row-normalised batch Gram matrices should agree;
    ``||G_s - G_t||_F^2 / B^2``. (B, ...) features of any shapes -> scalar."""
    B = student.shape[0]
    gs = F.normalize(student.reshape(B, -1) @ student.reshape(B, -1).T, dim=1)  # (B, B)
    gt = F.normalize(teacher.reshape(B, -1) @ teacher.reshape(B, -1).T, dim=1)
    return (gs - gt).pow(2).sum() / B**2


def deit_hard_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DeiT hard distillation: ``CE_ls(cls, labels) / 2 + CE(dist, argmax teacher) / 2``.

    ``label_smoothing`` applies to the class head's true labels only, as in DeiT's code (its base
    criterion smooths; the teacher's argmax is taken as it is).
    """
    hard = F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing)
    return (hard + F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))) / 2


def deit_soft_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DeiT soft distillation: ``CE_ls(cls, labels) / 2 + soft_target_kl(dist, teacher, T) / 2``."""
    hard = F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing)
    return (hard + soft_target_kl(dist_logits, teacher_logits, temperature)) / 2


def embedding_cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(student_i, teacher_i))`` over the batch. (B, D), (B, D) -> scalar."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def similarity_distribution_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL between the in-batch image-image similarity distributions of teacher and student.

    Row i of each is ``softmax(<e_i, e_j> / tau)`` over j != i (unit vectors e); the result is the
    batch-mean ``KL(teacher_i || student_i)``. (B, D), (B, D) -> scalar.
    """
    eye = torch.eye(len(student), dtype=torch.bool, device=student.device)
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher, dim=-1)
    s_logits = (s @ s.T / temperature).masked_fill(eye, float("-inf"))  # (B, B)
    t_logits = (t @ t.T / temperature).masked_fill(eye, float("-inf"))
    log_s = F.log_softmax(s_logits, dim=-1).masked_fill(eye, 0.0)
    p_t = F.softmax(t_logits, dim=-1)
    log_t = torch.log(p_t.clamp_min(1e-12)).masked_fill(eye, 0.0)
    return (p_t * (log_t - log_s)).sum(dim=-1).mean()
