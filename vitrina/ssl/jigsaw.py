"""Jigsaw puzzles (Noroozi & Favaro, 2016): shuffle 3 x 3 tiles by one of a fixed set of
permutations and predict which permutation it was.

The permutation set is chosen greedily for a large minimum Hamming distance (each new one is the
permutation farthest from all chosen, ties broken by a seeded draw), so no two puzzles are nearly
the same and the task cannot be solved by locating only a tile or two.

Tiles are embedded *together*: the shuffled tiles are laid out on one canvas, each in its slot with
a gap around it, and the backbone sees the canvas. The paper embeds each tile apart (a siamese
"context-free network") so low-level cues cannot cross tile borders; the gap and the per-tile
jitter play that role here at a ninth of the cost (one forward pass per image, not nine).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitrina.models.vit import ViT
from vitrina.ssl.augment import cut_tiles
from vitrina.ssl.common import SSLMethod

GRID = 3


def all_permutations(n: int) -> np.ndarray:
    """Every permutation of ``range(n)``, int8 (n!, n): grown by inserting element k at each place."""
    perms = np.zeros((1, 0), dtype=np.int8)
    for k in range(n):
        perms = np.concatenate([np.insert(perms, i, k, axis=1) for i in range(k + 1)])
    return perms


@functools.lru_cache(maxsize=8)
def max_hamming_permutations(count: int, n_tiles: int = GRID * GRID, seed: int = 0) -> np.ndarray:
    """``count`` permutations of ``n_tiles`` (int64 (count, n_tiles)), greedily maximising the minimum
    Hamming distance between any two; the first is the identity, so "not shuffled" is one class."""
    everything = all_permutations(n_tiles)  # (n!, n)
    if count > len(everything):
        raise ValueError(f"only {len(everything)} permutations of {n_tiles} tiles exist, {count} asked")
    rng = np.random.default_rng(seed)
    columns = [np.ascontiguousarray(everything[:, j]) for j in range(n_tiles)]  # contiguous: fast compares

    def distances_to(i: int) -> np.ndarray:
        """Hamming distance of every permutation to permutation ``i``."""
        distance = np.zeros(len(everything), dtype=np.int8)
        for j, column in enumerate(columns):
            distance += column != everything[i, j]
        return distance

    identity = int(np.flatnonzero((everything == np.arange(n_tiles)).all(axis=1))[0])
    chosen = [identity]
    nearest = distances_to(identity)  # distance of each candidate to the chosen set
    while len(chosen) < count:
        best = np.flatnonzero(nearest == nearest.max())
        pick = int(rng.choice(best))
        chosen.append(pick)
        nearest = np.minimum(nearest, distances_to(pick))
    return everything[chosen].astype(np.int64)


def shuffle_tiles(tiles: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) tiles, (B, T) permutations -> slot j of image i shows tile ``perms[i, j]``."""
    index = perms.view(*perms.shape, *([1] * (tiles.ndim - 2))).expand_as(tiles)
    return torch.gather(tiles, 1, index)


def unshuffle_tiles(shuffled: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """The inverse of ``shuffle_tiles``: puts every tile back in its own slot."""
    return shuffle_tiles(shuffled, perms.argsort(dim=1))


def place_tiles(tiles: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """(B, 9, C, t, t) -> (B, C, size, size): tile j centred in cell j of a 3 x 3 layout, gaps = ``fill``."""
    b, n, c, t, _ = tiles.shape
    cell = size // GRID
    offset = (cell - t) // 2
    canvas = torch.full((b, c, size, size), fill, dtype=tiles.dtype)
    for j in range(n):
        top, left = (j // GRID) * cell + offset, (j % GRID) * cell + offset
        canvas[:, :, top : top + t, left : left + t] = tiles[:, j]
    return canvas


@dataclass
class JigsawConfig:
    """``n_permutations`` puzzle classes; tiles of ``tile`` px cut from cells of image_size // 3 px."""

    n_permutations: int = 64
    tile: int = 7
    permutation_seed: int = 0


class Jigsaw(SSLMethod):
    """Backbone on the shuffled canvas -> pooled features -> linear head over the permutation set."""

    name = "jigsaw"

    def __init__(self, backbone: ViT, config: JigsawConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = config or JigsawConfig()
        perms = max_hamming_permutations(self.config.n_permutations, GRID * GRID, self.config.permutation_seed)
        self.register_buffer("permutations", torch.from_numpy(perms), persistent=False)
        self.head = nn.Linear(backbone.width, self.config.n_permutations)

    def puzzle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (shuffled canvases, permutation indices)."""
        tiles = cut_tiles(x, grid=GRID, tile=self.config.tile, jitter=True)  # (B, 9, C, t, t)
        labels = torch.randint(0, self.config.n_permutations, (x.shape[0],))
        shuffled = shuffle_tiles(tiles, self.permutations[labels])
        return place_tiles(shuffled, x.shape[-1]), labels

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        canvas, labels = self.puzzle(x)
        logits = self.head(self.features(canvas))  # (B, n_permutations)
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        return F.cross_entropy(logits, labels), {"pretext_acc": accuracy}
