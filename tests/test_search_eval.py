"""Search, zero-shot classification, and retrieval metrics/evaluation.

Metric functions are checked against hand-worked examples and scikit-learn; ``evaluate_index`` is
checked with an *oracle* encoder (vectors from the shapes' colours, texts from colour words) whose
right answers are known, and run end to end with the real ``clip-tiny`` encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score
from test_index import COLOURS, SHAPES, image_path, make_encoder, write_collection

from vitrina.data.prompts import prompts_for
from vitrina.errors import UserError
from vitrina.eval.retrieval import (
    average_precision,
    evaluate_index,
    first_relevant_rank,
    format_table,
    map_at_k,
    mean_average_precision,
    precision_at_k,
    ranked_relevance,
    recall_at_k,
)
from vitrina.eval.zeroshot import class_embeddings, class_probabilities, zero_shot_accuracy
from vitrina.index.embed import index_folder
from vitrina.search import Searcher, classify

# --- metrics on hand-worked examples --------------------------------------------------------

# Three queries over five ranked items; query 2 has no relevant item at all.
REL = np.array(
    [
        [0, 1, 0, 1, 0],  # relevant at ranks 2 and 4
        [1, 0, 0, 0, 0],  # relevant at rank 1
        [0, 0, 0, 0, 0],
    ],
    dtype=bool,
)


def test_recall_and_precision_at_k_by_hand() -> None:
    assert recall_at_k(REL, 1) == pytest.approx(1 / 3)
    assert recall_at_k(REL, 2) == pytest.approx(2 / 3)
    assert recall_at_k(REL, 5) == pytest.approx(2 / 3)
    assert precision_at_k(REL, 2) == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert precision_at_k(REL, 4) == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)


def test_average_precision_by_hand() -> None:
    assert average_precision(REL[0]) == pytest.approx((1 / 2 + 2 / 4) / 2)  # P@2, P@4 over 2 relevant
    assert average_precision(REL[1]) == 1.0
    assert average_precision(REL[2]) == 0.0
    # A relevant item never retrieved still counts in the denominator.
    assert average_precision(REL[0], n_relevant=4) == pytest.approx((1 / 2 + 2 / 4) / 4)
    assert mean_average_precision(REL) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_map_at_k_by_hand() -> None:
    # AP@2: query 0 -> P@2 * 1 / min(2, 2) = 0.25; query 1 -> 1 / min(2, 1) = 1; query 2 -> 0.
    assert map_at_k(REL, 2) == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    # AP@4 of query 0: (1/2 + 2/4) / min(4, 2) = 0.5.
    assert map_at_k(REL[:1], 4) == pytest.approx(0.5)
    # With 3 relevant in total (one beyond rank 5): (1/2 + 2/4) / min(4, 3).
    assert map_at_k(REL[:1], 4, n_relevant=np.array([3])) == pytest.approx(1 / 3)


def test_average_precision_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.permutation(50).astype(float)  # no ties: sklearn and the ranked form agree
        truth = rng.random(50) < 0.2
        truth[0] = True
        ranked = truth[np.argsort(-scores)]
        assert average_precision(ranked) == pytest.approx(average_precision_score(truth, scores))


def test_ranked_relevance_and_first_relevant_rank_agree() -> None:
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((6, 40))
    item_keys = rng.integers(0, 4, size=40)
    query_keys = np.arange(6) % 4
    rel = ranked_relevance(scores, query_keys, item_keys)  # (6, 40)
    assert rel.sum(axis=1).tolist() == [(item_keys == q).sum() for q in query_keys]
    ranks = first_relevant_rank(scores, item_keys[None, :] == query_keys[:, None])
    assert ranks.tolist() == rel.argmax(axis=1).tolist()
    assert recall_at_k(rel, 3) == pytest.approx(np.mean(ranks < 3))


def test_zero_shot_accuracy_and_probabilities() -> None:
    classes = np.eye(3, dtype=np.float32)
    images = np.array([[0.9, 0.1, 0], [0, 0.2, 0.9], [0.1, 0.8, 0.3]], dtype=np.float32)
    assert zero_shot_accuracy(images, ["a", "c", "c"], classes, ["a", "b", "c"]) == pytest.approx(2 / 3)
    probs = class_probabilities(images, classes, scale=10.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    expected = np.exp(10 * images[0]) / np.exp(10 * images[0]).sum()
    np.testing.assert_allclose(probs[0], expected, rtol=1e-5)


# --- an encoder whose right answers are known -----------------------------------------------


class ColourOracle:
    """Image -> share of pixels near each class colour; text -> the first colour word it names.

    ``text_shift`` rotates the colour words (red -> green ...) to make every text query wrong.
    """

    embed_dim = 3
    identity = {"kind": "colour-oracle", "embed_dim": 3, "name": "oracle"}
    NAMES = list(COLOURS)

    def __init__(self, text_shift: int = 0) -> None:
        self.text_shift = text_shift
        self.palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (3, 3)

    @property
    def image_transform(self):
        return lambda image: torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        flat = pixels.flatten(2).transpose(1, 2)  # (B, H*W, 3)
        near = torch.cdist(flat, self.palette.expand(len(flat), -1, -1)) < 30  # (B, H*W, 3)
        return torch.nn.functional.normalize(near.float().sum(dim=1), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        out = torch.full((len(texts), 3), 3**-0.5)
        for i, text in enumerate(texts):
            words = text.replace(",", " ").replace(".", " ").split()
            found = [self.NAMES.index(w) for w in words if w in self.NAMES]
            if found:
                out[i] = torch.nn.functional.one_hot(torch.tensor((found[0] + self.text_shift) % 3), 3).float()
        return out


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coll") / "photos"
    write_collection(root, captions=True)
    return root


def test_evaluate_index_with_an_oracle_gets_known_numbers(captioned: Path, tmp_path: Path) -> None:
    oracle = ColourOracle()
    index_folder(captioned, oracle, tmp_path / "idx", model_ref="oracle", progress=False)
    results = evaluate_index(tmp_path / "idx", oracle)
    labels = results["labels"]
    assert (labels["classes"], labels["images"]) == (3, 24)
    for key in ("R@1", "R@5", "R@10", "mAP@10", "mAP", "prompted_accuracy"):
        assert labels[key] == pytest.approx(1.0), key
    assert labels["P@10"] == pytest.approx(8 / 10)  # 8 images per class fill 8 of the top 10
    assert labels["chance"] == pytest.approx(1 / 3)
    assert results["captions"]["text_to_image"]["R@1"] == pytest.approx(1.0)
    assert results["captions"]["image_to_text"]["R@1"] == pytest.approx(1.0)
    assert results["captions"]["text_to_image"]["queries"] == 24

    # Every colour word now points at the wrong class: 8 wrong images outrank the right ones.
    shifted = evaluate_index(tmp_path / "idx", ColourOracle(text_shift=1))
    t2i = shifted["captions"]["text_to_image"]
    assert (t2i["R@1"], t2i["R@5"], t2i["R@10"]) == (0.0, 0.0, 1.0)
    assert shifted["labels"]["prompted_accuracy"] == 0.0
    json.dumps(results)  # the CLI writes it as JSON
    table = format_table(results)
    assert "class prompts" in table and "mAP@10" in table and "caption → image" in table
    # a model that records no held-out concepts gets no "zero-shot" number at all
    assert "zero_shot" not in results["labels"] and "zero_shot" not in results["captions"]
    assert "zero-shot" not in format_table(results)


def test_evaluate_index_reports_zero_shot_on_held_out_concepts_only(captioned: Path, tmp_path: Path) -> None:
    oracle = ColourOracle()
    index_folder(captioned, oracle, tmp_path / "idx", model_ref="oracle", progress=False)
    red = [f"a red {shape}, variant {v}" for shape in SHAPES for v in range(2)]
    results = evaluate_index(tmp_path / "idx", oracle, held_out={"labels": ["green", "red"], "captions": red})
    labels = results["labels"]
    assert labels["zero_shot"] == {
        "held_out_classes": ["green", "red"], "classes": 2, "images": 16, "accuracy": 1.0, "chance": 0.5
    }  # fmt: skip
    assert labels["prompted_seen"] == {"classes": 1, "images": 8, "accuracy": 1.0, "chance": 1.0}
    captions = results["captions"]
    assert (captions["held_out_concepts"]["queries"], captions["seen_concepts"]["queries"]) == (8, 16)
    assert captions["held_out_concepts"]["R@1"] == 1.0  # ties with the other red images count for the query
    # the oracle sees colour only: among the 8 red captions every red image ties, so matching is chance
    assert captions["zero_shot"] == {"concepts": 8, "images": 8, "accuracy": pytest.approx(1 / 8), "chance": 1 / 8}
    table = format_table(results)
    assert "zero-shot classification (held-out classes)" in table and "prompted classification (seen" in table


def test_evaluate_index_with_the_tiny_clip(captioned: Path, tmp_path: Path, encoder) -> None:
    index_folder(captioned, encoder, tmp_path / "idx", model_ref="clip-tiny", progress=False)
    results = evaluate_index(tmp_path / "idx", encoder)
    assert results["items"] == 24
    for section in (results["labels"], *results["captions"].values()):
        for key in ("R@1", "R@5", "R@10"):
            assert 0.0 <= section[key] <= 1.0
        assert section["R@1"] <= section["R@5"] <= section["R@10"]
    assert results["captions"]["image_to_text"]["gallery"] == 24


def test_class_embeddings_are_the_renormalised_prompt_mean(encoder) -> None:
    labels = ["red", "blue"]
    vectors = class_embeddings(labels, encoder)
    for label, vector in zip(labels, vectors, strict=True):
        prompts = torch.nn.functional.normalize(encoder.encode_text(prompts_for(label)), dim=-1)
        expected = torch.nn.functional.normalize(prompts.mean(dim=0), dim=0).numpy()
        np.testing.assert_allclose(vector, expected, atol=1e-5)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_classify_with_prompt_ensembles(captioned: Path, encoder) -> None:
    images = [image_path(captioned, "red", "circle-0"), Image.open(image_path(captioned, "blue", "square-1"))]
    oracle_says = classify(images, ["green", "blue", "red"], ColourOracle())
    assert [ranked[0][0] for ranked in oracle_says] == ["red", "blue"]
    results = classify(images, ["green", "blue", "red"], encoder, top=2)
    assert [len(r) for r in results] == [2, 2]
    for ranked in classify(images, ["green", "blue", "red"], encoder):
        probs = [p for _, p in ranked]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
    with pytest.raises(UserError, match="two labels"):
        classify(images, ["red"], encoder)
    (captioned / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match="not-an-image"):
        classify([captioned / "broken.jpg"], ["red", "blue"], encoder)
    (captioned / "broken.jpg").unlink()


def test_searcher_text_and_image_queries(captioned: Path, tmp_path: Path, encoder) -> None:
    index_folder(captioned, encoder, tmp_path / "idx", model_ref="clip-tiny", progress=False)
    with Searcher(tmp_path / "idx", encoder) as searcher:
        hits = searcher.search_text("a red circle", k=5)
        assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert all(Path(h.path).is_file() and h.caption and h.label for h in hits)
        target = image_path(captioned, "green", "triangle-1")
        assert searcher.search_image(target, k=1)[0].path == str(target)
        assert searcher.search_image(Image.open(target), k=1)[0].path == str(target)
        assert json.loads(json.dumps(hits[0].to_json()))["path"] == hits[0].path
        with pytest.raises(UserError, match="empty"):
            searcher.search_text("   ")
        with pytest.raises(UserError, match="zero"):
            searcher.search_vector(np.zeros(encoder.embed_dim))


def test_searcher_loads_the_model_named_in_the_index(captioned: Path, tmp_path: Path, encoder) -> None:
    index_folder(captioned, encoder, tmp_path / "idx", model_ref="clip-tiny", progress=False)
    with Searcher(tmp_path / "idx") as searcher:
        assert searcher.encoder.identity == encoder.identity
        assert len(searcher.search_text("a blue bar", k=3)) == 3
