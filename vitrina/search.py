"""Search an index by text, by example image or by vector; zero-shot classify images by label names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitrina.data.images import load_image
from vitrina.encoder import Encoder
from vitrina.errors import UserError
from vitrina.eval.zeroshot import class_embeddings, class_probabilities, logit_scale_of
from vitrina.index.ann import AnnView
from vitrina.index.ann import published_generation as ann_generation
from vitrina.index.encoders import check_encoder, encoder_for
from vitrina.index.store import Hit, IndexStore, Version

__all__ = ["Hit", "Searcher", "classify", "encode_images"]

ImageLike = str | os.PathLike | Image.Image


def encode_images(images: list[ImageLike], encoder: Encoder) -> np.ndarray:
    """(B, D) unit vectors of images given as paths or PIL images; a bad file is a one-line ``UserError``."""
    pils = [img.convert("RGB") if isinstance(img, Image.Image) else load_image(img) for img in images]
    if not pils:
        return np.empty((0, encoder.embed_dim), dtype=np.float32)
    pixels = torch.stack([encoder.image_transform(img) for img in pils])  # (B, 3, H, W)
    return encoder.encode_image(pixels).detach().cpu().numpy().astype(np.float32)


@dataclass(frozen=True)
class Served:
    """What one query runs against, taken once per query: a version, its model, and its ANN view."""

    version: Version
    encoder: Encoder
    view: AnnView


class Searcher:
    """Queries against the active version of one index directory.

    Without ``encoder``, the model is loaded from ``model_ref`` or, failing that, from the reference
    the active version stored; it must be the weights the version was built with (``vitrina.index.encoders``).
    ``refresh()`` (the server calls it on a background thread) loads a newer published ANN file or a
    newly activated version and swaps it in with one reference assignment: a query in flight keeps
    the state it started with, and no query waits for the load.
    """

    def __init__(self, index_dir: Path, encoder: Encoder | None = None, *, model_ref: str | None = None) -> None:
        self.index_dir = Path(index_dir)
        self.store = IndexStore.open(self.index_dir)
        self._model_ref = model_ref
        try:
            version = self.store.active_version()
            if encoder is None:
                encoder = encoder_for(version, self.index_dir, model_ref=model_ref)
            else:
                check_encoder(encoder, version, self.index_dir, chosen=True)
            self.served = Served(version, encoder, self.store.load_view(version.id))
        except BaseException:
            self.store.close()
            raise

    @property
    def encoder(self) -> Encoder:
        """The model of the version being served."""
        return self.served.encoder

    def refresh(self, store: IndexStore | None = None) -> bool:
        """Swap in the active version's newest published ANN (and its model, if the version changed).

        ``store`` is a connection of the calling thread (the server's loader has its own). Returns
        whether anything changed.
        """
        store = store or self.store
        served = self.served
        version = store.active_version()
        generation = ann_generation(self.index_dir, version.id)
        if version.id == served.version.id and (generation is None or generation == served.view.generation):
            return False
        encoder = served.encoder
        if version.id != served.version.id and version.digest != served.version.digest:
            encoder = encoder_for(version, self.index_dir)  # the new version's own model (an override named the old)
        self.served = Served(version, encoder, store.load_view(version.id))
        return True

    def close(self) -> None:
        """Close the index."""
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search_vector(self, vector: np.ndarray, k: int = 10, *, served: Served | None = None) -> list[Hit]:
        """Top-``k`` hits for one (D,) query vector (normalised here, so any scale is fine).

        ``served``: the state the vector was encoded with (``self.served`` taken before encoding), so a
        swap between encoding and searching cannot pair a vector with another version's view.
        """
        served = served or self.served
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)  # (1, D)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise UserError("query vector is zero or not finite; cannot search with it")
        return self.store.search(vector / norm, k, view=served.view)[0]

    def search_text(self, query: str, k: int = 10) -> list[Hit]:
        """Top-``k`` images for a text query."""
        if not query.strip():
            raise UserError("the text query is empty; type what the picture should show")
        served = self.served
        return self.search_vector(served.encoder.encode_text([query])[0].detach().cpu().numpy(), k, served=served)

    def search_image(self, image: ImageLike, k: int = 10) -> list[Hit]:
        """Top-``k`` images most like ``image`` (a path or a PIL image)."""
        served = self.served
        return self.search_vector(encode_images([image], served.encoder)[0], k, served=served)


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
