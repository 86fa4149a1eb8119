"""Zero-shot scoring at run time: class names -> prompt-ensemble text embeddings -> class probabilities.

Following CLIP: each label is written into several prompt templates ("a photo of a {}." ...), the
normalised text embeddings of its prompts are averaged and renormalised, and an image is assigned
the label whose ensemble vector has the highest cosine with the image vector. ``vitrina classify``,
the server's ``/api/classify`` and ``vitrina.eval`` all score with these functions. Numpy only: an
encoder may answer with torch tensors or, on the light query path, numpy arrays.
"""

from __future__ import annotations

import numpy as np

from vitrina.data.prompts import prompts_for
from vitrina.encoder import Encoder, as_numpy

# CLIP's trained temperature ends at its clamp, exp(log 100): softmax over 100 * cosine.
DEFAULT_LOGIT_SCALE = 100.0


def _normalize(vectors: np.ndarray, axis: int = -1) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=axis, keepdims=True), 1e-12)


def class_embeddings(labels: list[str], encoder: Encoder, *, batch_size: int = 256) -> np.ndarray:
    """(C, D) unit vectors: the renormalised mean of each label's normalised prompt embeddings."""
    prompts = [prompts_for(label) for label in labels]
    flat = [p for group in prompts for p in group]
    chunks = [as_numpy(encoder.encode_text(flat[i : i + batch_size])) for i in range(0, len(flat), batch_size)]
    text = _normalize(np.concatenate(chunks)) if chunks else np.empty((0, encoder.embed_dim), np.float32)
    out = np.empty((len(labels), encoder.embed_dim), dtype=np.float32)
    start = 0
    for c, group in enumerate(prompts):
        out[c] = _normalize(text[start : start + len(group)].mean(axis=0))
        start += len(group)
    return out


def logit_scale_of(encoder: Encoder) -> float:
    """The encoder's softmax scale if it exposes one as a plain number (``logit_scale``), else CLIP's 100."""
    scale = getattr(encoder, "logit_scale", None)
    return float(scale) if isinstance(scale, int | float) and scale > 0 else DEFAULT_LOGIT_SCALE


def class_probabilities(image_vectors: np.ndarray, class_vectors: np.ndarray, scale: float) -> np.ndarray:
    """(N, C) softmax over ``scale`` * cosine between (N, D) image and (C, D) class unit vectors."""
    logits = scale * (np.asarray(image_vectors, np.float32) @ np.asarray(class_vectors, np.float32).T)  # (N, C)
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)
