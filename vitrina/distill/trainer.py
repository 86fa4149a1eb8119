"""Distil a trained classifier (the teacher) into a student on the shared loop (``vitrina distill``).

Kinds (``KDKind``), each with its own objective on top of the student's cross-entropy:

* ``response``: Hinton's soft targets, ``(1 - alpha) CE + alpha KL(teacher || student) T**2``.
* ``feature``: FitNets. The student's middle block (ViT tokens as a grid, or a CNN / Swin stage map)
  goes through a learned 1x1 conv to the teacher's hint map: the teacher stage whose grid is
  closest to the student's (for ``resnet-mini-28`` -> ``vit-fmnist-28``: the 7x7, 128-channel
  stage 3 against the ViT's 7x7 patch grid), resized when they differ. ``CE + beta MSE``.
* ``relation``: RKD distance + angle on the pooled penultimate features: ``CE + beta (25 d + 50 a)``
  (the paper's weights).
* ``dist``: DIST's relation loss, ``CE + beta (inter + intra) T**2`` (``dist_relation_loss``): the Pearson
  correlation of the student's class probabilities with the teacher's, per image and per class over the batch.
* ``deit-hard`` / ``deit-soft``: a ViT student with a distillation token (``ViTConfig.distilled``):
  the class head learns the labels and the distillation head the teacher's argmax (hard) or its
  softened distribution (soft); DeiT's own 1/2 + 1/2 weighting.

The teacher runs in ``eval()`` under ``no_grad``, on the same augmented batch as the student (each
model gets its own size and normalisation). Without augmentation a batch's teacher outputs are a
fixed function of the image, so they are computed once for the whole training set and looked up;
with the in-memory shift-and-flip augmentation, ``cache_views`` computes the teacher's logits once
for every view it can draw (``view_logits``), so the student trains at a scratch run's rate.

Several teachers (``--teacher A --teacher B``) answer as one ensemble, the log of their mean softmax
(``ensemble_logits``), for the kinds that read logits only (response, DeiT); each teacher's cached views
are built beside its own checkpoint, so a teacher distilled from alone before is not run again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrina.checkpoint import load_model
from vitrina.config import TrainConfig
from vitrina.distill.losses import (
    HintLoss,
    deit_hard_loss,
    deit_soft_loss,
    dist_relation_loss,
    response_kd_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)
from vitrina.distill.view_logits import ShiftFlipViews, ViewLogits, cached_view_logits
from vitrina.errors import UserError
from vitrina.models.cnn import CNN
from vitrina.models.swin import Swin
from vitrina.models.vit import ViT
from vitrina.train.classify import (
    ClassifyOutcome,
    ClassifySettings,
    build_classifier,
    count_parameters,
    fit_classifier,
    logits_of,
    preprocess_of,
)
from vitrina.train.classify_data import ClassificationData, Preprocess, unit_pixels
from vitrina.train.loop import StepOutput

RKD_DISTANCE_WEIGHT, RKD_ANGLE_WEIGHT = 25.0, 50.0


class KDKind(StrEnum):
    """The distillation objective."""

    RESPONSE = "response"
    FEATURE = "feature"
    RELATION = "relation"
    DIST = "dist"
    DEIT_HARD = "deit-hard"
    DEIT_SOFT = "deit-soft"

    @classmethod
    def parse(cls, text: str) -> KDKind:
        """A kind by name; ``deit`` means ``deit-hard`` (the DeiT paper's better variant)."""
        text = "deit-hard" if text == "deit" else text
        try:
            return cls(text)
        except ValueError:
            choices = "response, feature, relation, dist, deit (= deit-hard), deit-soft"
            raise UserError(f"--kind {text!r}: use one of {choices}") from None

    @property
    def is_deit(self) -> bool:
        return self in (KDKind.DEIT_HARD, KDKind.DEIT_SOFT)

    @property
    def settings_read(self) -> frozenset[str]:
        """The ``DistillSettings`` weights this kind's loss reads (the others it ignores)."""
        return _SETTINGS_READ[self]

    @property
    def reads_logits_only(self) -> bool:
        """The kinds whose loss needs nothing of the teacher but its logits (cacheable, ensemble-able)."""
        return self in (KDKind.RESPONSE, KDKind.DIST, KDKind.DEIT_HARD, KDKind.DEIT_SOFT)


_SETTINGS_READ = {
    KDKind.RESPONSE: frozenset({"alpha", "temperature"}),
    KDKind.FEATURE: frozenset({"beta"}),
    KDKind.RELATION: frozenset({"beta"}),
    KDKind.DIST: frozenset({"temperature", "beta"}),
    KDKind.DEIT_HARD: frozenset(),
    KDKind.DEIT_SOFT: frozenset({"temperature"}),
}


@dataclass
class DistillSettings:
    """``alpha``: weight of the teacher term (response, DeiT soft/hard split is fixed at 1/2);
    ``temperature``: softmax temperature of soft targets (and of DIST's probabilities; None: 4, and 1 for DIST,
    as each paper's default); ``beta``: weight of the feature / relation / DIST term;
    ``teacher_bf16``: run the frozen teacher's forward under bfloat16 autocast (a CNN teacher's forward
    is ~1.8x faster on AVX-512 BF16 CPUs; its outputs are cast back to float32 for the losses).
    ``cache_views``: the teacher's logits for every shift-and-flip view of every training image, built
    once beside the teacher checkpoint and looked up (``view_logits``; the kinds that read logits only:
    response, DIST and DeiT; in-memory data without random erasing)."""

    kind: KDKind = KDKind.RESPONSE
    alpha: float = 0.7
    temperature: float | None = None
    beta: float = 1.0
    teacher_bf16: bool = False
    cache_views: bool = False

    def __post_init__(self) -> None:
        if self.temperature is None:
            # Hinton's soft targets want softening (T 4); DIST correlates the probabilities themselves (T 1)
            self.temperature = 1.0 if self.kind is KDKind.DIST else 4.0

    def validate(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise UserError(f"--alpha {self.alpha}: must be in [0, 1]")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature}: must be positive")
        if self.beta < 0:
            raise UserError(f"--beta {self.beta}: must be >= 0")
        if self.cache_views and not self.kind.reads_logits_only:
            raise UserError(
                "--cache-teacher-views stores logits only: use it with --kind response, dist or deit, "
                f"not {self.kind.value}"
            )


def check_view_cache(settings: ClassifySettings, data: ClassificationData) -> None:
    """The cached views are exactly what the training augmentation draws only for in-memory shift + flip."""
    if not (settings.augment and data.train.in_memory):
        raise UserError(
            "--cache-teacher-views caches the views of the in-memory shift-and-flip augmentation: "
            "use it with in-memory data (fashion-mnist) and augmentation on"
        )
    if settings.erasing > 0:
        raise UserError(
            f"--cache-teacher-views: random erasing ({settings.erasing}) makes views no cache holds; give --erasing 0"
        )


# --- teacher and student ------------------------------------------------------------------------


def load_teacher(path: str | os.PathLike, data: ClassificationData) -> tuple[nn.Module, Preprocess]:
    """A classifier checkpoint whose classes are the data's (same names, same order), in eval mode."""
    model, config = load_model(path)
    id2label = config.get("id2label")
    classes = getattr(model.config, "num_classes", 0)
    if not classes or id2label is None:
        raise UserError(
            f"--teacher {path}: not a classifier checkpoint (no class head / id2label); "
            "train one with `vitrina train classify`"
        )
    names = [id2label[str(i)] for i in range(len(id2label))]
    if classes != len(data.class_names):
        raise UserError(
            f"--teacher {path} predicts {classes} classes but the data has {len(data.class_names)}; "
            "distil on the data the teacher was trained on"
        )
    if names != data.class_names:
        raise UserError(
            f"--teacher {path}: its classes {names[:3]}... differ from the data's {data.class_names[:3]}..."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), preprocess_of(config, model)


@dataclass
class Teachers:
    """The frozen teacher checkpoints of one distillation, in the order given; two or more answer as one
    ensemble (``ensemble_logits``)."""

    paths: list[Path]
    models: list[nn.Module]
    preprocesses: list[Preprocess]

    @classmethod
    def load(cls, paths: Sequence[str | os.PathLike], data: ClassificationData) -> Teachers:
        if not paths:
            raise UserError("give --teacher CHECKPOINT (once per teacher of an ensemble)")
        loaded = [load_teacher(path, data) for path in paths]
        return cls([Path(p) for p in paths], [m for m, _ in loaded], [pre for _, pre in loaded])

    def single(self) -> tuple[nn.Module, Preprocess]:
        """The one teacher of a kind that reads more than logits (its maps or pooled features)."""
        if len(self.models) != 1:
            raise UserError(
                f"{len(self.models)} teachers: an ensemble answers with logits only; "
                "use --kind response, dist or deit, or give one --teacher"
            )
        return self.models[0], self.preprocesses[0]

    def answer(self, pixels: torch.Tensor, *, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, K), pooled features (B, C)) of the one teacher; an ensemble's logits and no pooled
        feature (its teachers' features share no space)."""
        if len(self.models) == 1:
            return teacher_outputs(self.models[0], pixels, self.preprocesses[0], bf16=bf16)
        answers = [
            teacher_outputs(m, pixels, pre, bf16=bf16)[0] for m, pre in zip(self.models, self.preprocesses, strict=True)
        ]
        return ensemble_logits(answers), None


def build_student(preset: str, num_classes: int, kind: KDKind, *, seed: int) -> nn.Module:
    """The student of ``preset``; a DeiT kind turns on the distillation token (ViT students only)."""
    if kind.is_deit:
        student = build_classifier(preset, num_classes, seed=seed)
        if not isinstance(student, ViT):
            raise UserError(f"--kind {kind.value} needs a ViT student with a distillation token; {preset} is not a ViT")
        return build_classifier(preset, num_classes, seed=seed, distilled=True)
    return build_classifier(preset, num_classes, seed=seed)


# --- intermediate maps for FitNets --------------------------------------------------------------


class MapTap:
    """Keeps the output of one inner module of a model (a forward hook) and returns it as (B, C, H, W)."""

    def __init__(self, model: nn.Module, module: nn.Module) -> None:
        self.model, self.module = model, module
        self.output: torch.Tensor | None = None
        self.module.register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self.output = output

    def map(self) -> torch.Tensor:
        """The kept output as a channels-first map (ViT tokens: prefix dropped, patches on their grid)."""
        x = self.output
        if isinstance(self.model, ViT):
            x = x[:, self.model.config.num_prefix_tokens :]  # (B, N, C)
            B, N, C = x.shape
            side = int(round(N**0.5))
            return x.transpose(1, 2).reshape(B, C, side, side)  # (B, C, g, g)
        if isinstance(self.model, Swin):
            return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        return x


def _stage_modules(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, ViT):
        return list(model.blocks)
    if isinstance(model, CNN | Swin):
        return list(model.stages)
    raise UserError(f"feature distillation supports ViT, Swin and CNN models, not {type(model).__name__}")


def hint_module(model: nn.Module, grid: int | None = None) -> nn.Module:
    """The layer whose output is the hint: a ViT's middle block; for a CNN / Swin the stage whose map
    side is closest to ``grid`` (the middle stage when no grid is given)."""
    stages = _stage_modules(model)
    if isinstance(model, ViT) or grid is None:
        return stages[(len(stages) - 1) // 2]
    side = model.config.image_size
    with torch.no_grad():
        probe = torch.zeros(1, model.config.in_channels, side, side)
        _, maps = model.forward_features(probe, return_stages=True)
    sides = [m.shape[-1] if isinstance(model, CNN) else m.shape[1] for m in maps]
    best = min(range(len(sides)), key=lambda i: (abs(sides[i] - grid), -i))
    return stages[best]


def feature_taps(student: nn.Module, teacher: nn.Module, s_pre: Preprocess, t_pre: Preprocess):
    """Taps on the student's and teacher's hint layers, and the ``HintLoss`` sized between them."""
    student_tap = MapTap(student, hint_module(student))
    with torch.no_grad():
        was_training = student.training
        student.eval()
        student(s_pre(torch.zeros(2, 1, s_pre.image_size, s_pre.image_size)))
        student.train(was_training)
    s_map = student_tap.map()
    teacher_tap = MapTap(teacher, hint_module(teacher, grid=s_map.shape[-1]))
    with torch.no_grad():
        teacher(t_pre(torch.zeros(2, 1, t_pre.image_size, t_pre.image_size)))
    t_map = teacher_tap.map()
    return student_tap, teacher_tap, HintLoss(s_map.shape[1], t_map.shape[1])


class Distiller(nn.Module):
    """What the loop trains: the student, plus the FitNets regressor when there is one (not saved)."""

    def __init__(self, student: nn.Module, hint: HintLoss | None = None) -> None:
        super().__init__()
        self.student = student
        self.hint = hint


# --- teacher outputs ----------------------------------------------------------------------------


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module, pixels: torch.Tensor, preprocess: Preprocess, *, bf16: bool = False
) -> tuple[torch.Tensor, ...]:
    """(logits (B, K), pooled features (B, C)) of the teacher in eval mode, as float32."""
    teacher.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        features = teacher.forward_features(preprocess(pixels))
        logits, pooled = logits_of(teacher.forward_head(features)), teacher.forward_head(features, pre_logits=True)
    return logits.float(), pooled.float()


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, K) logits of each teacher -> the ensemble's: the log of their mean softmax; one teacher's as they are.

    Probabilities are averaged, not logits, so the target is the ensemble's predictive distribution: at
    temperature 1 a softmax of this gives exactly that mean, and a temperature T softens the mean itself
    (softmax(log p / T) is proportional to p^(1/T)), not each teacher before averaging."""
    if len(logits) == 1:
        return logits[0]
    log_probs = torch.stack([x.float().log_softmax(dim=-1) for x in logits])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


# pixels (B, C, H, W) in [0, 1] -> (teacher logits (B, K), pooled features (B, C) or None)
TeacherAnswer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


class TeacherCache:
    """Teacher logits and pooled features for every training image, computed once (un-augmented data)."""

    def __init__(self, answer: TeacherAnswer, pixels: torch.Tensor, batch_size: int = 500) -> None:
        parts = [answer(x) for x in pixels.split(batch_size)]
        self.logits = torch.cat([p[0] for p in parts])  # (N, K)
        self.pooled = None if parts[0][1] is None else torch.cat([p[1] for p in parts])  # (N, C)

    def __call__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.logits[index], None if self.pooled is None else self.pooled[index]


# --- the objective ------------------------------------------------------------------------------


def make_kd_loss(
    distiller: Distiller,
    teacher: TeacherAnswer,
    settings: DistillSettings,
    *,
    student_pre: Preprocess,
    label_smoothing: float,
    cache: TeacherCache | None = None,
    view_logits: tuple[ShiftFlipViews, ViewLogits] | None = None,
    taps: tuple[MapTap, MapTap] | None = None,
):
    """The step's loss for ``settings.kind``: pixels in [0, 1], labels, item indices -> ``StepOutput``.

    ``teacher`` answers an augmented batch (``Teachers.answer``; with FitNets taps it must run the tapped
    teacher's forward). With ``view_logits`` the pixels arrive un-augmented: the step draws each image's view itself and
    looks its teacher logits up."""
    student, kind = distiller.student, settings.kind

    def loss_fn(pixels: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        if view_logits is not None:
            views, logits = view_logits
            drawn = views.draw(len(pixels))  # (B,)
            pixels = views.apply(pixels, drawn)
            t_logits, t_pooled = logits[index, drawn], None
        elif cache is not None:
            t_logits, t_pooled = cache(index)
        else:
            t_logits, t_pooled = teacher(pixels)
        features = student.forward_features(student_pre(pixels))
        out = student.forward_head(features)
        # the losses in float32 even when the forward ran under bf16 autocast (TrainConfig.precision):
        # softened distributions and pairwise distances need the mantissa
        out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
        if kind.is_deit:
            if not isinstance(out, tuple):
                raise UserError("--kind deit needs a distilled student (ViTConfig.distilled=True)")
            cls_logits, dist_logits = out
            if kind is KDKind.DEIT_HARD:
                loss = deit_hard_loss(cls_logits, dist_logits, t_logits, labels, label_smoothing=label_smoothing)
            else:
                loss = deit_soft_loss(
                    cls_logits,
                    dist_logits,
                    t_logits,
                    labels,
                    temperature=settings.temperature,
                    label_smoothing=label_smoothing,
                )
        elif kind is KDKind.RESPONSE:
            loss = response_kd_loss(
                out,
                t_logits,
                labels,
                alpha=settings.alpha,
                temperature=settings.temperature,
                label_smoothing=label_smoothing,
            )
        else:
            ce = F.cross_entropy(out, labels, label_smoothing=label_smoothing)
            if kind is KDKind.DIST:
                extra = dist_relation_loss(out, t_logits, temperature=settings.temperature)
            elif kind is KDKind.FEATURE:
                student_tap, teacher_tap = taps
                extra = distiller.hint(student_tap.map().float(), teacher_tap.map().float())
            else:
                s_pooled = student.forward_head(features, pre_logits=True).float()
                extra = RKD_DISTANCE_WEIGHT * rkd_distance_loss(s_pooled, t_pooled)
                extra = extra + RKD_ANGLE_WEIGHT * rkd_angle_loss(s_pooled, t_pooled)
            loss = ce + settings.beta * extra
        with torch.no_grad():
            predicted = logits_of(out).argmax(dim=1)
            metrics = {
                "train_acc": float((predicted == labels).float().mean()),
                "agreement": float((predicted == t_logits.argmax(dim=1)).float().mean()),
            }
        return StepOutput(loss, len(labels), metrics)

    return loss_fn


def distill_classifier(
    *,
    teacher_paths: Sequence[str | os.PathLike],
    student_preset: str,
    data: ClassificationData,
    out_dir: str | os.PathLike,
    train_config: TrainConfig,
    settings: ClassifySettings,
    distill: DistillSettings,
    progress: bool = True,
    log=print,
) -> ClassifyOutcome:
    """Train a ``student_preset`` classifier on ``data`` guided by the teacher checkpoint (or the ensemble of
    several, ``Teachers``); test the best."""
    distill.validate()
    teachers = Teachers.load(teacher_paths, data)
    student = build_student(student_preset, len(data.class_names), distill.kind, seed=train_config.seed)
    c = student.config
    student_pre = Preprocess(c.image_size, data.mean, data.std, in_channels=c.in_channels)
    hint, taps = None, None
    if not distill.kind.reads_logits_only:
        teachers.single()  # raises for an ensemble: these kinds read one teacher's maps or pooled features
    if distill.kind is KDKind.FEATURE:
        teacher, teacher_pre = teachers.single()
        student_tap, teacher_tap, hint = feature_taps(student, teacher, student_pre, teacher_pre)
        taps = (student_tap, teacher_tap)
    distiller = Distiller(student, hint)
    cache, view_logits, extra_results = None, None, {}
    if distill.cache_views:
        check_view_cache(settings, data)
        views = ShiftFlipViews(settings.crop_pad)
        # each teacher's views are built (or reused) beside its own checkpoint, then combined
        built = [
            cached_view_logits(
                lambda pixels, m=model, pre=pre: teacher_outputs(m, pixels, pre, bf16=distill.teacher_bf16)[0],
                path,
                data.train.images,
                views,
                teacher_setting=f"bf16={distill.teacher_bf16}",
                progress=progress,
                log=log,
            )
            # channels-last maps: the CNN teacher's forward at batch 128 ran at ~7.2k img/s against ~4.6k here
            # (one measurement); the build runs it once per view and image
            for path, model, pre in zip(
                teachers.paths,
                [m.to(memory_format=torch.channels_last) for m in teachers.models],
                teachers.preprocesses,
                strict=True,
            )
        ]
        combined = ViewLogits(ensemble_logits([b.logits for b in built]), sum(b.build_minutes for b in built))
        view_logits = (views, combined)
        extra_results["teacher_view_logits_minutes"] = combined.build_minutes
    elif not settings.augment and distill.kind is not KDKind.FEATURE:
        # un-augmented images: the teacher's answer per image never changes, so compute it once
        cache = TeacherCache(teachers.answer, unit_pixels(data.train, student_pre.image_size))
    total, trainable = count_parameters(student)
    teacher_total = sum(count_parameters(m)[0] for m in teachers.models)
    paths = [os.fspath(p) for p in teachers.paths]
    log(
        f"student {student_preset}: {total:,} parameters, {trainable:,} trainable; "
        f"teacher {', '.join(paths)}: {teacher_total:,} (frozen); kind {distill.kind.value}"
    )
    loss_fn = make_kd_loss(
        distiller,
        lambda pixels: teachers.answer(pixels, bf16=distill.teacher_bf16),
        distill,
        student_pre=student_pre,
        label_smoothing=settings.label_smoothing,
        cache=cache,
        view_logits=view_logits,
        taps=taps,
    )
    record = {
        # one teacher keeps the plain path, so the runs written before ensembles still resume
        "teacher": paths[0] if len(paths) == 1 else paths,
        "kind": distill.kind.value,
        "alpha": distill.alpha,
        "temperature": distill.temperature,
        "beta": distill.beta,
        **({"teacher_bf16": True} if distill.teacher_bf16 else {}),  # absent when off: older runs still resume
        **({"cache_views": True} if distill.cache_views else {}),
    }
    return fit_classifier(
        trainable=distiller,
        classifier=student,
        loss_fn=loss_fn,
        data=data,
        preprocess=student_pre,
        out_dir=out_dir,
        train_config=train_config,
        settings=settings,
        identity={"distill": record},
        extra_config={"distill": record},
        # the step augments itself when it looks up cached views: the batch arrives as stored
        prepare_batch=(lambda pixels: pixels) if view_logits is not None else None,
        extra_results=extra_results,
        progress=progress,
    )
