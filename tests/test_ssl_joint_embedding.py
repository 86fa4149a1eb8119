"""VICReg and BYOL: the losses against naive definitions, collapse, EMA in closed form, multi-crop views,
a few steps lowering the loss with local crops, and `vitrina pretrain vicreg --local-crops` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vitrina.cli import main
from vitrina.data.fashion_mnist import load_fashion_mnist
from vitrina.errors import UserError
from vitrina.models.vit import ViT, ViTConfig
from vitrina.ssl.augment import MultiCrop, random_resized_crop
from vitrina.ssl.byol import BYOL, BYOLConfig, ema_update, normalised_mse
from vitrina.ssl.multicrop import fit_crops, view_pairs
from vitrina.ssl.run import multi_crop_config
from vitrina.ssl.vicreg import VICReg, VICRegConfig, covariance_term, variance_term, vicreg_loss

TINY = ViTConfig(image_size=28, patch_size=4, width=32, depth=1, heads=2)


@pytest.fixture(scope="module")
def fashion() -> torch.Tensor:
    """32 real Fashion-MNIST training images, uint8 (32, 1, 28, 28)."""
    images, _ = load_fashion_mnist("train")
    return torch.from_numpy(images[:32].copy())[:, None]


def naive_vicreg(z1: list[list[float]], z2: list[list[float]], lam: float, mu: float, nu: float) -> float:
    """The VICReg formula written with plain loops over samples and dimensions."""
    n, d = len(z1), len(z1[0])

    def mean(col: list[float]) -> float:
        return sum(col) / len(col)

    def var_term(z: list[list[float]]) -> float:
        total = 0.0
        for k in range(d):
            col = [z[i][k] for i in range(n)]
            var = sum((v - mean(col)) ** 2 for v in col) / (n - 1)
            total += max(0.0, 1.0 - math.sqrt(var + 1e-4))
        return total / d

    def cov_term(z: list[list[float]]) -> float:
        means = [mean([z[i][k] for i in range(n)]) for k in range(d)]
        total = 0.0
        for k in range(d):
            for m in range(d):
                if k != m:
                    c = sum((z[i][k] - means[k]) * (z[i][m] - means[m]) for i in range(n)) / (n - 1)
                    total += c * c
        return total / d

    invariance = sum((z1[i][k] - z2[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d)
    return lam * invariance + mu * (var_term(z1) + var_term(z2)) / 2 + nu * (cov_term(z1) + cov_term(z2))


@pytest.mark.parametrize("n, d, scale", [(4, 3, 0.3), (8, 5, 2.0), (16, 2, 0.05)])
def test_vicreg_loss_equals_the_formula(n: int, d: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(n * d)
    z1 = torch.randn(n, d, generator=generator, dtype=torch.float64) * scale
    z2 = z1 + 0.5 * torch.randn(n, d, generator=generator, dtype=torch.float64)
    for lam, mu, nu in [(25.0, 25.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]:
        got = vicreg_loss(z1, z2, invariance_weight=lam, variance_weight=mu, covariance_weight=nu).loss
        assert got.item() == pytest.approx(naive_vicreg(z1.tolist(), z2.tolist(), lam, mu, nu), rel=1e-9, abs=1e-12)


def test_hand_made_tensors() -> None:
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # dim 0: std sqrt(2); dim 1: constant
    assert variance_term(z).item() == pytest.approx((0.0 + (1 - math.sqrt(1e-4))) / 2)
    assert covariance_term(z).item() == 0.0  # dim 1 has no spread, so no covariance with dim 0
    correlated = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)  # C = [[2, 2], [2, 2]]
    assert covariance_term(correlated).item() == pytest.approx((4 + 4) / 2)


def test_collapse_gives_the_variance_term_its_maximum() -> None:
    constant = torch.full((8, 4), 0.7)
    terms = vicreg_loss(constant, constant.clone())
    maximum = 1.0 - math.sqrt(1e-4)  # std = sqrt(0 + eps): the smallest it can be
    assert terms.variance.item() == pytest.approx(maximum)
    assert terms.invariance.item() == 0.0 and terms.covariance.item() == pytest.approx(0.0, abs=1e-20)
    spread = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert vicreg_loss(spread, spread).variance.item() < maximum


def test_normalised_mse_is_two_minus_two_cosine() -> None:
    generator = torch.Generator().manual_seed(0)
    p, t = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    cosines = [torch.dot(p[i], t[i]) / (p[i].norm() * t[i].norm()) for i in range(6)]
    assert normalised_mse(p, t).item() == pytest.approx(sum(2 - 2 * c.item() for c in cosines) / 6, rel=1e-5)
    assert normalised_mse(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter


def test_ema_after_k_steps_equals_the_closed_form() -> None:
    target, online = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in target.parameters()]
    tau, k = 0.9, 5
    for _ in range(k):
        ema_update(target, online, tau)
    for t, t0, o in zip(target.parameters(), start, online.parameters(), strict=True):
        assert torch.allclose(t, tau**k * t0 + (1 - tau**k) * o, atol=1e-6)


def test_multi_crop_views_and_pairs(fashion) -> None:
    x = fashion[:4].float() / 127.5 - 1
    assert random_resized_crop(x, scale=(0.2, 0.5), size=12).shape == (4, 1, 12, 12)
    crops = fit_crops(MultiCrop(local_views=3), ViT(TINY))
    assert crops.local_size == 16  # half of 28 px in whole 4 px patches
    globals_, locals_ = crops(x)
    assert [g.shape for g in globals_] == [(4, 1, 28, 28)] * 2 and [v.shape for v in locals_] == [(4, 1, 16, 16)] * 3
    assert not torch.equal(globals_[0], globals_[1])
    assert view_pairs(5) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]  # locals never paired
    with pytest.raises(UserError, match="multiple of the backbone's patch size"):
        fit_crops(MultiCrop(local_views=2, local_size=14), ViT(TINY))
    with pytest.raises(UserError, match="applies to vicreg, byol"):
        multi_crop_config("simclr", 2)


@pytest.mark.parametrize("name", ["vicreg", "byol"])
def test_a_few_steps_with_local_crops_lower_the_loss(name: str, fashion) -> None:
    torch.manual_seed(0)
    crops = MultiCrop(local_views=2)
    if name == "vicreg":
        method = VICReg(ViT(TINY), VICRegConfig(expander_dims=(64, 64), crops=crops))
    else:
        method = BYOL(ViT(TINY), BYOLConfig(hidden=64, projection_dim=32, crops=crops))
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    batch = (fashion, torch.arange(len(fashion)))
    losses = []
    for _ in range(15):
        torch.manual_seed(1)  # the same views every step: a fixed problem
        out = method.step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses
    if name == "byol":  # the target follows the online network but takes no gradient
        assert all(p.grad is None for p in method.target_backbone.parameters())
        assert not torch.equal(method.target_projector[0].weight, method.projector[0].weight)


def test_cli_pretrains_vicreg_with_local_crops(tmp_path, capsys) -> None:
    out = tmp_path / "vicreg"
    args = ["pretrain", "vicreg", "--backbone", "vit-fmnist-28-fast", "--data", "fashion-mnist:train:128"]
    assert main([*args, "--out", str(out), "--epochs", "1", "--batch-size", "64", "--local-crops", "2"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["pretrain"]["method"] == "vicreg"
    assert saved["pretrain"]["settings"]["crops"]["local_views"] == 2
    assert saved["pretrain"]["settings"]["crops"]["local_size"] == 14  # 28 px, 7 px patches: 2 patches
    assert (out / "model.safetensors").is_file() and "train/loss" in capsys.readouterr().out
    assert main(["pretrain", "rotation", "--out", str(tmp_path / "x"), "--epochs", "1", "--local-crops", "2"]) == 2
    assert "multi-crop applies to" in capsys.readouterr().err
