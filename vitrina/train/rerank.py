"""Train a cross-attention re-ranker (``vitrina.models.rerank``) on the dual encoder's hard negatives.

1. **Cache** (once): the frozen CLIP's image tokens of every distinct image, the token states and
   unit embeddings of every distinct caption, the unit embeddings of every image.
2. **Split by caption**: a seeded ``val_fraction`` of the captions (with all their images) is held out,
   so validation asks about texts the re-ranker never saw.
3. **Mine**: for each training caption, its positives are every image paired with that exact text
   (the same emoji in several styles); each positive makes one group with ``negatives`` images drawn
   from the caption's ``hard_pool`` best dual-encoder candidates that are not positives: what a
   re-ranked query reorders. Drawn once, seeded: a fixed list of groups the loop reshuffles per epoch.
4. **Train** a correction to the dual encoder: each group's scores ``dual_scale * cosine + logit``
   (``dual_scale`` the CLIP's logit scale, the logit zero at the start) through a softmax with the
   positive as the target, in the one training loop (``vitrina.train.loop``: time cap, checkpoints,
   resume, metrics.jsonl). Untrained, the re-ranker ranks as the dual encoder does.

Validation: for each held-out caption, the dual encoder's top ``val_candidates`` images are re-scored;
``val_r1_dual`` / ``val_r1_rerank`` say how often a positive is first before and after. The epoch with
the best ``val_r1_rerank`` is kept in ``out_dir/best``, the folder ``load_reranker`` prefers.
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
from vitrina.train.checkpointing import BestKeeper
from vitrina.train.loop import StepOutput, TrainSummary, train


@dataclass
class RerankSettings:
    """How training groups are mined, and the re-ranker's shape."""

    hard_pool: int = 50  # a caption's negatives: the dual encoder's top-k non-positives (what --rerank 50 sees)
    negatives: int = 15  # per group: a caption, one of its positives and this many of its hard-pool negatives
    val_candidates: int = 50  # held-out captions: how many dual-encoder candidates the re-ranker reorders
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
            vectors.append(clip.encode_image_tokens(x))
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


@dataclass
class Groups:
    """Training groups: caption row, (G,) image rows (its positive first, then hard negatives), their cosines."""

    captions: torch.Tensor  # (E,) caption rows of the cache
    images: torch.Tensor  # (E, G) image rows; column 0 is a positive of the caption
    dual: torch.Tensor  # (E, G) dual-encoder cosine of each (caption, image)


def mine_groups(cache: FeatureCache, caption_rows: np.ndarray, settings: RerankSettings, seed: int) -> Groups:
    """One group per (caption, positive image): the positive and ``settings.negatives`` images drawn (seeded,
    once) from the caption's ``hard_pool`` best-scoring non-positives: the candidates a re-ranked query reorders.

    Fewer negatives when a collection is too small to give every caption that many (all groups one size).
    """
    rng = np.random.default_rng(seed)
    n_images = cache.image_vectors.shape[0]
    similarity = cache.text_vectors[caption_rows] @ cache.image_vectors.T  # (C, I)
    most_positives = max((len(cache.positives[row]) for row in caption_rows.tolist()), default=0)
    pool_size = min(settings.hard_pool, n_images - most_positives)
    negatives = min(settings.negatives, pool_size)
    if negatives < 1:
        raise UserError(f"{n_images} distinct images: too few to give a caption a negative; add images")
    captions, images, dual = [], [], []
    for row, sims in zip(caption_rows.tolist(), similarity, strict=True):
        positives = cache.positives[row]
        top = sims.topk(pool_size + len(positives)).indices.tolist()
        pool = [i for i in top if i not in positives][:pool_size]
        for image in sorted(positives):
            picked = rng.choice(len(pool), size=negatives, replace=False)
            rows = [image, *(pool[j] for j in sorted(picked))]
            captions.append(row)
            images.append(rows)
            dual.append(sims[rows])
    if not captions:
        width = 1 + negatives
        return Groups(torch.empty(0, dtype=torch.long), torch.empty(0, width, dtype=torch.long), torch.empty(0, width))
    return Groups(torch.tensor(captions), torch.tensor(images), torch.stack(dual))


class GroupExamples(Dataset):
    """Groups as (text states, text mask, (G, M, Cv) image tokens, (G,) cosines) read from the cache."""

    def __init__(self, cache: FeatureCache, groups: Groups) -> None:
        self.cache, self.groups = cache, groups

    def __len__(self) -> int:
        return len(self.groups.captions)

    def __getitem__(self, index: int):
        caption, images = int(self.groups.captions[index]), self.groups.images[index]
        c = self.cache
        return c.text_states[caption], c.text_mask[caption], c.image_tokens[images], self.groups.dual[index]


def group_softmax_step(model: CrossAttentionReranker, batch) -> StepOutput:
    """Cross-entropy of each group's softmax over its G scores (dual_scale x cosine + the correction),
    the positive (column 0) the target: what decides a re-ranked query's first hit."""
    states, mask, image_tokens, dual = batch  # (B, L, Ct), (B, L), (B, G, M, Cv), (B, G)
    B, G = dual.shape
    # the cache pads every caption to the longest one; this batch needs only its own longest (padding is ignored)
    length = int(mask.sum(dim=1).max())
    states, mask = states[:, :length], mask[:, :length]
    scores = model(
        states.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0), image_tokens.flatten(0, 1), dual.flatten()
    ).view(B, G)
    target = torch.zeros(B, dtype=torch.long)
    loss = F.cross_entropy(scores, target)
    first = (scores.argmax(dim=1) == 0).float().mean().item()
    return StepOutput(loss=loss, n_items=B, metrics={"top1": first})


def rerank_eval(cache: FeatureCache, caption_rows: np.ndarray, candidates: int):
    """An ``eval_fn``: R@1 of the dual encoder and of the re-ranker over each caption's top candidates."""

    def evaluate(model: CrossAttentionReranker) -> dict[str, float]:
        if len(caption_rows) == 0:
            return {}
        similarity = cache.text_vectors[caption_rows] @ cache.image_vectors.T  # (C, I)
        top = similarity.topk(min(candidates, similarity.shape[1]), dim=1).indices  # (C, N)
        dual = rerank = 0
        for i, (row, pool) in enumerate(zip(caption_rows.tolist(), top, strict=True)):
            n, length = len(pool), int(cache.text_mask[row].sum())
            scores = model(
                cache.text_states[row, :length].expand(n, -1, -1),
                cache.text_mask[row, :length].expand(n, -1),
                cache.image_tokens[pool],
                similarity[i, pool],
            )  # (N,)
            dual += int(pool[0]) in cache.positives[row]
            rerank += int(pool[int(scores.argmax())]) in cache.positives[row]
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
    groups = mine_groups(cache, train_rows, settings, train_config.seed)
    torch.manual_seed(train_config.seed)
    shape = {"width": settings.width, "depth": settings.depth, "heads": settings.heads}
    # the CLIP's own temperature: the correction starts from the softmax the dual encoder was trained with
    model = CrossAttentionReranker(config_for(clip, dual_scale=float(clip.scale()), **shape))
    extra = {"data": data_spec, "rerank": to_dict(settings), "train": to_dict(train_config)}

    def save(m: CrossAttentionReranker, folder: Path, best: dict | None = None) -> None:
        save_reranker(m, folder, clip_ref=clip_ref, clip_digest=clip_digest, extra={**extra, "best": best})

    # the epoch with the best R@1 on the held-out captions is what a search loads (OUT/best): trained past
    # it, the correction learns the training captions' images and reorders unseen ones worse
    out_dir = Path(out_dir)
    evaluate = rerank_eval(cache, val_rows, settings.val_candidates)
    keeper = BestKeeper(model, out_dir, "val_r1_rerank", save) if len(val_rows) else None

    def evaluate_and_note(m: CrossAttentionReranker) -> dict[str, float]:
        results = evaluate(m)
        if keeper is not None:
            keeper.note(results)
        return results

    return train(
        model=model,
        step_fn=group_softmax_step,
        train_data=GroupExamples(cache, groups),
        out_dir=out_dir,
        config=train_config,
        save_fn=save,
        eval_fn=evaluate_and_note,
        on_checkpoint=None if keeper is None else keeper.on_checkpoint,
        run_identity={"clip_digest": clip_digest, "data": data_spec, "rerank": to_dict(settings)},
        progress=progress,
    )
