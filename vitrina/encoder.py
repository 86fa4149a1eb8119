"""The one interface every part of vitrina talks to: an encoder of images and texts.

Whatever built it (our CLIP trained here, a CLIP whose image tower was distilled,
a pretrained Hugging Face / open_clip model), an encoder answers:

* ``encode_image(pixels)`` -> (B, D) float32, L2-normalised, computed under ``no_grad``;
* ``encode_text(texts)``   -> (B, D) float32, L2-normalised;
* ``image_transform``      -> PIL RGB image -> (3, H, W) float tensor the model expects;
* ``identity``             -> a small dict that says which model made the vectors, so an
  index can refuse to be searched with a model of another kind or width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # the query path imports this module without torch (see vitrina.runtime)
    import torch
    from PIL import Image


@runtime_checkable
class Encoder(Protocol):
    """Anything that maps images and texts into one L2-normalised vector space."""

    embed_dim: int

    @property
    def identity(self) -> dict:
        """``{"kind": str, "embed_dim": int, "name": str, "digest": str}``; ``digest`` (sha256 hex) names the
        weights, so equal digests mean the same vectors and a differently trained model is told apart."""
        ...

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image -> (3, H, W) float tensor, normalised as the image tower expects."""
        ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unit vectors."""
        ...

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of B strings -> (B, D) unit vectors."""
        ...


def as_numpy(vectors) -> np.ndarray:
    """(B, D) vectors from any encoder (a torch tensor of any float dtype, or a numpy array, as the ONNX
    query encoder answers) as contiguous float32 numpy; torch is never imported here."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().float().cpu().numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32)
