"""Distil a CLIP's image tower into a smaller ViT (``vitrina distill clip``).

The student CLIP is the teacher with another image tower: the teacher's text tower, text
projection, temperature and tokenizer are copied and frozen; the student ViT and its image
projection (to the same ``embed_dim``) learn to put every image where the teacher puts it:

    loss = mean(1 - cos(student_emb, teacher_emb))                       (each image's direction)
         + similarity_weight * KL(teacher || student) over softmax(<e_i, e_j> / tau), j != i
                                                                            (the batch's geometry)
         + text_weight * KL(teacher || student) over softmax(scale * <e_i, t_k>), both ways
                                                       (where the batch's captions t_k see each image)

The last term asks what retrieval asks: not only where an image lies, but how it ranks the batch's
captions against each other (and each caption the batch's images), with the teacher's own temperature.
The captions' vectors come from the frozen text tower, computed once per distinct caption.

Since the text side is the teacher's, the student's image vectors are searched with the same text
queries: ``vitrina index --model STUDENT_DIR`` works as with the teacher. Both towers see the same
augmented batch (decoded at the teacher's size, resized for a student of another size). Without
augmentation the teacher's embeddings are computed once per image and looked up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vitrina.checkpoint import load_model, save_model
from vitrina.config import TrainConfig, to_dict
from vitrina.data.datasets import ImageCaptionDataset
from vitrina.data.transforms import eval_transform, train_transform
from vitrina.distill.losses import embedding_cosine_loss, similarity_distribution_loss, soft_target_kl
from vitrina.errors import UserError
from vitrina.models.clip import CLIP, CLIPConfig
from vitrina.models.registry import VIT_PRESETS, preset_config
from vitrina.models.vit import ViTConfig
from vitrina.train.clip import Pair, captions_of, fingerprint, retrieval_recall, split_pairs
from vitrina.train.loop import StepOutput, TrainSummary, train


@dataclass
class ClipDistillSettings:
    """``similarity_weight``: weight of the in-batch similarity KL (0 turns it off); ``text_weight``: weight
    of the image-caption KL over the batch's captions (0 turns it off);
    ``similarity_temperature``: its softmax temperature; ``augment``: random resized crop + flip;
    ``val_max_items``: size of the fixed validation subset."""

    similarity_weight: float = 1.0
    similarity_temperature: float = 0.05
    text_weight: float = 0.0  # the image-caption KL (0 turns it off); each image's first caption
    augment: bool = True
    val_max_items: int = 512

    def validate(self) -> None:
        if self.similarity_weight < 0 or self.similarity_temperature <= 0:
            raise UserError("similarity_weight must be >= 0 and similarity_temperature positive")
        if self.text_weight < 0:
            raise UserError(f"--text-weight must be 0 or more, got {self.text_weight}")


def load_clip_teacher(path: str | os.PathLike) -> CLIP:
    """A CLIP checkpoint in eval mode, frozen; ``UserError`` for anything else."""
    model, config = load_model(path)
    if not isinstance(model, CLIP):
        raise UserError(f"--teacher {path}: a {config['kind']} checkpoint; distill clip needs a CLIP checkpoint")
    model.requires_grad_(False)
    return model.eval()


def student_vision_config(preset: str) -> ViTConfig:
    """The student's image tower: a ViT preset, without a classifier head."""
    if preset not in VIT_PRESETS:
        names = ", ".join(VIT_PRESETS)
        raise UserError(f"--student {preset}: the student image tower must be a ViT preset ({names})")
    config = preset_config(preset)
    config.num_classes = 0
    return config


def build_student_clip(teacher: CLIP, vision: ViTConfig, *, seed: int = 0) -> CLIP:
    """A CLIP with a fresh ``vision`` tower and the teacher's text side (copied, frozen)."""
    t = teacher.config
    config = CLIPConfig(
        vision=vision,
        text=t.text,
        text_backend=t.text_backend,
        text_locked=True,
        embed_dim=t.embed_dim,
        init_logit_scale=t.init_logit_scale,
        max_logit_scale=t.max_logit_scale,
        image_mean=t.image_mean,
        image_std=t.image_std,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = CLIP(config, tokenizer=teacher.tokenizer)
    student.text.load_state_dict(teacher.text.state_dict())
    student.text_projection.load_state_dict(teacher.text_projection.state_dict())
    with torch.no_grad():
        student.logit_scale.copy_(teacher.logit_scale)
    for module in (student.text, student.text_projection):
        module.requires_grad_(False)
    student.logit_scale.requires_grad_(False)
    return student


class IndexedPixels(Dataset):
    """``(pixels, index)`` over the images of image-caption pairs (captions are not needed here)."""

    def __init__(self, pairs: Sequence[Pair], transform) -> None:
        self.images = ImageCaptionDataset(pairs, transform)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index][0], index


def resize_to(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) normalised pixels -> (B, 3, size, size) (bilinear, antialiased when shrinking)."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def teacher_embeddings(teacher: CLIP, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) -> (N, D) unit image embeddings of the teacher."""
    teacher.eval()
    return torch.cat([teacher.encode_image(x) for x in pixels.split(batch_size)])


@torch.no_grad()
def caption_vectors(teacher: CLIP, pairs: Sequence[Pair], batch_size: int = 256) -> torch.Tensor:
    """(N, D) unit text vectors of each pair's first caption, each distinct caption encoded once."""
    firsts = [captions_of(caption)[0] for _, caption in pairs]
    distinct = list(dict.fromkeys(firsts))
    vectors = torch.cat(
        [
            teacher.encode_text(teacher.tokenize(distinct[i : i + batch_size]))
            for i in range(0, len(distinct), batch_size)
        ]
    )
    row = {text: i for i, text in enumerate(distinct)}
    return vectors[torch.tensor([row[text] for text in firsts])]


def image_text_kl(student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """The mean of KL(teacher || student) over each image's softmax across the captions and each caption's
    across the images, logits ``scale * <image, caption>``. (B, D) unit student / teacher image vectors,
    (B, D) unit caption vectors -> scalar. A caption that several images share is a column several times
    over: the teacher's soft targets spread over its copies as the student's must, so duplicates need
    no special case."""
    s_logits = scale * student @ text.T  # (B, B): image i, caption k
    t_logits = scale * teacher @ text.T
    return (soft_target_kl(s_logits, t_logits, 1.0) + soft_target_kl(s_logits.T, t_logits.T, 1.0)) / 2


def clip_distill_loss(
    student: CLIP,
    teacher: CLIP,
    settings: ClipDistillSettings,
    cache: torch.Tensor | None = None,
    captions: torch.Tensor | None = None,
):
    """The step's loss: batch ``(pixels at the teacher's size, indices)`` -> ``StepOutput``. ``captions``:
    (N, D) caption vectors by item index (``caption_vectors``), needed when ``settings.text_weight`` > 0."""
    size = student.config.vision.image_size
    scale = float(teacher.scale())

    def step(_: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        pixels, index = batch
        target = cache[index] if cache is not None else teacher_embeddings(teacher, pixels)  # (B, D)
        emb = student.encode_image(resize_to(pixels, size))  # (B, D)
        cosine = embedding_cosine_loss(emb, target)
        loss = cosine
        metrics = {"cosine": 1 - float(cosine.detach())}
        if settings.similarity_weight > 0:
            similarity = similarity_distribution_loss(emb, target, settings.similarity_temperature)
            loss = loss + settings.similarity_weight * similarity
            metrics["similarity_kl"] = float(similarity.detach())
        if settings.text_weight > 0:
            text_kl = image_text_kl(emb, target, captions[index], scale)
            loss = loss + settings.text_weight * text_kl
            metrics["text_kl"] = float(text_kl.detach())
        return StepOutput(loss, len(index), metrics)

    return step


def make_eval_fn(student: CLIP, teacher: CLIP, val_pairs: Sequence[Pair], max_items: int):
    """Validation: mean cosine to the teacher, and text->image R@1/R@5 of student and teacher."""
    items = [(s, captions_of(c)[0]) for s, c in val_pairs[:max_items]]
    c = teacher.config
    dataset = ImageCaptionDataset(items, eval_transform(c.vision.image_size, c.image_mean, c.image_std))
    pixels, captions = [], []
    for x, caption in DataLoader(dataset, batch_size=256):
        pixels.append(x)
        captions += list(caption)
    pixels_all = torch.cat(pixels)
    target = teacher_embeddings(teacher, pixels_all)
    with torch.no_grad():
        text = torch.cat(
            [teacher.encode_text(teacher.tokenize(captions[i : i + 256])) for i in range(0, len(captions), 256)]
        )
    teacher_r1 = retrieval_recall(target, text, captions, 1)
    size = student.config.vision.image_size

    def evaluate(_: torch.nn.Module) -> dict[str, float]:
        emb = torch.cat([student.encode_image(resize_to(x, size)) for x in pixels_all.split(256)])
        return {
            "val/cosine": float(F.cosine_similarity(emb, target, dim=-1).mean()),
            "val/t2i_r1": retrieval_recall(emb, text, captions, 1),
            "val/t2i_r5": retrieval_recall(emb, text, captions, 5),
            "val/teacher_t2i_r1": teacher_r1,
        }

    return evaluate


def distill_clip_tower(
    *,
    teacher_path: str | os.PathLike,
    student_preset: str,
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike,
    train_config: TrainConfig,
    settings: ClipDistillSettings | None = None,
    progress: bool = True,
) -> TrainSummary:
    """Train a student image tower of ``student_preset`` on the images of ``pairs`` into ``out_dir``."""
    settings = settings or ClipDistillSettings()
    settings.validate()
    if not pairs:
        raise UserError("no images to distil on: check the --data spec")
    teacher = load_clip_teacher(teacher_path)
    student = build_student_clip(teacher, student_vision_config(student_preset), seed=train_config.seed)
    train_config.validate()
    train_pairs, val_pairs = split_pairs(pairs, train_config.val_fraction, train_config.seed)
    c = teacher.config
    make = train_transform if settings.augment else eval_transform
    dataset = IndexedPixels(train_pairs, make(c.vision.image_size, c.image_mean, c.image_std))
    cache = None
    if not settings.augment:
        loader = DataLoader(dataset, batch_size=256, num_workers=train_config.num_workers)
        cache = torch.cat([teacher_embeddings(teacher, x) for x, _ in loader])
    captions = caption_vectors(teacher, train_pairs) if settings.text_weight > 0 else None
    total = sum(p.numel() for p in student.visual.parameters()) + student.image_projection.weight.numel()
    teacher_total = sum(p.numel() for p in teacher.visual.parameters())
    print(f"student image tower {student_preset}: {total:,} trainable parameters (teacher's: {teacher_total:,})")
    record = {"teacher": os.fspath(Path(teacher_path)), "student": student_preset, "settings": to_dict(settings)}

    def save(_: torch.nn.Module, folder: Path) -> None:
        save_model(student, folder, extra_config={"distilled_from": record, "train": to_dict(train_config)})

    # the loop trains (and checkpoints the state of) the image side only; save() writes the whole CLIP
    trainable = torch.nn.ModuleDict({"visual": student.visual, "image_projection": student.image_projection})
    return train(
        model=trainable,
        step_fn=clip_distill_loss(student, teacher, settings, cache, captions),
        train_data=dataset,
        out_dir=out_dir,
        config=train_config,
        save_fn=save,
        eval_fn=make_eval_fn(student, teacher, val_pairs, settings.val_max_items) if val_pairs else None,
        run_identity={"distill": record, "data": fingerprint(pairs), "model": to_dict(student.config)},
        best_metric="val/cosine" if val_pairs else None,
        higher_is_better=True,
        progress=progress,
    )
