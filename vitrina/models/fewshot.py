"""Few-shot scoring at run time: a few labelled images per class -> a classifier in the joint space.

Three ways, all over L2-normalised image vectors (N, D) and integer labels:

* ``prototype`` -- each class's prototype is the renormalised mean of its shots' unit vectors; an
  image goes to the class whose prototype has the highest cosine (Snell et al., 2017, on cosines).
* ``tip-adapter`` -- training-free Tip-Adapter (Zhang et al., 2022): the shots form a key-value
  cache (keys: their vectors; values: one-hot labels). An image's affinity to a key is
  ``exp(-beta (1 - cos))``; the cache logits ``A @ L`` are added, weighted by ``alpha``, to the
  zero-shot logits ``scale * cos(image, text class vector)``, as the paper writes it:
  ``logits = scale * f W_c^T + alpha * A L``.
* ``linear`` -- a logistic-regression head (scikit-learn, fitted here) on the shots' vectors; only
  its weights are kept, so scoring is a matrix product.

``draw_shots`` picks ``shots`` images per class for one seed; the draw of a smaller ``shots`` is a
prefix of a larger one's (same seed), so accuracy curves over 1, 2, 4, ... shots grow one set.
``read_shots_folder`` reads a folder of class folders. Numpy only, like ``vitrina.models.zeroshot``:
``vitrina classify --shots``, the server and ``vitrina eval fewshot`` all score with this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from vitrina.data.folder import clean_class_name
from vitrina.data.images import is_image_path
from vitrina.errors import UserError
from vitrina.models.zeroshot import DEFAULT_LOGIT_SCALE

FewShotMethod = Literal["prototype", "tip-adapter", "linear"]
FEWSHOT_METHODS: tuple[str, ...] = ("prototype", "tip-adapter", "linear")
# Tip-Adapter's defaults (its ImageNet setting): cache weight alpha, affinity sharpness beta.
TIP_ALPHA = 1.0
TIP_BETA = 5.5


def _normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def class_prototypes(vectors: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, D) vectors and (N,) labels in [0, C) -> (C, D) unit prototypes: the renormalised mean of unit vectors."""
    unit = _normalize(vectors)
    labels = np.asarray(labels)
    out = np.empty((num_classes, unit.shape[1]), dtype=np.float32)
    for c in range(num_classes):
        members = unit[labels == c]  # (n_c, D)
        if len(members) == 0:
            raise ValueError(f"class {c} has no shots")
        out[c] = _normalize(members.mean(axis=0))
    return out


def cache_affinity(queries: np.ndarray, keys: np.ndarray, beta: float) -> np.ndarray:
    """(Q, D) and (K, D) unit vectors -> (Q, K) Tip-Adapter affinities ``exp(-beta (1 - cos))`` in (0, 1]."""
    return np.exp(-beta * (1.0 - _normalize(queries) @ _normalize(keys).T))


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) integer labels -> (N, C) float32 one-hot rows."""
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), np.asarray(labels)] = 1.0
    return out


@dataclass
class FewShotClassifier:
    """A fitted few-shot classifier; ``logits`` scores (N, D) image vectors against ``class_names``.

    ``prototypes`` (C, D) always; ``keys``/``key_labels`` and ``text_vectors`` (C, D) for Tip-Adapter;
    ``weight`` (C, D) and ``bias`` (C,) for the linear head.
    """

    class_names: list[str]
    method: str
    prototypes: np.ndarray
    scale: float = DEFAULT_LOGIT_SCALE
    keys: np.ndarray | None = None
    key_labels: np.ndarray | None = None
    text_vectors: np.ndarray | None = None
    alpha: float = TIP_ALPHA
    beta: float = TIP_BETA
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None

    def logits(self, image_vectors: np.ndarray) -> np.ndarray:
        """(N, D) image vectors -> (N, C) class logits."""
        unit = _normalize(image_vectors)
        if self.method == "linear":
            return unit @ self.weight.T + self.bias
        if self.method == "tip-adapter":
            zero_shot = self.scale * (unit @ self.text_vectors.T)  # (N, C)
            cache = cache_affinity(unit, self.keys, self.beta) @ one_hot(self.key_labels, len(self.class_names))
            return zero_shot + self.alpha * cache
        return self.scale * (unit @ self.prototypes.T)  # (N, C)

    def probabilities(self, image_vectors: np.ndarray) -> np.ndarray:
        """(N, C) softmax of ``logits``."""
        logits = self.logits(image_vectors)
        logits = logits - logits.max(axis=1, keepdims=True)  # stable softmax
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, image_vectors: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) class indices."""
        return self.logits(image_vectors).argmax(axis=1)


def fit_fewshot(
    vectors: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    *,
    method: str = "prototype",
    text_vectors: np.ndarray | None = None,
    scale: float = DEFAULT_LOGIT_SCALE,
    alpha: float = TIP_ALPHA,
    beta: float = TIP_BETA,
    seed: int = 0,
) -> FewShotClassifier:
    """A classifier from the shots' (N, D) ``vectors`` and (N,) ``labels`` (indices into ``class_names``).

    ``text_vectors`` (C, D): the classes' prompt-ensemble vectors, which Tip-Adapter needs.
    """
    if method not in FEWSHOT_METHODS:
        raise UserError(f"few-shot method {method!r}: choose one of {', '.join(FEWSHOT_METHODS)}")
    labels = np.asarray(labels, dtype=np.int64)
    unit = _normalize(vectors)
    classifier = FewShotClassifier(
        list(class_names), method, class_prototypes(unit, labels, len(class_names)), scale=scale, alpha=alpha, beta=beta
    )
    if method == "tip-adapter":
        if text_vectors is None or len(text_vectors) != len(class_names):
            raise ValueError("tip-adapter needs one text vector per class")
        classifier.keys, classifier.key_labels = unit, labels
        classifier.text_vectors = _normalize(text_vectors)
    elif method == "linear":
        classifier.weight, classifier.bias = _fit_linear_head(unit, labels, len(class_names), seed)
    return classifier


def _fit_linear_head(
    unit: np.ndarray, labels: np.ndarray, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(C, D) weight and (C,) bias of a logistic regression on the shots (a binary fit written as two rows)."""
    from sklearn.linear_model import LogisticRegression

    # C=10: unit vectors have small coordinates, the default C=1 shrinks a few-shot head to near-uniform
    head = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(unit, labels)
    weight = np.zeros((num_classes, unit.shape[1]), dtype=np.float32)
    bias = np.zeros(num_classes, dtype=np.float32)
    if len(head.classes_) == 2:  # sklearn keeps one row: logit(class 1) - logit(class 0)
        weight[head.classes_[1]], bias[head.classes_[1]] = head.coef_[0], head.intercept_[0]
    else:
        weight[head.classes_], bias[head.classes_] = head.coef_, head.intercept_
    return weight, bias


def draw_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of ``shots`` items per class of (N,) integer ``labels``, drawn for ``seed``; sorted.

    Each class is shuffled by its own generator seeded with (seed, class), and the first ``shots``
    taken: the draw does not depend on the other classes, and fewer shots are a subset of more.
    """
    labels = np.asarray(labels)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"class {c} has {len(members)} items, fewer than {shots} shots")
        order = np.random.default_rng([seed, int(c)]).permutation(len(members))
        picked.append(members[order[:shots]])
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


def read_shots_folder(folder: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """A folder with one subfolder of labelled images per class -> (image paths, (N,) labels, class names).

    Class names are the subfolders' cleaned names (``ankle_boot`` -> ``ankle boot``); subfolders sorted.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--shots {root}: not a folder; give a folder with one subfolder of images per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(
            f"--shots {root}: {len(classes)} class folder(s); few-shot needs at least two "
            f"(e.g. {root}/cat/*.png and {root}/dog/*.png)"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for c, class_dir in enumerate(classes):
        files = (p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = sorted(p for p in files if is_image_path(p))
        if not images:
            raise UserError(f"--shots {class_dir}: no images in this class folder; add a few or remove the folder")
        paths += images
        labels += [c] * len(images)
    names = [clean_class_name(p.name) for p in classes]
    return paths, np.asarray(labels, dtype=np.int64), names
