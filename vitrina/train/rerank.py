"""Train a cross-attention re-ranker (``vitrina.models.rerank``) on the dual encoder's hard negatives.

1. **Cache** (once): the frozen CLIP's image tokens of every distinct image, the token states and
   unit embeddings of every distinct caption, the unit embeddings of every image.
2. **Split by caption**: a seeded ``val_fraction`` of the captions (with all their images) is held out,
   so validation asks about texts the re-ranker never saw.
3. **Mine**: for each training caption, its positives are every image paired with that exact text
   (the same emoji in several styles); its hard negatives are the dual encoder's top ``hard_pool``
   images that are not positives, of which ``hard_per_positive`` per positive are drawn, plus as many
   random non-positives. Drawn once, seeded: the examples are a fixed list the loop reshuffles per epoch.
4. **Train** with binary cross-entropy on (caption, image, is-positive) through the one training loop
   (``vitrina.train.loop``: time cap, checkpoints, resume, metrics.jsonl).

Validation: for each held-out caption, the dual encoder's top ``val_candidates`` images are re-scored;
``val_r1_dual`` / ``val_r1_rerank`` say how often a positive is first before and after.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vitrina.config import TrainConfig, to_dict
from vitrina.data.datasets import open_source
from vitrina.data.images import BadImageError
from vitrina.data.sources import Pair
from vitrina.data.transforms import eval_transform
from vitrina.errors import UserError
from vitrina.models.clip import CLIP
from vitrina.models.rerank import CrossAttentionReranker, config_for, save_reranker
from vitrina.train.loop import StepOutput, TrainSummary, train


@dataclass
class RerankSettings:
    """How examples are mined, and the re-ranker's shape."""

    hard_pool: int = 16  # a caption's hard negatives are drawn from the dual encoder's top-k non-positives
    hard_per_positive: int = 1
    random_per_positive: int = 1
    val_candidates: int = 16  # held-out captions: how many dual-encoder candidates the re-ranker reorders
    width: int = 128
    depth: int = 2
    heads: int = 4
    feature_batch_size: int = 256


@dataclass
class FeatureCache:
    """The frozen towers' outputs for one data set (rows: distinct images, distinct captions)."""

    image_tokens: torch.Tensor  # (I, M, Cv)
    image_vectors: torch.Tensor  # (I, D) unit
    text_states: torch.Tensor  # (T, L, Ct), padded to the longest caption
    text_mask: torch.Tensor  # (T, L), 1 = real token
    text_vectors: torch.Tensor  # (T, D) unit
    positives: list[set[int]]  # caption row -> image rows paired with it
    captions: list[str]


def _image_key(source, row: int):
    """Pairs name an image by path (deduplicated) or hold it in memory (each its own)."""
    return os.fspath(source) if isinstance(source, str | os.PathLike) else ("memory", row)


def build_cache(clip: CLIP, pairs: Sequence[Pair], *, batch_size: int = 256) -> FeatureCache:
    """Run the frozen towers once over the distinct images and captions of ``pairs``."""
    image_rows: dict = {}
    sources = []
    caption_rows: dict[str, int] = {}
    positives: list[set[int]] = []
    for row, (source, caption) in enumerate(pairs):
        key = _image_key(source, row)
        if key not in image_rows:
            image_rows[key] = len(sources)
            sources.append(source)
        for text in [caption] if isinstance(caption, str) else list(caption):
            if text not in caption_rows:
                caption_rows[text] = len(positives)
                positives.append(set())
            positives[caption_rows[text]].add(image_rows[key])
    c = clip.config
    transform = eval_transform(c.vision.image_size, c.image_mean, c.image_std)
    clip.eval()
    tokens, vectors = [], []
    with torch.inference_mode():
        for i in range(0, len(sources), batch_size):
            try:
                pixels = torch.stack([transform(open_source(s)) for s in sources[i : i + batch_size]])
            except BadImageError as error:
                raise UserError(f"{error}; remove it from the data or fix it") from None
            x = clip.image_tokens(pixels)  # (b, M, Cv)
            tokens.append(x)
            vectors.append(F.normalize(clip.project_image(clip.visual.pool(x)), dim=-1))
        captions = list(caption_rows)
        states, masks, text_vectors = [], [], []
        for i in range(0, len(captions), batch_size):
            batch = clip.tokenize(captions[i : i + batch_size])
            s, m = clip.text_token_states(batch)  # (b, L, Ct), (b, L)
            states.append(s)
            masks.append(m)
            text_vectors.append(clip.encode_text(batch))
    longest = max(s.shape[1] for s in states)
    return FeatureCache(
        image_tokens=torch.cat(tokens),
        image_vectors=torch.cat(vectors),
        text_states=torch.cat([F.pad(s, (0, 0, 0, longest - s.shape[1])) for s in states]),
        text_mask=torch.cat([F.pad(m, (0, longest - m.shape[1])) for m in masks]),
        text_vectors=torch.cat(text_vectors),
        positives=positives,
        captions=captions,
    )


def split_captions(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train rows, val rows) of ``n`` captions; the val share is at least 2 when any."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = 0 if val_fraction <= 0 else max(2, round(val_fraction * n))
    if n - n_val < 2:
        raise UserError(f"only {n} distinct captions: too few to train a re-ranker and hold out {val_fraction:.0%}")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def mine_examples(
    cache: FeatureCache, caption_rows: np.ndarray, settings: RerankSettings, seed: int
) -> list[tuple[int, int, float]]:
    """(caption row, image row, label) examples: positives, dual-encoder hard negatives, random negatives."""
    rng = np.random.default_rng(seed)
    n_images = cache.image_vectors.shape[0]
    similarity = (cache.text_vectors[caption_rows] @ cache.image_vectors.T).numpy()  # (C, I)
    examples: list[tuple[int, int, float]] = []
    for row, sims in zip(caption_rows.tolist(), similarity, strict=True):
        positives = cache.positives[row]
        top = np.argsort(-sims, kind="stable")[: settings.hard_pool + len(positives)].tolist()
        ranked = [i for i in top if i not in positives]
        hard = ranked[: settings.hard_pool]
        others = n_images - len(positives)
        for image in positives:
            examples.append((row, image, 1.0))
            if hard:
                for pick in rng.choice(len(hard), size=min(settings.hard_per_positive, len(hard)), replace=False):
                    examples.append((row, int(hard[pick]), 0.0))
            for _ in range(settings.random_per_positive if others else 0):
                image_row = int(rng.integers(n_images))
                while image_row in positives:
                    image_row = int(rng.integers(n_images))
                examples.append((row, image_row, 0.0))
    return examples


class PairExamples(Dataset):
    """Examples as (text states, text mask, image tokens, label) tensors read from the cache."""

    def __init__(self, cache: FeatureCache, examples: list[tuple[int, int, float]]) -> None:
        self.cache, self.examples = cache, examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        caption, image, label = self.examples[index]
        c = self.cache
        return c.text_states[caption], c.text_mask[caption], c.image_tokens[image], torch.tensor(label)


def bce_step(model: CrossAttentionReranker, batch) -> StepOutput:
    """Binary cross-entropy of the matching logits against is-positive."""
    states, mask, image_tokens, labels = batch
    logits = model(states, mask, image_tokens)  # (B,)
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    accuracy = ((logits > 0).float() == labels).float().mean().item()
    return StepOutput(loss=loss, n_items=labels.shape[0], metrics={"acc": accuracy})


def rerank_eval(cache: FeatureCache, caption_rows: np.ndarray, candidates: int):
    """An ``eval_fn``: R@1 of the dual encoder and of the re-ranker over each caption's top candidates."""

    def evaluate(model: CrossAttentionReranker) -> dict[str, float]:
        if len(caption_rows) == 0:
            return {}
        similarity = cache.text_vectors[caption_rows] @ cache.image_vectors.T  # (C, I)
        top = similarity.topk(min(candidates, similarity.shape[1]), dim=1).indices  # (C, N)
        dual = rerank = 0
        for row, pool in zip(caption_rows.tolist(), top, strict=True):
            n = len(pool)
            logits = model(
                cache.text_states[row].expand(n, -1, -1), cache.text_mask[row].expand(n, -1), cache.image_tokens[pool]
            )  # (N,)
            dual += int(pool[0]) in cache.positives[row]
            rerank += int(pool[int(logits.argmax())]) in cache.positives[row]
        return {"val_r1_dual": dual / len(caption_rows), "val_r1_rerank": rerank / len(caption_rows)}

    return evaluate


def train_reranker(
    *,
    clip: CLIP,
    clip_ref: str,
    clip_digest: str,
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike,
    train_config: TrainConfig,
    settings: RerankSettings | None = None,
    data_spec: str = "",
    progress: bool = True,
) -> TrainSummary:
    """Train a re-ranker for the frozen ``clip`` on ``pairs`` into ``out_dir`` (a run found there resumes)."""
    settings = settings or RerankSettings()
    if not pairs:
        raise UserError("no image-caption pairs to train the re-ranker on: check the data spec")
    clip.requires_grad_(False)
    cache = build_cache(clip, pairs, batch_size=settings.feature_batch_size)
    train_rows, val_rows = split_captions(len(cache.captions), train_config.val_fraction, train_config.seed)
    examples = mine_examples(cache, train_rows, settings, train_config.seed)
    torch.manual_seed(train_config.seed)
    model = CrossAttentionReranker(config_for(clip, width=settings.width, depth=settings.depth, heads=settings.heads))
    extra = {"data": data_spec, "rerank": to_dict(settings), "train": to_dict(train_config)}

    def save(m: CrossAttentionReranker, folder: Path) -> None:
        save_reranker(m, folder, clip_ref=clip_ref, clip_digest=clip_digest, extra=extra)

    return train(
        model=model,
        step_fn=bce_step,
        train_data=PairExamples(cache, examples),
        out_dir=out_dir,
        config=train_config,
        save_fn=save,
        eval_fn=rerank_eval(cache, val_rows, settings.val_candidates),
        run_identity={"clip_digest": clip_digest, "data": data_spec, "rerank": to_dict(settings)},
        progress=progress,
    )
