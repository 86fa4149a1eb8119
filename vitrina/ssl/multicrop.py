"""Views shared by the joint-embedding methods (VICReg, BYOL): embedding a multi-crop set of views
and the pairs of views that are compared.

Global views (full size) go through the network as one batch and local views (smaller) as another,
since a batch holds one image size. A pair is a global view and any other view: local views are
compared only with global ones (SwAV, DINO), never with each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from vitrina.errors import UserError
from vitrina.models.vit import ViT
from vitrina.ssl.augment import MultiCrop


def fit_crops(crops: MultiCrop, backbone: ViT) -> MultiCrop:
    """``crops`` with its local view size fitted to ``backbone``: about half the image side in whole patches
    (e.g. 16 px for 28 px and 4 px patches) unless set; ``UserError`` for a set size that does not tile."""
    patch, image = backbone.config.patch_size, backbone.config.image_size
    size = crops.local_size or patch * max(1, round(image / patch / 2))
    if size % patch or size > image:
        raise UserError(
            f"multi-crop local size {size} px: must be a multiple of the backbone's patch size {patch} "
            f"and at most its image size {image}"
        )
    return replace(crops, local_size=size)


def embed_views(
    encode: Callable[[torch.Tensor], torch.Tensor], globals_: list[torch.Tensor], locals_: list[torch.Tensor]
) -> list[torch.Tensor]:
    """One (B, D) embedding per view, globals first: two forward passes (globals, then locals), not one per view."""
    batch = globals_[0].shape[0]
    embedded = list(encode(torch.cat(globals_)).split(batch))  # (2B, D) -> 2 x (B, D)
    if locals_:
        embedded += list(encode(torch.cat(locals_)).split(batch))  # (kB, D) -> k x (B, D)
    return embedded


def view_pairs(n_views: int, n_global: int = 2) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, i a global view and j any later view: (0, 1), then each global with each local."""
    return [(i, j) for i in range(n_global) for j in range(i + 1, n_views)]
