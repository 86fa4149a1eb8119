"""The concept split of bench/ssl_cross_style.py: no probe-test concept may reach the probe's
training set in any style, small categories are dropped, and the split is stratified and seeded."""

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("ssl_cross_style_under_test", REPO / "bench" / "ssl_cross_style.py")
cross_style = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cross_style)


def concepts_of(sizes: dict[str, int]) -> dict[str, str]:
    return {f"{category}-{i}": category for category, size in sizes.items() for i in range(size)}


def test_split_is_by_concept_stratified_and_drops_small_categories():
    few = cross_style.MIN_CONCEPTS - 1
    category_of = concepts_of({"Flags": 50, "Objects": 20, "Component": few, "Symbols": 30})
    class_names, concepts, labels, is_test = cross_style.split_concepts(category_of, seed=0)
    assert class_names == ["Flags", "Objects", "Symbols"]
    assert len(concepts) == len(set(concepts)) == 100 and not any(c.startswith("Component") for c in concepts)
    assert [class_names[label] for label in labels] == [category_of[c] for c in concepts]
    for label, size in enumerate((50, 20, 30)):  # every category gives its share of test concepts
        assert is_test[labels == label].sum() == round(cross_style.TEST_FRACTION * size)


def test_split_is_reproducible_and_moves_with_the_seed():
    category_of = concepts_of({"Flags": 60, "Symbols": 40})
    first = cross_style.split_concepts(category_of, seed=0)[3]
    assert np.array_equal(first, cross_style.split_concepts(category_of, seed=0)[3])
    assert not np.array_equal(first, cross_style.split_concepts(category_of, seed=1)[3])
