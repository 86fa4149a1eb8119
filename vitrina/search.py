"""Search an index by text, by example image or by vector; zero-shot classify images by label names."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitrina.data.images import load_image
from vitrina.encoder import Encoder
from vitrina.errors import UserError
from vitrina.eval.zeroshot import class_embeddings, class_probabilities, logit_scale_of
from vitrina.index.store import Hit, IndexStore

__all__ = ["Hit", "Searcher", "classify", "encode_images"]

ImageLike = str | os.PathLike | Image.Image


def encode_images(images: list[ImageLike], encoder: Encoder) -> np.ndarray:
    """(B, D) unit vectors of images given as paths or PIL images; a bad file is a one-line ``UserError``."""
    pils = [img.convert("RGB") if isinstance(img, Image.Image) else load_image(img) for img in images]
    if not pils:
        return np.empty((0, encoder.embed_dim), dtype=np.float32)
    pixels = torch.stack([encoder.image_transform(img) for img in pils])  # (B, 3, H, W)
    return encoder.encode_image(pixels).detach().cpu().numpy().astype(np.float32)


class Searcher:
    """Queries against one index directory.

    Without ``encoder``, the model is loaded from ``model_ref`` or, failing that, from the ref stored
    in the index; either way its identity must match the index's (same kind and width).
    """

    def __init__(self, index_dir: Path, encoder: Encoder | None = None, *, model_ref: str | None = None) -> None:
        self.index_dir = Path(index_dir)
        probe = IndexStore.open(self.index_dir)
        stored_ref = probe.info.get("model_ref")
        probe.close()
        if encoder is None:
            from vitrina.checkpoint import load_encoder

            encoder = load_encoder(model_ref or stored_ref)
        self.encoder = encoder
        self.store = IndexStore.open(self.index_dir, identity=encoder.identity)

    def close(self) -> None:
        """Close the index."""
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search_vector(self, vector: np.ndarray, k: int = 10) -> list[Hit]:
        """Top-``k`` hits for one (D,) query vector (normalised here, so any scale is fine)."""
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)  # (1, D)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise UserError("query vector is zero or not finite; cannot search with it")
        return self.store.search(vector / norm, k)[0]

    def search_text(self, query: str, k: int = 10) -> list[Hit]:
        """Top-``k`` images for a text query."""
        if not query.strip():
            raise UserError("the text query is empty; type what the picture should show")
        return self.search_vector(self.encoder.encode_text([query])[0].detach().cpu().numpy(), k)

    def search_image(self, image: ImageLike, k: int = 10) -> list[Hit]:
        """Top-``k`` images most like ``image`` (a path or a PIL image)."""
        return self.search_vector(encode_images([image], self.encoder)[0], k)


def classify(
    images: list[ImageLike], labels: list[str], encoder: Encoder, *, top: int | None = None
) -> list[list[tuple[str, float]]]:
    """Zero-shot: for each image, (label, probability) pairs sorted by probability, best ``top`` kept.

    Labels become prompt-ensemble vectors; probabilities are a softmax over scaled cosine similarity.
    """
    if len(labels) < 2:
        raise UserError("zero-shot classification needs at least two labels")
    class_vectors = class_embeddings(labels, encoder)  # (C, D)
    probs = class_probabilities(encode_images(images, encoder), class_vectors, logit_scale_of(encoder))  # (B, C)
    order = np.argsort(-probs, axis=1, kind="stable")[:, : top or len(labels)]
    return [[(labels[c], float(row[c])) for c in ranked] for row, ranked in zip(probs, order, strict=True)]
