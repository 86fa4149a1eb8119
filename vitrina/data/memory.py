"""Every training image decoded once into one uint8 tensor (N, 3, H, W) at the model's resolution.

Small sets (emoji, Fashion-MNIST: thousands of images of a few kB) fit in memory many times over;
decoding them once and cropping on tensors (``vitrina.data.batch_augment``) replaces a PIL decode
and resize per sample per epoch, which on a 2-core machine costs more than the model's step.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from vitrina.data.datasets import ImageSource, open_source
from vitrina.data.images import BadImageError
from vitrina.data.transforms import EvalTransform
from vitrina.errors import UserError

DEFAULT_BUDGET_BYTES = 2 * 2**30  # 2 GiB: ~300k images at 48 px, ~14k at 224 px


def pixel_bytes(count: int, size: int) -> int:
    """Bytes of ``count`` RGB uint8 images of ``size`` x ``size``."""
    return count * 3 * size * size


def fits_in_memory(count: int, size: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> bool:
    """True when ``count`` decoded images at ``size`` px fit ``budget_bytes``."""
    return pixel_bytes(count, size) <= budget_bytes


def decode_all(sources: Sequence[ImageSource], size: int) -> tuple[torch.Tensor, list[int]]:
    """(N, 3, size, size) uint8 pixels of every readable source (shorter side to ``size``, centre
    crop, as the index sees images) and the indices into ``sources`` they came from.

    An unreadable file is reported once (a warning naming it) and left out.
    """
    geometry = EvalTransform(size)
    pixels = torch.empty((len(sources), 3, size, size), dtype=torch.uint8)  # (N, 3, H, W)
    kept: list[int] = []
    for i, source in enumerate(sources):
        try:
            image = open_source(source)
        except BadImageError as error:
            warnings.warn(f"{error}; skipped", UserWarning, stacklevel=2)
            continue
        pixels[len(kept)] = geometry.to_uint8(image)
        kept.append(i)
    if not kept:
        raise UserError(f"none of the {len(sources)} images can be read; see the warnings above")
    return pixels[: len(kept)].clone() if len(kept) < len(sources) else pixels, kept
