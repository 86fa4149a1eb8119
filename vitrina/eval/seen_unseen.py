"""Zero-shot only where it is one: metrics split by what the model never trained on.

A checkpoint trained with held-out concepts records them (``config.json``: ``held_out`` with
``labels`` and ``captions``, ``vitrina.data.holdout.HeldOut``). Against an index:

* labels: **zero-shot accuracy** = images of held-out classes classified among the held-out
  classes' prompt ensembles (chance 1/k); **prompted classification (seen classes)** = the same on
  the classes it trained on (chance 1/(C-k)).
* captions: text->image R@K of the held-out concepts' captions and of the seen ones (gallery: the
  whole index), and zero-shot accuracy = images of held-out concepts matched to their own caption
  among the held-out captions (chance 1/k).

Without a record nothing is called zero-shot: accuracy over every class is "prompted accuracy".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vitrina.encoder import Encoder, as_numpy
from vitrina.eval.zeroshot import class_embeddings, zero_shot_accuracy


def held_out_of(model_ref: str | None) -> dict | None:
    """The ``held_out`` record (``labels``, ``captions``) of checkpoint folder ``model_ref``, if it has one."""
    if not model_ref:
        return None
    config = Path(model_ref) / "config.json"
    if not config.is_file():
        return None
    try:
        record = json.loads(config.read_text()).get("held_out")
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _class_block(image_vectors: np.ndarray, labels: list[str], classes: list[str], encoder: Encoder) -> dict:
    """Accuracy of the images labelled with ``classes``, classified among ``classes`` only."""
    rows = [i for i, label in enumerate(labels) if label in classes]
    vectors = class_embeddings(classes, encoder)  # (k, D)
    accuracy = zero_shot_accuracy(image_vectors[rows], [labels[i] for i in rows], vectors, classes)
    return {"classes": len(classes), "images": len(rows), "accuracy": accuracy, "chance": 1.0 / len(classes)}


def label_split(image_vectors: np.ndarray, labels: list[str], encoder: Encoder, held_labels: set[str]) -> dict:
    """``zero_shot`` (held-out classes) and ``prompted_seen`` blocks; empty when the index has no held-out class."""
    classes = sorted(set(labels))
    unseen = [c for c in classes if c in held_labels]
    seen = [c for c in classes if c not in held_labels]
    if not unseen:
        return {}
    out = {"zero_shot": {"held_out_classes": unseen, **_class_block(image_vectors, labels, unseen, encoder)}}
    if seen:
        out["prompted_seen"] = _class_block(image_vectors, labels, seen, encoder)
    return out


def caption_split(
    image_vectors: np.ndarray, captions: list[str], encoder: Encoder, held_captions: set[str], chunk: int = 1024
) -> dict:
    """Text->image R@K of held-out and of seen captions, and zero-shot caption matching of held-out
    concepts' images; empty when no caption of the index is held out."""
    unique, caption_of_image = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    held = np.asarray([c in held_captions for c in unique])  # (T,)
    if not held.any():
        return {}
    text = np.concatenate(
        [as_numpy(encoder.encode_text(list(unique[i : i + chunk]))) for i in range(0, len(unique), chunk)]
    ).astype(np.float32)  # (T, D)
    scores = text @ image_vectors.T  # (T, N)
    own = np.where(caption_of_image[None, :] == np.arange(len(unique))[:, None], scores, -np.inf)  # (T, N)
    ranks = ((scores > own.max(axis=1, keepdims=True)) & np.isinf(own)).sum(axis=1)  # (T,) best own image's rank
    out: dict = {}
    for name, mask in (("held_out_concepts", held), ("seen_concepts", ~held)):
        if mask.any():
            out[name] = {"queries": int(mask.sum()), **{f"R@{k}": float(np.mean(ranks[mask] < k)) for k in (1, 5, 10)}}
    held_ids = np.flatnonzero(held)  # the candidates: held-out captions only
    images = np.flatnonzero(np.isin(caption_of_image, held_ids))
    predicted = held_ids[(image_vectors[images] @ text[held_ids].T).argmax(axis=1)]
    out["zero_shot"] = {
        "concepts": len(held_ids),
        "images": len(images),
        "accuracy": float(np.mean(predicted == caption_of_image[images])),
        "chance": 1.0 / len(held_ids),
    }
    return out
