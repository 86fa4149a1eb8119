"""The HTTP API of ``vitrina serve``, through FastAPI's TestClient, over a real tiny index.

The collection is PIL-drawn shapes (``test_index.write_collection``) plus an exact copy of one file
(a near-duplicate) and a zero-byte file (a ledger entry), embedded with the real ``clip-tiny``
encoder. Rankings are checked against brute-force cosine over the stored vectors.
"""

from __future__ import annotations

import io
import shutil
import socket
import urllib.parse
from pathlib import Path

import anyio
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_index import image_path, make_encoder, write_collection

from vitrina.errors import UserError
from vitrina.index.embed import index_folder
from vitrina.index.store import IndexStore
from vitrina.search import Term, classify, collapse_near_duplicates, parse_query
from vitrina.serve import serve
from vitrina.serve.app import create_app
from vitrina.serve.media import MAX_UPLOAD_BYTES, ThumbCache

# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve") / "photos"
    write_collection(root, variants=3, captions=True)  # 3 colours x 4 shapes x 3 variants = 36 images
    shutil.copyfile(image_path(root, "red", "circle-0"), root / "red" / "circle-0-copy.png")
    (root / "blue" / "empty.png").write_bytes(b"")  # goes to the ledger as "empty"
    return root


@pytest.fixture(scope="module")
def index_dir(collection: Path, encoder) -> Path:
    out = collection.parent / "index"
    index_folder(collection, encoder, out, model_ref="clip-tiny", progress=False, workers=0)
    return out


@pytest.fixture(scope="module")
def client(index_dir: Path, encoder):
    app = create_app(index_dir, encoder=encoder, thumb_dir=index_dir.parent / "thumbs")
    with TestClient(app) as test_client:  # runs the lifespan: workers are shut down at the end
        yield test_client


@pytest.fixture(scope="module")
def stored(index_dir: Path) -> dict:
    """Everything the index holds: ids, vectors, and relative path <-> id."""
    with IndexStore.open(index_dir) as store:
        ids, vectors = store.all_vectors()
        root = store.root
        names = {Path(path).relative_to(root).as_posix(): item_id for item_id, path, _, _ in store.items()}
    return {"ids": ids, "vectors": vectors, "by_name": names, "root": root}


def brute_force(stored: dict, query: np.ndarray, k: int) -> list[int]:
    """Ids of the top-``k`` stored vectors by inner product with ``query`` (exact, stable)."""
    scores = stored["vectors"] @ query  # (N,)
    return [int(stored["ids"][i]) for i in np.argsort(-scores, kind="stable")[:k]]


def text_vector(encoder, text: str) -> np.ndarray:
    return encoder.encode_text([text])[0].numpy()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def raw_get(app, raw_path: bytes) -> tuple[int, bytes]:
    """GET ``raw_path`` exactly as given (HTTP clients normalise ``../``; an attacker's need not)."""

    async def go() -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": urllib.parse.unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 12345),
            "server": ("testserver", 80),
        }
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    return anyio.run(go)


# --- the query language ---------------------------------------------------------------------


def test_parse_query_joins_plain_words_and_reads_signs_and_weights() -> None:
    assert parse_query("beach at  sunset") == [Term("beach at sunset", 1.0)]
    assert parse_query('beach -people "red umbrella"^0.5 -"dark clouds"^0.3 x-ray') == [
        Term("beach x-ray", 1.0),
        Term("people", -1.0),
        Term("red umbrella", 0.5),
        Term("dark clouds", -0.3),
    ]
    assert parse_query("cat^2 dog^0") == [Term("cat", 2.0)]  # weight 0 drops the term


@pytest.mark.parametrize("bad", ["-people", '"unclosed', "cat^", "cat^99", "   "])
def test_parse_query_refuses_what_it_cannot_read(bad: str) -> None:
    with pytest.raises(UserError, match="query"):
        parse_query(bad)


def test_collapse_groups_vectors_over_the_threshold_under_the_first_seen() -> None:
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    near_a = np.array([0.999, 0.0447])  # cos with a ~ 0.999
    vectors = np.stack([a, near_a, b, a, b])  # (5, 2), ranked best first
    assert collapse_near_duplicates(vectors, k=10, threshold=0.95) == [(0, [1, 3]), (2, [4])]
    assert collapse_near_duplicates(vectors, k=1, threshold=0.95) == [(0, [1, 3])]
    assert collapse_near_duplicates(vectors, k=10, threshold=1.01) == [(i, []) for i in range(5)]


# --- search ---------------------------------------------------------------------------------


def test_text_search_returns_hits_ranked_as_brute_force(client, stored, encoder) -> None:
    response = client.get("/api/search", params={"q": "a red circle", "k": 7})
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 37 and body["k"] == 7 and body["terms"] == [{"text": "a red circle", "weight": 1.0}]
    hits = body["hits"]
    assert [h["id"] for h in hits] == brute_force(stored, text_vector(encoder, "a red circle"), 7)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    first = hits[0]
    assert stored["by_name"][first["name"]] == first["id"]
    assert first["label"] in {"red", "green", "blue"}
    assert first["image_url"] == f"/api/images/{first['id']}" and first["thumb_url"] == f"/api/thumbs/{first['id']}"


def test_negative_and_weighted_terms_rank_by_weighted_cosine(client, stored, encoder) -> None:
    query = 'red circle -"blue square"^0.5 green^0.25'
    hits = client.get("/api/search", params={"q": query, "k": 10}).json()["hits"]
    combined = (
        text_vector(encoder, "red circle")
        - 0.5 * text_vector(encoder, "blue square")
        + 0.25 * text_vector(encoder, "green")
    )
    assert [h["id"] for h in hits] == brute_force(stored, combined, 10)
    unit = combined / np.linalg.norm(combined)
    top = stored["vectors"][list(stored["ids"]).index(hits[0]["id"])]
    assert hits[0]["score"] == pytest.approx(float(top @ unit), abs=1e-4)


def test_search_by_image_id_finds_itself_and_its_exact_copy_first(client, stored) -> None:
    original = stored["by_name"][image_path(stored["root"], "red", "circle-0").relative_to(stored["root"]).as_posix()]
    copy = stored["by_name"]["red/circle-0-copy.png"]
    hits = client.post("/api/search", json={"image_id": original, "k": 3}).json()["hits"]
    assert {h["id"] for h in hits[:2]} == {original, copy}
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and hits[1]["score"] == pytest.approx(1.0, abs=1e-5)


def test_collapse_folds_the_copy_into_one_result(client, stored) -> None:
    copy = stored["by_name"]["red/circle-0-copy.png"]
    body = client.post("/api/search", json={"image_id": copy, "k": 5, "collapse": True}).json()
    hits = body["hits"]
    shown = [h["id"] for h in hits]
    folded = [d for h in hits for d in h["duplicates"]]
    original = ({hits[0]["id"], *hits[0]["duplicates"]} & set(stored["by_name"].values())) - {copy}
    assert hits[0]["id"] in (copy, *original)
    assert len(hits) <= 5 and not set(shown) & set(folded)
    # Every folded item is within the threshold of the item it was folded into; shown ones are not.
    vector = {int(i): v for i, v in zip(stored["ids"], stored["vectors"], strict=True)}
    for hit in hits:
        for dup in hit["duplicates"]:
            assert vector[hit["id"]] @ vector[dup] >= 0.95 - 1e-6
    for i, a in enumerate(shown):
        for b in shown[i + 1 :]:
            assert vector[a] @ vector[b] < 0.95


def test_text_mixed_with_an_image_id_ranks_by_the_weighted_sum(client, stored, encoder) -> None:
    item = stored["by_name"]["green/square-1" + Path(image_path(stored["root"], "green", "square-1")).suffix]
    body = {"q": "a blue triangle", "image_id": item, "image_weight": 0.5, "k": 8}
    hits = client.post("/api/search", json=body).json()["hits"]
    image_vector = stored["vectors"][list(stored["ids"]).index(item)]
    combined = text_vector(encoder, "a blue triangle") + 0.5 * image_vector
    assert [h["id"] for h in hits] == brute_force(stored, combined, 8)


def test_upload_search_finds_the_uploaded_image(client, stored) -> None:
    path = image_path(stored["root"], "blue", "triangle-2")
    with open(path, "rb") as f:
        response = client.post("/api/search/image", params={"k": 3}, files={"file": (path.name, f, "image/png")})
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert hits[0]["id"] == stored["by_name"][path.relative_to(stored["root"]).as_posix()]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert response.json()["query"] == {"image": path.name}


# --- files by id ----------------------------------------------------------------------------


def test_images_and_thumbnails_are_served_by_id(client, stored, index_dir) -> None:
    path = image_path(stored["root"], "green", "bar-0")
    item = stored["by_name"][path.relative_to(stored["root"]).as_posix()]
    response = client.get(f"/api/images/{item}")
    assert response.status_code == 200 and response.content == path.read_bytes()
    assert response.headers["content-type"] in ("image/png", "image/jpeg")
    thumb = client.get(f"/api/thumbs/{item}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as image:
        assert image.format == "JPEG" and image.size == (48, 48)  # never upscaled
    cached = list((index_dir.parent / "thumbs").glob(f"{item}-*.jpg"))
    assert len(cached) == 1
    before = cached[0].stat().st_mtime_ns
    assert client.get(f"/api/thumbs/{item}").content == thumb.content
    assert cached[0].stat().st_mtime_ns == before  # served from the cache, not made again


def test_thumbnail_cache_remakes_a_changed_file(tmp_path: Path) -> None:
    source = tmp_path / "a.png"
    Image.new("RGB", (600, 300), (200, 10, 10)).save(source)
    cache = ThumbCache(tmp_path / "thumbs", size=64)
    first = cache.get(7, source)
    with Image.open(first) as image:
        assert image.size == (64, 32)
    Image.new("RGB", (300, 600), (10, 10, 200)).save(source)
    second = cache.get(7, source)
    assert second != first and not first.exists()
    with Image.open(second) as image:
        assert image.size == (32, 64)


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/api/images/../../../../etc/passwd",
        b"/api/images/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        b"/api/images/..%2f..%2f..%2fetc%2fpasswd",
        b"/api/images//etc/passwd",
        b"/api/images/%2Fetc%2Fpasswd",
        b"/api/thumbs/../meta.sqlite",
        b"/api/thumbs/%2e%2e%2fmeta.sqlite",
        b"/api/images/1/../../meta.sqlite",
        b"/static/../app.py",
        b"/static/%2e%2e/app.py",
        b"/static//etc/passwd",
        b"/api/images/-1",
    ],
)
def test_path_traversal_attempts_are_404(client, raw_path: bytes) -> None:
    status, body = raw_get(client.app, raw_path)
    assert status == 404, (raw_path, body[:200])
    assert b"root:" not in body and b"SQLite" not in body and b"import" not in body


def test_unknown_ids_are_404(client) -> None:
    assert client.get("/api/images/999999").status_code == 404
    assert client.get("/api/thumbs/999999").json() == {"error": "image 999999 is not in the index"}
    response = client.post("/api/search", json={"image_id": 999999})
    assert response.status_code == 404 and "999999" in response.json()["error"]


# --- limits and errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"q": "x" * 1001}, "q"),
        ({"q": ""}, "q"),
        ({"q": "cat", "k": 1001}, "k"),
        ({"q": "cat", "k": 0}, "k"),
        ({"q": "cat", "k": "many"}, "k"),
        ({}, "q"),
        ({"q": "-people"}, "query"),
        ({"q": '"unclosed'}, "query"),
    ],
)
def test_bad_text_queries_are_422_with_a_one_line_error(client, params: dict, field: str) -> None:
    response = client.get("/api/search", params=params)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error.startswith(f"{field}:") and "\n" not in error


def test_a_query_of_exactly_1000_characters_is_accepted(client) -> None:
    assert client.get("/api/search", params={"q": "a" * 1000, "k": 1}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [{}, {"q": "  "}, {"q": "cat", "k": 5000}, {"q": "cat", "image_weight": 50}, {"q": "cat", "colour": "red"}],
)
def test_bad_json_searches_are_422(client, body: dict) -> None:
    response = client.post("/api/search", json=body)
    assert response.status_code == 422 and response.json()["error"]


def post_upload(client, data: bytes, content_type: str = "image/png", name: str = "x.png"):
    return client.post("/api/search/image", files={"file": (name, data, content_type)})


def test_oversized_uploads_are_413(client) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_UPLOAD_BYTES + 1)
    response = post_upload(client, big)
    assert response.status_code == 413 and "bytes" in response.json()["error"]

    def chunks():  # no Content-Length: counted while it streams in
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n"
        for _ in range(22):
            yield b"\0" * 2**20

    response = client.post(
        "/api/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code == 413


def test_uploads_over_50_megapixels_are_413(client) -> None:
    huge = png_bytes(Image.new("1", (10_000, 5_001)))  # 50.01 MP, a few kB of PNG
    assert len(huge) < MAX_UPLOAD_BYTES
    response = post_upload(client, huge)
    assert response.status_code == 413 and "pixels" in response.json()["error"]


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"hello, I am text", "text/plain"),
        (b"hello, I am text", "image/png"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "application/octet-stream"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
    ],
)
def test_non_image_uploads_are_415(client, data: bytes, content_type: str) -> None:
    response = post_upload(client, data, content_type)
    assert response.status_code == 415, response.text
    assert "image" in response.json()["error"]


def test_empty_and_truncated_uploads_are_400(client) -> None:
    assert post_upload(client, b"").status_code == 400
    whole = png_bytes(Image.effect_noise((64, 64), 40).convert("RGB"))
    response = post_upload(client, whole[: len(whole) // 2])
    assert response.status_code == 400 and "truncated" in response.json()["error"]


def test_missing_upload_field_is_422(client) -> None:
    response = client.post("/api/search/image", data={"q": "cat"})
    assert response.status_code == 422 and response.json()["error"].startswith("file:")


# --- classify, info, health, metrics, page ---------------------------------------------------


def test_classify_an_upload_and_an_indexed_image(client, stored, encoder) -> None:
    path = image_path(stored["root"], "red", "square-1")
    labels = ["red square", "green circle", "blue bar"]
    expected = classify([path], labels, encoder)[0]
    with open(path, "rb") as f:
        response = client.post("/api/classify", data={"labels": ", ".join(labels)}, files={"file": (path.name, f)})
    assert response.status_code == 200, response.text
    ranked = response.json()["labels"]
    assert [r["label"] for r in ranked] == [label for label, _ in expected]
    assert [r["probability"] for r in ranked] == pytest.approx([p for _, p in expected], abs=1e-5)
    assert sum(r["probability"] for r in ranked) == pytest.approx(1.0, abs=1e-4)
    item = stored["by_name"][path.relative_to(stored["root"]).as_posix()]
    by_id = client.post("/api/classify", data={"labels": ",".join(labels), "image_id": item, "top": 2}).json()
    assert by_id["labels"] == ranked[:2]


@pytest.mark.parametrize("data", [{"labels": "cat", "image_id": 1}, {"labels": "cat,dog"}, {"labels": ",,"}])
def test_classify_refuses_bad_requests(client, data: dict) -> None:
    response = client.post("/api/classify", data=data)
    assert response.status_code == 422 and response.json()["error"]


def test_info_health_and_page(client) -> None:
    info = client.get("/api/info").json()
    assert info["count"] == 37 and info["embed_dim"] == 64 and info["index_kind"] == "flat"
    assert info["ledger"] == {"total": 1, "by_reason": {"empty": 1}}
    assert info["collection"] == "photos"
    assert info["model"]["ref"] == "clip-tiny" and info["model"]["untrained"] is True
    assert client.get("/healthz").json() == {"status": "ok", "count": 37}
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "async function run()" in client.get("/static/app.js").text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/classify", "/api/info", "/healthz", "/metrics"} <= set(paths)


def test_metrics_count_requests_latency_and_errors(client) -> None:
    client.get("/api/search", params={"q": "a green bar", "k": 2})
    client.get("/api/images/424242")
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    requests = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in families["vitrina_http_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("GET", "/api/search", "200")] >= 1
    assert requests[("GET", "/api/images/{item_id:int}", "404")] >= 1
    buckets = [
        s
        for s in families["vitrina_http_request_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["route"] == "/api/search"
    ]
    assert buckets and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 1
    errors = {(s.labels["route"], s.labels["kind"]): s.value for s in families["vitrina_http_errors"].samples}
    assert errors[("/api/images/{item_id:int}", "client")] >= 1
    assert next(iter(families["vitrina_index_items"].samples)).value == 37


def test_an_empty_index_answers_with_no_hits(tmp_path: Path, encoder) -> None:
    (tmp_path / "nothing").mkdir()
    index_folder(tmp_path / "nothing", encoder, tmp_path / "index", model_ref="clip-tiny", progress=False)
    with TestClient(create_app(tmp_path / "index", encoder=encoder)) as empty:
        body = empty.get("/api/search", params={"q": "anything"}).json()
        assert body["count"] == 0 and body["hits"] == [] and body["weak"] is False
        assert empty.get("/api/info").json()["count"] == 0


def test_serve_refuses_a_busy_port_with_one_line(index_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"127.0.0.1:{port}: cannot listen there"):
            serve(index_dir, port=port)


def test_an_index_of_another_width_is_refused_at_start(index_dir: Path) -> None:
    class Wide:
        embed_dim = 32
        identity = {"kind": "vitrina-clip", "embed_dim": 32, "name": "other"}

    with pytest.raises(UserError, match="64-d vectors .* the given model is a 32-d"):
        create_app(index_dir, encoder=Wide())


def test_a_bug_is_a_json_500_and_counted(index_dir: Path, encoder) -> None:
    class Faulty:
        """The real encoder, except that the text "boom" hits a bug."""

        embed_dim, identity, image_transform = encoder.embed_dim, encoder.identity, encoder.image_transform

        def encode_image(self, pixels):
            return encoder.encode_image(pixels)

        def encode_text(self, texts):
            if "boom" in texts:
                raise RuntimeError("a bug")
            return encoder.encode_text(texts)

    with TestClient(create_app(index_dir, encoder=Faulty()), raise_server_exceptions=False) as faulty:
        assert faulty.get("/api/search", params={"q": "fine"}).status_code == 200
        response = faulty.get("/api/search", params={"q": "boom"})
        assert response.status_code == 500
        assert response.json() == {"error": "internal error; the server log has the details"}
        assert 'vitrina_http_errors_total{kind="server",route="/api/search"} 1.0' in faulty.get("/metrics").text


def test_explain_serves_a_rollout_overlay_by_id(client, stored) -> None:
    assert client.get("/api/info").json()["model"]["explain"] is True  # clip-tiny's image tower is a ViT
    path = image_path(stored["root"], "green", "bar-0")
    item = stored["by_name"][path.relative_to(stored["root"]).as_posix()]
    response = client.get(f"/api/explain/{item}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.size == (256, 256) and image.mode == "RGB"
        pixels = np.asarray(image)
    assert pixels.std() > 1  # an overlay, not a blank canvas
    missing = client.get("/api/explain/999999")
    assert missing.status_code == 404 and "error" in missing.json()
    assert client.get("/api/explain/..%2f..%2fetc%2fpasswd").status_code == 404


def _png_pixels(response) -> np.ndarray:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.size == (256, 256) and image.mode == "RGB"
        return np.asarray(image).astype(np.int16)


def test_explain_with_a_query_serves_its_patch_similarity_map(client, stored) -> None:
    path = image_path(stored["root"], "red", "circle-1")
    item = stored["by_name"][path.relative_to(stored["root"]).as_posix()]
    rollout = _png_pixels(client.get(f"/api/explain/{item}"))
    red = _png_pixels(client.get(f"/api/explain/{item}", params={"q": "a red circle"}))
    boat = _png_pixels(client.get(f"/api/explain/{item}", params={"q": 'a boat -"red"^0.5'}))
    assert red.std() > 1 and np.abs(red - rollout).max() > 10  # not the rollout
    assert np.abs(red - boat).max() > 10  # the map follows the query
    again = _png_pixels(client.get(f"/api/explain/{item}", params={"q": "a red circle"}))
    assert (again == red).all()
    cancelled = client.get(f"/api/explain/{item}", params={"q": "cat -cat"})
    assert cancelled.status_code == 422 and "cancel each other out" in cancelled.json()["error"]
    negative = client.get(f"/api/explain/{item}", params={"q": "-cat"})  # nothing positive to map
    assert negative.status_code == 422 and "error" in negative.json()


class _NoTowerEncoder:
    """The clip-tiny encoder seen from outside only (as a wrapped foreign model is): no ViT to look into."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.embed_dim = inner.embed_dim

    identity = property(lambda self: self._inner.identity)
    image_transform = property(lambda self: self._inner.image_transform)

    def encode_image(self, pixels):
        return self._inner.encode_image(pixels)

    def encode_text(self, texts):
        return self._inner.encode_text(texts)


def test_explain_says_clearly_when_the_image_tower_is_no_vit(index_dir: Path, encoder, stored, tmp_path) -> None:
    app = create_app(index_dir, encoder=_NoTowerEncoder(encoder), thumb_dir=tmp_path / "thumbs", reload_s=0)
    item = int(stored["ids"][0])
    with TestClient(app) as other:
        assert other.get("/api/info").json()["model"]["explain"] is False
        for params in ({}, {"q": "a red circle"}):
            response = other.get(f"/api/explain/{item}", params=params)
            assert response.status_code == 409 and "not a ViT" in response.json()["error"]
