"""PIL image -> normalised pixels in numpy, as ``vitrina.data.transforms.EvalTransform`` computes them.

The same PIL operations in the same order (RGB, shorter side to ``size`` with bicubic resampling,
centre crop), then the same float32 arithmetic: ``(pixel - 255 * mean) / (255 * std)``. What to do is
read from the preprocessing a version records (``EvalTransform.describe()``); any other recipe is
refused, and the image query then runs the PyTorch path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from vitrina.data.images import to_rgb

RESIZE = "shorter side to size, centre crop"
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC}


def unsupported(describe: dict) -> str | None:
    """Why a recorded preprocessing cannot run here, or None when it can."""
    if not isinstance(describe, dict) or describe.get("resize") != RESIZE:
        return f"preprocessing {describe!r} has no numpy twin (only {RESIZE!r})"
    if describe.get("interpolation") not in RESAMPLING:
        return f"interpolation {describe.get('interpolation')!r} has no numpy twin (only {', '.join(RESAMPLING)})"
    for key in ("mean", "std"):
        if not (isinstance(describe.get(key), Sequence) and len(describe[key]) == 3):
            return f"preprocessing {key} {describe.get(key)!r} is not three numbers"
    if not isinstance(describe.get("size"), int) or describe["size"] < 1:
        return f"preprocessing size {describe.get('size')!r} is not a positive integer"
    return None


class ImagePreprocess:
    """PIL image -> (3, size, size) float32, equal to ``EvalTransform(size, mean, std)`` (to float32 rounding)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], *, interpolation: str = "bicubic"):
        self.size = int(size)
        self.resample = RESAMPLING[interpolation]
        self.mean = (np.asarray(mean, dtype=np.float32) * np.float32(255.0)).reshape(3, 1, 1)
        self.std = (np.asarray(std, dtype=np.float32) * np.float32(255.0)).reshape(3, 1, 1)

    @classmethod
    def from_describe(cls, describe: dict) -> ImagePreprocess:
        """From ``EvalTransform.describe()``; ``ValueError`` for a recipe this class does not compute."""
        reason = unsupported(describe)
        if reason is not None:
            raise ValueError(reason)
        return cls(describe["size"], describe["mean"], describe["std"], interpolation=describe["interpolation"])

    def __call__(self, image: Image.Image) -> np.ndarray:
        size = self.size
        width, height = image.size
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        if new != image.size:
            image = image.resize(new, self.resample)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        if new != (size, size):
            image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(to_rgb(image), dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        return (pixels.astype(np.float32) - self.mean) / self.std
