"""The query language of the HTTP API: weighted and negative text terms, mixed with example images.

Syntax of a text query (parsed by ``parse_query``)::

    beach at sunset -people "red umbrella"^0.5 -"dark clouds"^0.3

* plain words form one phrase together (``beach at sunset``), encoded as one text;
* ``"a quoted phrase"`` is a term of its own;
* a leading ``-`` makes a word or quoted phrase negative (default weight ``-1``);
* a trailing ``^w`` sets the weight of a word or quoted phrase (``-x^0.3`` is ``x`` at ``-0.3``).

The query vector is ``sum_i w_i * e_i`` over the unit embeddings ``e_i`` of the terms (and of any
example images), so an item's rank follows ``sum_i w_i * cos(item, e_i)``: ``beach -people`` ranks by
"beach-ness minus people-ness". The reported score is the cosine with the normalised sum.

These helpers belong in ``vitrina/search.py`` eventually (they sit on ``Searcher.search_vector``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from vitrina.encoder import Encoder
from vitrina.errors import UserError

NEGATIVE_WEIGHT = -1.0
MAX_TERMS = 16
MAX_ABS_WEIGHT = 10.0

# One token: optional "-", then a quoted phrase or a bare word, then an optional "^weight".
_TOKEN = re.compile(
    r"""(?P<neg>-)?(?:"(?P<phrase>[^"]*)"|(?P<word>[^\s"^]+))(?:\^(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+)))?"""
)


@dataclass(frozen=True)
class Term:
    """One text of a query and its weight (negative: push results away from it)."""

    text: str
    weight: float


def parse_query(query: str) -> list[Term]:
    """Split ``query`` into weighted terms (see the module docstring); plain words join into one phrase.

    Raises ``UserError`` for a query with no positive term, too many terms, or an absurd weight.
    """
    plain: list[str] = []
    terms: list[Term] = []
    pos = 0
    for match in _TOKEN.finditer(query):
        gap = query[pos : match.start()]
        if gap.strip():
            raise UserError(f"query: cannot read {gap.strip()!r}; close quotes and write weights as term^0.5")
        pos = match.end()
        text = match["phrase"] if match["phrase"] is not None else match["word"]
        text = " ".join(text.split())
        negative = match["neg"] is not None
        if not text:
            continue
        if not negative and match["phrase"] is None and match["weight"] is None:
            plain.append(text)  # part of the main phrase
            continue
        magnitude = float(match["weight"]) if match["weight"] is not None else 1.0
        if not np.isfinite(magnitude) or abs(magnitude) > MAX_ABS_WEIGHT:
            raise UserError(f"query: weight of {text!r} must be within ±{MAX_ABS_WEIGHT:g}")
        terms.append(Term(text, NEGATIVE_WEIGHT * abs(magnitude) if negative else magnitude))
    rest = query[pos:]
    if rest.strip():
        raise UserError(f"query: cannot read {rest.strip()!r}; close quotes and write weights as term^0.5")
    if plain:
        terms.insert(0, Term(" ".join(plain), 1.0))
    terms = [t for t in terms if t.weight != 0]
    if len(terms) > MAX_TERMS:
        raise UserError(f"query: {len(terms)} terms, at most {MAX_TERMS} are allowed")
    if not any(t.weight > 0 for t in terms):
        raise UserError("query: needs at least one positive term (words without a leading '-')")
    return terms


def combine(parts: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """``sum w * v`` over (unit vector (D,), weight) pairs, normalised; ``UserError`` if it cancels out."""
    if not parts:
        raise UserError("query: nothing to search by; give a text, an image, or both")
    total = np.zeros_like(np.asarray(parts[0][0], dtype=np.float32))  # (D,)
    for vector, weight in parts:
        total += np.float32(weight) * np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise UserError("query: the terms cancel each other out; change their weights")
    return total / norm


def text_parts(terms: list[Term], encoder: Encoder) -> list[tuple[np.ndarray, float]]:
    """Encode every term in one batch -> (unit vector (D,), weight) pairs for ``combine``."""
    vectors = encoder.encode_text([t.text for t in terms]).detach().cpu().numpy().astype(np.float32)  # (T, D)
    return [(vector, t.weight) for vector, t in zip(vectors, terms, strict=True)]


def collapse_near_duplicates(vectors: np.ndarray, k: int, threshold: float) -> list[tuple[int, list[int]]]:
    """Greedy de-duplication of a ranked list of (N, D) unit ``vectors``.

    Walks the ranking best first; an item whose cosine with an already kept item is ``>= threshold``
    joins that item's group instead of being kept. Returns up to ``k`` (kept row, [duplicate rows])
    pairs in rank order; items past the ``k``-th kept one only ever join groups.
    """
    kept: list[int] = []
    groups: dict[int, list[int]] = {}
    for row in range(len(vectors)):
        if kept:
            similarity = vectors[kept] @ vectors[row]  # (len(kept),)
            best = int(np.argmax(similarity))
            if similarity[best] >= threshold:
                groups[kept[best]].append(row)
                continue
        if len(kept) < k:
            kept.append(row)
            groups[row] = []
    return [(row, groups[row]) for row in kept]
