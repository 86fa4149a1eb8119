"""Seeded, stratified index splits of labelled data (every class in proportion)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of ``count`` items, every class in proportion (largest remainders), drawn from ``seed``."""
    if count >= len(labels):
        return np.arange(len(labels))
    classes, sizes = np.unique(labels, return_counts=True)
    share = sizes * count / len(labels)
    quota = np.floor(share).astype(int)
    for c in np.argsort(-(share - quota), kind="stable")[: count - quota.sum()]:
        quota[c] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picked))


def stratified_split(labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of each part (sorted), every class divided in the proportions ``fractions``.

    Within a class the items are shuffled by ``(seed, class)``; part ``i`` takes the next
    ``round(fraction_i x n)`` items (the last part takes the rest), so every part of a class with at
    least ``len(fractions)`` items gets one item or more.
    """
    labels = np.asarray(labels)
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions {fractions} must sum to 1")
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = np.random.default_rng([seed, int(c)]).permutation(members)
        counts = [round(f * len(members)) for f in fractions[:-1]]
        if len(members) >= len(fractions):
            counts = [max(1, n) for n in counts]
            while sum(counts) > len(members) - 1:  # the last part gets one too: take from the largest
                counts[counts.index(max(counts))] -= 1
        start = 0
        for i, n in enumerate([*counts, len(members) - sum(counts)]):
            parts[i].append(members[start : start + max(0, n)])
            start += max(0, n)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]
