"""What a CLIP training step reads: the pixel path (in memory or per-sample files), the fixed
evaluation sets, and the concept id of every caption (for duplicate-aware targets).

In memory (the default when the decoded set fits its budget): every training image is decoded once
at the model's resolution into a uint8 tensor; the loop's data order yields item indices and the
``collate_fn`` crops, flips and normalises the whole batch on tensors (``BatchAugment``), drawing
from torch's global RNG, which the loop seeds and saves, so a resumed run meets the same crops.
Otherwise (large photo collections): ``ImageCaptionDataset`` with the per-sample PIL transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from vitrina.data.batch_augment import BatchAugment
from vitrina.data.datasets import Caption, ImageCaptionDataset, ImageSource
from vitrina.data.memory import decode_all
from vitrina.data.transforms import EvalTransform, TrainTransform
from vitrina.errors import UserError

Pair = tuple[ImageSource, Caption]


class ItemIndices(Dataset):
    """Items are their own indices: the pixels live in the collate function's tensor."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class InMemoryBatches:
    """``collate_fn``: a list of item indices -> (augmented pixels (B, 3, H, W), one caption per item)."""

    def __init__(
        self, pixels: torch.Tensor, captions: Sequence[Caption], augment: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        for i, caption in enumerate(captions):
            texts = [caption] if isinstance(caption, str) else list(caption)
            if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
                raise UserError(f"item {i}: empty caption; every image needs a caption text")
        self.pixels, self.captions, self.augment = pixels, list(captions), augment

    def _caption(self, caption: Caption) -> str:
        if isinstance(caption, str):
            return caption
        return caption[int(torch.randint(len(caption), ()).item())]  # global RNG: saved by the loop

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        chosen = torch.as_tensor(indices, dtype=torch.long)
        return self.augment(self.pixels[chosen]), [self._caption(self.captions[i]) for i in indices]


@dataclass
class TrainingData:
    """The loop's ``train_data`` and ``collate_fn``, and which path built them."""

    dataset: Dataset
    collate_fn: Callable[[list], tuple[torch.Tensor, list[str]]] | None
    in_memory: bool


class Unaugmented:
    """(B, 3, H, W) uint8 -> normalised float, nothing drawn (``augment=False``: the index's view)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.transform = EvalTransform(size, mean, std)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.transform.normalize(pixels)


def training_data(
    pairs: Sequence[Pair],
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    in_memory: bool,
    augment: bool = True,
    crop: bool = True,
) -> TrainingData:
    """The training set of ``pairs`` at ``size`` px, decoded once (``in_memory``) or per sample;
    ``augment=False`` gives every image as the index sees it (tests that compare exact runs);
    ``crop=False`` augments by flips alone."""
    if not in_memory:
        transform = TrainTransform(size, mean, std, crop=crop) if augment else EvalTransform(size, mean, std)
        return TrainingData(ImageCaptionDataset(pairs, transform), None, False)
    pixels, kept = decode_all([source for source, _ in pairs], size)  # (N, 3, H, W) uint8
    look = BatchAugment(mean=mean, std=std, crop=crop) if augment else Unaugmented(size, mean, std)
    batches = InMemoryBatches(pixels, [pairs[i][1] for i in kept], look)
    return TrainingData(ItemIndices(len(kept)), batches, True)


def fixed_eval_set(
    pairs: Sequence[Pair], *, size: int, mean: Sequence[float], std: Sequence[float], max_items: int
) -> tuple[torch.Tensor, list[str]]:
    """The first ``max_items`` readable pairs as normalised (N, 3, H, W) pixels (as the index sees
    them) and the first caption of each."""
    items = list(pairs[:max_items])
    pixels, kept = decode_all([source for source, _ in items], size)
    captions = [items[i][1] if isinstance(items[i][1], str) else items[i][1][0] for i in kept]
    return EvalTransform(size, mean, std).normalize(pixels), captions


def caption_concepts(pairs: Sequence[Pair], concepts: Sequence[str] | None) -> dict[str, int]:
    """Every caption string -> the integer id of its pair's concept (``concepts``: one key per pair;
    None: the concept is the pair's first caption, so only identical captions are duplicates).

    A caption that names several concepts keeps the first (a caption is what the step sees).
    """
    if concepts is not None and len(concepts) != len(pairs):
        raise UserError(f"{len(concepts)} concept keys for {len(pairs)} pairs; give one key per pair")
    ids: dict[str, int] = {}
    of_caption: dict[str, int] = {}
    for i, (_, caption) in enumerate(pairs):
        texts = [caption] if isinstance(caption, str) else list(caption)
        key = concepts[i] if concepts is not None else texts[0]
        concept = ids.setdefault(key, len(ids))
        for text in texts:
            of_caption.setdefault(text, concept)
    return of_caption
