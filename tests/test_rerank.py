"""The cross-attention re-ranker: its model's properties, its folder, its training, and re-ranked search.

One module fixture makes the real thing small: a clip-tiny checkpoint, a captioned collection of 24
drawn images indexed with it, and a re-ranker trained on that collection through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from test_index import write_collection

from vitrina.checkpoint import load_encoder, load_model, save_model
from vitrina.cli import main as cli
from vitrina.data.images import load_image
from vitrina.data.sources import load_training_pairs
from vitrina.errors import UserError
from vitrina.index.embed import index_folder
from vitrina.models.registry import build_model
from vitrina.models.rerank import (
    CrossAttentionReranker,
    RerankConfig,
    load_cross_model,
    load_reranker,
    save_reranker,
)
from vitrina.search import Query, Searcher, Term
from vitrina.serve.app import create_app
from vitrina.train.rerank import RerankSettings, build_cache, mine_examples, split_captions

TINY = RerankConfig(text_width=24, image_width=16, width=32, depth=2, heads=4)


def random_inputs(batch: int = 3, length: int = 5, tokens: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, TINY.text_width, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 3:] = 0  # a shorter text
    image = torch.randn(batch, tokens, TINY.image_width, generator=g)
    return states, mask, image


def test_logits_are_one_per_pair_finite_and_backward_runs() -> None:
    torch.manual_seed(0)
    model = CrossAttentionReranker(TINY)
    logits = model(*random_inputs())
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_score_ignores_the_order_of_image_tokens() -> None:
    """No position embedding on the image side: the image tokens are read as a set."""
    torch.manual_seed(0)
    model = CrossAttentionReranker(TINY).eval()
    states, mask, image = random_inputs()
    shuffled = image[:, torch.randperm(image.shape[1], generator=torch.Generator().manual_seed(1))]
    torch.testing.assert_close(model(states, mask, shuffled), model(states, mask, image), rtol=0, atol=1e-5)


def test_score_ignores_padding_after_a_text() -> None:
    torch.manual_seed(0)
    model = CrossAttentionReranker(TINY).eval()
    states, mask, image = random_inputs()
    padded_states = torch.cat([states, 100 * torch.randn(3, 4, TINY.text_width)], dim=1)  # (B, L + 4, Ct)
    padded_mask = F.pad(mask, (0, 4))  # the new positions are padding
    torch.testing.assert_close(model(padded_states, padded_mask, image), model(states, mask, image), atol=1e-5, rtol=0)


def test_save_load_round_trip_gives_identical_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CrossAttentionReranker(TINY).eval()
    save_reranker(model, tmp_path / "r", clip_ref="somewhere", clip_digest="0" * 64, extra={"note": "test"})
    loaded, config = load_cross_model(tmp_path / "r")
    assert config["clip"] == {"ref": "somewhere", "digest": "0" * 64} and config["note"] == "test"
    inputs = random_inputs()
    assert torch.equal(loaded(*inputs), model(*inputs))


def test_a_damaged_folder_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text('{"kind": "clip"}')
    with pytest.raises(UserError, match=r"config.json: not a re-ranker"):
        load_cross_model(tmp_path / "r")


# --- the real thing, small ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint with a trained reranker/, index built with it, collection, index of a model without one)."""
    base = tmp_path_factory.mktemp("rerank")
    root = base / "photos"
    write_collection(root, captions=True)
    ckpt = save_model(build_model("clip-tiny"), base / "clip")
    index_dir = base / "index"
    index_folder(root, load_encoder(ckpt), index_dir, model_ref=str(ckpt), progress=False, workers=0)
    argv = ["train", "rerank", "--model", str(ckpt), "--data", str(root), "--epochs", "4", "--batch-size", "16"]
    assert cli(argv) == 0
    bare = save_model(build_model("clip-tiny"), base / "bare")
    bare_index = base / "bare-index"
    index_folder(root, load_encoder(bare), bare_index, model_ref=str(bare), progress=False, workers=0)
    return ckpt, index_dir, root, bare_index


def test_training_lowers_the_loss_on_its_examples(setup) -> None:
    ckpt, _, root, _ = setup
    clip, _ = load_model(ckpt)
    trained, config = load_cross_model(ckpt / "reranker")
    settings = RerankSettings(**config["rerank"])
    cache = build_cache(clip, load_training_pairs(str(root)))
    rows, _ = split_captions(len(cache.captions), config["train"]["val_fraction"], config["train"]["seed"])
    examples = mine_examples(cache, rows, settings, config["train"]["seed"])
    assert sum(label for _, _, label in examples) == len(rows)  # one positive per caption here

    def loss(model: CrossAttentionReranker) -> float:
        caption, image, label = (torch.tensor(column) for column in zip(*examples, strict=True))
        with torch.no_grad():
            logits = model(cache.text_states[caption], cache.text_mask[caption], cache.image_tokens[image])
        return F.binary_cross_entropy_with_logits(logits, label.float()).item()

    torch.manual_seed(config["train"]["seed"])
    untrained = CrossAttentionReranker(trained.config).eval()  # what training started from
    assert loss(trained) < loss(untrained) - 0.05
    metrics = [json.loads(line) for line in (ckpt / "reranker" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_r1_rerank" in m.get("eval", {}) for m in metrics)  # the held-out captions were re-ranked


def test_rerank_reorders_the_same_candidates_by_the_rerankers_scores(setup) -> None:
    ckpt, index_dir, _, _ = setup
    terms = [Term("a red circle", 1.0)]
    with Searcher(index_dir, runtime="torch") as searcher:
        plain = searcher.run(Query(terms=terms, k=10))
        reranked = searcher.run(Query(terms=terms, k=10, rerank=10))
        reranker = searcher.reranker()
    assert sorted(r.hit.id for r in reranked.hits) == sorted(r.hit.id for r in plain.hits)
    scores = [r.rerank_score for r in reranked.hits]
    assert scores == sorted(scores, reverse=True)
    expected = reranker.score("a red circle", [load_image(r.hit.path) for r in reranked.hits]).numpy()
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    # the re-ranker folder loads on its own (its CLIP found as its parent) and scores the same
    alone = load_reranker(ckpt / "reranker")
    np.testing.assert_array_equal(
        alone.score("a red circle", [load_image(r.hit.path) for r in reranked.hits]), expected
    )


def test_rerank_with_k_below_n_keeps_the_best_k_of_the_n(setup) -> None:
    _, index_dir, _, _ = setup
    terms = [Term("a blue square", 1.0)]
    with Searcher(index_dir, runtime="torch") as searcher:
        all_n = searcher.run(Query(terms=terms, k=12, rerank=12))
        top_k = searcher.run(Query(terms=terms, k=4, rerank=12))
    assert [r.hit.id for r in top_k.hits] == [r.hit.id for r in all_n.hits[:4]]


def test_rerank_needs_a_text(setup) -> None:
    _, index_dir, _, _ = setup
    with Searcher(index_dir, runtime="torch") as searcher, pytest.raises(UserError, match="give a text query"):
        searcher.run(Query(item_ids=[(1, 1.0)], k=5, rerank=5))


def test_no_reranker_is_one_clear_line(setup, capsys) -> None:
    _, _, _, bare_index = setup
    assert cli(["search", str(bare_index), "a red circle", "--rerank", "5", "--runtime", "torch"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no re-ranker" in err and "vitrina train rerank" in err


def test_api_rerank_answers_the_same_ids_reordered(setup) -> None:
    _, index_dir, _, bare_index = setup
    with TestClient(create_app(index_dir, reload_s=0)) as client:
        plain = client.get("/api/search", params={"q": "a green triangle", "k": 8}).json()
        reranked = client.get("/api/search", params={"q": "a green triangle", "k": 8, "rerank": 8}).json()
        posted = client.post("/api/search", json={"q": "a green triangle", "k": 8, "rerank": 8}).json()
    assert sorted(h["id"] for h in reranked["hits"]) == sorted(h["id"] for h in plain["hits"])
    assert [h["id"] for h in posted["hits"]] == [h["id"] for h in reranked["hits"]]
    assert all(h["rerank_score"] is not None for h in reranked["hits"])
    assert all(h["rerank_score"] is None for h in plain["hits"])
    with TestClient(create_app(bare_index, reload_s=0)) as client:
        answer = client.get("/api/search", params={"q": "a red circle", "rerank": 5})
    assert answer.status_code == 409 and "no re-ranker" in answer.json()["error"]
