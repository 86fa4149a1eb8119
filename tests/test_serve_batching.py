"""Micro-batched searches answer exactly what one-by-one searches answer, through PyTorch or the exported ONNX
text tower; the ONNX-backed server answers as the PyTorch-backed one; the query-embedding cache is bounded and
keyed by model and runtime; the heavy lane is bounded and never holds searches up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_index import image_path, make_encoder, write_collection

from vitrina.checkpoint import load_encoder, save_model
from vitrina.errors import UserError
from vitrina.index.embed import index_folder
from vitrina.models.registry import build_model
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

    with Searcher(index_dir, text_runtime="auto") as fast, Searcher(index_dir) as plain:
        assert isinstance(fast.served.text_encoder, OnnxQueryEncoder) and plain.served.text_encoder is None
        assert fast.encoder.identity == plain.encoder.identity  # the PyTorch model still answers the rest
        for text in TEXTS:
            a, b = fast.run(Query(terms=parse_query(text), k=8)), plain.run(Query(terms=parse_query(text), k=8))
            assert [r.hit.id for r in a.hits] == [r.hit.id for r in b.hits]
            np.testing.assert_allclose([r.hit.score for r in a.hits], [r.hit.score for r in b.hits], atol=1e-5)


def test_the_text_tower_runs_on_as_many_threads_as_torch(index_dir: Path) -> None:
    """`serve --threads N` sets PyTorch's threads; the ONNX text tower beside it takes N too, not every core."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Searcher(index_dir, text_runtime="onnx") as searcher:
            assert searcher.run(Query(terms=parse_query("a red circle"), k=3)).hits
            session = searcher.served.text_encoder._sessions["text"]
            assert session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(saved)


def test_the_onnx_backed_server_answers_what_the_torch_backed_one_answers(index_dir: Path) -> None:
    photo = image_path(index_dir.parent / "photos", "red", "circle-0")
    onnx_app, torch_app = create_app(index_dir, runtime="onnx"), create_app(index_dir, runtime="torch")
    with TestClient(onnx_app) as onnx, TestClient(torch_app) as pt:
        assert onnx.get("/api/info").json()["model"]["text_runtime"] == "onnx"
        assert pt.get("/api/info").json()["model"]["text_runtime"] == "torch"
        for text in TEXTS:
            params = {"q": text, "k": 12, "collapse": "true"}
            a, b = onnx.get("/api/search", params=params).json(), pt.get("/api/search", params=params).json()
            assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]] and a["hits"], text
            np.testing.assert_allclose([h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-4)
        # The routes that run the PyTorch model still work beside the ONNX text tower, and agree.
        for client in (onnx, pt):
            assert client.get("/api/explain/1", params={"q": "a red circle"}).status_code == 200
            with open(photo, "rb") as f:
                upload = client.post("/api/search/image", files={"file": (photo.name, f, "image/png")}, params={"k": 5})
            assert upload.status_code == 200
        labels = {"labels": "red circle,blue square,green triangle", "image_id": "1"}
        a, b = (c.post("/api/classify", data=labels).json()["labels"] for c in (onnx, pt))
        assert [x["label"] for x in a] == [x["label"] for x in b]
        np.testing.assert_allclose([x["probability"] for x in a], [x["probability"] for x in b], atol=1e-4)


def test_onnx_batched_texts_equal_one_by_one(index_dir: Path) -> None:
    """The exported text tower takes a dynamic batch (padded to its longest text): a micro-batch of queries gets
    the vectors each would get alone, and the batched searches the same hits."""
    texts = [t.text for text in TEXTS for t in parse_query(text)] + ["x", "a much longer query " * 6]
    with Searcher(index_dir, text_runtime="onnx") as searcher:
        tower = searcher.served.text_encoder
        together = tower.encode_text(texts)  # (T, D)
        alone = np.concatenate([tower.encode_text([text]) for text in texts])  # (T, D)
        np.testing.assert_allclose(together, alone, atol=1e-4)
        batch = searcher.run_batch(queries())
    for query, together in zip(queries()[:-1], batch[:-1], strict=True):
        with Searcher(index_dir, text_runtime="onnx") as fresh:  # nothing cached
            alone = fresh.run(query)
        assert [(r.hit.id, r.duplicates) for r in together.hits] == [(r.hit.id, r.duplicates) for r in alone.hits]
        np.testing.assert_allclose([r.hit.score for r in together.hits], [r.hit.score for r in alone.hits], atol=1e-4)


def test_runtime_onnx_refuses_what_it_cannot_serve(index_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--precision bf16 runs the PyTorch towers"):
        Searcher(index_dir, text_runtime="onnx", precision="bf16")
    bare = tmp_path / "bare"
    write_collection(tmp_path / "photos")
    index_folder(tmp_path / "photos", make_encoder(), bare, model_ref="clip-tiny", progress=False, export_towers=False)
    with pytest.raises(UserError, match="no exported text tower to serve"):
        create_app(bare, runtime="onnx")
    with Searcher(bare, text_runtime="auto") as searcher:  # auto: PyTorch where the version has no towers
        assert searcher.served.text_encoder is None and searcher.run(Query(terms=parse_query("red"), k=3)).hits


def test_the_cache_never_serves_another_versions_or_runtimes_vectors(tmp_path: Path) -> None:
    """Two versions of other weights, both with exported towers: after the swap, a text cached under the first
    version is encoded again by the second's tower, and the cache is keyed by runtime too."""
    write_collection(tmp_path / "photos")
    save_model(build_model("clip-tiny", seed=0), tmp_path / "A")
    save_model(build_model("clip-tiny", seed=1), tmp_path / "B")
    index_dir = tmp_path / "idx"
    a = load_encoder(tmp_path / "A")
    index_folder(tmp_path / "photos", a, index_dir, model_ref=str(tmp_path / "A"), progress=False)
    with Searcher(index_dir, text_runtime="onnx") as searcher:
        first = searcher.text_vectors(["a red circle"])["a red circle"]
        key_a = searcher.served.texts_key
        b = load_encoder(tmp_path / "B")
        index_folder(tmp_path / "photos", b, index_dir, model_ref=str(tmp_path / "B"), progress=False, new_version=True)
        assert searcher.refresh()
        assert searcher.served.version.name == "v2" and searcher.served.text_encoder is not None
        second = searcher.text_vectors(["a red circle"])["a red circle"]
        assert searcher.served.texts_key != key_a and searcher.text_cache.misses == 2  # encoded again, not served
        np.testing.assert_allclose(second, b.encode_text(["a red circle"]).numpy()[0], atol=1e-4)
        assert np.abs(second - first).max() > 1e-2  # the other weights' vector really differs
    with Searcher(index_dir, text_runtime="torch") as plain, Searcher(index_dir, text_runtime="onnx") as fast:
        assert plain.served.texts_key[0] == fast.served.texts_key[0] and plain.served.texts_key != fast.served.texts_key
