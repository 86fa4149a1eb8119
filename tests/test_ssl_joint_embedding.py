"""VICReg and BYOL: the losses against naive definitions, collapse, EMA in closed form, multi-crop views,
a few steps lowering the loss with local crops, and `vitrina pretrain vicreg --local-crops` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vitrina.cli import main
from vitrina.data.fashion_mnist import load_fashion_mnist
from vitrina.errors import UserError
from vitrina.models.vit import ViT, ViTConfig
from vitrina.ssl.augment import MultiCrop, random_resized_crop
from vitrina.ssl.byol import BYOL, BYOLConfig, ema_update, normalised_mse
from vitrina.ssl.common import HEADS_FILE, to_input
from vitrina.ssl.dino import DINO, DINOConfig, dino_loss
from vitrina.ssl.multicrop import fit_crops, view_pairs
from vitrina.ssl.run import multi_crop_config, parse_expander
from vitrina.ssl.vicreg import (
    VICReg,
    VICRegConfig,
    covariance_term,
    multi_view_vicreg,
    variance_term,
    vicreg_loss,
)

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


def test_multi_view_loss_is_the_mean_over_pairs_in_value_and_gradient() -> None:
    """Each view's variance and covariance computed once, weighted by its pairs, is the pairwise mean."""
    generator = torch.Generator().manual_seed(3)
    views = [torch.randn(16, 6, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    pairs = view_pairs(len(views))  # (0, 1), (0, 2), (0, 3), (1, 2), (1, 3): view 0 in 3 pairs, view 2 in 2
    weights = {"invariance_weight": 25.0, "variance_weight": 25.0, "covariance_weight": 1.0}
    pairwise = [vicreg_loss(views[i], views[j], **weights) for i, j in pairs]
    expected = torch.stack([t.loss for t in pairwise]).mean()
    got = multi_view_vicreg(views, pairs, **weights)
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for name in ("invariance", "variance", "covariance"):
        mean = torch.stack([getattr(t, name) for t in pairwise]).mean()
        assert getattr(got, name).item() == pytest.approx(mean.item(), rel=1e-12)
    expected_grads = torch.autograd.grad(expected, views)
    for got_grad, expected_grad in zip(torch.autograd.grad(got.loss, views), expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-12)


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
    with pytest.raises(UserError, match="applies to vicreg, byol, dino"):
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


def test_cli_pretrains_a_hybrid_with_its_stem_in_bf16(tmp_path, capsys) -> None:
    out = tmp_path / "vicreg"
    args = ["pretrain", "vicreg", "--data", "fashion-mnist:train:64", "--epochs", "1", "--batch-size", "32"]
    hybrid = ["--backbone", "vit-hybrid-fmnist-s8-r1", "--precision", "bf16-stem"]
    assert main([*args, *hybrid, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "bf16-stem"
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()
    plain = ["--backbone", "vit-fmnist-28-fast", "--precision", "bf16-stem"]
    assert main([*args, *plain, "--out", str(tmp_path / "plain")]) == 2
    assert "precision bf16-stem: the" in capsys.readouterr().err


def test_cli_pretrains_vicreg_with_a_wider_expander(tmp_path, capsys) -> None:
    out = tmp_path / "vicreg"
    args = ["pretrain", "vicreg", "--backbone", "vit-fmnist-28-fast", "--data", "fashion-mnist:train:128"]
    assert main([*args, "--out", str(out), "--epochs", "1", "--batch-size", "64", "--expander", "96x80"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["pretrain"]["settings"]["expander_dims"] == [96, 80]
    assert saved["pretrain"]["settings"]["crops"]["local_views"] == 0  # an expander alone adds no local crops
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main([*args, "--out", str(bad), "--epochs", "1", "--expander", "96xwide"]) == 2
    assert "--expander '96xwide': give layer widths joined by x" in capsys.readouterr().err
    assert not bad.exists()  # refused before anything is written
    assert main(["pretrain", "byol", "--out", str(bad), "--epochs", "1", "--expander", "64"]) == 2
    assert "only vicreg has an expander" in capsys.readouterr().err
    assert main(["pretrain", "mae", "--out", str(bad), "--epochs", "1", "--expander", "64"]) == 2
    assert "only vicreg has an expander, not mae" in capsys.readouterr().err


def test_expander_widths_parse_and_build_the_expander() -> None:
    assert parse_expander("2048x2048X2048") == (2048, 2048, 2048)
    with pytest.raises(UserError, match="must be >= 1"):
        parse_expander("64x0")
    config = multi_crop_config("vicreg", 2, expander_dims=(96, 48))
    method = VICReg(ViT(TINY), config)
    linears = [layer for layer in method.expander if isinstance(layer, torch.nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(TINY.width, 96), (96, 48)]
    assert method.config.crops.local_views == 2


def naive_dino(student: list, teacher: list, centre: list, ts: float, tt: float) -> float:
    """DINO's loss written out with Python floats: for every teacher view i and student view j != i,
    the batch mean of -sum_k P_t[k] log P_s[k]; then the mean over those pairs."""

    def softmax(row: list, temp: float, shift: list) -> list:
        scaled = [(v - c) / temp for v, c in zip(row, shift, strict=True)]
        top = max(scaled)
        exps = [math.exp(v - top) for v in scaled]
        return [e / sum(exps) for e in exps]

    zeros = [0.0] * len(centre)
    terms = []
    for i, t_view in enumerate(teacher):
        for j, s_view in enumerate(student):
            if j == i:
                continue
            per_image = []
            for t_row, s_row in zip(t_view, s_view, strict=True):
                p_t, p_s = softmax(t_row, tt, centre), softmax(s_row, ts, zeros)
                per_image.append(-sum(a * math.log(b) for a, b in zip(p_t, p_s, strict=True)))
            terms.append(sum(per_image) / len(per_image))
    return sum(terms) / len(terms)


def test_dino_loss_equals_the_formula() -> None:
    generator = torch.Generator().manual_seed(5)
    student = [torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(3)]  # 2 global + 1 local
    teacher = [torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(2)]
    centre = torch.randn(4, generator=generator, dtype=torch.float64)
    got = dino_loss(student, teacher, centre, student_temp=0.1, teacher_temp=0.04).item()
    expected = naive_dino(
        [v.tolist() for v in student], [v.tolist() for v in teacher], centre.tolist(), ts=0.1, tt=0.04
    )
    assert got == pytest.approx(expected, rel=1e-9)


def test_dino_step_moves_the_centre_and_teacher_without_teacher_gradients(fashion) -> None:
    torch.manual_seed(0)
    config = DINOConfig(hidden=32, bottleneck=16, prototypes=24, crops=MultiCrop(local_views=2))
    method = DINO(ViT(TINY), config)
    assert torch.equal(method.centre, torch.zeros(24))
    with torch.no_grad():  # a student unlike its teacher, so that the teacher's EMA step has somewhere to go
        for p in method.head.parameters():
            p.add_(0.1)
    before = [p.clone() for p in method.teacher_head.parameters()]
    method.train()
    torch.manual_seed(1)
    out = method.step((fashion[:16], torch.arange(16)))
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher_backbone.parameters())
    assert all(p.grad is None for p in method.teacher_head.parameters())
    assert all(p.grad is not None for p in method.head.parameters())
    for old, new, student in zip(before, method.teacher_head.parameters(), method.head.parameters(), strict=True):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * student.detach())  # one EMA step (0.99)
    # the centre's first step from 0: (1 - 0.9) x the teacher's mean output over the two global views
    torch.manual_seed(1)
    globals_, _ = method.config.crops(to_input(fashion[:16], method.in_channels))
    teacher_mean = torch.cat([method.teacher(g) for g in globals_]).mean(dim=0)
    torch.testing.assert_close(method.centre, 0.1 * teacher_mean, rtol=1e-4, atol=1e-6)
    assert 0 < out.metrics["teacher_entropy"] <= math.log(24) + 1e-6
    with torch.no_grad():  # evaluation leaves the centre and the teacher alone
        centre = method.centre.clone()
        method.eval()
        method.step((fashion[:16], torch.arange(16)))
    assert torch.equal(method.centre, centre)


def test_cli_pretrains_dino_with_local_crops(tmp_path) -> None:
    out = tmp_path / "dino"
    args = ["pretrain", "dino", "--backbone", "vit-fmnist-28-fast", "--data", "fashion-mnist:train:128"]
    assert main([*args, "--out", str(out), "--epochs", "1", "--batch-size", "64", "--local-crops", "2"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["pretrain"]["method"] == "dino" and saved["pretrain"]["settings"]["crops"]["local_views"] == 2
    heads = load_file(out / HEADS_FILE)
    assert heads["centre"].shape == (1024,) and heads["centre"].abs().sum() > 0  # the centre is saved and moved
    assert any(name.startswith("teacher_backbone.") for name in heads)


def test_blur_probability_reaches_the_views_and_bad_ones_are_refused() -> None:
    config = multi_crop_config("byol", 2, blur_p=0.0)
    assert config.crops.view.blur_p == 0.0 and config.crops.local_views == 2
    assert multi_crop_config("vicreg", 0).crops.view.blur_p == 0.5  # the SimCLR default stays
    assert multi_crop_config("vicreg", 2, expander_dims=(64,), blur_p=0.25).crops.view.blur_p == 0.25
    with pytest.raises(UserError, match="--blur: multi-crop applies to vicreg, byol, dino, not mae"):
        multi_crop_config("mae", 0, blur_p=0.0)
    with pytest.raises(UserError, match="--blur 1.5: give a probability"):
        multi_crop_config("dino", 2, blur_p=1.5)
