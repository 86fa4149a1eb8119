"""The cross-attention re-ranker: its model's properties, its folder, its training, and re-ranked search.

One module fixture makes the real thing small: a clip-tiny checkpoint, a captioned collection of 24
drawn images indexed with it, and a re-ranker trained on that collection through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from test_index import draw, image_path, write_collection
from torch.utils.data import default_collate

import vitrina.search
from vitrina.checkpoint import load_encoder, load_model, save_model
from vitrina.cli import main as cli
from vitrina.data.images import load_image
from vitrina.data.sources import load_training_pairs
from vitrina.errors import UserError
from vitrina.index.embed import index_folder
from vitrina.index.rerank_tokens import MANIFEST, prepare_tokens, tokens_dir
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
from vitrina.train.rerank import (
    GroupExamples,
    RerankSettings,
    build_cache,
    group_softmax_step,
    mine_groups,
    split_captions,
)

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
    argv = ["train", "rerank", "--model", str(ckpt), "--data", str(root), "--epochs", "20", "--batch-size", "8"]
    assert cli(argv) == 0
    bare = save_model(build_model("clip-tiny"), base / "bare")
    bare_index = base / "bare-index"
    index_folder(root, load_encoder(bare), bare_index, model_ref=str(bare), progress=False, workers=0)
    return ckpt, index_dir, root, bare_index


def test_training_lowers_the_loss_on_its_groups(setup) -> None:
    ckpt, _, root, _ = setup
    clip, _ = load_model(ckpt)
    trained, config = load_cross_model(ckpt / "reranker")
    assert trained.config.dual_scale == pytest.approx(clip.scale().item())  # the CLIP's temperature
    settings = RerankSettings(**config["rerank"])
    cache = build_cache(clip, load_training_pairs(str(root)))
    rows, _ = split_captions(len(cache.captions), config["train"]["val_fraction"], config["train"]["seed"])
    groups = mine_groups(cache, rows, settings, config["train"]["seed"])
    assert groups.captions.tolist() == rows.tolist()  # one positive per caption here: one group each
    for caption, images in zip(groups.captions.tolist(), groups.images.tolist(), strict=True):
        assert images[0] in cache.positives[caption] and not set(images[1:]) & cache.positives[caption]
    cosines = cache.text_vectors[groups.captions, None, :] @ cache.image_vectors[groups.images].transpose(1, 2)
    torch.testing.assert_close(groups.dual, cosines.squeeze(1))  # (E, G): the dual encoder's score of each pair

    def loss(model: CrossAttentionReranker) -> float:
        with torch.no_grad():
            return group_softmax_step(model, default_collate(list(GroupExamples(cache, groups)))).loss.item()

    torch.manual_seed(config["train"]["seed"])
    untrained = CrossAttentionReranker(trained.config).eval()  # what training started from
    assert loss(trained) < loss(untrained) - 0.05
    metrics = [json.loads(line) for line in (ckpt / "reranker" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_r1_rerank" in m.get("eval", {}) for m in metrics)  # the held-out captions were re-ranked


def test_training_keeps_its_best_epoch_by_validation_and_search_loads_it(setup) -> None:
    ckpt, index_dir, _, _ = setup
    metrics = [json.loads(line) for line in (ckpt / "reranker" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [(m["step"], m["eval"]["val_r1_rerank"]) for m in metrics if "val_r1_rerank" in m.get("eval", {})]
    best_step, best_value = max(evaluated, key=lambda e: (e[1], -e[0]))  # the first epoch with the highest R@1
    _, config = load_cross_model(ckpt / "reranker" / "best")
    assert config["best"]["metric"] == "val_r1_rerank"
    assert (config["best"]["step"], config["best"]["value"]) == (best_step, best_value)
    with Searcher(index_dir, runtime="torch") as searcher:
        assert Path(searcher.reranker().source) == ckpt / "reranker" / "best"


def test_an_untrained_residual_reranker_keeps_the_dual_encoders_order() -> None:
    """dual_scale > 0: the correction starts at zero, so the scores are dual_scale x the cosines."""
    torch.manual_seed(0)
    model = CrossAttentionReranker(RerankConfig(**{**vars(TINY), "dual_scale": 14.3})).eval()
    states, mask, image = random_inputs()
    cosines = torch.tensor([0.1, 0.7, 0.4])
    torch.testing.assert_close(model(states, mask, image, cosines), 14.3 * cosines)


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


# --- the token file: image tokens stored once per item -------------------------------------------


@pytest.fixture
def own_index(setup, tmp_path: Path):
    """(checkpoint, a fresh index of a copy of the collection, that copy): free to grow and to prepare."""
    ckpt, _, root, _ = setup
    photos = tmp_path / "photos"
    shutil.copytree(root, photos)
    index_dir = tmp_path / "index"
    index_folder(photos, load_encoder(ckpt), index_dir, model_ref=str(ckpt), progress=False, workers=0)
    return ckpt, index_dir, photos


def decoded_paths(monkeypatch) -> list[str]:
    """Every image path the search decodes from now on (the cold path's work)."""
    seen: list[str] = []
    real = vitrina.search.load_image

    def counting(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(vitrina.search, "load_image", counting)
    return seen


def reranked(index_dir: Path, text: str, n: int = 24) -> dict[int, float]:
    """Item id -> re-ranker score of a text query re-ranking the top ``n``, in rank order."""
    with Searcher(index_dir, runtime="torch") as searcher:
        results = searcher.run(Query(terms=[Term(text, 1.0)], k=n, rerank=n))
    return {r.hit.id: r.rerank_score for r in results.hits}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_token_file_scores_equal_the_cold_path_and_decode_nothing(own_index, monkeypatch, capsys) -> None:
    _, index_dir, _ = own_index
    text = "a red circle"
    cold = reranked(index_dir, text)
    assert cli(["rerank-prepare", str(index_dir)]) == 0
    assert "24 items (0 reused, 24 embedded, 0 unreadable)" in capsys.readouterr().out
    manifest = json.loads((tokens_dir(index_dir, 1) / MANIFEST).read_text())
    assert manifest["shape"][0] == 24 and manifest["bytes_per_item"] == manifest["shape"][1] * manifest["shape"][2] * 2
    seen = decoded_paths(monkeypatch)
    warm = reranked(index_dir, text)
    assert seen == []  # every candidate's image side came from the file
    assert set(warm) == set(cold)
    tolerance = 1e-3  # both paths score float16 image embeddings; only the float32 work around them may differ
    np.testing.assert_allclose([warm[i] for i in cold], list(cold.values()), rtol=0, atol=tolerance)
    # every two candidates the cold path tells apart by more than twice that are in the same order
    ids = list(cold)
    apart = [(a, b) for n, a in enumerate(ids) for b in ids[n + 1 :] if cold[a] - cold[b] > 2 * tolerance]
    assert len(apart) > 0.9 * len(ids) * (len(ids) - 1) / 2  # nearly all pairs: the check is not vacuous
    assert all(warm[a] > warm[b] for a, b in apart)


def test_items_added_or_changed_after_the_file_are_decoded_and_reranked(own_index, monkeypatch) -> None:
    ckpt, index_dir, photos = own_index
    assert cli(["rerank-prepare", str(index_dir)]) == 0
    new = photos / "red" / "extra.png"
    draw((220, 20, 20), "circle", 5).save(new)
    changed = image_path(photos, "blue", "square-0")
    draw((20, 20, 220), "triangle", 3).save(changed, quality=95)  # same path (same id), new pixels
    index_folder(photos, load_encoder(ckpt), index_dir, model_ref=str(ckpt), progress=False, workers=0)
    seen = decoded_paths(monkeypatch)
    scores = reranked(index_dir, "a red circle", n=25)
    assert sorted(seen) == sorted([str(new), str(changed)])  # the other 23 from the file
    assert len(scores) == 25 and all(np.isfinite(s) for s in scores.values())
    reranker = load_reranker(ckpt / "reranker")
    with Searcher(index_dir, runtime="torch") as searcher:
        ids = {hit.path: hit.id for hit in (searcher.store.get(i) for i in scores)}
    expected = reranker.score("a red circle", [load_image(new), load_image(changed)]).numpy()
    np.testing.assert_allclose([scores[ids[str(new)]], scores[ids[str(changed)]]], expected, rtol=0, atol=1e-5)
    # preparing again reuses the 23 rows still current and embeds the two
    report = prepare_tokens(index_dir, reranker)
    assert (report.rows, report.reused, report.embedded) == (25, 23, 2)
    assert sorted(p.name for p in tokens_dir(index_dir, 1).iterdir()) == ["items-g2.npy", "tokens-g2.npy", MANIFEST]


def test_a_token_file_of_other_weights_is_not_used(own_index, monkeypatch) -> None:
    _, index_dir, _ = own_index
    cold = reranked(index_dir, "a green triangle")
    assert cli(["rerank-prepare", str(index_dir)]) == 0
    folder = tokens_dir(index_dir, 1)
    manifest = json.loads((folder / MANIFEST).read_text())
    np.load(folder / manifest["tokens"], mmap_mode="r+")[:] = 0  # rows that would change every score if read
    (folder / MANIFEST).write_text(json.dumps({**manifest, "reranker_digest": "0" * 64}))
    seen = decoded_paths(monkeypatch)
    again = reranked(index_dir, "a green triangle")
    assert len(seen) == 24  # every candidate decoded: the file was ignored
    assert list(again) == list(cold)
    np.testing.assert_allclose(list(again.values()), list(cold.values()), rtol=0, atol=1e-6)


def test_a_reranked_search_writes_nothing(own_index) -> None:
    _, index_dir, _ = own_index
    assert cli(["rerank-prepare", str(index_dir)]) == 0
    with Searcher(index_dir, runtime="torch") as searcher:
        searcher.run(Query(terms=[Term("a blue square", 1.0)], k=3))  # opened and searched once
        before = folder_bytes(index_dir)
        results = searcher.run(Query(terms=[Term("a blue square", 1.0)], k=24, rerank=24))
        assert searcher._token_file(searcher.served, searcher.reranker()) is not None
        # compared while open: SQLite itself removes its empty WAL file when the last connection closes
        assert folder_bytes(index_dir) == before
    assert all(r.rerank_score is not None for r in results.hits)


def test_train_rerank_with_an_index_prepares_its_tokens(own_index, tmp_path: Path, capsys) -> None:
    ckpt, index_dir, photos = own_index
    out = tmp_path / "other-reranker"
    argv = ["train", "rerank", "--model", str(ckpt), "--data", str(photos), "--epochs", "1", "--batch-size", "16"]
    assert cli([*argv, "--out", str(out), "--index", str(index_dir)]) == 0
    assert "re-ranker tokens of v1: 24 items" in capsys.readouterr().out
    manifest = json.loads((tokens_dir(index_dir, 1) / MANIFEST).read_text())
    assert manifest["reranker_digest"] == load_reranker(out).digest
    # the index model's own re-ranker (another digest) does not use it
    with Searcher(index_dir, runtime="torch") as searcher:
        assert searcher._token_file(searcher.served, searcher.reranker()) is None
    with Searcher(index_dir, runtime="torch", reranker=out) as searcher:
        assert searcher._token_file(searcher.served, searcher.reranker()) is not None
