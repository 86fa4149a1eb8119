"""Concepts kept out of training entirely, so that "zero-shot" means what it says.

The rule (seeded): a share of the emoji concepts (one concept = one emoji in every drawing style)
and a number of Fashion-MNIST classes. Every pair of a held-out concept, in any style and with any
caption, leaves the training set; evaluation reports zero-shot accuracy on those concepts only and
calls accuracy on the rest "prompted classification (seen classes)".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vitrina.data.datasets import Caption, ImageSource
from vitrina.data.sources import EMOJI_CONCEPT, FASHION_CONCEPT

Pair = tuple[ImageSource, Caption]


@dataclass(frozen=True)
class HoldOutRule:
    """``emoji_fraction`` of the emoji concepts (at least one when there are any) and
    ``fashion_classes`` Fashion-MNIST classes (never all of them), drawn from ``seed``."""

    emoji_fraction: float = 0.1
    fashion_classes: int = 2
    seed: int = 0


@dataclass
class HeldOut:
    """What a run never trained on: concept keys, the class labels among them (as an index names
    them: "sandal") and every caption of their pairs. Written beside the weights (config.json)."""

    concepts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


def _draw(keys: list[str], count: int, seed: int, namespace: str) -> list[str]:
    # the draw of one namespace does not depend on what the other sources hold
    order = np.random.default_rng([seed, sum(namespace.encode())]).permutation(len(keys))
    return [keys[i] for i in order[:count]]


def held_out_concepts(concepts: Sequence[str], rule: HoldOutRule) -> set[str]:
    """The concept keys ``rule`` keeps out of training, drawn among the distinct keys of ``concepts``."""
    emoji = sorted({c for c in concepts if c.startswith(EMOJI_CONCEPT)})
    fashion = sorted({c for c in concepts if c.startswith(FASHION_CONCEPT)})
    n_emoji = max(1, round(rule.emoji_fraction * len(emoji))) if emoji and rule.emoji_fraction > 0 else 0
    n_fashion = min(rule.fashion_classes, max(0, len(fashion) - 1))
    return set(_draw(emoji, n_emoji, rule.seed, EMOJI_CONCEPT)) | set(
        _draw(fashion, n_fashion, rule.seed, FASHION_CONCEPT)
    )


def split_held_out(
    pairs: Sequence[Pair], concepts: Sequence[str], held: set[str]
) -> tuple[list[Pair], list[str], list[Pair], HeldOut]:
    """(training pairs, their concepts, held-out pairs, the ``HeldOut`` record), in input order."""
    train, train_concepts, kept_out = [], [], []
    captions: dict[str, None] = {}
    for pair, concept in zip(pairs, concepts, strict=True):
        if concept in held:
            kept_out.append(pair)
            texts = [pair[1]] if isinstance(pair[1], str) else list(pair[1])
            captions.update(dict.fromkeys(texts))
        else:
            train.append(pair)
            train_concepts.append(concept)
    labels = sorted(c.removeprefix(FASHION_CONCEPT) for c in held if c.startswith(FASHION_CONCEPT))
    return train, train_concepts, kept_out, HeldOut(sorted(held), labels, sorted(captions))


SELECTION_NAMESPACE = "selection"


def selection_split(
    pairs: Sequence[Pair], concepts: Sequence[str], *, seed: int = 0, fraction: float = 0.5
) -> tuple[list[Pair], list[Pair], set[str]]:
    """Split an evaluation set by concept into (selection pairs, report pairs, selection concepts).

    A run may pick its best epoch on the selection part; a number it reports is honest only on the
    report part, which no choice ever looked at. Concepts, not pairs, are drawn (seeded), so one
    concept's images are all on one side.
    """
    keys = sorted(set(concepts))
    chosen = set(_draw(keys, round(fraction * len(keys)), seed, SELECTION_NAMESPACE))
    selection = [p for p, c in zip(pairs, concepts, strict=True) if c in chosen]
    report = [p for p, c in zip(pairs, concepts, strict=True) if c not in chosen]
    return selection, report, chosen
