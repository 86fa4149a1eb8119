"""Held-out-style recall (``vitrina.eval.style``): R@K against a hand-made gallery, and the demo's split of the
real facebook emoji style by concept (skipped when the data are not installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitrina.checkpoint import load_encoder, save_model
from vitrina.data.emoji import load_emoji
from vitrina.data.sources import EMOJI_CONCEPT
from vitrina.errors import UserError
from vitrina.eval.style import KINDS, PARTS, format_style_table, recalls, style_recalls
from vitrina.models.registry import build_model


class TableText:
    """Texts embedded as fixed vectors (``encode_text`` is all ``recalls`` asks of an encoder)."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    def encode_text(self, texts: list[str]) -> np.ndarray:
        rows = np.asarray([self.vectors[t] for t in texts], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_recall_counts_the_rank_of_the_first_relevant_image() -> None:
    gallery = np.eye(3, dtype=np.float32)  # three images, one axis each
    keys = ["cat", "dog", "dog"]  # "dog" names two images: either one is a hit
    encoder = TableText({"cat": [0.2, 1.0, 0.1], "dog": [0.0, 0.3, 1.0]})
    # "cat" ranks image 1 (a dog) first and its own image second; "dog" ranks image 2, a dog, first
    result = recalls(encoder, gallery, keys, ["dog", "cat", "cat"])  # a repeated query counts once
    assert result == {"queries": 2, "R@1": 0.5, "R@5": 1.0, "R@10": 1.0}


@pytest.fixture(scope="module")
def facebook():
    try:
        return load_emoji("facebook")
    except UserError as error:
        pytest.skip(f"offline data not installed: {error}")


def test_the_style_splits_by_concept_and_every_part_is_scored(facebook, tmp_path: Path) -> None:
    encoder = load_encoder(str(save_model(build_model("clip-tiny"), tmp_path / "clip")))
    held = {EMOJI_CONCEPT + item.unified for item in facebook[:3]}
    results = style_recalls(encoder, held, seed=0, style="facebook")
    for kind in KINDS:
        parts = results[kind]
        assert parts["held_out_concepts"]["queries"] == 3  # one caption (name) per held-out emoji
        # the parts cover the style's distinct queries once each (a text shared by two parts counts in both)
        assert sum(parts[p]["queries"] for p in PARTS) >= parts["all"]["queries"] > 0.9 * len(facebook)
        assert abs(parts["report_half"]["queries"] - parts["selection_half"]["queries"]) < 0.1 * len(facebook)
        for block in parts.values():
            assert 0 <= block["R@1"] <= block["R@5"] <= block["R@10"] <= 1
    table = format_style_table(results)
    assert "held-out concepts" in table and "report half" in table
    assert max(len(line) for line in table.splitlines()) <= 80  # a terminal's width: no wrapped rows
