"""The ``Encoder`` interface over a model we wrap rather than map onto ours: one base class and its kinds.

``WrappedEncoder`` holds what every wrapped model shares: the identity (kind, width, name and the
digest of its weights), the image transform, eval mode, ``inference_mode`` and L2 normalisation.
A kind says only how its towers run: ``image_embedding`` / ``text_embedding`` (unnormalised), which
is also what a tower exported from a wrapped model would run. ``ImageOnlyEncoder`` wraps any image
model (timm); ``OpenCLIPEncoder`` an open_clip model we do not map (other towers, tokenizers, SigLIP).
Models mapped onto our ``CLIP`` use ``vitrina.models.clip.CLIPEncoder`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitrina.digest import tensors_sha256
from vitrina.errors import UserError


class WrappedEncoder:
    """A library's model behind the ``Encoder`` interface; subclasses say how its towers run."""

    kind: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        name: str,
        image_size: int,
        digest: str | None = None,
    ) -> None:
        """``digest`` names the weights (sha256 of the file they came from); without it, of the tensors."""
        self.model = model.eval()
        self.name = name
        self._transform = transform
        with torch.inference_mode():
            self.embed_dim = int(self.image_embedding(torch.zeros(1, 3, image_size, image_size)).shape[-1])
        self._identity = {
            "kind": self.kind,
            "embed_dim": self.embed_dim,
            "name": name,
            "digest": digest or tensors_sha256(self.model.state_dict()),
        }

    @property
    def identity(self) -> dict:
        return dict(self._identity)

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) image embeddings, not normalised: the image tower's forward."""
        raise NotImplementedError

    def text_embedding(self, texts: list[str]) -> torch.Tensor:
        """B strings (at least one) -> (B, D) text embeddings, not normalised: the text tower's forward."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) float32 unit vectors."""
        with torch.inference_mode():
            return F.normalize(self.image_embedding(pixels).float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of B strings -> (B, D) float32 unit vectors."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim)
        with torch.inference_mode():
            return F.normalize(self.text_embedding(texts).float(), dim=-1)


class ImageOnlyEncoder(WrappedEncoder):
    """An image model (pixels -> pooled features) for image -> image search; it has no text tower."""

    kind = "image-only"

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise UserError(
            f"{self.name} is an image-only model: it cannot encode text queries; search with --image PATH, "
            "or use a CLIP (hf:..., open_clip:...) for text"
        )


class OpenCLIPEncoder(WrappedEncoder):
    """An open_clip model as open_clip runs it, with its own tokenizer and the checkpoint's image statistics."""

    kind = "open_clip"

    def __init__(self, model: nn.Module, tokenizer, *, name: str, mean, std, digest: str | None = None) -> None:
        from vitrina.data.transforms import eval_transform

        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.tokenizer = tokenizer
        transform = eval_transform(size, tuple(mean), tuple(std))
        super().__init__(model, transform, name=name, image_size=size, digest=digest)

    def image_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def text_embedding(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts))
