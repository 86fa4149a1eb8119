"""Contrastive losses, each written as its paper defines it (tests compare them with naive loops).

* ``nt_xent`` — SimCLR (Chen et al., 2020): for 2N views, ``l(i, j) = -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ)``
  with cosine similarity ``s``, averaged over all 2N anchors.
* ``info_nce`` — van den Oord et al., 2018 / MoCo: one query, one positive key, negative keys;
  cross-entropy of the positive among ``[positive, negatives]`` at temperature τ.
* ``margin_contrastive_loss`` — Hadsell, Chopra & LeCun, 2006: ``y d²/2 + (1-y) max(0, m-d)²/2``
  with Euclidean distance ``d`` and ``y = 1`` for similar pairs.
* ``triplet_loss`` / ``batch_hard_triplet_loss`` — Schroff et al., 2015 (FaceNet), and the
  in-batch hardest-positive / hardest-negative mining of Hermans et al., 2017.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent of two views: ``z1[i]`` and ``z2[i]`` (each (N, D)) are the positive pair of image i.

    Every other of the 2N views is a negative; the anchor itself is left out of the denominator.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D): view 1 of every image, then view 2
    logits = z @ z.T / temperature  # (2N, 2N) cosine / τ
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # k ≠ i
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,) index of the positive
    return F.cross_entropy(logits, partner)


def info_nce(
    query: torch.Tensor,
    positive_key: torch.Tensor,
    negative_keys: torch.Tensor | None = None,
    *,
    temperature: float = 0.1,
) -> torch.Tensor:
    """InfoNCE over cosine similarities: ``-log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ exp(q·k⁻/τ))``.

    ``query``, ``positive_key``: (B, D). ``negative_keys``: (M, D) shared by every query, (B, M, D)
    one set per query, or None — then the other queries' positive keys are the negatives (in-batch).
    """
    q = F.normalize(query, dim=-1)
    k_pos = F.normalize(positive_key, dim=-1)
    if negative_keys is None:
        logits = q @ k_pos.T  # (B, B): diagonal = positives, the rest = in-batch negatives
        labels = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits / temperature, labels)
    k_neg = F.normalize(negative_keys, dim=-1)
    positive = (q * k_pos).sum(dim=-1, keepdim=True)  # (B, 1)
    # shared negatives (M, D) or one set per query (B, M, D) -> (B, M)
    negative = q @ k_neg.T if k_neg.ndim == 2 else torch.einsum("bd,bmd->bm", q, k_neg)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (B, 1+M): the positive is class 0
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def margin_contrastive_loss(
    x1: torch.Tensor, x2: torch.Tensor, similar: torch.Tensor, *, margin: float = 1.0
) -> torch.Tensor:
    """Hadsell et al.'s contrastive loss over pairs ``(x1[i], x2[i])`` (each (B, D)).

    ``similar``: (B,) bool or 0/1 — 1 pulls the pair together (``d²/2``), 0 pushes it beyond
    ``margin`` (``max(0, m - d)²/2``). Mean over pairs.
    """
    y = similar.to(x1.dtype)
    d = F.pairwise_distance(x1, x2, eps=0.0)  # (B,)
    return (y * d.pow(2) / 2 + (1 - y) * F.relu(margin - d).pow(2) / 2).mean()


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, *, margin: float = 0.2
) -> torch.Tensor:
    """FaceNet triplet loss ``max(0, d(a, p) - d(a, n) + m)`` over given triplets (each (B, D)); mean."""
    d_ap = F.pairwise_distance(anchor, positive, eps=0.0)
    d_an = F.pairwise_distance(anchor, negative, eps=0.0)
    return F.relu(d_ap - d_an + margin).mean()


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.2) -> torch.Tensor:
    """Triplet loss with in-batch hard mining (Hermans et al., 2017) over (B, D) embeddings.

    Each anchor takes its farthest same-label item (hardest positive) and its closest other-label
    item (hardest negative). Anchors with no positive or no negative in the batch are left out;
    a batch with none left gives 0 (still connected to the graph, so ``backward`` works).
    """
    dist = torch.cdist(embeddings, embeddings)  # (B, B) Euclidean
    same = labels[:, None] == labels[None, :]  # (B, B)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive_mask, negative_mask = same & ~eye, ~same
    hardest_positive = dist.masked_fill(~positive_mask, float("-inf")).amax(dim=1)  # (B,)
    hardest_negative = dist.masked_fill(~negative_mask, float("inf")).amin(dim=1)  # (B,)
    valid = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    if not valid.any():
        return embeddings.sum() * 0.0
    return F.relu(hardest_positive[valid] - hardest_negative[valid] + margin).mean()
