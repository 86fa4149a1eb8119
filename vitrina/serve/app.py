"""The HTTP API and web page over one index: ``create_app(index_dir)`` returns a FastAPI app.

The model is loaded once, when the app is made, and lives on one worker thread together with the
index it searches (see ``workers.py``); a second worker holds a metadata-only connection for image,
thumbnail and info look-ups, so those never wait behind a search. Every error is a JSON object
``{"error": "one line"}`` with a 4xx status; a 500 means a bug.

Queries run through ``vitrina.search`` (``Query``, ``Searcher.run``), the engine ``vitrina search``
uses too; this module only maps routes to it, validates, and enforces the limits. What each route
documents in the OpenAPI schema (statuses, limits, patterns) is kept true by ``contract.py``.

Routes: ``/`` (the page), ``/static/*``, ``/api/search`` (GET text, POST JSON text/image id/both),
``/api/search/image`` (multipart upload), ``/api/images/{id}``, ``/api/thumbs/{id}``,
``/api/explain/{id}`` (attention rollout; with ``?q=`` the query's patch-similarity map),
``/api/classify``, ``/api/info``, ``/healthz``, ``/metrics``; the OpenAPI schema at ``/openapi.json``.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vitrina.data.images import BadImageError, load_image
from vitrina.encoder import Encoder, as_numpy
from vitrina.errors import UserError
from vitrina.index.store import Hit, IndexStore, choose_index_kind
from vitrina.search import (
    MAX_ABS_WEIGHT,
    QUERY_PATTERN,
    TERMS_PATTERN,
    RerankUnavailable,
    Results,
    Searcher,
    Served,
    Term,
    UnknownItemError,
    classify,
    combine,
    encode_images,
    parse_query,
)
from vitrina.search import Query as SearchQuery
from vitrina.serve.batching import HEAVY_SLOTS, WINDOW_MS, Busy, HeavyLane, MicroBatcher
from vitrina.serve.contract import (
    LABELS_PATTERN,
    MAX_ID,
    MAX_LABELS,
    MAX_LABELS_CHARS,
    allowed_methods,
    errors,
    parse_labels,
    refine_openapi,
)
from vitrina.serve.live import POLL_S, Reloader
from vitrina.serve.media import MAX_UPLOAD_BYTES, ThumbCache, UploadError, decode_upload, indexed_file, media_type
from vitrina.serve.metrics import Metrics, MetricsMiddleware
from vitrina.serve.workers import Worker

log = logging.getLogger("vitrina.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_QUERY_CHARS = 1000
MAX_K = 1000
MAX_RERANK = 200  # candidates the cross-attention re-ranker may re-score per query (it reads each image)
DEFAULT_K = 24
WEAK_SCORE = 0.15  # a text query whose best cosine is below this "matches nothing well"
MULTIPART_SLACK = 64 * 2**10  # boundaries and part headers around an upload of MAX_UPLOAD_BYTES
NOSNIFF = {"X-Content-Type-Options": "nosniff"}  # an indexed "x.png" holding HTML stays an image
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'",
    **NOSNIFF,
}
IMAGE_HEADERS = {"Cache-Control": "private, max-age=3600", **NOSNIFF}
RERANK_HELP = "re-score the top N with the cross-attention re-ranker (0: off); it only reorders those N"
ItemId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="id of an indexed image")]


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class SearchBody(BaseModel):
    """``POST /api/search``: a text query, an indexed image by id, or both mixed."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["image_id"], "properties": {"image_id": {"type": "integer"}}},
                {"required": ["q"], "properties": {"q": {"type": "string", "pattern": QUERY_PATTERN}}},
            ]
        },
    )

    q: str | None = Field(
        None,
        max_length=MAX_QUERY_CHARS,
        description="text query (see the query syntax); without image_id it needs a positive term",
        json_schema_extra={"pattern": TERMS_PATTERN},
    )
    image_id: int | None = Field(None, ge=0, le=MAX_ID, description="id of an indexed image to search by")
    image_weight: float = Field(1.0, ge=-MAX_ABS_WEIGHT, le=MAX_ABS_WEIGHT, description="weight of the image")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K)
    collapse: bool = Field(False, description="show near-duplicate images as one result")
    rerank: int = Field(0, ge=0, le=MAX_RERANK, description=RERANK_HELP)


def _index_info(store: IndexStore) -> dict:
    """On the metadata worker: what ``/api/info`` reports about the index (its active version)."""
    version, count = store.active_version(), store.count
    reasons = Counter(reason for _, reason, _ in store.ledger())
    return {
        "count": count,
        "version": version.name,
        "embed_dim": version.embed_dim,
        "index_kind": choose_index_kind(count, version.index_kind),
        "index_kind_setting": version.index_kind,
        "collection": store.root.name,
        "ledger": {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))},
    }


def _validation_message(error: RequestValidationError) -> str:
    """The first validation problem as ``field: what is wrong``."""
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    return f"{where}: {first.get('msg', 'invalid')}"


class BodyLimitMiddleware:
    """Answers 413 to request bodies over ``max_bytes``, declared or streamed, before the app parses them.

    A declared ``Content-Length`` is checked up front (the server enforces it). A streamed body
    without one is read here, up to the limit, and replayed to the app: the 413 has to be sent from
    here, since FastAPI turns any error raised while it reads a body into a 400.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body over {self.max_bytes} bytes; uploads may be at most {MAX_UPLOAD_BYTES} bytes"
        await JSONResponse({"error": message}, status_code=413)(scope, receive, send)


def _thumb_folder(index_dir: Path, thumb_dir: Path | None) -> Path:
    """``thumb_dir``, else ``INDEX_DIR/thumbs``, else (read-only index) a private temporary folder."""
    folder = Path(thumb_dir) if thumb_dir is not None else index_dir / "thumbs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    if thumb_dir is not None:
        raise UserError(f"{thumb_dir}: cannot write thumbnails there; give a writable folder")
    return Path(tempfile.mkdtemp(prefix="vitrina-thumbs-"))


def create_app(
    index_dir: Path,
    *,
    encoder: Encoder | None = None,
    model_ref: str | None = None,
    thumb_dir: Path | None = None,
    weak_score: float = WEAK_SCORE,
    reload_s: float = POLL_S,
    batch_window_ms: float = WINDOW_MS,
    heavy_slots: int = HEAVY_SLOTS,
    precision: str = "fp32",
    runtime: str = "auto",
    reranker: str | None = None,
) -> FastAPI:
    """A FastAPI app serving the index in ``index_dir``; the model is loaded now and kept warm.

    ``encoder`` (else ``model_ref``, else the model recorded in the index) must match the index's
    kind and width. Thumbnails are cached in ``thumb_dir`` (default ``INDEX_DIR/thumbs``). ``reranker``: the
    re-ranker folder for ``rerank=N`` (default: the index model's ``reranker/``), loaded at its first use.
    ``runtime``: what embeds query texts: ``auto`` the version's exported ONNX text tower where it has one (of the
    served weights), else PyTorch; ``onnx`` only that tower; ``torch`` the PyTorch model. The PyTorch model is
    loaded in every case: uploads, explain maps, classification and re-ranking run it; ``app.state.text_runtime``
    says which runtime the first version got (``/api/info`` says it for the version being served).
    """
    index_dir = Path(index_dir)
    searcher_worker: Worker[Searcher] = Worker(
        "vitrina-search",
        lambda: Searcher(
            index_dir,
            encoder,
            model_ref=model_ref,
            precision=precision,
            text_runtime=runtime,
            reranker=reranker,
        ),
        close=Searcher.close,
    )
    meta: Worker[IndexStore] = Worker("vitrina-meta", lambda: IndexStore.open(index_dir), close=IndexStore.close)
    searcher: Searcher = searcher_worker.call(lambda s: s)
    searcher_worker.call(Searcher.warm_up)
    batcher = MicroBatcher(searcher_worker, window_ms=batch_window_ms)
    heavy = HeavyLane(Worker("vitrina-heavy", lambda: searcher), slots=heavy_slots)
    root = meta.call(lambda s: s.root)
    # Hits carry root/relative paths; the page shows the relative part. A string prefix, not pathlib: 10 hits'
    # relative_to cost 0.57 ms per request (measured on the 2-core machine under load), the prefix 0.03 ms.
    root_prefix = os.path.join(str(root), "")
    thumbs = ThumbCache(_thumb_folder(index_dir, thumb_dir))
    metrics = Metrics()
    reloader = Reloader(searcher, index_dir, interval_s=reload_s) if reload_s > 0 else None

    first = searcher.served
    app_text_runtime = "torch" if first.text_encoder is None else "onnx"

    def model_info() -> dict:
        """The model of the version being served now (it changes when another version is activated)."""
        served = searcher.served
        ref = model_ref if model_ref and served.encoder is first.encoder else served.version.model_ref
        return {**_model_info(served.encoder, ref), "text_runtime": "torch" if served.text_encoder is None else "onnx"}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if reloader is not None:
            reloader.stop()
        batcher.stop()
        heavy.worker.shutdown()
        searcher_worker.shutdown()
        meta.shutdown()

    app = FastAPI(
        title="vitrina",
        summary="Text-to-image search over one index",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.text_runtime = app_text_runtime
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_UPLOAD_BYTES + MULTIPART_SLACK)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: also times 413s
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_error_handlers(app)
    refine_openapi(app, one_of={("/api/classify", "post"): ["file", "image_id"]})

    def hit_json(hit: Hit, duplicates: list[int], rerank_score: float | None) -> dict:
        if hit.path.startswith(root_prefix):
            name = hit.path[len(root_prefix) :].replace(os.sep, "/")
        else:  # a URL, or an absolute path listed outside the collection
            name = Path(hit.path).name
        return {
            "id": hit.id,
            "name": name,
            "score": round(hit.score, 6),
            "label": hit.label,
            "caption": hit.caption,
            "image_url": f"/api/images/{hit.id}",
            "thumb_url": f"/api/thumbs/{hit.id}",
            "duplicates": duplicates,
            "rerank_score": None if rerank_score is None else round(rerank_score, 6),
        }

    async def answer(query: SearchQuery, echo: dict) -> dict:
        start = time.perf_counter()
        results: Results = await batcher.submit(query)
        best = results.hits[0].hit.score if results.hits else None
        return {
            "query": echo,
            "terms": [{"text": t.text, "weight": t.weight} for t in query.terms],
            "k": query.k,
            "count": results.count,
            "hits": [hit_json(ranked.hit, ranked.duplicates, ranked.rerank_score) for ranked in results.hits],
            "weak": results.cancelled or bool(not query.has_examples and results.hits and best < weak_score),
            "note": "the terms cancel each other out: nothing to rank by" if results.cancelled else None,
            "took_ms": round(1000 * (time.perf_counter() - start), 2),
        }

    async def indexed_path(item_id: int) -> Path:
        hit = await meta.run(IndexStore.get, item_id)
        path = indexed_file(root, hit.path) if hit is not None else None
        if path is None:
            raise ApiError(404, f"image {item_id} is not in the index")
        return path

    async def indexed_image(item_id: int) -> Image.Image:
        path = await indexed_path(item_id)
        try:
            return await run_in_threadpool(load_image, path)
        except BadImageError as error:
            raise ApiError(404, f"image {item_id} can no longer be read ({error.reason})") from None

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """Liveness: the index answers."""
        return {"status": "ok", "count": await meta.run(lambda s: s.count)}

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics_text() -> Response:
        """Prometheus text format: requests, latency histogram, errors, index size."""
        metrics.items.set(await meta.run(lambda s: s.count))
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/api/info", tags=["index"])
    async def info() -> dict:
        """The version being served (name, model, weights digest, ANN generation and size), item count,
        index kind and ledger counts."""
        served = searcher.served
        return {
            "model": model_info(),
            **await meta.run(_index_info),
            "version": served.version.name,
            "generation": served.view.generation,
            "served_vectors": served.view.count,
            "swaps": reloader.swaps if reloader is not None else 0,
        }

    @app.get("/api/search", tags=["search"], responses=errors(409, 422))
    async def search_get(
        q: Annotated[
            str,
            Query(
                max_length=MAX_QUERY_CHARS,
                description="text query: needs a positive term (see the query syntax)",
                json_schema_extra={"pattern": QUERY_PATTERN},
            ),
        ],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = DEFAULT_K,
        collapse: Annotated[bool, Query(description="show near-duplicate images as one result")] = False,
        rerank: Annotated[int, Query(ge=0, le=MAX_RERANK, description=RERANK_HELP)] = 0,
    ) -> dict:
        """Text query. Words form one phrase; ``-word`` / ``-"a phrase"`` push away; ``word^0.5`` weighs.

        Terms are separated by spaces; at most 16 quoted, negative or weighted terms, weights within ±10.
        """
        if not q:  # the pattern rules it out too; no minLength beside it, which makes generators slow
            raise ApiError(422, "q: give a text query")
        query = SearchQuery(terms=parse_query(q), k=k, collapse=collapse, rerank=rerank)
        return await answer(query, {"q": q, **({"rerank": rerank} if rerank else {})})

    @app.post("/api/search", tags=["search"], responses=errors(400, 404, 409, 413, 422))
    async def search_post(body: SearchBody) -> dict:
        """A text query, an indexed image by id, or both mixed (``image_weight`` scales the image).

        With an image, the text may be blank or only push away (``-people``).
        """
        if body.image_id is None:
            if body.q is None:
                raise ApiError(422, "give q (a text query), image_id (an indexed image), or both")
            query = SearchQuery(terms=parse_query(body.q), k=body.k, collapse=body.collapse, rerank=body.rerank)
        else:
            terms = parse_query(body.q or "", require_positive=False)
            item_ids = [(body.image_id, body.image_weight)]
            query = SearchQuery(terms=terms, item_ids=item_ids, k=body.k, collapse=body.collapse, rerank=body.rerank)
        return await answer(query, body.model_dump(exclude_defaults=True))

    @app.post("/api/search/image", tags=["search"], responses=errors(400, 413, 415, 422, 503))
    async def search_image(
        file: Annotated[UploadFile, File(description="PNG, JPEG, GIF, BMP, WebP or TIFF; ≤ 20 MB, ≤ 50 MP")],
        q: Annotated[
            str | None,
            Form(
                max_length=MAX_QUERY_CHARS,
                description="optional text mixed in (see the query syntax)",
                json_schema_extra={"pattern": TERMS_PATTERN},
            ),
        ] = None,
        k: Annotated[int, Query(ge=1, le=MAX_K)] = DEFAULT_K,
        collapse: Annotated[bool, Query()] = False,
    ) -> dict:
        """Search by an uploaded example image (optionally mixed with a text query)."""
        image = await _read_upload(file)
        terms = parse_query(q or "", require_positive=False)
        echo = {"image": file.filename or "upload", **({"q": q} if q else {})}
        # The image tower runs in the heavy lane; the search itself joins the next batch of searches.
        vector = await heavy.run(lambda s: encode_images([image], s.served.encoder)[0])
        return await answer(SearchQuery(terms=terms, vectors=[(vector, 1.0)], k=k, collapse=collapse), echo)

    @app.get(
        "/api/images/{item_id:int}",
        tags=["images"],
        response_class=FileResponse,
        responses={200: {"content": {"image/*": {}}}, **errors(404, 422)},
    )
    async def image_file(item_id: ItemId) -> FileResponse:
        """The original file of an indexed image, by id."""
        path = await indexed_path(item_id)
        return FileResponse(path, media_type=media_type(path), headers=IMAGE_HEADERS)

    @app.get(
        "/api/thumbs/{item_id:int}",
        tags=["images"],
        response_class=FileResponse,
        responses={200: {"content": {"image/jpeg": {}}}, **errors(404, 422)},
    )
    async def thumb_file(item_id: ItemId) -> FileResponse:
        """A JPEG thumbnail of an indexed image (made once, then served from the disk cache)."""
        path = await indexed_path(item_id)
        try:
            thumb = await run_in_threadpool(thumbs.get, item_id, path)
        except BadImageError as error:
            raise ApiError(404, f"image {item_id} can no longer be read ({error.reason})") from None
        return FileResponse(thumb, media_type="image/jpeg", headers=IMAGE_HEADERS)

    @app.get(
        "/api/explain/{item_id:int}",
        tags=["images"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **errors(404, 409, 422, 503)},
    )
    async def explain_image(
        item_id: ItemId,
        q: Annotated[
            str | None,
            Query(
                max_length=MAX_QUERY_CHARS,
                description="a text query (search syntax): map each patch's similarity to it instead of the rollout",
                json_schema_extra={"pattern": QUERY_PATTERN},
            ),
        ] = None,
    ) -> Response:
        """PNG: an indexed image under the image tower's attention-rollout map, or with ``q`` under the
        query's patch-similarity map: which patches resemble the text (ViT image towers only)."""
        if not model_info()["explain"]:
            raise ApiError(409, "this model's image tower is not a ViT: it has no attention or patch map to show")
        terms = parse_query(q) if q else None
        image = await indexed_image(item_id)
        if terms is None:
            png = await heavy.run(lambda s: _heatmap_png(s.encoder, image))
        else:
            png = await heavy.run(lambda s: _query_heatmap_png(s.served, terms, image))
        return Response(png, media_type="image/png", headers=IMAGE_HEADERS)

    @app.post("/api/classify", tags=["search"], responses=errors(400, 404, 413, 415, 422, 503))
    async def classify_image(
        labels: Annotated[
            str,
            Form(
                max_length=MAX_LABELS_CHARS,
                description=f"2 to {MAX_LABELS} comma-separated class names",
                json_schema_extra={"pattern": LABELS_PATTERN},
            ),
        ],
        file: Annotated[UploadFile | None, File(description="the image to classify (or give image_id)")] = None,
        image_id: Annotated[int | None, Form(ge=0, le=MAX_ID, description="an indexed image (or give file)")] = None,
        top: Annotated[int | None, Form(ge=1, le=MAX_LABELS, description="keep the best top labels")] = None,
    ) -> dict:
        """Zero-shot classification of one image against the given labels (prompt ensembles)."""
        names = parse_labels(labels)
        if names is None:
            raise ApiError(422, f"labels: give 2 to {MAX_LABELS} comma-separated names")
        if (file is None) == (image_id is None):
            raise ApiError(422, "give either file (an upload) or image_id (an indexed image), not both")
        image = await _read_upload(file) if file is not None else await indexed_image(image_id)
        if len(names) == 1:  # "cat, cat": one class, certain
            return {"labels": [{"label": names[0], "probability": 1.0}]}
        ranked = await heavy.run(lambda s: classify([image], names, s.encoder, top=top)[0])
        return {"labels": [{"label": label, "probability": round(p, 6)} for label, p in ranked]}

    return app


async def _read_upload(file: UploadFile) -> Image.Image:
    """Read and decode an upload off the event loop; ``UploadError`` says why it cannot be used."""
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    return await run_in_threadpool(decode_upload, data, declared_type=file.content_type)


def _model_info(encoder: Encoder, ref: str | None) -> dict:
    """The encoder's identity, its reference, whether it is an untrained preset and has attention maps."""
    from vitrina.models.registry import CLIP_PRESETS

    untrained = ref is not None and not Path(ref).exists() and ref in CLIP_PRESETS
    shown_ref = Path(ref).name if ref and Path(ref).exists() else ref
    return {**encoder.identity, "ref": shown_ref, "untrained": untrained, "explain": _vit_tower(encoder) is not None}


def _vit_tower(encoder: Encoder):
    """The encoder's ViT image tower, or None (Swin/CNN towers, wrapped foreign models)."""
    from vitrina.models.vit import ViT

    visual = getattr(getattr(encoder, "model", None), "visual", None)
    return visual if isinstance(visual, ViT) else None


def _heatmap_png(encoder: Encoder, image: Image.Image) -> bytes:
    """On the searcher worker (the model is used by one thread at a time): the rollout overlay as PNG bytes."""
    from vitrina.models.explain import rollout_heatmap

    config = encoder.model.config
    overlay = rollout_heatmap(_vit_tower(encoder), image, mean=config.image_mean, std=config.image_std)
    buffer = io.BytesIO()
    overlay.save(buffer, format="PNG")
    return buffer.getvalue()


def _query_heatmap_png(served: Served, terms: list[Term], image: Image.Image) -> bytes:
    """In the heavy lane: the overlay of the query's patch-similarity map as PNG bytes.

    The query vector is the search's own (weighted terms combined), encoded by the served text tower.
    """
    from vitrina.models.explain import query_heatmap

    texts = as_numpy(served.texts.encode_text([t.text for t in terms]))  # (T, D)
    vector = combine([(v, t.weight) for v, t in zip(texts, terms, strict=True)])
    if vector is None:
        raise ApiError(422, "q: the terms cancel each other out; nothing to map (change their weights)")
    overlay = query_heatmap(served.encoder.model, image, vector)
    buffer = io.BytesIO()
    overlay.save(buffer, format="PNG")
    return buffer.getvalue()


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": "one line"}``."""

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(Busy)
    async def busy(_: Request, exc: Busy) -> JSONResponse:
        message = "too many uploads, classifications or attention maps at once; retry in a second"
        return JSONResponse({"error": message}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(UnknownItemError)
    async def unknown_item(_: Request, exc: UnknownItemError) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(RerankUnavailable)
    async def no_rerank(_: Request, exc: RerankUnavailable) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(UserError)
    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the user's doing: log the traceback here, answer one JSON line.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, "internal error; the server log has the details")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = "no such page or item" if exc.status_code == 404 else str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # the first route of the path answers: name the methods of all of them
            headers["Allow"] = allowed_methods(app, request.scope)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=headers or None)
