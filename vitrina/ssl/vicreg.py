"""VICReg (Bardes, Ponce & LeCun, 2022): two views of every image through the backbone and an
expander MLP; the loss keeps the two embeddings close (invariance) while keeping every embedding
dimension spread over the batch (variance) and the dimensions decorrelated (covariance), so the
embeddings cannot collapse to a constant without negatives or a momentum encoder.

For a batch of n embeddings ``Z`` (n, d) of one view and ``Z'`` of the other:

* invariance ``s(Z, Z') = mean_{i,k} (z_ik - z'_ik)^2`` (the reference code's ``F.mse_loss``);
* variance ``v(Z) = (1/d) sum_k max(0, gamma - sqrt(Var(z_.k) + eps))``, Var unbiased (paper eq. 1);
* covariance ``c(Z) = (1/d) sum_{k != l} C(Z)_kl^2``, ``C(Z) = (Z - mean)^T (Z - mean) / (n - 1)`` (eq. 3);
* ``loss = lambda s(Z, Z') + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z'))``, with the reference
  code's halving of the variance pair, for which its weights ``lambda = mu = 25, nu = 1`` were tuned.

Multi-crop: 2 global and ``local_views`` small views; the loss is the mean over the pairs of a global
view with every other view (``vitrina.ssl.multicrop``). A view's variance and covariance terms do not
depend on its partner, so ``multi_view_vicreg`` computes each once and weights it by the number of pairs
it is in, instead of once per pair: the same loss, and with 2 + 2 views 4 covariance matrices, not 10.
The probe uses the backbone's pooled features; the expander is thrown away, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitrina.models.vit import ViT
from vitrina.ssl.augment import MultiCrop
from vitrina.ssl.common import SSLMethod
from vitrina.ssl.multicrop import embed_views, fit_crops, view_pairs


def variance_term(z: torch.Tensor, *, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``(1/d) sum_k max(0, gamma - sqrt(Var(z_.k) + eps))`` of (n, d) embeddings; 0 once every std >= gamma."""
    std = torch.sqrt(z.var(dim=0) + eps)  # (d,), unbiased variance over the batch
    return F.relu(gamma - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """``(1/d) sum_{k != l} C_kl^2`` of (n, d) embeddings, C their (d, d) covariance over the batch."""
    n, d = z.shape
    centred = z - z.mean(dim=0)
    cov = centred.T @ centred / (n - 1)  # (d, d)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / d


@dataclass
class VICRegTerms:
    """The three terms of one pair of views and their weighted sum."""

    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor
    loss: torch.Tensor


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> VICRegTerms:
    """VICReg of two views' (n, d) embeddings, as the module docstring defines it: the one pair of
    ``multi_view_vicreg``."""
    return multi_view_vicreg(
        [z1, z2],
        [(0, 1)],
        invariance_weight=invariance_weight,
        variance_weight=variance_weight,
        covariance_weight=covariance_weight,
        gamma=gamma,
        eps=eps,
    )


def multi_view_vicreg(
    views: list[torch.Tensor],
    pairs: list[tuple[int, int]],
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> VICRegTerms:
    """The mean over ``pairs`` of ``vicreg_loss(views[i], views[j])``, each view's variance and covariance
    computed once (they are per view): each term's value is that mean's."""
    in_pairs = [0] * len(views)  # how many pairs each view is in
    for i, j in pairs:
        in_pairs[i] += 1
        in_pairs[j] += 1
    used = [k for k, count in enumerate(in_pairs) if count]
    invariance = torch.stack([F.mse_loss(views[i], views[j]) for i, j in pairs]).mean()
    variance = sum(in_pairs[k] * variance_term(views[k], gamma=gamma, eps=eps) for k in used) / (2 * len(pairs))
    covariance = sum(in_pairs[k] * covariance_term(views[k]) for k in used) / len(pairs)
    loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return VICRegTerms(invariance, variance, covariance, loss)


def expander(width: int, dims: tuple[int, ...]) -> nn.Sequential:
    """The paper's expander: (Linear-BN-ReLU) for every hidden size, then a last Linear to ``dims[-1]``."""
    layers: list[nn.Module] = []
    sizes = (width, *dims)
    for i, (cin, cout) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(cin, cout))
        if i < len(dims) - 1:
            layers += [nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@dataclass
class VICRegConfig:
    """Expander sizes (the paper's 8192-8192-8192, scaled to small models), the loss weights, multi-crop views."""

    expander_dims: tuple[int, ...] = (512, 512, 512)
    invariance_weight: float = 25.0
    variance_weight: float = 25.0
    covariance_weight: float = 1.0
    crops: MultiCrop = field(default_factory=MultiCrop)

    def __post_init__(self) -> None:
        self.expander_dims = tuple(self.expander_dims)


class VICReg(SSLMethod):
    """f = backbone, h = expander MLP, loss = mean over view pairs of VICReg(h(f(view_i)), h(f(view_j)))."""

    name = "vicreg"

    def __init__(self, backbone: ViT, config: VICRegConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = c = config or VICRegConfig()
        c.crops = fit_crops(c.crops, backbone)
        self.expander = expander(backbone.width, c.expander_dims)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) views -> (B, expander_dims[-1]) embeddings."""
        return self.expander(self.features(x))

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        views = embed_views(self.embed, *c.crops(x))  # 2 + local_views x (B, D)
        terms = multi_view_vicreg(
            views,
            view_pairs(len(views)),
            invariance_weight=c.invariance_weight,
            variance_weight=c.variance_weight,
            covariance_weight=c.covariance_weight,
        )
        with torch.no_grad():
            metrics = {
                "invariance": float(terms.invariance),
                "variance": float(terms.variance),
                "covariance": float(terms.covariance),
                "embedding_std": float(views[0].std(dim=0).mean()),  # collapse shows as this falling to 0
            }
        return terms.loss, metrics
