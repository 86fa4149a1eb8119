"""Zero-shot classification: class names -> prompt-ensemble text embeddings -> nearest class.

Following CLIP: each label is written into several prompt templates ("a photo of a {}." ...), the
normalised text embeddings of its prompts are averaged and renormalised, and an image is assigned
the label whose ensemble vector has the highest cosine with the image vector.
"""

from __future__ import annotations

import numpy as np
import torch

from vitrina.data.prompts import prompts_for
from vitrina.encoder import Encoder

# CLIP's trained temperature ends at its clamp, exp(log 100): softmax over 100 * cosine.
DEFAULT_LOGIT_SCALE = 100.0


def class_embeddings(labels: list[str], encoder: Encoder, *, batch_size: int = 256) -> np.ndarray:
    """(C, D) unit vectors: the renormalised mean of each label's normalised prompt embeddings."""
    prompts = [prompts_for(label) for label in labels]
    flat = [p for group in prompts for p in group]
    chunks = [encoder.encode_text(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)]
    text = torch.cat(chunks).float() if chunks else torch.empty(0, encoder.embed_dim)  # (sum P_c, D)
    text = torch.nn.functional.normalize(text, dim=-1)
    out = np.empty((len(labels), encoder.embed_dim), dtype=np.float32)
    start = 0
    for c, group in enumerate(prompts):
        mean = text[start : start + len(group)].mean(dim=0)
        out[c] = torch.nn.functional.normalize(mean, dim=0).numpy()
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


def zero_shot_accuracy(
    image_vectors: np.ndarray, true_labels: list[str], class_vectors: np.ndarray, class_names: list[str]
) -> float:
    """Fraction of images whose nearest class vector is their own label's."""
    if len(true_labels) == 0:
        return float("nan")
    predicted = (np.asarray(image_vectors) @ np.asarray(class_vectors).T).argmax(axis=1)  # (N,)
    names = np.asarray(class_names, dtype=object)
    return float(np.mean(names[predicted] == np.asarray(true_labels, dtype=object)))
