"""Contrastive image-text training of a CLIP on the shared loop (``vitrina train clip``).

1. The pairs are split into training and validation sets (seeded).
2. A text transformer that still has the bare byte-level tokenizer gets a BPE tokenizer learnt from
   the training captions (saved beside the weights by ``save_model``). A resumed run takes the
   tokenizer from its checkpoint instead, so the token ids stay those the weights learnt.
3. Each step embeds a batch of images and captions and takes ``clip_loss``. When the text tower is
   locked its features never change, so they are computed once for every distinct caption (under
   ``inference_mode``, in batches) and looked up per step; only the projection above them trains.
4. After each epoch: validation loss and text->image R@1/R@5 on a fixed validation subset.
5. Under ``torchrun`` each process embeds its share of the global batch, gathers every share's
   embeddings (with their gradients: ``distributed.gather_with_grad``) and takes the loss of its
   own rows against the global batch, so N processes compute what one process with the global
   batch computes.

Every epoch's checkpoint folder is a complete model that ``vitrina.checkpoint.load_encoder`` opens.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitrina.checkpoint import load_model, save_model
from vitrina.config import TrainConfig, to_dict
from vitrina.data.datasets import Caption, ImageCaptionDataset, ImageSource
from vitrina.data.transforms import eval_transform, train_transform
from vitrina.errors import UserError
from vitrina.losses import FeatureGather, clip_loss, clip_loss_rows
from vitrina.models.clip import CLIP
from vitrina.models.text import SPECIAL_TOKENS, train_bpe
from vitrina.train import distributed
from vitrina.train.loop import CheckpointInfo, StepOutput, TrainSummary, find_checkpoint, train

Pair = tuple[ImageSource, Caption]

BYTE_LEVEL_VOCAB = len(SPECIAL_TOKENS) + 256  # a tokenizer this small has learnt no merges


@dataclass
class ClipTrainSettings:
    """CLIP-specific settings on top of ``TrainConfig``.

    ``tokenizer_vocab_size``: BPE vocabulary learnt for a fresh text transformer (None: the tower's
    ``vocab_size``). ``cache_text_features``: precompute a locked text tower's features.
    ``val_max_items``: size of the fixed validation subset. ``text_batch_size``: captions per batch
    when caching features.
    """

    tokenizer_vocab_size: int | None = None
    cache_text_features: bool = True
    val_max_items: int = 512
    text_batch_size: int = 256


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


def clip_step(
    model: CLIP, batch: tuple[torch.Tensor, list[str]], embed_text, gather: FeatureGather | None = None
) -> StepOutput:
    """One contrastive step: (B, 3, H, W) pixels and B captions -> ``clip_loss`` and the temperature.

    With ``gather`` (several processes) B is this process's share of the global batch: the
    negatives and the in-batch R@1 are over the global batch, the loss is this share's rows.
    """
    pixels, captions = batch
    image_emb = model.encode_image(pixels)  # (B, D)
    text_emb = embed_text(list(captions))  # (B, D)
    scale = model.scale()
    if gather is None:
        loss, images, offset = clip_loss(image_emb, text_emb, scale), image_emb, 0
    else:
        images, offset = gather(image_emb)  # (N, D), the global batch
        texts, _ = gather(text_emb)  # (N, D)
        loss = clip_loss_rows(image_emb, text_emb, images, texts, scale, offset=offset)
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


def make_eval_fn(
    model: CLIP,
    val_pairs: Sequence[Pair],
    *,
    batch_size: int,
    max_items: int,
    cache: TextFeatureCache | None,
    num_workers: int,
) -> Callable[[CLIP], dict[str, float]]:
    """The loop's ``eval_fn``: val loss (in batches of ``batch_size``), R@1 and R@5 text->image.

    The subset (first ``max_items`` pairs, first caption of each) and its pixels are fixed once.
    """
    c = model.config
    items = [(s, cap if isinstance(cap, str) else cap[0]) for s, cap in val_pairs[:max_items]]
    dataset = ImageCaptionDataset(items, eval_transform(c.vision.image_size, c.image_mean, c.image_std))
    pixels, captions = [], []
    for x, caption in DataLoader(dataset, batch_size=256, num_workers=num_workers):
        pixels.append(x)
        captions += list(caption)
    pixels_all = torch.cat(pixels)  # (N, 3, H, W)

    def evaluate(model: CLIP) -> dict[str, float]:
        embed_text = make_embedder(model, cache)
        image_emb = torch.cat([model.encode_image(x) for x in pixels_all.split(256)])  # (N, D)
        text_emb = torch.cat([embed_text(captions[i : i + 256]) for i in range(0, len(captions), 256)])  # (N, D)
        losses, weights = [], []
        for i in range(0, len(captions), batch_size):
            n = len(captions[i : i + batch_size])
            if n < 2:
                continue  # a batch of one has no negatives
            losses.append(clip_loss(image_emb[i : i + n], text_emb[i : i + n], model.scale()).item() * n)
            weights.append(n)
        return {
            "val/loss": sum(losses) / max(1, sum(weights)),
            "val/t2i_r1": retrieval_recall(image_emb, text_emb, captions, 1),
            "val/t2i_r5": retrieval_recall(image_emb, text_emb, captions, 5),
        }

    return evaluate


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
    tokenizer_vocab_size: int | None = None,
    resume: bool = True,
    progress: bool = True,
    on_checkpoint: Callable[[CheckpointInfo], None] | None = None,
) -> TrainSummary:
    """Train ``model`` contrastively on ``pairs`` into ``out_dir`` (resuming a run found there).

    Image size and normalisation come from ``model.config``. ``tokenizer_vocab_size`` overrides
    ``settings.tokenizer_vocab_size``. Returns the loop's summary (val loss, R@1, R@5 included).
    """
    settings = settings or ClipTrainSettings()
    vocab = tokenizer_vocab_size or settings.tokenizer_vocab_size
    # under torchrun: the global batch is the negatives of every process's rows
    gather = distributed.gather_with_grad if distributed.setup() else None
    out_dir = Path(out_dir)
    if not pairs:
        raise UserError("no image-caption pairs to train on: check the data spec")
    train_config.validate()
    train_pairs, val_pairs = split_pairs(pairs, train_config.val_fraction, train_config.seed)
    learnt_tokenizer = _prepare_tokenizer(model, train_pairs, out_dir, vocab)

    c = model.config
    dataset = ImageCaptionDataset(train_pairs, train_transform(c.vision.image_size, c.image_mean, c.image_std))
    cache = None
    if settings.cache_text_features and text_locked(model):
        cache = TextFeatureCache(model, all_captions(pairs), batch_size=settings.text_batch_size)
    embed_text = make_embedder(model, cache)
    eval_fn = None
    if val_pairs:
        eval_fn = make_eval_fn(
            model,
            val_pairs,
            batch_size=train_config.batch_size,
            max_items=settings.val_max_items,
            cache=cache,
            num_workers=train_config.num_workers,
        )
    identity: dict[str, Any] = {
        "model": to_dict(c),
        "data": fingerprint(pairs),
        "tokenizer": {"learnt": learnt_tokenizer, "vocab_size": vocab},
        "val_max_items": settings.val_max_items,
    }

    def save(model: CLIP, folder: Path) -> None:
        save_model(model, folder, extra_config={"train": to_dict(train_config)})

    return train(
        model=model,
        step_fn=lambda model, batch: clip_step(model, batch, embed_text, gather),
        train_data=dataset,
        out_dir=out_dir,
        config=train_config,
        save_fn=save,
        eval_fn=eval_fn,
        run_identity=identity,
        resume=resume,
        best_metric="val/t2i_r1" if eval_fn else None,
        higher_is_better=True,
        on_checkpoint=on_checkpoint,
        progress=progress,
    )
