"""Zero-shot evaluation: the accuracy of nearest-class-prompt classification over labelled images.

The scoring (prompt ensembles, probabilities) is runtime code in ``vitrina.models.zeroshot``, shared
with ``vitrina classify`` and the server.
"""

from __future__ import annotations

import numpy as np

from vitrina.models.zeroshot import (  # noqa: F401 - the scoring itself lives with the runtime code
    DEFAULT_LOGIT_SCALE,
    class_embeddings,
    class_probabilities,
    logit_scale_of,
)


def zero_shot_accuracy(
    image_vectors: np.ndarray, true_labels: list[str], class_vectors: np.ndarray, class_names: list[str]
) -> float:
    """Fraction of images whose nearest class vector is their own label's."""
    if len(true_labels) == 0:
        return float("nan")
    predicted = (np.asarray(image_vectors) @ np.asarray(class_vectors).T).argmax(axis=1)  # (N,)
    names = np.asarray(class_names, dtype=object)
    return float(np.mean(names[predicted] == np.asarray(true_labels, dtype=object)))
