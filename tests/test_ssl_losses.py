"""Every contrastive loss against a naive, obviously-correct loop over a grid of shapes and temperatures."""

import math

import pytest
import torch

from vitrina.ssl.contrastive_losses import (
    batch_hard_triplet_loss,
    info_nce,
    margin_contrastive_loss,
    nt_xent,
    triplet_loss,
)


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


def naive_nt_xent(z1, z2, temperature):
    # SimCLR's Algorithm 1 with views interleaved as 2k-1, 2k (here 2k, 2k+1)
    views = [z for pair in zip(z1, z2, strict=True) for z in pair]
    n = len(views)

    def ell(i, j):
        denominator = sum(math.exp(cosine(views[i], views[k]) / temperature) for k in range(n) if k != i)
        return -math.log(math.exp(cosine(views[i], views[j]) / temperature) / denominator)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n // 2)) / n


def naive_info_nce(q, k_pos, negatives_per_query, temperature):
    total = 0.0
    for i in range(len(q)):
        positive = math.exp(cosine(q[i], k_pos[i]) / temperature)
        negative = sum(math.exp(cosine(q[i], k) / temperature) for k in negatives_per_query[i])
        total += -math.log(positive / (positive + negative))
    return total / len(q)


@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("dim", [3, 32])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_nt_xent_matches_naive_loop(batch, dim, temperature):
    g = torch.Generator().manual_seed(batch * 100 + dim)
    z1, z2 = torch.randn(batch, dim, generator=g, dtype=torch.float64), torch.randn(batch, dim, generator=g).double()
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(naive_nt_xent(z1, z2, temperature), rel=1e-9)


def test_nt_xent_is_low_for_matching_views_and_high_for_random_ones():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 16, generator=g)
    assert nt_xent(z, z, 0.1) < 0.05 < nt_xent(z, torch.randn(32, 16, generator=g), 0.1) - 1


@pytest.mark.parametrize("batch,n_negatives", [(1, 1), (4, 7), (9, 3)])
@pytest.mark.parametrize("temperature", [0.05, 0.2, 1.0])
@pytest.mark.parametrize("layout", ["shared", "per_query", "in_batch"])
def test_info_nce_matches_naive_loop(batch, n_negatives, temperature, layout):
    g = torch.Generator().manual_seed(batch * 10 + n_negatives)
    q, k = torch.randn(batch, 8, generator=g).double(), torch.randn(batch, 8, generator=g).double()
    if layout == "shared":
        negatives = torch.randn(n_negatives, 8, generator=g).double()
        per_query = [negatives] * batch
    elif layout == "per_query":
        negatives = torch.randn(batch, n_negatives, 8, generator=g).double()
        per_query = list(negatives)
    else:
        negatives = None
        per_query = [torch.cat([k[:i], k[i + 1 :]]) for i in range(batch)]
    expected = naive_info_nce(q, k, per_query, temperature)
    assert info_nce(q, k, negatives, temperature=temperature).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("batch,dim", [(1, 2), (6, 4), (20, 16)])
@pytest.mark.parametrize("margin", [0.5, 1.0, 3.0])
def test_margin_contrastive_matches_hadsell_formula(batch, dim, margin):
    g = torch.Generator().manual_seed(batch + dim)
    x1, x2 = torch.randn(batch, dim, generator=g).double(), torch.randn(batch, dim, generator=g).double()
    similar = torch.randint(0, 2, (batch,), generator=g).bool()
    expected = 0.0
    for a, b, y in zip(x1, x2, similar, strict=True):
        d = math.sqrt(float(((a - b) ** 2).sum()))
        expected += d**2 / 2 if y else max(0.0, margin - d) ** 2 / 2
    expected /= batch
    assert margin_contrastive_loss(x1, x2, similar, margin=margin).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("batch,dim,margin", [(3, 2, 0.1), (10, 8, 1.0), (7, 5, 5.0)])
def test_triplet_matches_naive_loop(batch, dim, margin):
    g = torch.Generator().manual_seed(batch)
    a, p, n = (torch.randn(batch, dim, generator=g).double() for _ in range(3))
    hinges = [max(0.0, float((ai - pi).norm() - (ai - ni).norm()) + margin) for ai, pi, ni in zip(a, p, n, strict=True)]
    expected = sum(hinges) / batch
    assert triplet_loss(a, p, n, margin=margin).item() == pytest.approx(expected, rel=1e-9)


def naive_batch_hard(x, labels, margin):
    losses = []
    for i in range(len(x)):
        positives = [float((x[i] - x[j]).norm()) for j in range(len(x)) if j != i and labels[j] == labels[i]]
        negatives = [float((x[i] - x[j]).norm()) for j in range(len(x)) if labels[j] != labels[i]]
        if positives and negatives:
            losses.append(max(0.0, max(positives) - min(negatives) + margin))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("batch,n_classes", [(4, 2), (12, 3), (16, 16), (9, 1)])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_batch_hard_triplet_matches_naive_mining(batch, n_classes, margin):
    g = torch.Generator().manual_seed(batch * n_classes)
    x = torch.randn(batch, 6, generator=g).double().requires_grad_()
    labels = torch.randint(0, n_classes, (batch,), generator=g)
    loss = batch_hard_triplet_loss(x, labels, margin=margin)
    assert loss.item() == pytest.approx(naive_batch_hard(x.detach(), labels, margin), rel=1e-6, abs=1e-9)
    loss.backward()  # anchors without a positive or negative (and the all-one-class batch) still backprop
    assert torch.isfinite(x.grad).all()
