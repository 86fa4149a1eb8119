"""Held-out concepts never reach training: the demo's split on the real emoji + Fashion-MNIST data
(skipped when the data are not installed), and the rule on keys the test writes."""

from __future__ import annotations

import pytest

from vitrina.data.holdout import HoldOutRule, held_out_concepts, selection_split, split_held_out
from vitrina.data.sources import load_training_items
from vitrina.errors import UserError

DEMO_SPEC = "emoji:apple,google,twitter+fashion-mnist:train:6000"


@pytest.fixture(scope="module")
def demo_items():
    try:
        return load_training_items(DEMO_SPEC, seed=0)
    except UserError as error:
        pytest.skip(f"offline data not installed: {error}")


def test_held_out_concepts_never_reach_the_training_pairs(demo_items):
    pairs, concepts = demo_items
    held = held_out_concepts(concepts, HoldOutRule(seed=0))
    train, train_concepts, kept_out, record = split_held_out(pairs, concepts, held)
    emoji = {c for c in concepts if c.startswith("emoji:")}
    held_emoji = {c for c in held if c.startswith("emoji:")}
    assert len(held_emoji) == round(0.1 * len(emoji)) and len(record.labels) == 2
    assert not held & set(train_concepts)
    assert len(train) + len(kept_out) == len(pairs) and len(train) == len(train_concepts)
    # every style of a held-out emoji left: three pairs per held-out emoji concept
    assert sum(c in held_emoji for c in concepts) == 3 * len(held_emoji)
    # no training caption is a held-out caption (a caption would carry the concept in by its text)
    assert not {caption for _, caption in train} & set(record.captions)
    assert all(f"fashion-mnist:{label}" in held for label in record.labels)
    # the fourth style's pictures of the held-out emoji carry held-out captions (what the eval splits on)
    facebook, facebook_concepts = load_training_items("emoji:facebook")
    held_facebook = [caption for (_, caption), c in zip(facebook, facebook_concepts, strict=True) if c in held]
    assert held_facebook and set(held_facebook) <= set(record.captions)


def test_the_rule_is_seeded_and_never_holds_out_every_class():
    concepts = [f"emoji:{i:04X}" for i in range(40)] + [f"fashion-mnist:{n}" for n in "abc"] + ["a caption"]
    a, b = held_out_concepts(concepts, HoldOutRule(seed=3)), held_out_concepts(concepts, HoldOutRule(seed=3))
    assert a == b and a != held_out_concepts(concepts, HoldOutRule(seed=4))
    assert len([c for c in a if c.startswith("emoji:")]) == 4 and "a caption" not in a
    assert len([c for c in held_out_concepts(concepts, HoldOutRule(fashion_classes=5)) if "fashion" in c]) == 2


def test_the_selection_split_keeps_each_concept_on_one_side_and_is_seeded():
    pairs, concepts = load_training_items("emoji:facebook", seed=0)
    selection, report, chosen = selection_split(pairs, concepts, seed=0)
    assert len(selection) + len(report) == len(pairs)
    assert abs(len(chosen) - len(set(concepts)) / 2) <= 1
    side = {c: (c in chosen) for c in concepts}
    assert sum(side.values()) == len(chosen)
    assert {id(p) for p in selection}.isdisjoint({id(p) for p in report})
    assert all((c in chosen) == any(p is q for q in selection) for p, c in zip(pairs[:50], concepts[:50], strict=True))
    again, _, chosen_again = selection_split(pairs, concepts, seed=0)
    assert chosen_again == chosen and [p for p in again] == selection
    assert selection_split(pairs, concepts, seed=1)[2] != chosen
