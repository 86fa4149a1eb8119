"""Few-shot classification: prototypes, Tip-Adapter against a naive loop, the linear head, seeded draws,
`vitrina classify --shots` on real images with the real clip-tiny, and `vitrina eval fewshot` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_index import COLOURS, draw

from vitrina.cli import main
from vitrina.errors import UserError
from vitrina.models.fewshot import (
    FEWSHOT_METHODS,
    cache_affinity,
    class_prototypes,
    draw_shots,
    fit_fewshot,
    read_shots_folder,
)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _clusters(num_classes: int, per_class: int, dim: int = 16, noise: float = 0.05, seed: int = 0):
    """Well-separated fixtures: class c near the basis vector e_c, ``per_class`` distinct points each."""
    rng = np.random.default_rng(seed)
    centres = np.eye(num_classes, dim, dtype=np.float32)  # (C, D), orthonormal
    labels = np.repeat(np.arange(num_classes), per_class)
    vectors = centres[labels] + noise * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return (3.0 * vectors).astype(np.float32), labels, centres  # any scale: the methods normalise


def test_prototype_is_the_renormalised_mean_of_normalised_embeddings() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((12, 8)).astype(np.float32) * rng.uniform(0.1, 5, (12, 1)).astype(np.float32)
    labels = np.array([0, 1, 2] * 4)
    prototypes = class_prototypes(vectors, labels, 3)
    for c in range(3):
        members = [vectors[i] / np.linalg.norm(vectors[i]) for i in range(12) if labels[i] == c]
        mean = np.sum(members, axis=0) / len(members)
        np.testing.assert_allclose(prototypes[c], mean / np.linalg.norm(mean), atol=1e-6)
    with pytest.raises(ValueError, match="class 3 has no shots"):
        class_prototypes(vectors, labels, 4)


def test_tip_adapter_logits_equal_the_naive_formula() -> None:
    vectors, labels, centres = _clusters(3, 2)
    queries = _unit(np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32))
    text = _unit(centres + 0.1)
    model = fit_fewshot(vectors, labels, ["a", "b", "c"], method="tip-adapter", text_vectors=text, alpha=2.0, beta=3.0)
    keys = _unit(vectors)
    expected = np.zeros((5, 3))
    for q in range(5):
        for c in range(3):
            cache = sum(math.exp(-3.0 * (1 - float(queries[q] @ keys[k]))) for k in range(6) if labels[k] == c)
            expected[q, c] = 100.0 * float(queries[q] @ text[c]) + 2.0 * cache
    np.testing.assert_allclose(model.logits(queries), expected, rtol=1e-5)
    affinity = cache_affinity(queries, keys, 3.0)
    assert affinity.shape == (5, 6) and np.all((affinity > 0) & (affinity <= 1 + 1e-6))


@pytest.mark.parametrize("method", FEWSHOT_METHODS)
@pytest.mark.parametrize("shots", [1, 3])
def test_well_separated_classes_are_classified_correctly(method: str, shots: int) -> None:
    train, labels, centres = _clusters(4, shots, seed=shots)
    test, test_labels, _ = _clusters(4, 10, noise=0.2, seed=10 + shots)  # new, noisier points of the same classes
    model = fit_fewshot(train, labels, list("wxyz"), method=method, text_vectors=centres)
    assert (model.predict(test) == test_labels).all()
    probs = model.probabilities(test)
    assert probs.shape == (40, 4) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_linear_head_with_two_classes_has_one_row_per_class() -> None:
    train, labels, _ = _clusters(2, 2)
    model = fit_fewshot(train, labels, ["a", "b"], method="linear")
    assert model.weight.shape == (2, 16) and (model.predict(train) == labels).all()
    with pytest.raises(ValueError, match="class 2 has no shots"):  # every class needs a shot
        fit_fewshot(train, labels, ["a", "b", "never seen"], method="linear")


def test_seeded_draws_are_reproducible_stratified_and_nested() -> None:
    labels = np.array([0] * 20 + [1] * 7 + [2] * 30)
    first, again = draw_shots(labels, 4, seed=3), draw_shots(labels, 4, seed=3)
    np.testing.assert_array_equal(first, again)
    assert np.bincount(labels[first]).tolist() == [4, 4, 4]
    assert not np.array_equal(first, draw_shots(labels, 4, seed=4))
    assert set(draw_shots(labels, 2, seed=3)) <= set(first)  # fewer shots: a subset of the same seed's draw
    # a class's draw does not depend on the other classes being there
    alone = draw_shots(labels[labels == 1], 4, seed=3)
    np.testing.assert_array_equal(alone + 20, first[labels[first] == 1])
    with pytest.raises(ValueError, match="fewer than 8 shots"):
        draw_shots(labels, 8, seed=0)


def _solid(colour: tuple[int, int, int], variant: int) -> Image.Image:
    """A 48 px picture of one colour, shifted a little per variant (distinct images, well-separated classes)."""
    shifted = tuple(min(255, max(0, c + 12 * (variant - 1))) for c in colour)
    return Image.new("RGB", (48, 48), shifted)


def _shots_folder(root: Path, per_class: int, variants: range) -> Path:
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for v in list(variants)[:per_class]:
            _solid(colour, v).save(root / name / f"solid-{v}.png")
    return root


def test_read_shots_folder_errors_on_one_class_or_an_empty_class(tmp_path: Path) -> None:
    shots = _shots_folder(tmp_path / "shots", 2, range(2))
    paths, labels, names = read_shots_folder(shots)
    assert names == ["blue", "green", "red"] and labels.tolist() == [0, 0, 1, 1, 2, 2] and len(paths) == 6
    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    draw((255, 0, 0), "square", 0).save(one / "cat" / "a.png")
    with pytest.raises(UserError, match="1 class folder"):
        read_shots_folder(one)
    (shots / "purple").mkdir()
    with pytest.raises(UserError, match="purple: no images"):
        read_shots_folder(shots)


def test_classify_shots_cli_on_real_images(tmp_path: Path, capsys) -> None:
    shots = _shots_folder(tmp_path / "shots", 2, range(2))
    queries = []
    for name, colour in COLOURS.items():
        queries.append(tmp_path / f"{name}-query.png")
        _solid(colour, 2).save(queries[-1])  # a variant not among the shots
    for method in ("prototype", "linear"):
        args = [*map(str, queries), "--model", "clip-tiny", "--shots", str(shots), "--method", method, "--json"]
        assert main(["classify", *args]) == 0
        ranked = json.loads(capsys.readouterr().out)
        assert [r[0][0] for r in ranked] == list(COLOURS)  # each query's best class is its colour
        assert all(abs(sum(p for _, p in r) - 1) < 1e-4 for r in ranked)


def test_classify_cli_errors_clearly(tmp_path: Path, capsys) -> None:
    image = tmp_path / "q.png"
    draw((255, 0, 0), "square", 0).save(image)
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    draw((255, 0, 0), "square", 0).save(one / "a.png")
    assert main(["classify", str(image), "--model", "clip-tiny", "--shots", str(one.parent)]) == 2
    assert "1 class folder(s); few-shot needs at least two" in capsys.readouterr().err
    empty = _shots_folder(tmp_path / "shots", 1, range(1))
    (empty / "grey").mkdir()
    assert main(["classify", str(image), "--model", "clip-tiny", "--shots", str(empty)]) == 2
    assert "grey: no images in this class folder" in capsys.readouterr().err
    assert main(["classify", str(image), "--model", "clip-tiny"]) == 2
    assert "give --labels" in capsys.readouterr().err
    assert main(["classify", str(image), "--model", "clip-tiny", "--labels", "a,b", "--method", "linear"]) == 2
    assert "give --shots DIR too" in capsys.readouterr().err


def test_eval_fewshot_writes_json_and_plot(tmp_path: Path, capsys) -> None:
    data = tmp_path / "colours"
    for name, colour in COLOURS.items():
        (data / name).mkdir(parents=True)
        for shape in ("square", "circle"):
            for v in range(3):
                draw(colour, shape, v).save(data / name / f"{shape}-{v}.png")
    out = tmp_path / "out"
    args = ["--model", "clip-tiny", "--data", str(data), "--shots", "1,2", "--seeds", "3", "--out", str(out)]
    assert main(["eval", "fewshot", *args, "--methods", "prototype,linear"]) == 0
    assert "prototype" in capsys.readouterr().out
    (result,) = json.loads((out / "fewshot.json").read_text())["results"]
    assert result["classes"] == ["blue", "green", "red"] and result["test_images"] == 9 and result["shots"] == [1, 2]
    for curve in result["methods"].values():
        runs = np.asarray(curve["runs"])  # (shots, seeds)
        assert runs.shape == (2, 3) and ((runs >= 0) & (runs <= 1)).all()
        np.testing.assert_allclose(curve["mean"], runs.mean(axis=1))
        np.testing.assert_allclose(curve["std"], runs.std(axis=1))
    assert 0 <= result["zero_shot"] <= 1
    assert (out / "fewshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again"
    assert main(["eval", "fewshot", *args[:-1], str(again), "--methods", "prototype,linear"]) == 0
    rerun = json.loads((again / "fewshot.json").read_text())["results"][0]
    assert rerun["methods"] == result["methods"]  # seeded: the same draws, the same accuracies
    assert main(["eval", "fewshot", *args, "--shots", "4"]) == 2  # 6 images a class: 4 shots need 8
    assert "fewer than two classes" in capsys.readouterr().err
