"""Micro-batched searches answer exactly what one-by-one searches answer; the query-embedding cache is
bounded and keyed by model; the heavy lane is bounded and never holds searches up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_index import image_path, make_encoder, write_collection

from vitrina.index.embed import index_folder
from vitrina.search import LRUCache, Query, Searcher, UnknownItemError, parse_query
from vitrina.serve.app import create_app
from vitrina.serve.batching import Busy, HeavyLane, MicroBatcher
from vitrina.serve.workers import Worker

TEXTS = ["a red circle", "a blue square -green", 'a bar "triangle"^0.5', "green", "a red circle", "blue bar"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batching")
    write_collection(root / "photos", captions=True)
    index_folder(root / "photos", make_encoder(), root / "idx", model_ref="clip-tiny", progress=False)
    return root / "idx"


def queries() -> list[Query]:
    out = [Query(terms=parse_query(text), k=5 + i, collapse=i % 2 == 1) for i, text in enumerate(TEXTS)]
    out.append(Query(item_ids=[(3, 1.0)], terms=parse_query("-green", require_positive=False), k=4))
    out.append(Query(item_ids=[(10_000, 1.0)], k=3))  # not in the index: its own error, nobody else's
    return out


def test_a_batch_answers_what_single_queries_answer(index_dir: Path) -> None:
    with Searcher(index_dir, make_encoder()) as searcher:
        batch = searcher.run_batch(queries())
        assert isinstance(batch[-1], UnknownItemError)
        for query, together in zip(queries()[:-1], batch[:-1], strict=True):
            alone = Searcher(index_dir, make_encoder()).run(query)  # a fresh searcher: nothing cached
            assert [(r.hit.id, r.duplicates) for r in together.hits] == [(r.hit.id, r.duplicates) for r in alone.hits]
            scores = [r.hit.score for r in together.hits], [r.hit.score for r in alone.hits]
            np.testing.assert_allclose(*scores, atol=1e-5)


def test_the_micro_batcher_gathers_concurrent_queries(index_dir: Path) -> None:
    worker = Worker("test-search", lambda: Searcher(index_dir, make_encoder()), close=Searcher.close)
    try:
        expected = worker.call(lambda s: s.run_batch(queries()))

        async def many() -> list:
            batcher = MicroBatcher(worker, window_ms=20)
            results = await asyncio.gather(*(batcher.submit(q) for q in queries()), return_exceptions=True)
            batcher.stop()
            return [results, batcher.batches]

        results, batches = asyncio.run(many())
        assert batches == 1  # all of them arrived within the window
        assert isinstance(results[-1], UnknownItemError)
        for got, want in zip(results[:-1], expected[:-1], strict=True):
            assert [r.hit.id for r in got.hits] == [r.hit.id for r in want.hits]
    finally:
        worker.shutdown()


def test_query_embeddings_are_cached_per_model_and_bounded(index_dir: Path) -> None:
    with Searcher(index_dir, make_encoder(), text_cache_size=3) as searcher:
        first = searcher.text_vectors(["a", "b", "c"])
        assert searcher.text_cache.misses == 3 and len(searcher.text_cache) == 3
        again = searcher.text_vectors(["a", "b"])
        assert searcher.text_cache.hits == 2
        np.testing.assert_array_equal(first["a"], again["a"])
        searcher.text_vectors(["d"])  # evicts the least recently used: "c"
        digest = searcher.encoder.identity["digest"]
        assert len(searcher.text_cache) == 3 and searcher.text_cache.get((digest, "c")) is None
        fresh = searcher.encoder.encode_text(["a"]).numpy()[0]
        np.testing.assert_allclose(first["a"], fresh, atol=1e-6)
    cache = LRUCache(2)
    cache.put(("digest-1", "x"), np.ones(2))
    assert cache.get(("digest-2", "x")) is None  # another model's vector is never served


def test_the_heavy_lane_is_bounded_and_searches_do_not_wait_for_it(index_dir: Path) -> None:
    search_worker = Worker("test-search", lambda: Searcher(index_dir, make_encoder()), close=Searcher.close)
    heavy = HeavyLane(Worker("test-heavy", lambda: None), slots=1)
    try:

        async def scenario() -> tuple[float, bool]:
            batcher = MicroBatcher(search_worker, window_ms=1)
            slow = asyncio.ensure_future(heavy.run(lambda _: time.sleep(1.0)))
            await asyncio.sleep(0.05)
            refused = False
            try:
                await heavy.run(lambda _: None)
            except Busy:
                refused = True
            start = time.perf_counter()
            await batcher.submit(Query(terms=parse_query("a red circle"), k=3))
            took = time.perf_counter() - start
            await slow
            batcher.stop()
            return took, refused

        took, refused = asyncio.run(scenario())
        assert refused and took < 0.5
    finally:
        heavy.worker.shutdown()
        search_worker.shutdown()


def test_a_full_heavy_lane_answers_503_with_retry_after(index_dir: Path) -> None:
    with TestClient(create_app(index_dir, heavy_slots=0)) as client:
        response = client.post("/api/classify", data={"labels": "red,blue", "image_id": "1"})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "retry" in response.json()["error"]
        path = image_path(index_dir.parent / "photos", "red", "circle-0")
        with open(path, "rb") as f:
            upload = client.post("/api/search/image", files={"file": (path.name, f, "image/png")})
        assert upload.status_code == 503
        assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200  # searches go on


def test_the_server_embeds_query_texts_with_the_exported_text_tower(index_dir: Path) -> None:
    from vitrina.runtime import OnnxQueryEncoder

    with Searcher(index_dir, fast_texts=True) as fast, Searcher(index_dir) as plain:
        assert isinstance(fast.served.text_encoder, OnnxQueryEncoder) and plain.served.text_encoder is None
        assert fast.encoder.identity == plain.encoder.identity  # the PyTorch model still answers the rest
        for text in TEXTS:
            a, b = fast.run(Query(terms=parse_query(text), k=8)), plain.run(Query(terms=parse_query(text), k=8))
            assert [r.hit.id for r in a.hits] == [r.hit.id for r in b.hits]
            np.testing.assert_allclose([r.hit.score for r in a.hits], [r.hit.score for r in b.hits], atol=1e-5)
    with TestClient(create_app(index_dir)) as client:  # what `vitrina serve` runs
        assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200
