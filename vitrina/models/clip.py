"""CLIP (Radford et al., 2021): an image tower and a text tower projected into one space.

    pixels -> ViT -> pooled (B, Cv) -> image_projection -> (B, D) -> L2 normalise
    texts  -> tokenizer -> text tower -> pooled (B, Ct) -> text_projection -> (B, D) -> L2 normalise
    logits = exp(clamp(logit_scale)) * image_emb @ text_emb.T

The text tower is our ``TextTransformer`` (with a BPE tokenizer) or the pretrained MiniLM
(``text_backend="minilm"``), locked or fine-tuned. Features and projections are separate steps so
a trainer can compute a locked tower's features once and only train the projections above them.
``CLIPEncoder`` wraps a CLIP behind the ``vitrina.encoder.Encoder`` interface.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer
from torch import nn

from vitrina.models.text import TextConfig, TextTransformer, byte_level_tokenizer, set_context_length, tokenize
from vitrina.models.vit import ViT, ViTConfig

TextBackend = Literal["transformer", "minilm"]


@dataclass
class CLIPConfig:
    """Shape of a CLIP. ``text`` is required for the ``transformer`` backend and ignored for ``minilm``."""

    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig | None = None
    text_backend: TextBackend = "transformer"
    text_locked: bool = False
    embed_dim: int = 256
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.text_backend not in ("transformer", "minilm"):
            raise ValueError(f"text_backend must be 'transformer' or 'minilm', got {self.text_backend!r}")
        if self.text_backend == "transformer" and self.text is None:
            raise ValueError("text_backend 'transformer' needs a text config (TextConfig)")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")


class CLIP(nn.Module):
    """Image tower + text tower + linear projections + learnable log-temperature."""

    def __init__(self, config: CLIPConfig, *, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.visual = ViT(config.vision)
        if config.text_backend == "minilm":
            from vitrina.models.minilm import MiniLMTower

            self.text = MiniLMTower(locked=config.text_locked)
            self.tokenizer: Tokenizer | None = None
        else:
            self.text = TextTransformer(config.text)
            if config.text_locked:
                self.text.requires_grad_(False)
            self.set_tokenizer(tokenizer or byte_level_tokenizer(config.text.context_length))
        self.image_projection = nn.Linear(self.visual.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text.width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        # CLIP's init: projections scaled by the input width, so projected vectors start near unit size.
        nn.init.normal_(self.image_projection.weight, std=self.visual.width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=self.text.width**-0.5)

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use ``tokenizer`` (e.g. one from ``train_bpe``) for our text transformer; its vocab must fit."""
        if self.config.text_backend != "transformer":
            raise ValueError("the MiniLM text tower brings its own tokenizer")
        if tokenizer.get_vocab_size() > self.config.text.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.get_vocab_size()} tokens, the text tower only "
                f"{self.config.text.vocab_size}; train the BPE with vocab_size <= {self.config.text.vocab_size}"
            )
        self.tokenizer = set_context_length(tokenizer, self.config.text.context_length)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay (embeddings tables are found by the loop itself)."""
        names = {"logit_scale"} | {f"visual.{n}" for n in self.visual.no_weight_decay()}
        if isinstance(self.text, TextTransformer):
            names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names

    # --- text and image in ---------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """list of B strings -> the tensors ``text_features`` takes (``input_ids``, ``attention_mask``)."""
        if self.tokenizer is None:
            return self.text.tokenize(texts)
        return tokenize(self.tokenizer, texts)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, Cv) pooled image-tower features, before the projection."""
        return self.visual.forward_head(self.visual.forward_for_head(pixels), pre_logits=True)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """``tokenize`` output -> (B, Ct) pooled text-tower features, before the projection."""
        return self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])

    def text_token_states(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokenize`` output -> ((B, L, Ct) per-token text-tower states, (B, L) mask, 1 = real token).

        What a cross-attention re-ranker (``vitrina.models.rerank``) reads, beside ``image_tokens``.
        """
        mask = tokens["attention_mask"]
        return self.text.token_states(input_ids=tokens["input_ids"], attention_mask=mask), mask

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P+N, Cv) image-tower tokens ([CLS] and the patches) after its final LayerNorm."""
        return self.visual.forward_features(pixels)

    # --- into the shared space -----------------------------------------------------------

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        """(B, Cv) -> (B, D), not normalised."""
        return self.image_projection(features)

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        """(B, Ct) -> (B, D), not normalised."""
        return self.text_projection(features)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unit vectors (with autograd; ``CLIPEncoder`` is the inference path)."""
        return F.normalize(self.project_image(self.image_features(pixels)), dim=-1)

    def encode_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P+N, Cv) ``image_tokens`` output -> (B, D) unit vectors: ``encode_image`` for a caller that
        keeps the tokens too (a re-ranker reads both)."""
        return F.normalize(self.project_image(self.visual.pool(tokens)), dim=-1)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """``tokenize`` output -> (B, D) unit vectors."""
        return F.normalize(self.project_text(self.text_features(tokens)), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp of the log-temperature, clamped to ``max_logit_scale`` (the gradient stops at the clamp)."""
        return self.logit_scale.clamp(max=self.config.max_logit_scale).exp()

    def forward(
        self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (image_emb (B, D), text_emb (B, D), logit_scale scalar), ready for ``clip_loss``."""
        return self.encode_image(pixels), self.encode_text(tokens), self.scale()


def config_hash(model: CLIP) -> str:
    """8 hex digits naming the model's shape and tokenizer (vectors from different ones never mix).

    Only non-default config fields count, so adding a field with a neutral default later does not
    orphan existing indexes.
    """
    from vitrina.config import non_default_dict

    payload = json.dumps(non_default_dict(model.config), sort_keys=True)
    if model.tokenizer is not None:
        payload += model.tokenizer.to_str()
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


class CLIPEncoder:
    """The ``Encoder`` interface over a CLIP: eval mode, ``inference_mode``, texts batched internally."""

    def __init__(self, model: CLIP, *, name: str, digest: str | None = None, text_batch_size: int = 256) -> None:
        """``digest`` names the weights (sha256 of the checkpoint file); without it, of the tensors in memory."""
        from vitrina.data.transforms import eval_transform
        from vitrina.digest import tensors_sha256

        self.model = model.eval()
        self.embed_dim = model.config.embed_dim
        self.text_batch_size = text_batch_size
        self._identity = {
            "kind": "vitrina-clip",
            "embed_dim": self.embed_dim,
            "name": f"{name}-{config_hash(model)}",
            "digest": digest or tensors_sha256(model.state_dict()),
        }
        c = model.config
        self._transform = eval_transform(c.vision.image_size, c.image_mean, c.image_std)

    @property
    def identity(self) -> dict:
        return dict(self._identity)

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    def _device(self) -> torch.device:
        return self.model.logit_scale.device

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) float32 unit vectors on the CPU."""
        with torch.inference_mode():
            return self.model.encode_image(pixels.to(self._device())).float().cpu()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of B strings -> (B, D) float32 unit vectors on the CPU."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.text_batch_size):
                tokens = self.model.tokenize(texts[i : i + self.text_batch_size])
                tokens = {k: v.to(self._device()) for k, v in tokens.items()}
                out.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(out)
