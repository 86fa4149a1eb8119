"""Contrastive image-text training of a CLIP on the shared loop (``vitrina train clip``).

1. The pairs are split into training and validation sets (seeded).
2. A text transformer that still has the bare byte-level tokenizer gets a BPE tokenizer learnt from
   the training captions (saved beside the weights by ``save_model``). A resumed run takes the
   tokenizer from its checkpoint instead, so the token ids stay those the weights learnt.
3. The training images are decoded once into memory when they fit (``vitrina.train.clip_data``)
   and cropped/flipped a whole batch at a time; large collections keep per-sample decoding.
4. Each step embeds a batch of images and captions and takes ``clip_loss``, duplicate-aware by
   default: pairs of one concept (one emoji in several styles, one garment class) in a batch share
   the target instead of being each other's negatives. When the text tower is locked its features
   never change, so they are computed once for every distinct caption (under ``inference_mode``,
   in batches) and looked up per step; only the projection above them trains.
5. After each epoch: validation loss and text->image R@1/5/10 on a fixed validation subset, and
   R@1/5/10 on every *watch set* (e.g. held-out concepts, a held-out drawing style). The model with
   the best ``best_metric`` so far is written to ``out_dir/best`` (a folder ``load_encoder`` opens).
6. Under ``torchrun`` each process embeds its share of the global batch, gathers every share's
   embeddings (with their gradients: ``distributed.gather_with_grad``) and takes the loss of its
   own rows against the global batch, so N processes compute what one process with the global
   batch computes.

Every epoch's checkpoint folder is a complete model that ``vitrina.checkpoint.load_encoder`` opens.
``out_dir`` itself is the last checkpoint; ``out_dir/best`` the best one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitrina.checkpoint import load_model, save_model
from vitrina.config import NEGATIVES, TrainConfig, to_dict
from vitrina.data.datasets import Caption, ImageSource
from vitrina.data.memory import DEFAULT_BUDGET_BYTES, fits_in_memory
from vitrina.errors import UserError
from vitrina.losses import FeatureGather, caption_set_loss, clip_loss, clip_loss_rows
from vitrina.models.clip import CLIP
from vitrina.models.text import SPECIAL_TOKENS, train_bpe
from vitrina.train import distributed
from vitrina.train.checkpointing import BestKeeper
from vitrina.train.clip_data import caption_concepts, fixed_eval_set, training_data
from vitrina.train.loop import CheckpointInfo, StepOutput, TrainSummary, find_checkpoint, train

Pair = tuple[ImageSource, Caption]

BYTE_LEVEL_VOCAB = len(SPECIAL_TOKENS) + 256  # a tokenizer this small has learnt no merges


@dataclass
class ClipTrainSettings:
    """CLIP-specific settings on top of ``TrainConfig``.

    ``tokenizer_vocab_size``: BPE vocabulary learnt for a fresh text transformer (None: the tower's
    ``vocab_size``). ``cache_text_features``: precompute a locked text tower's features.
    ``val_max_items``: size of the fixed validation subset. ``text_batch_size``: captions per batch
    when caching features. ``in_memory``: decode the training images once into memory (None: when
    they fit ``memory_budget_bytes`` at the model's resolution). ``duplicate_aware``: pairs of one
    concept in a batch share the target (``clip_loss(concepts=...)``). ``watch_max_items``: images
    of each watch set evaluated. ``best_metric``: what ``out_dir/best`` keeps the best of (None: the
    first watch set's R@10, else the validation R@10). ``augment``: random crops and flips (off:
    every image as the index sees it, for runs that must match exactly). ``crop``: the random resized
    crops (off: flips alone). ``negatives``: what an image is contrasted with: ``"batch"`` (CLIP's
    loss: the batch's captions) or ``"captions"`` (every distinct training caption, with every
    phrasing of its concept as a positive: ``caption_set_loss``; needs cached text features) or ``"auto"``
    (``"captions"`` where the run can have them, a locked text tower in one process; else ``"batch"``).
    """

    tokenizer_vocab_size: int | None = None
    cache_text_features: bool = True
    val_max_items: int = 512
    text_batch_size: int = 256
    in_memory: bool | None = None
    memory_budget_bytes: int = DEFAULT_BUDGET_BYTES
    duplicate_aware: bool = True
    watch_max_items: int = 2048
    best_metric: str | None = None
    augment: bool = True
    crop: bool = True
    negatives: str = "batch"

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVES:
            raise UserError(f"negatives={self.negatives!r}: choose one of {', '.join(NEGATIVES)}")


def split_pairs(pairs: Sequence[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded shuffle, then the first ``val_fraction`` (at least 2 items, when any) is validation."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = 0 if val_fraction <= 0 else max(2, round(val_fraction * len(pairs)))
    if n_val and len(pairs) - n_val < 2:
        raise UserError(f"only {len(pairs)} image-caption pairs: too few to hold out {val_fraction:.0%} for validation")
    shuffled = [pairs[i] for i in order]
    return shuffled[n_val:], shuffled[:n_val]


def captions_of(caption: Caption) -> list[str]:
    """One item's caption strings (an item may carry several)."""
    return [caption] if isinstance(caption, str) else list(caption)


def all_captions(pairs: Sequence[Pair]) -> list[str]:
    """Every caption string of every item, in order."""
    return [text for _, caption in pairs for text in captions_of(caption)]


def fingerprint(pairs: Sequence[Pair]) -> str:
    """A short hash of the pairs (paths as names, in-memory images by content) for the resume check."""
    h = hashlib.sha256()
    for source, caption in pairs:
        if isinstance(source, np.ndarray):
            h.update(str(source.shape).encode() + source.tobytes())
        elif isinstance(source, Image.Image):
            h.update(f"{source.mode}{source.size}".encode() + source.tobytes())
        else:
            h.update(os.fsdecode(source).encode())
        h.update(b"\0" + "\x1f".join(captions_of(caption)).encode() + b"\n")
    return h.hexdigest()[:16]


# --- text features ---------------------------------------------------------------------------


class TextFeatureCache:
    """A locked text tower's pooled features for a fixed set of captions, computed once."""

    def __init__(self, model: CLIP, captions: Sequence[str], *, batch_size: int = 256) -> None:
        self.row = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        unique = list(self.row)
        was_training = model.training
        model.eval()
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(unique), batch_size):
                chunks.append(model.text_features(model.tokenize(unique[i : i + batch_size])))
        model.train(was_training)
        # clone outside inference mode: inference tensors cannot be saved for backward
        self.features = torch.cat(chunks).clone()  # (N_unique, Ct)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """B captions -> (B, Ct) features."""
        return self.features[[self.row[c] for c in captions]]


def text_locked(model: CLIP) -> bool:
    """True when no text-tower parameter trains (its features are a fixed function of the caption)."""
    return not any(p.requires_grad for p in model.text.parameters())


def make_embedder(model: CLIP, cache: TextFeatureCache | None) -> Callable[[list[str]], torch.Tensor]:
    """captions -> (B, D) unit text embeddings, through the cache when there is one."""
    if cache is None:
        return lambda captions: model.encode_text(model.tokenize(captions))
    return lambda captions: torch.nn.functional.normalize(model.project_text(cache(captions)), dim=-1)


class CaptionSet:
    """Every distinct training caption, for ``negatives="captions"``: their unit embeddings under the
    current text projection (recomputed each step: the projection trains) and their concept ids."""

    def __init__(self, model: CLIP, cache: TextFeatureCache, captions: Sequence[str], concept_of: dict[str, int]):
        self.captions = list(dict.fromkeys(captions))
        self.model, self.features = model, cache(self.captions)  # (C, Ct)
        self.concepts = torch.tensor([concept_of[c] for c in self.captions])  # (C,)

    def embeddings(self) -> torch.Tensor:
        """(C, D) unit embeddings of every caption."""
        return torch.nn.functional.normalize(self.model.project_text(self.features), dim=-1)


def clip_step(
    model: CLIP,
    batch: tuple[torch.Tensor, list[str]],
    embed_text,
    gather: FeatureGather | None = None,
    concept_of: dict[str, int] | None = None,
    caption_set: CaptionSet | None = None,
) -> StepOutput:
    """One contrastive step: (B, 3, H, W) pixels and B captions -> ``clip_loss`` and the temperature.

    With ``gather`` (several processes) B is this process's share of the global batch: the
    negatives and the in-batch R@1 are over the global batch, the loss is this share's rows.
    With ``concept_of`` (caption -> concept id) the targets are duplicate-aware. With
    ``caption_set`` (one process, ``concept_of`` given) each image is contrasted with every
    training caption (``caption_set_loss``).
    """
    pixels, captions = batch
    # The towers may run under bf16 autocast (``TrainConfig.precision``); the loss never does. Similarities
    # times a temperature of up to 100 in bf16 (8 bits of mantissa) would be rounded by up to 0.5 a logit.
    image_emb = model.encode_image(pixels).float()  # (B, D)
    text_emb = embed_text(list(captions)).float()  # (B, D)
    every_caption = caption_set.embeddings().float() if caption_set is not None else None  # (C, D)
    concepts = None if concept_of is None else torch.tensor([concept_of[c] for c in captions])  # (B,)
    with torch.autocast("cpu", enabled=False):
        scale = model.scale()
        if every_caption is not None:
            loss = caption_set_loss(
                image_emb,
                text_emb,
                every_caption,
                scale,
                concepts=concepts,
                caption_set_concepts=caption_set.concepts,
            )
            images, offset = image_emb, 0
        elif gather is None:
            loss, images, offset = clip_loss(image_emb, text_emb, scale, concepts=concepts), image_emb, 0
        else:
            images, offset = gather(image_emb)  # (N, D), the global batch
            texts, _ = gather(text_emb)  # (N, D)
            all_concepts = None if concepts is None else gather(concepts)[0]  # (N,)
            loss = clip_loss_rows(
                image_emb, text_emb, images, texts, scale, offset=offset, row_concepts=concepts, concepts=all_concepts
            )
    with torch.no_grad():
        scale_value = float(scale.detach())
        # in-batch text->image top-1: a cheap progress signal beside the loss
        batch_r1 = (text_emb @ images.T).argmax(dim=1).eq(torch.arange(len(captions)) + offset).float().mean()
    metrics = {"logit_scale": scale_value, "t2i_batch_r1": float(batch_r1)}
    return StepOutput(loss, len(captions), metrics)


# --- validation ------------------------------------------------------------------------------


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str], k: int) -> float:
    """Text->image R@k: share of captions whose top k images include one carrying the same caption.

    Counting any image with an identical caption as a hit matters for prompt captions ("a photo of
    a sandal." names many images).
    """
    scores = text_emb @ image_emb.T  # (Nt, Ni)
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (Nt, k)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])  # (N,)
    hits = (caption_id[top] == caption_id[:, None]).any(dim=1)  # (Nt,)
    return hits.float().mean().item()


def embed_eval_set(
    model: CLIP, embed_text: Callable[[list[str]], torch.Tensor], pixels: torch.Tensor, captions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) pixels and N captions -> (N, D) image and (N, D) text embeddings, in batches of 256."""
    image_emb = torch.cat([model.encode_image(x) for x in pixels.split(256)])  # (N, D)
    text_emb = torch.cat([embed_text(list(captions[i : i + 256])) for i in range(0, len(captions), 256)])  # (N, D)
    return image_emb, text_emb


def recalls(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str], prefix: str) -> dict[str, float]:
    """``{prefix}/t2i_r1``, ``_r5`` and ``_r10`` of one embedded set."""
    return {f"{prefix}/t2i_r{k}": retrieval_recall(image_emb, text_emb, captions, k) for k in (1, 5, 10)}


def make_eval_fn(
    model: CLIP,
    val_pairs: Sequence[Pair],
    *,
    batch_size: int,
    max_items: int,
    cache: TextFeatureCache | None,
    watch_sets: dict[str, Sequence[Pair]] | None = None,
    watch_max_items: int = 2048,
) -> Callable[[CLIP], dict[str, float]]:
    """The loop's ``eval_fn``: val loss (in batches of ``batch_size``) and text->image R@1/5/10 on
    the validation subset, and R@1/5/10 on every watch set (``{name}/t2i_r10``...).

    Each subset (the first ``max_items`` / ``watch_max_items`` pairs, first caption of each) and its
    pixels are fixed once.
    """
    c = model.config
    geometry = {"size": c.vision.image_size, "mean": c.image_mean, "std": c.image_std}
    sets = {}
    if val_pairs:
        sets["val"] = fixed_eval_set(val_pairs, max_items=max_items, **geometry)
    for name, pairs in (watch_sets or {}).items():
        if not pairs:
            raise UserError(f"watch set {name!r} has no pairs; leave it out or give it images")
        sets[name] = fixed_eval_set(pairs, max_items=watch_max_items, **geometry)

    def evaluate(model: CLIP) -> dict[str, float]:
        embed_text = make_embedder(model, cache)
        results: dict[str, float] = {}
        for name, (pixels, captions) in sets.items():
            image_emb, text_emb = embed_eval_set(model, embed_text, pixels, captions)
            if name == "val":
                results["val/loss"] = _batched_loss(model, image_emb, text_emb, batch_size)
            results.update(recalls(image_emb, text_emb, captions, name))
        return results

    return evaluate


def _batched_loss(model: CLIP, image_emb: torch.Tensor, text_emb: torch.Tensor, batch_size: int) -> float:
    """The plain CLIP loss over consecutive batches of ``batch_size``, weighted by their sizes."""
    losses, weights = [], []
    for i in range(0, len(image_emb), batch_size):
        n = len(image_emb[i : i + batch_size])
        if n < 2:
            continue  # a batch of one has no negatives
        losses.append(clip_loss(image_emb[i : i + n], text_emb[i : i + n], model.scale()).item() * n)
        weights.append(n)
    return sum(losses) / max(1, sum(weights))


def use_in_memory(settings: ClipTrainSettings, n_items: int, size: int) -> bool:
    """The in-memory path when asked, or (``in_memory`` None) when the decoded set fits its budget."""
    if settings.in_memory is not None:
        return settings.in_memory
    return fits_in_memory(n_items, size, settings.memory_budget_bytes)


# --- the trainer -----------------------------------------------------------------------------


def _prepare_tokenizer(model: CLIP, train_pairs: Sequence[Pair], out_dir: Path, vocab_size: int | None) -> bool:
    """Give a fresh text transformer its BPE tokenizer; True when one was learnt or reloaded."""
    if model.config.text_backend != "transformer" or model.tokenizer is None:
        return False
    if model.tokenizer.get_vocab_size() > BYTE_LEVEL_VOCAB:
        return False  # it already has a learnt tokenizer (e.g. fine-tuning a trained CLIP)
    previous = find_checkpoint(out_dir)
    if previous is not None:
        # resuming: the token ids must be those the saved weights learnt
        try:
            saved, _ = load_model(previous)
            model.set_tokenizer(saved.tokenizer)
            return True
        except (UserError, ValueError, AttributeError):
            pass  # a checkpoint of another model: the loop refuses it with a clear message
    size = vocab_size or model.config.text.vocab_size
    model.set_tokenizer(train_bpe(all_captions(train_pairs), size, context_length=model.config.text.context_length))
    return True


def train_clip(
    *,
    model: CLIP,
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike,
    train_config: TrainConfig,
    settings: ClipTrainSettings | None = None,
    concepts: Sequence[str] | None = None,
    watch_sets: dict[str, Sequence[Pair]] | None = None,
    extra_config: dict[str, Any] | None = None,
    tokenizer_vocab_size: int | None = None,
    resume: bool = True,
    progress: bool = True,
    on_checkpoint: Callable[[CheckpointInfo], None] | None = None,
) -> TrainSummary:
    """Train ``model`` contrastively on ``pairs`` into ``out_dir`` (resuming a run found there).

    Image size and normalisation come from ``model.config``. ``concepts``: one key per pair (what
    the duplicate-aware targets treat as one thing; default: the first caption). ``watch_sets``:
    named pair sets evaluated after every epoch and never trained on (held-out concepts, a held-out
    style); the best model by ``settings.best_metric`` is kept in ``out_dir/best``. ``extra_config``
    goes into every saved ``config.json`` (e.g. the concepts held out of training, which the
    evaluation reads). ``tokenizer_vocab_size`` overrides ``settings.tokenizer_vocab_size``. Returns the loop's summary.
    """
    settings = settings or ClipTrainSettings()
    vocab = tokenizer_vocab_size or settings.tokenizer_vocab_size
    # under torchrun: the global batch is the negatives of every process's rows
    gather = distributed.gather_with_grad if distributed.setup() else None
    out_dir = Path(out_dir)
    if not pairs:
        raise UserError("no image-caption pairs to train on: check the data spec")
    train_config.validate()
    watch_sets = dict(watch_sets or {})
    concept_of = caption_concepts(pairs, concepts) if settings.duplicate_aware else None
    train_pairs, val_pairs = split_pairs(pairs, train_config.val_fraction, train_config.seed)
    learnt_tokenizer = _prepare_tokenizer(model, train_pairs, out_dir, vocab)

    c = model.config
    in_memory = use_in_memory(settings, len(train_pairs), c.vision.image_size)
    geometry = {"size": c.vision.image_size, "mean": c.image_mean, "std": c.image_std}
    data = training_data(train_pairs, in_memory=in_memory, augment=settings.augment, crop=settings.crop, **geometry)
    if data.in_memory and train_config.num_workers:
        # the pixels are already decoded: worker processes would only copy batches between processes
        train_config = dataclasses.replace(train_config, num_workers=0)
    cache = None
    if settings.cache_text_features and text_locked(model):
        watched = [pair for watch in watch_sets.values() for pair in watch]
        cache = TextFeatureCache(model, all_captions([*pairs, *watched]), batch_size=settings.text_batch_size)
    embed_text = make_embedder(model, cache)
    caption_set = None
    captions_possible = cache is not None and gather is None  # cached features of every caption, one process
    negatives = settings.negatives
    if negatives == "auto":
        # where they apply, caption negatives gained 7 (captions) and 11 (names) points of held-out-style R@10
        # over batch negatives (retrieval_quality.json: caption-negatives against caption-variants)
        negatives = "captions" if captions_possible else "batch"
    if negatives == "captions":
        if not captions_possible:
            raise UserError(
                "negatives='captions' needs a locked text tower with cached features, in one process; "
                "use negatives='batch' for a trained text tower or under torchrun"
            )
        # the training captions only: held-out concepts' texts must never reach training, not even as negatives
        concept_of = concept_of or caption_concepts(train_pairs, None)
        caption_set = CaptionSet(model, cache, all_captions(train_pairs), concept_of)
    eval_fn = None
    if val_pairs or watch_sets:
        eval_fn = make_eval_fn(
            model,
            val_pairs,
            batch_size=train_config.batch_size,
            max_items=settings.val_max_items,
            cache=cache,
            watch_sets=watch_sets,
            watch_max_items=settings.watch_max_items,
        )
    identity: dict[str, Any] = {
        "model": to_dict(c),
        "data": fingerprint(pairs),
        "tokenizer": {"learnt": learnt_tokenizer, "vocab_size": vocab},
        "val_max_items": settings.val_max_items,
        "in_memory": data.in_memory,  # another augmentation path draws other crops
        "duplicate_aware": settings.duplicate_aware,
        "augment": settings.augment,
        "concepts": hashlib.sha256("\x1f".join(concepts or []).encode()).hexdigest()[:16],
        "watch": {name: fingerprint(watch) for name, watch in watch_sets.items()},
    }
    if settings.augment and not settings.crop:
        identity["crop"] = False  # only when off: runs from before the setting (all cropped) still resume
    if negatives != "batch":
        identity["negatives"] = negatives  # likewise: only when not CLIP's own

    def save(model: CLIP, folder: Path, best: dict | None = None) -> None:
        extra: dict[str, Any] = {**(extra_config or {}), "train": to_dict(train_config)}
        if best is not None:
            extra["best"] = best
        save_model(model, folder, extra_config=extra)

    best_metric = settings.best_metric or (f"{next(iter(watch_sets))}/t2i_r10" if watch_sets else "val/t2i_r10")
    keeper = BestKeeper(model, out_dir, best_metric, save) if eval_fn else None

    def evaluate(model: CLIP) -> dict[str, float]:
        results = eval_fn(model)
        keeper.note(results)
        return results

    def after_checkpoint(info: CheckpointInfo) -> None:
        if keeper is not None:
            keeper.on_checkpoint(info)
        if on_checkpoint is not None:
            on_checkpoint(info)

    return train(
        model=model,
        step_fn=lambda model, batch: clip_step(model, batch, embed_text, gather, concept_of, caption_set),
        train_data=data.dataset,
        collate_fn=data.collate_fn,
        out_dir=out_dir,
        config=train_config,
        save_fn=save,
        eval_fn=evaluate if eval_fn else None,
        run_identity=identity,
        resume=resume,
        best_metric=best_metric if eval_fn else None,
        higher_is_better=True,
        on_checkpoint=after_checkpoint,
        progress=progress,
    )
