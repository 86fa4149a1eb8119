"""Distillation: every loss against a naive per-sample reference, and tiny runs that really distil."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitrina.checkpoint import save_model
from vitrina.distill.losses import (
    HintLoss,
    deit_hard_loss,
    deit_soft_loss,
    dist_relation_loss,
    embedding_cosine_loss,
    response_kd_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_distribution_loss,
    similarity_preserving_loss,
    soft_target_kl,
)
from vitrina.distill.trainer import (
    Distiller,
    DistillSettings,
    KDKind,
    Teachers,
    build_student,
    ensemble_logits,
    feature_taps,
    make_kd_loss,
    teacher_outputs,
)
from vitrina.errors import UserError
from vitrina.models.cnn import CNN, CNNConfig
from vitrina.models.vit import ViT, ViTConfig
from vitrina.train.classify_data import Preprocess

# --- naive references: plain Python loops over samples ------------------------------------------


def naive_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        s_exp = [math.exp(v / T) for v in s_row]
        t_exp = [math.exp(v / T) for v in t_row]
        p = [v / sum(t_exp) for v in t_exp]
        q = [v / sum(s_exp) for v in s_exp]
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    return total / len(student) * T * T


def naive_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        total += -row[y] + math.log(sum(math.exp(v) for v in row))
    return total / len(labels)


def naive_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    """Label smoothing by its definition: the target is ``(1 - eps) one_hot + eps / K`` over K classes."""
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        target = [(1 - eps) * (k == y) + eps / len(row) for k in range(len(row))]
        total += sum(-p * (v - log_z) for p, v in zip(target, row, strict=True))
    return total / len(labels)


def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def naive_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> float:
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ds = [float((s[i] - s[j]).norm()) for i, j in pairs]
    dt = [float((t[i] - t[j]).norm()) for i, j in pairs]
    ms, mt = sum(ds) / len(ds), sum(dt) / len(dt)
    return sum(huber(a / ms, b / mt) for a, b in zip(ds, dt, strict=True)) / len(pairs)


def naive_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> float:
    def cos(x, i, j, k):
        if i == j or k == j:
            return 0.0  # a zero vector normalises to zero
        a, b = x[i] - x[j], x[k] - x[j]
        return float(a @ b / (a.norm() * b.norm()))

    n = len(s)
    triples = [(i, j, k) for i in range(n) for j in range(n) for k in range(n)]
    return sum(huber(cos(s, i, j, k), cos(t, i, j, k)) for i, j, k in triples) / len(triples)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("shape", [(1, 3), (5, 10)])
def test_soft_target_kl_matches_naive_loop_with_T_squared(T, shape):
    g = torch.Generator().manual_seed(int(T * 10) + shape[0])
    s, t = torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g) * 3
    assert soft_target_kl(s, t, T).item() == pytest.approx(naive_kl(s, t, T), rel=1e-4, abs=1e-6)


def test_t_squared_scaling_of_the_soft_gradient():
    # d/dz KL(p || softmax(z/T)) = (q - p) / T; the T^2 factor makes it T (q - p). With the same soft
    # distributions at T = 2 and T = 8 (logits z = s * T), the gradient must grow 4x, not shrink 4x.
    s = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    t = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    norms = []
    for T in (2.0, 8.0):
        z = (s * T).requires_grad_()
        (grad,) = torch.autograd.grad(soft_target_kl(z, t * T, T), z)
        norms.append(grad.norm().item())
    assert norms[1] / norms[0] == pytest.approx(4.0, rel=1e-4)


def test_response_kd_loss_mixes_hard_and_soft_terms():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    got = response_kd_loss(s, t, y, alpha=0.3, temperature=3.0).item()
    assert got == pytest.approx(0.7 * naive_ce(s, y) + 0.3 * naive_kl(s, t, 3.0), rel=1e-4)


def test_deit_losses_match_their_definition():
    g = torch.Generator().manual_seed(4)
    cls, dist, t = (torch.randn(5, 3, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 0, 1])
    hard = deit_hard_loss(cls, dist, t, y).item()
    assert hard == pytest.approx(0.5 * naive_ce(cls, y) + 0.5 * naive_ce(dist, t.argmax(1)), rel=1e-4)
    soft = deit_soft_loss(cls, dist, t, y, temperature=2.0).item()
    assert soft == pytest.approx(0.5 * naive_ce(cls, y) + 0.5 * naive_kl(dist, t, 2.0), rel=1e-4)


def test_deit_label_smoothing_smooths_the_class_head_only():
    g = torch.Generator().manual_seed(5)
    cls, dist, t = (torch.randn(6, 4, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    hard = deit_hard_loss(cls, dist, t, y, label_smoothing=0.1).item()
    expected = 0.5 * naive_smoothed_ce(cls, y, 0.1) + 0.5 * naive_ce(dist, t.argmax(1))
    assert hard == pytest.approx(expected, rel=1e-4)
    soft = deit_soft_loss(cls, dist, t, y, temperature=2.0, label_smoothing=0.1).item()
    assert soft == pytest.approx(0.5 * naive_smoothed_ce(cls, y, 0.1) + 0.5 * naive_kl(dist, t, 2.0), rel=1e-4)
    assert hard != pytest.approx(deit_hard_loss(cls, dist, t, y).item(), rel=1e-4)  # it does change the loss


def naive_dist(student: torch.Tensor, teacher: torch.Tensor, T: float) -> float:
    """DIST by its definition, with numpy's Pearson correlation: one minus the mean correlation over the rows
    (images), plus one minus the mean over the columns (classes), times T squared."""
    p_s = F.softmax(student.double() / T, dim=1).numpy()
    p_t = F.softmax(teacher.double() / T, dim=1).numpy()
    inter = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(p_s, p_t, strict=True)])
    intra = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(p_s.T, p_t.T, strict=True)])
    return float((1 - inter) + (1 - intra)) * T * T


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dist_relation_loss_matches_numpy_pearson(T):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    assert dist_relation_loss(s, t, temperature=T).item() == pytest.approx(naive_dist(s, t, T), rel=1e-4)
    assert dist_relation_loss(t, t, temperature=T).item() == pytest.approx(0.0, abs=1e-5)  # float32 x T**2


def test_dist_relation_loss_does_not_ask_for_the_teachers_confidence():
    # a student whose probabilities are the teacher's mixed with the uniform distribution is an affine map of
    # them, per image and per class: DIST (at T 1) asks nothing more of it, where the soft targets' KL still does
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(4)) * 3
    softer = torch.log(0.6 * F.softmax(t, dim=1) + 0.4 / 5)
    assert dist_relation_loss(softer, t, temperature=1.0).item() == pytest.approx(0.0, abs=1e-5)
    assert soft_target_kl(softer, t, 1.0).item() > 0.05


@pytest.mark.parametrize("n", [3, 6])
def test_rkd_losses_match_naive_loops(n):
    g = torch.Generator().manual_seed(n)
    s, t = torch.randn(n, 5, generator=g), torch.randn(n, 7, generator=g)
    assert rkd_distance_loss(s, t).item() == pytest.approx(naive_rkd_distance(s, t), rel=1e-4)
    assert rkd_angle_loss(s, t).item() == pytest.approx(naive_rkd_angle(s, t), rel=1e-4, abs=1e-7)
    assert rkd_distance_loss(s, 3 * s).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert rkd_angle_loss(s, 3 * s).item() == pytest.approx(0.0, abs=1e-6)


def test_similarity_preserving_loss_matches_naive_gram():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 2, 3, generator=g), torch.randn(4, 6, generator=g)
    fs, ft = s.reshape(4, -1), t
    total = 0.0
    for i in range(4):
        rs = torch.tensor([float(fs[i] @ fs[j]) for j in range(4)])
        rt = torch.tensor([float(ft[i] @ ft[j]) for j in range(4)])
        total += float(((rs / rs.norm() - rt / rt.norm()) ** 2).sum())
    assert similarity_preserving_loss(s, t).item() == pytest.approx(total / 16, rel=1e-4)


def test_embedding_losses_match_naive_definitions():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    cos = [float(s[i] @ t[i] / (s[i].norm() * t[i].norm())) for i in range(5)]
    assert embedding_cosine_loss(s, t).item() == pytest.approx(sum(1 - c for c in cos) / 5, rel=1e-5)
    tau, total = 0.1, 0.0
    su, tu = F.normalize(s, dim=1), F.normalize(t, dim=1)
    for i in range(5):
        others = [j for j in range(5) if j != i]
        ps = torch.softmax(torch.tensor([float(su[i] @ su[j]) / tau for j in others]), 0)
        pt = torch.softmax(torch.tensor([float(tu[i] @ tu[j]) / tau for j in others]), 0)
        total += float((pt * (pt.log() - ps.log())).sum())
    assert similarity_distribution_loss(s, t, tau).item() == pytest.approx(total / 5, rel=1e-4)
    assert similarity_distribution_loss(s, 2 * s, tau).item() == pytest.approx(0.0, abs=1e-6)


def test_image_text_kl_matches_a_naive_loop_both_ways():
    from vitrina.distill.clip_tower import image_text_kl

    g = torch.Generator().manual_seed(7)
    s, t, text = (F.normalize(torch.randn(4, 6, generator=g), dim=1) for _ in range(3))
    text[3] = text[1]  # a caption two images share: a column twice over, no special case
    scale, total = 5.0, 0.0
    for rows_s, rows_t in ((s @ text.T, t @ text.T), ((s @ text.T).T, (t @ text.T).T)):
        for i in range(4):
            ps, pt = torch.softmax(scale * rows_s[i], 0), torch.softmax(scale * rows_t[i], 0)
            total += float((pt * (pt.log() - ps.log())).sum()) / 4
    assert image_text_kl(s, t, text, scale).item() == pytest.approx(total / 2, rel=1e-4)
    assert image_text_kl(t, t, text, scale).item() == pytest.approx(0.0, abs=1e-6)


def test_hint_loss_resizes_the_teacher_map_to_the_student_grid():
    hint = HintLoss(8, 4)
    s, t = torch.randn(2, 8, 7, 7), torch.randn(2, 4, 14, 14)
    expected = F.mse_loss(hint.regressor(s), F.interpolate(t, size=(7, 7), mode="bilinear", align_corners=False))
    assert hint(s, t).item() == pytest.approx(expected.item())


# --- tiny runs ----------------------------------------------------------------------------------

TINY_VIT = dict(image_size=28, patch_size=7, width=32, depth=2, heads=2, num_classes=4)


def tiny_teacher() -> CNN:
    torch.manual_seed(1)
    return CNN(CNNConfig(image_size=28, widths=(8, 16), blocks=(1, 1), num_classes=4)).eval()


def answers_of(teacher, pre, *, bf16: bool = False):
    """What the trainer hands ``make_kd_loss`` for one teacher: its answer to an augmented batch."""
    return lambda pixels: teacher_outputs(teacher, pixels, pre, bf16=bf16)


def run_steps(distiller, loss_fn, pixels, labels, steps: int) -> None:
    opt = torch.optim.Adam([p for p in distiller.parameters() if p.requires_grad], lr=3e-3)
    distiller.train()
    for _ in range(steps):
        out = loss_fn(pixels, labels, torch.arange(len(labels)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def agreement(student, teacher, pre, pixels) -> float:
    """Share of images where the student's prediction (a DeiT student's distillation head) is the teacher's."""
    student.train()  # a distilled ViT returns (cls, dist) in train mode; the others have no dropout
    with torch.no_grad():
        out = student(pre(pixels))
        out = out[1] if isinstance(out, tuple) else out
        return float((out.argmax(1) == teacher(pre(pixels)).argmax(1)).float().mean())


def images_the_teacher_tells_apart(teacher, pre, per_class: int = 12) -> torch.Tensor:
    """Random images of varied contrast, up to ``per_class`` for each class the teacher predicts."""
    candidates = torch.rand(800, 1, 28, 28) * torch.rand(800, 1, 1, 1) + torch.rand(800, 1, 1, 1) * 0.5
    with torch.no_grad():
        predicted = teacher(pre(candidates.clamp(0, 1))).argmax(1)
    picked = torch.cat([torch.nonzero(predicted == c).flatten()[:per_class] for c in predicted.unique()])
    assert len(predicted[picked].unique()) >= 2
    return candidates[picked].clamp(0, 1)


@pytest.mark.parametrize("kind", [KDKind.RESPONSE, KDKind.DIST, KDKind.DEIT_SOFT])
def test_a_tiny_distillation_run_raises_agreement_with_the_teacher(kind):
    torch.manual_seed(0)
    teacher = tiny_teacher()
    pre = Preprocess(28, (0.5,) * 3, (0.5,) * 3)
    pixels = images_the_teacher_tells_apart(teacher, pre)
    labels = torch.randint(0, 4, (len(pixels),))  # noise: only the teacher's answers can be learnt
    student = ViT(ViTConfig(**TINY_VIT, distilled=kind.is_deit))
    before = agreement(student, teacher, pre, pixels)
    settings = DistillSettings(kind=kind, alpha=1.0, temperature=2.0)
    distiller = Distiller(student)
    loss_fn = make_kd_loss(distiller, answers_of(teacher, pre), settings, student_pre=pre, label_smoothing=0.0)
    run_steps(distiller, loss_fn, pixels, labels, 40)
    after = agreement(student, teacher, pre, pixels)
    assert after >= before + 0.25, (before, after)


@pytest.mark.parametrize("kind", [KDKind.FEATURE, KDKind.RELATION, KDKind.DEIT_HARD])
def test_feature_relation_and_deit_objectives_decrease_on_a_fixed_batch(kind):
    torch.manual_seed(0)
    pixels, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 4, (16,))
    teacher = tiny_teacher()
    pre = Preprocess(28, (0.5,) * 3, (0.5,) * 3)
    student = ViT(ViTConfig(**TINY_VIT, distilled=kind.is_deit))
    taps, hint = None, None
    if kind is KDKind.FEATURE:
        student_tap, teacher_tap, hint = feature_taps(student, teacher, pre, pre)
        taps = (student_tap, teacher_tap)
        assert student_tap.map().shape[-1] == 4 and teacher_tap.map().shape[1] in (8, 16)
    distiller = Distiller(student, hint)
    loss_fn = make_kd_loss(
        distiller, answers_of(teacher, pre), DistillSettings(kind=kind), student_pre=pre, label_smoothing=0.0, taps=taps
    )
    first = loss_fn(pixels, labels, torch.arange(16)).loss.item()
    run_steps(distiller, loss_fn, pixels, labels, 15)
    assert loss_fn(pixels, labels, torch.arange(16)).loss.item() < first


@pytest.mark.parametrize("kind", [KDKind.RESPONSE, KDKind.FEATURE, KDKind.RELATION])
def test_kd_losses_stay_float32_under_bf16_autocast_and_a_bf16_teacher(kind):
    torch.manual_seed(0)
    pixels, labels = torch.rand(8, 1, 28, 28), torch.randint(0, 4, (8,))
    pre = Preprocess(28, (0.5,) * 3, (0.5,) * 3)
    student, teacher = ViT(ViTConfig(**TINY_VIT)), tiny_teacher()
    taps, hint = None, None
    if kind is KDKind.FEATURE:
        student_tap, teacher_tap, hint = feature_taps(student, teacher, pre, pre)
        taps = (student_tap, teacher_tap)
    distiller = Distiller(student, hint)

    def loss(teacher_bf16: bool) -> torch.Tensor:
        answers = answers_of(teacher, pre, bf16=teacher_bf16)
        fn = make_kd_loss(distiller, answers, DistillSettings(kind=kind), student_pre=pre, label_smoothing=0, taps=taps)
        return fn(pixels, labels, torch.arange(8)).loss

    exact = loss(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_bf16 = loss(False)
    teacher_bf16 = loss(True)
    for fast in (student_bf16, teacher_bf16):
        assert fast.dtype == torch.float32
        torch.testing.assert_close(fast, exact, rtol=0.05, atol=0.02)  # bf16 forward, float32 loss


def test_deit_kind_needs_a_vit_student_and_unknown_kinds_are_named():
    with pytest.raises(UserError, match="needs a ViT student"):
        build_student("resnet-mini-28", 10, KDKind.DEIT_HARD, seed=0)
    assert build_student("vit-fmnist-28-fast", 10, KDKind.parse("deit"), seed=0).config.distilled
    with pytest.raises(UserError, match="--kind 'fitnets'"):
        KDKind.parse("fitnets")
    with pytest.raises(UserError, match="unknown model preset"):
        build_student("vit-huge-28", 10, KDKind.RESPONSE, seed=0)


@pytest.mark.parametrize("kind", list(KDKind))
def test_each_kind_reads_exactly_the_weights_it_names(kind):
    """``settings_read`` is what the CLI checks a flag against: a weight it names changes the loss, the rest do not."""
    torch.manual_seed(0)
    pixels, labels = torch.rand(8, 1, 28, 28), torch.randint(0, 4, (8,))
    pre = Preprocess(28, (0.5,) * 3, (0.5,) * 3)
    student, teacher = ViT(ViTConfig(**TINY_VIT, distilled=kind.is_deit)), tiny_teacher()
    taps, hint = None, None
    if kind is KDKind.FEATURE:
        student_tap, teacher_tap, hint = feature_taps(student, teacher, pre, pre)
        taps = (student_tap, teacher_tap)
    distiller = Distiller(student, hint)
    student.train()

    def loss(**weights) -> float:
        settings = DistillSettings(kind=kind, **weights)
        fn = make_kd_loss(distiller, answers_of(teacher, pre), settings, student_pre=pre, label_smoothing=0, taps=taps)
        with torch.no_grad():
            return fn(pixels, labels, torch.arange(8)).loss.item()

    base = loss(alpha=0.7, temperature=4.0, beta=1.0)
    changed = {"alpha": 0.3, "temperature": 2.0, "beta": 3.0}
    for name, value in changed.items():
        moved = loss(**{"alpha": 0.7, "temperature": 4.0, "beta": 1.0, name: value}) != base
        assert moved == (name in kind.settings_read), (kind, name)


def test_temperature_defaults_per_kind_and_the_cli_refuses_weights_a_kind_ignores(tmp_path, capsys):
    assert DistillSettings(kind=KDKind.DIST).temperature == 1.0  # DIST's paper: the probabilities themselves
    assert DistillSettings(kind=KDKind.RESPONSE).temperature == 4.0  # Hinton's softened targets
    assert DistillSettings(kind=KDKind.DIST, temperature=2.0).temperature == 2.0
    from vitrina.cli import main

    base = ["distill", "--teacher", str(tmp_path / "t"), "--student", "vit-fmnist-28-fast", "--data", "fashion-mnist"]
    for kind, flag in [("dist", "--alpha"), ("deit", "--temperature"), ("response", "--beta")]:
        assert main([*base, "--kind", kind, flag, "0.5", "--out", str(tmp_path / kind)]) == 2
        err = capsys.readouterr().err
        assert f"{flag}: --kind" in err and "leave it out" in err and err.count("\n") == 1
        assert not (tmp_path / kind).exists()  # refused before anything is written
    clip = ["distill", "clip", "--teacher", str(tmp_path / "c"), "--student", "vit-demo-48-student-p12-w96"]
    assert main([*clip, "--data", "emoji:apple", "--temperature", "1", "--out", str(tmp_path / "c2")]) == 2
    assert "not distill clip's" in capsys.readouterr().err


def test_clip_tower_distillation_gives_a_searchable_clip(tmp_path):
    from vitrina.checkpoint import load_encoder
    from vitrina.config import TrainConfig
    from vitrina.distill.clip_tower import ClipDistillSettings, distill_clip_tower
    from vitrina.models.registry import build_model

    teacher_dir = tmp_path / "teacher"
    save_model(build_model("clip-tiny"), teacher_dir)
    rng = torch.Generator().manual_seed(0)
    pairs = [
        ((torch.rand(20, 20, 3, generator=rng) * 255).to(torch.uint8).numpy(), f"picture {i % 5}") for i in range(40)
    ]
    summary = distill_clip_tower(
        teacher_path=teacher_dir,
        student_preset="vit-nano-32",
        pairs=pairs,
        out_dir=tmp_path / "student",
        train_config=TrainConfig(epochs=3, batch_size=8, lr=3e-3, val_fraction=0.2),
        settings=ClipDistillSettings(augment=False),
        progress=False,
    )
    assert summary.epochs_done == 3 and "val/cosine" in summary.metrics
    with_captions = distill_clip_tower(
        teacher_path=teacher_dir,
        student_preset="vit-nano-32",
        pairs=pairs,
        out_dir=tmp_path / "student-text",
        train_config=TrainConfig(epochs=1, batch_size=8, lr=3e-3, val_fraction=0.2, log_every=1),
        settings=ClipDistillSettings(augment=False, text_weight=1.0),
        progress=False,
    )
    logged = [json.loads(line) for line in (with_captions.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("text_kl", 0) > 0 for row in logged)  # the caption term ran and was logged
    teacher, student = load_encoder(teacher_dir), load_encoder(tmp_path / "student")
    texts = ["picture 1", "a dog"]
    torch.testing.assert_close(student.encode_text(texts), teacher.encode_text(texts))  # the teacher's text side
    assert student.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, teacher.embed_dim)
    with pytest.raises(UserError, match="must be a ViT preset"):
        distill_clip_tower(
            teacher_path=teacher_dir, student_preset="resnet-mini-28", pairs=pairs, out_dir=tmp_path / "x",
            train_config=TrainConfig(epochs=1, batch_size=8),
        )  # fmt: skip


def test_an_ensemble_answers_with_the_mean_of_its_teachers_softmax():
    torch.manual_seed(0)
    a, b, c = torch.randn(5, 4) * 3, torch.randn(5, 4), torch.randn(5, 4) * 0.2
    combined = ensemble_logits([a, b, c])
    naive = [
        [sum(math.exp(x[i, k]) / sum(math.exp(v) for v in x[i].tolist()) for x in (a, b, c)) / 3 for k in range(4)]
        for i in range(5)
    ]
    torch.testing.assert_close(combined.softmax(dim=-1), torch.tensor(naive), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(combined.exp().sum(dim=-1), torch.ones(5))  # log-probabilities: no shift left
    # a temperature softens the ensemble's mean, not each teacher before averaging
    T = 4.0
    mean = torch.tensor(naive)
    torch.testing.assert_close((combined / T).softmax(-1), mean ** (1 / T) / (mean ** (1 / T)).sum(-1, keepdim=True))
    assert ensemble_logits([a]) is a  # one teacher: its logits exactly as they are (the rows before ensembles)


def test_two_teachers_answer_as_their_ensemble_and_refuse_feature_kinds(tmp_path):
    first = tiny_teacher()
    torch.manual_seed(2)  # another draw of the same architecture: the teachers disagree
    second = CNN(CNNConfig(image_size=28, widths=(8, 16), blocks=(1, 1), num_classes=4)).eval()
    pre = Preprocess(28, (0.5,) * 3, (0.5,) * 3)
    teachers = Teachers([tmp_path / "a", tmp_path / "b"], [first, second], [pre, pre])
    pixels = torch.rand(6, 1, 28, 28)
    logits, pooled = teachers.answer(pixels)
    assert not torch.allclose(teacher_outputs(first, pixels, pre)[0], teacher_outputs(second, pixels, pre)[0])
    expected = ensemble_logits([teacher_outputs(first, pixels, pre)[0], teacher_outputs(second, pixels, pre)[0]])
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert pooled is None  # the teachers' features share no space
    with pytest.raises(UserError, match="--kind response, dist or deit"):
        teachers.single()
    one = Teachers([tmp_path / "a"], [first], [pre])
    assert one.single() == (first, pre)
    torch.testing.assert_close(one.answer(pixels)[0], teacher_outputs(first, pixels, pre)[0], rtol=0, atol=0)
