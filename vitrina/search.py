"""Search an index, and zero-shot classify images by label names.

One query engine for the CLI and the HTTP API: a ``Query`` holds weighted text terms, example images
(files, PIL images, indexed items by id, or raw vectors) and how many hits to return; ``Searcher.run``
encodes it, searches, re-ranks the top candidates with a cross-attention model and folds
near-duplicates when asked.

The text query language (``parse_query``)::

    beach at sunset -people "red umbrella"^0.5 -"dark clouds"^0.3

* plain words form one phrase together (``beach at sunset``), encoded as one text;
* ``"a quoted phrase"`` is a term of its own;
* a leading ``-`` makes a word or quoted phrase negative (default weight ``-1``);
* a trailing ``^w`` sets the weight of a word or quoted phrase, ``|w| <= 10`` (``-x^0.3`` is ``x`` at ``-0.3``);
* terms are separated by spaces, tabs or newlines; at most 16 marked (quoted, negative or weighted) terms;
* a text-only query needs a positive term (words without a leading ``-``).

``QUERY_PATTERN`` (text-only) and ``TERMS_PATTERN`` (text mixed with an image: no positive term needed)
are those rules as regular expressions, valid in Python and in the ECMA dialect of JSON Schema: the API
publishes them in its schema, and ``parse_query`` accepts exactly the strings they match.

The query vector is ``sum_i w_i * e_i`` over the unit embeddings ``e_i`` of the terms and example
images, so an item's rank follows ``sum_i w_i * cos(item, e_i)``: ``beach -people`` ranks by
"beach-ness minus people-ness". The reported score is the cosine with the normalised sum; terms that
cancel each other out (``cat -cat``) match nothing, and the search says so.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vitrina.data.images import load_image
from vitrina.encoder import Encoder, as_numpy
from vitrina.errors import UserError
from vitrina.index.ann import AnnView
from vitrina.index.ann import published_generation as ann_generation
from vitrina.index.encoders import RUNTIMES, check_encoder, query_encoder
from vitrina.index.store import Hit, IndexStore, Version

__all__ = [
    "MAX_ABS_WEIGHT",
    "MAX_TERMS",
    "QUERY_PATTERN",
    "TERMS_PATTERN",
    "Hit",
    "Query",
    "RankedHit",
    "RerankUnavailable",
    "Results",
    "Searcher",
    "Served",
    "Term",
    "UnknownItemError",
    "classify",
    "classify_fewshot",
    "collapse_near_duplicates",
    "combine",
    "encode_images",
    "parse_query",
]

ImageLike = str | os.PathLike | Image.Image

NEGATIVE_WEIGHT = -1.0
MAX_TERMS = 16  # marked terms (quoted, negative or weighted) in one query; the plain words make one more
MAX_ABS_WEIGHT = 10.0  # spelt out again in _MAGNITUDE below
DUPLICATE_COSINE = 0.95  # image vectors this close are shown as one result when collapsing
COLLAPSE_POOL = 3  # when collapsing, rank k * 3 candidates so k distinct ones usually remain
TEXT_CACHE_SIZE = 4096  # query embeddings kept per searcher (a 512-d vector is 2 KiB: 8 MiB at most)

# --- the query language as regular expressions -----------------------------------------------
# ASCII classes only, and no Python-only syntax: the same strings are ECMA patterns in the API schema.
_W = r"[ \t\n\r]"  # a separator
_WORD = r'[^ \t\n\r"^-][^ \t\n\r"^]*'  # a bare word: no separator, quote or caret; no leading "-"
_PHRASE = r'"[^"]*"'
_MAGNITUDE = r"(?:10(?:\.0+)?|[0-9](?:\.[0-9]+)?|\.[0-9]+)"  # 0 ... 10
_NUM = rf"[+-]?{_MAGNITUDE}"
_NON_POSITIVE_NUM = rf"(?:-{_MAGNITUDE}|\+?(?:0(?:\.0+)?|\.0+))"
_TOKEN = rf"-?(?:{_PHRASE}|{_WORD})(?:\^{_NUM})?"
_MARKED = rf"(?:-(?:{_PHRASE}|{_WORD})(?:\^{_NUM})?|{_PHRASE}(?:\^{_NUM})?|{_WORD}\^{_NUM})"
# A token that adds nothing positive: negative, a blank phrase, or a weight <= 0.
_NON_POSITIVE = (
    rf'(?:-(?:{_PHRASE}|{_WORD})(?:\^{_NUM})?|"{_W}*"(?:\^{_NUM})?|(?:{_PHRASE}|{_WORD})\^{_NON_POSITIVE_NUM})'
)
_SOME_TOKENS = rf"{_W}*{_TOKEN}(?:{_W}+{_TOKEN})*{_W}*"
_NOT_TOO_MANY = rf"(?!{_W}*(?:(?:{_WORD}{_W}+)*{_MARKED}{_W}+){{{MAX_TERMS}}}(?:{_WORD}{_W}+)*{_MARKED})"
_SOME_POSITIVE = rf"(?!{_W}*(?:{_NON_POSITIVE}(?:{_W}+{_NON_POSITIVE})*)?{_W}*$)"

# A query needs a token anyway (a positive one), spelt out so that generators reach long queries.
TERMS_PATTERN = rf"^{_NOT_TOO_MANY}(?:{_SOME_TOKENS}|{_W}*)$"
QUERY_PATTERN = rf"^{_SOME_POSITIVE}{_NOT_TOO_MANY}{_SOME_TOKENS}$"

_TERMS_RE = re.compile(TERMS_PATTERN)
_QUERY_RE = re.compile(QUERY_PATTERN)
_PARTS_RE = re.compile(rf'(?P<neg>-)?(?:"(?P<phrase>[^"]*)"|(?P<word>{_WORD}))(?:\^(?P<weight>{_NUM}))?')
_PIECE_RE = re.compile(r'-?"[^"]*"?[^ \t\n\r"]*|[^ \t\n\r]+')  # what a reader would call one term


@dataclass(frozen=True)
class Term:
    """One text of a query and its weight (negative: push results away from it)."""

    text: str
    weight: float


def _clean(text: str) -> str:
    """Separators collapsed to one space, none at the ends."""
    return " ".join(part for part in re.split(f"{_W}+", text) if part)


def parse_query(query: str, *, require_positive: bool = True) -> list[Term]:
    """Split ``query`` into weighted terms (see the module docstring); plain words join into one phrase.

    Accepts exactly the strings ``QUERY_PATTERN`` matches (``TERMS_PATTERN`` without
    ``require_positive``); anything else is a ``UserError`` that says what is wrong.
    """
    if not (_QUERY_RE if require_positive else _TERMS_RE).fullmatch(query):
        raise UserError(_why_not(query, require_positive))
    plain: list[str] = []
    terms: list[Term] = []
    for match in _PARTS_RE.finditer(query):
        text = _clean(match["phrase"] if match["phrase"] is not None else match["word"])
        negative = match["neg"] is not None
        if not negative and match["phrase"] is None and match["weight"] is None:
            plain.append(text)  # part of the main phrase
            continue
        magnitude = float(match["weight"]) if match["weight"] is not None else 1.0
        weight = NEGATIVE_WEIGHT * abs(magnitude) if negative else magnitude
        if text and weight != 0:
            terms.append(Term(text, weight))
    if plain:
        terms.insert(0, Term(" ".join(plain), 1.0))
    return terms


def _why_not(query: str, require_positive: bool) -> str:
    """A one-line reason why ``query`` is not a well-formed query."""
    if query.count('"') % 2:
        return 'query: a quote (") is not closed'
    marked, positive = 0, False
    for piece in _PIECE_RE.finditer(query):
        token = piece.group()
        if not re.fullmatch(_TOKEN, token):
            if "^" in token:
                return f"query: cannot read {token!r}; write a weight as term^0.5, between -10 and 10"
            return f"query: cannot read {token!r}; separate terms by spaces; a leading '-' negates a term"
        marked += bool(re.fullmatch(_MARKED, token))
        positive = positive or not re.fullmatch(_NON_POSITIVE, token)
    if marked > MAX_TERMS:
        return f"query: {marked} quoted, negative or weighted terms; at most {MAX_TERMS} are allowed"
    if require_positive and not positive:
        return "query: needs at least one positive term (words without a leading '-')"
    return "query: cannot read it; see the query syntax"  # not reached while the patterns and the reader agree


# --- vectors ------------------------------------------------------------------------------------


def combine(parts: list[tuple[np.ndarray, float]]) -> np.ndarray | None:
    """``sum w * v`` over (unit vector (D,), weight) pairs, normalised; None if the terms cancel out."""
    if not parts:
        raise UserError("query: nothing to search by; give a text, an image, or both")
    total = np.zeros_like(np.asarray(parts[0][0], dtype=np.float32))  # (D,)
    for vector, weight in parts:
        total += np.float32(weight) * np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        return None
    return total / norm


def collapse_near_duplicates(vectors: np.ndarray, k: int, threshold: float) -> list[tuple[int, list[int]]]:
    """Greedy de-duplication of a ranked list of (N, D) unit ``vectors``.

    Walks the ranking best first; an item whose cosine with an already kept item is ``>= threshold``
    joins that item's group instead of being kept. Returns up to ``k`` (kept row, [duplicate rows])
    pairs in rank order; items past the ``k``-th kept one only ever join groups.
    """
    kept: list[int] = []
    groups: dict[int, list[int]] = {}
    for row in range(len(vectors)):
        if kept:
            similarity = vectors[kept] @ vectors[row]  # (len(kept),)
            best = int(np.argmax(similarity))
            if similarity[best] >= threshold:
                groups[kept[best]].append(row)
                continue
        if len(kept) < k:
            kept.append(row)
            groups[row] = []
    return [(row, groups[row]) for row in kept]


def encode_images(images: list[ImageLike], encoder: Encoder) -> np.ndarray:
    """(B, D) unit vectors of images given as paths or PIL images; a bad file is a one-line ``UserError``."""
    pils = [img.convert("RGB") if isinstance(img, Image.Image) else load_image(img) for img in images]
    if not pils:
        return np.empty((0, encoder.embed_dim), dtype=np.float32)
    pixels = _stack([encoder.image_transform(img) for img in pils])  # (B, 3, H, W)
    return as_numpy(encoder.encode_image(pixels))


def _stack(pixels: list):
    """Stack per-image pixels as the encoder made them: torch tensors with torch, numpy arrays with numpy
    (the exported towers' encoder: a query then never imports torch)."""
    if hasattr(pixels[0], "detach"):
        import torch

        return torch.stack(pixels)
    return np.stack(pixels)


# --- queries ------------------------------------------------------------------------------------


class UnknownItemError(UserError):
    """A query names an indexed item by an id the index does not hold."""

    def __init__(self, item_id: int) -> None:
        super().__init__(f"image_id {item_id} is not in the index")
        self.item_id = item_id


class RerankUnavailable(UserError):
    """A query asks for re-ranking that cannot be done: no re-ranker, or no text to score images against."""


@dataclass
class Query:
    """What to search by: weighted text terms and example images, mixed into one vector.

    ``images`` are files or PIL images (encoded here), ``item_ids`` indexed items (their stored
    vectors), ``vectors`` raw (D,) vectors of any scale; each comes with its weight. ``collapse``
    shows near-duplicate images as one hit, the others listed as its duplicates. ``rerank = N``
    reorders the top N hits by the cross-attention re-ranker's ``sum_i w_i * logit(term_i, image)``
    over the text terms (it needs one); the N candidates stay the same, only their order changes.
    """

    terms: list[Term] = field(default_factory=list)
    images: list[tuple[ImageLike, float]] = field(default_factory=list)
    item_ids: list[tuple[int, float]] = field(default_factory=list)
    vectors: list[tuple[np.ndarray, float]] = field(default_factory=list)
    k: int = 10
    collapse: bool = False
    rerank: int = 0  # re-score the dual encoder's top ``rerank`` with the re-ranker (0: do not)

    @property
    def has_examples(self) -> bool:
        """Whether anything besides text is searched by."""
        return bool(self.images or self.item_ids or self.vectors)


@dataclass(frozen=True)
class RankedHit:
    """One result and the ids of the near-duplicates folded into it (empty unless collapsing)."""

    hit: Hit
    duplicates: list[int] = field(default_factory=list)
    rerank_score: float | None = None  # the re-ranker's score, when the query asked for re-ranking


@dataclass(frozen=True)
class Results:
    """The ranked hits of a query, the size of the index searched, and whether the terms cancelled out."""

    hits: list[RankedHit]
    count: int
    cancelled: bool = False


@dataclass(frozen=True)
class Served:
    """What one query runs against, taken once per query: a version, its model, and its ANN view."""

    version: Version
    encoder: Encoder
    view: AnnView
    text_encoder: Encoder | None = None  # a faster text tower of the same weights (ONNX), else ``encoder``

    @property
    def texts(self) -> Encoder:
        """The encoder that embeds query texts."""
        return self.text_encoder or self.encoder

    @property
    def texts_key(self) -> tuple:
        """What a cached query vector of this state is keyed by besides its text: the weights' digest and the
        code that ran them (PyTorch and ONNX agree to 1e-4, not bit for bit), so a swapped-in version or another
        runtime never gets another's vectors."""
        return (self.encoder.identity.get("digest") or id(self.encoder), type(self.texts).__name__)


class Searcher:
    """Queries against the active version of one index directory.

    Without ``encoder``, the model is loaded from ``model_ref`` or, failing that, from the reference
    the active version stored; it must be the weights the version was built with (``vitrina.index.encoders``).
    ``runtime``: ``torch`` loads that model; ``auto`` runs the version's exported ONNX towers where they are
    usable (no torch import), ``onnx`` only those (``vitrina.index.encoders.query_encoder``).
    ``text_runtime`` (the server's choice): query texts run there while ``encoder``, the PyTorch model, answers
    the rest (images, explain maps, classification, re-ranking): ``auto`` the version's exported ONNX text
    tower where it has a usable one of the encoder's weights, ``onnx`` only that (a version without one is a
    ``UserError``), ``torch`` or None the encoder itself.
    ``reranker``: the re-ranker folder for ``Query.rerank`` (default: ``reranker/`` in the version's model
    checkpoint), loaded at the first query that asks for it.
    ``refresh()`` (the server calls it on a background thread) loads a newer published ANN file or a
    newly activated version and swaps it in with one reference assignment: a query in flight keeps
    the state it started with, and no query waits for the load.
    """

    def __init__(
        self,
        index_dir: Path,
        encoder: Encoder | None = None,
        *,
        model_ref: str | None = None,
        runtime: str = "torch",
        precision: str = "fp32",
        text_cache_size: int = TEXT_CACHE_SIZE,
        text_runtime: str | None = None,
        reranker: str | os.PathLike | None = None,
    ) -> None:
        self.index_dir = Path(index_dir)
        self._reranker_ref = reranker
        self._rerankers: dict[str | None, object] = {}  # version digest -> its loaded Reranker
        self._token_files: dict[tuple[int, str], tuple] = {}  # (version, re-ranker digest) -> (stamp, TokenFile)
        self.store = IndexStore.open(self.index_dir)
        self.text_cache = LRUCache(text_cache_size)  # (Served.texts_key, text) -> unit vector
        self._model_ref = model_ref
        self._runtime = runtime
        self._precision = precision
        self._text_runtime = _check_text_runtime(text_runtime, precision)
        try:
            version = self.store.active_version()
            if encoder is None:
                encoder = query_encoder(
                    version, self.index_dir, model_ref=model_ref, runtime=runtime, precision=precision
                )
            else:
                check_encoder(encoder, version, self.index_dir, chosen=True)
            self.served = Served(version, encoder, self.store.load_view(version.id), self._text_tower(version, encoder))
        except BaseException:
            self.store.close()
            raise

    @property
    def encoder(self) -> Encoder:
        """The model of the version being served."""
        return self.served.encoder

    def refresh(self, store: IndexStore | None = None) -> bool:
        """Swap in the active version's newest published ANN (and its model, if the version changed).

        ``store`` is a connection of the calling thread (the server's loader has its own). Returns
        whether anything changed.
        """
        store = store or self.store
        served = self.served
        version = store.active_version()
        generation = ann_generation(self.index_dir, version.id)
        if version.id == served.version.id and (generation is None or generation == served.view.generation):
            return False
        encoder, text_encoder = served.encoder, served.text_encoder
        if version.id != served.version.id and version.digest != served.version.digest:
            # the new version's own model (an override named the old)
            encoder = query_encoder(version, self.index_dir, runtime=self._runtime, precision=self._precision)
            text_encoder = self._text_tower(version, encoder)
            _text_vectors(text_encoder or encoder, ["warm-up"])  # the first query after the swap does not pay for it
        self.served = Served(version, encoder, store.load_view(version.id), text_encoder)
        return True

    def _text_tower(self, version: Version, encoder: Encoder) -> Encoder | None:
        """With ``text_runtime`` auto or onnx: the version's exported ONNX text tower (same weights, checked to 1e-4
        at export; ~3x faster than PyTorch for one short query), used for query texts beside the PyTorch ``encoder``;
        None: the encoder embeds them. Only towers of the encoder's own weights count (``--model`` may name others)."""
        if self._text_runtime in (None, "torch") or not hasattr(encoder, "model"):
            return None
        import torch  # loaded already: the encoder beside the tower is PyTorch

        from vitrina.index.ann import version_dir
        from vitrina.runtime import OnnxQueryEncoder, TowersUnavailable
        from vitrina.runtime.towers import towers_dir

        digest = encoder.identity.get("digest")
        try:
            if digest != version.digest:
                raise TowersUnavailable(f"the served model is not the weights {version.name} was built with")
            folder = towers_dir(version_dir(self.index_dir, version.id))
            # as many ONNX Runtime threads as PyTorch's (`serve --threads`), not every core: the text tower
            # runs beside the PyTorch model in one process and should not take more cores than it may
            towers = OnnxQueryEncoder.load(folder, digest=digest, threads=torch.get_num_threads())
            reason = towers.why_not("text")
        except TowersUnavailable as error:
            reason = error.reason
        if reason is None:
            return towers
        if self._text_runtime == "onnx":
            raise UserError(
                f"{self.index_dir}: {version.name} has no exported text tower to serve ({reason}); use --runtime "
                f"auto or torch, or export its towers: `vitrina index FOLDER --model {version.model_ref} "
                f"--out {self.index_dir}`"
            )
        return None

    def close(self) -> None:
        """Close the index."""
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warm_up(self) -> None:
        """Run the text tower and one search, so the first query does not pay for either."""
        served = self.served
        self.store.search(_text_vectors(served.texts, ["warm-up"]), 1, view=served.view)

    def search_vector(self, vector: np.ndarray, k: int = 10, *, served: Served | None = None) -> list[Hit]:
        """Top-``k`` hits for one (D,) query vector (normalised here, so any scale is fine).

        ``served``: the state the vector was encoded with (``self.served`` taken before encoding), so a
        swap between encoding and searching cannot pair a vector with another version's view.
        """
        served = served or self.served
        return self.store.search(_unit(vector)[None, :], k, view=served.view)[0]

    def search_text(self, query: str, k: int = 10) -> list[Hit]:
        """Top-``k`` images for a text, taken as one phrase (``run`` reads the query language)."""
        if not query.strip():
            raise UserError("the text query is empty; type what the picture should show")
        served = self.served
        return self.search_vector(_text_vectors(served.texts, [query])[0], k, served=served)

    def search_image(self, image: ImageLike, k: int = 10) -> list[Hit]:
        """Top-``k`` images most like ``image`` (a path or a PIL image)."""
        served = self.served
        return self.search_vector(encode_images([image], served.encoder)[0], k, served=served)

    def text_vectors(self, texts: list[str], *, served: Served | None = None) -> dict[str, np.ndarray]:
        """Unit vectors of ``texts`` by text: cached ones from the LRU cache (keyed by ``Served.texts_key``, so a
        swapped-in model or another runtime never gets another's vectors), the rest encoded in one batch."""
        served = served or self.served
        key = served.texts_key
        found: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for text in dict.fromkeys(texts):
            cached = self.text_cache.get((key, text))
            if cached is None:
                missing.append(text)
            else:
                found[text] = cached
        if missing:
            for text, vector in zip(missing, _text_vectors(served.texts, missing), strict=True):
                found[text] = vector
                self.text_cache.put((key, text), vector)
        return found

    def query_vector(
        self, query: Query, *, served: Served | None = None, texts: dict[str, np.ndarray] | None = None
    ) -> np.ndarray | None:
        """The unit (D,) vector ``query`` searches by, or None when its parts cancel each other out.

        ``texts``: the vectors of its terms, when a batch encoded them already.
        """
        served = served or self.served
        parts: list[tuple[np.ndarray, float]] = []
        if query.terms:
            if texts is None:
                texts = self.text_vectors([t.text for t in query.terms], served=served)
            parts += [(texts[t.text], t.weight) for t in query.terms]
        if query.item_ids:
            ids = [item_id for item_id, _ in query.item_ids]
            stored = self.store.item_vectors(ids, version=served.version.id)
            for item_id, weight in query.item_ids:
                if item_id not in stored:
                    raise UnknownItemError(item_id)
                parts.append((stored[item_id], weight))
        if query.images:
            encoded = encode_images([image for image, _ in query.images], served.encoder)  # (I, D)
            parts += [(v, w) for v, (_, w) in zip(encoded, query.images, strict=True)]
        parts += [(_unit(vector), weight) for vector, weight in query.vectors]
        return combine(parts)

    def run(self, query: Query) -> Results:
        """Encode ``query``, search, and fold near-duplicates if it asks to -> ranked hits.

        The whole query runs against one ``Served`` state, whatever ``refresh`` swaps in meanwhile.
        """
        result = self.run_batch([query])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def run_batch(self, queries: list[Query]) -> list[Results | Exception]:
        """Several queries as one: every text term of all of them encoded in one batch (through the cache),
        one ANN search for all their vectors, then each query's own k and collapse.

        A query that cannot run (an unknown image id, k < 1, no re-ranker) gets its ``UserError`` in its place; the
        others are answered. All run against one ``Served`` state.
        """
        served = self.served
        count = self.store.count
        texts = self.text_vectors([t.text for q in queries for t in q.terms], served=served)
        out: list[Results | Exception | None] = [None] * len(queries)
        wanted: list[tuple[int, np.ndarray, int]] = []  # (position, vector, how many hits to fetch)
        for i, query in enumerate(queries):
            try:
                if query.k < 1:
                    raise UserError(f"k must be at least 1, got {query.k}")
                if query.rerank < 0:
                    raise UserError(f"rerank must be 0 or more, got {query.rerank}")
                if query.rerank and not query.terms:
                    raise RerankUnavailable("rerank: the re-ranker scores text against images; give a text query too")
                vector = self.query_vector(query, served=served, texts=texts)
            except UserError as error:
                out[i] = error
                continue
            if vector is None:
                out[i] = Results([], count, cancelled=True)
            else:
                wanted.append((i, vector, max(query.k * (COLLAPSE_POOL if query.collapse else 1), query.rerank)))
        if wanted:
            vectors = np.stack([vector for _, vector, _ in wanted])  # (Q, D)
            ranked = self.store.search(vectors, max(k for _, _, k in wanted), view=served.view)
            for (i, _, k), hits in zip(wanted, ranked, strict=True):
                try:
                    pool, scores = self._rerank(queries[i], hits[:k], served)
                except UserError as error:
                    out[i] = error
                    continue
                out[i] = self._finish(queries[i], pool, served, count, scores)
        return out  # type: ignore[return-value]

    def reranker(self, served: Served | None = None):
        """The re-ranker of ``served``'s version (loaded once): ``--reranker``, else MODEL/reranker/."""
        from vitrina.models.rerank import load_reranker, reranker_folder

        served = served or self.served
        version = served.version
        if version.digest not in self._rerankers:
            folder = Path(self._reranker_ref) if self._reranker_ref else reranker_folder(version.model_ref)
            if not folder.is_dir():
                raise RerankUnavailable(
                    f"{self.index_dir}: no re-ranker for {version.model_ref} (looked for {folder}); train one with "
                    f"`vitrina train rerank --model {version.model_ref} --data SPEC`, or give --reranker FOLDER"
                )
            model = getattr(served.encoder, "model", None)
            self._rerankers[version.digest] = load_reranker(folder, clip=model, clip_digest=version.digest)
        return self._rerankers[version.digest]

    def _rerank(self, query: Query, pool: list[Hit], served: Served) -> tuple[list[Hit], dict[int, float]]:
        """``pool`` with its first ``query.rerank`` hits reordered by the re-ranker -> (hits, id -> its score).

        Each term's text states are computed once and scored against all N candidates in one forward pass.
        An image that can no longer be read scores -inf: it stays among the candidates, last.
        """
        if not query.rerank or not pool:
            return pool, {}
        reranker = self.reranker(served)
        head, tail = pool[: query.rerank], pool[query.rerank :]
        embedded, rows = self._candidate_images(head, served, reranker)
        scores = np.full(len(head), -np.inf, dtype=np.float32)  # (N,)
        if rows:
            logits = sum(
                t.weight * reranker.score_embedded(reranker.text_states(t.text), embedded).numpy() for t in query.terms
            )  # (n,)
            # a residual re-ranker corrects the dual encoder's score of the hit (the whole query's, once)
            dual = np.asarray([head[j].score for j in rows], dtype=np.float32)
            scores[rows] = logits + reranker.dual_scale * dual
        order = np.argsort(-scores, kind="stable")  # ties keep the dual encoder's order
        head = [head[j] for j in order]
        return head + tail, {head[j].id: float(scores[order[j]]) for j in range(len(head))}

    def _candidate_images(self, head: list[Hit], served: Served, reranker):
        """The re-ranker's (n, M, W) float16 image side of the readable hits of ``head``, and their rows in ``head``.

        From the version's token file (``vitrina.index.rerank_tokens``) where it holds the item as it is now;
        the others (added or changed since the file was made, or no file) decoded and embedded here.
        """
        import torch

        tokens = self._token_file(served, reranker)
        stored = tokens.rows([h.id for h in head], self.store.content_hashes([h.id for h in head])) if tokens else {}
        stored_at = [row for row, hit in enumerate(head) if hit.id in stored]
        images, fresh_at = [], []
        for row, hit in enumerate(head):
            if hit.id in stored:
                continue
            try:
                images.append(load_image(hit.path))
                fresh_at.append(row)
            except UserError:  # BadImageError: gone or damaged since it was indexed
                continue
        parts = []
        if stored_at:
            parts.append(torch.from_numpy(tokens.gather([stored[head[row].id] for row in stored_at])))
        if images:
            parts.append(reranker.embed_images(images))
        return (torch.cat(parts) if parts else None), stored_at + fresh_at

    def _token_file(self, served: Served, reranker):
        """The version's token file for this re-ranker's weights, or None; looked up again when its manifest changes
        (a writer published a new one), so a long-running server picks it up without a restart."""
        from vitrina.index.rerank_tokens import manifest_stamp, open_tokens

        version = served.version
        key = (version.id, reranker.digest)
        stamp = manifest_stamp(self.index_dir, version.id)
        cached = self._token_files.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, None if stamp is None else open_tokens(self.index_dir, version, reranker.digest))
            self._token_files[key] = cached
        return cached[1]

    def _finish(
        self, query: Query, pool: list[Hit], served: Served, count: int, reranked: dict[int, float] | None = None
    ) -> Results:
        """The ranked hits of one query from its candidates: as they are, or with near-duplicates folded.

        ``reranked``: the re-ranker's score of each re-scored hit by id (reported beside the cosine).
        """
        reranked = reranked or {}
        if not query.collapse:
            return Results([RankedHit(hit, rerank_score=reranked.get(hit.id)) for hit in pool[: query.k]], count)
        stored = self.store.item_vectors([hit.id for hit in pool], version=served.version.id)
        pool = [hit for hit in pool if hit.id in stored]  # deleted between the two reads
        if not pool:
            return Results([], count)
        vectors = np.stack([stored[hit.id] for hit in pool])  # (N, D)
        groups = collapse_near_duplicates(vectors, query.k, DUPLICATE_COSINE)
        hits = [RankedHit(pool[row], [pool[d].id for d in dups], reranked.get(pool[row].id)) for row, dups in groups]
        return Results(hits, count)


class LRUCache:
    """A bounded mapping that forgets the least recently used entry first (query embeddings)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        """The value of ``key`` (marked as just used), or None."""
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key, value) -> None:
        """Store ``value``; past ``maxsize`` entries the oldest goes."""
        if self.maxsize <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def _check_text_runtime(text_runtime: str | None, precision: str) -> str | None:
    """``text_runtime`` if it can be honoured; exported towers are float32, so another precision keeps PyTorch."""
    if text_runtime is not None and text_runtime not in RUNTIMES:
        raise UserError(f"--runtime {text_runtime!r} is unknown; use one of {', '.join(RUNTIMES)}")
    if precision != "fp32":
        if text_runtime == "onnx":
            raise UserError(f"--precision {precision} runs the PyTorch towers; use --runtime auto or torch")
        return None
    return text_runtime


def _text_vectors(encoder: Encoder, texts: list[str]) -> np.ndarray:
    """(T, D) unit vectors of ``texts``, encoded in one batch."""
    return as_numpy(encoder.encode_text(texts))


def _unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` as float32 (D,) of length 1; a zero or non-finite one is a ``UserError``."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)  # (D,)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise UserError("query vector is zero or not finite; cannot search with it")
    return vector / norm


def classify(
    images: list[ImageLike], labels: list[str], encoder: Encoder, *, top: int | None = None
) -> list[list[tuple[str, float]]]:
    """Zero-shot: for each image, (label, probability) pairs sorted by probability, best ``top`` kept.

    Labels become prompt-ensemble vectors; probabilities are a softmax over scaled cosine similarity.
    """
    from vitrina.models.zeroshot import class_embeddings, class_probabilities, logit_scale_of

    if len(labels) < 2:
        raise UserError("zero-shot classification needs at least two labels")
    class_vectors = class_embeddings(labels, encoder)  # (C, D)
    probs = class_probabilities(encode_images(images, encoder), class_vectors, logit_scale_of(encoder))  # (B, C)
    order = np.argsort(-probs, axis=1, kind="stable")[:, : top or len(labels)]
    return [[(labels[c], float(row[c])) for c in ranked] for row, ranked in zip(probs, order, strict=True)]


def encode_images_batched(images: list[ImageLike], encoder: Encoder, *, batch_size: int = 64) -> np.ndarray:
    """(B, D) unit vectors of many images, ``batch_size`` at a time (bounded memory)."""
    chunks = [encode_images(images[i : i + batch_size], encoder) for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.empty((0, encoder.embed_dim), dtype=np.float32)


def classify_fewshot(
    images: list[ImageLike],
    shots_folder: str | os.PathLike,
    encoder: Encoder,
    *,
    method: str = "prototype",
    top: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> tuple[list[str], list[list[tuple[str, float]]]]:
    """Few-shot: the classes of ``shots_folder`` (one subfolder of labelled images each) learnt from its images,
    then each image's (label, probability) pairs, best ``top`` first. Returns (class names, ranked pairs).

    ``method``: prototype, tip-adapter (with the class names' prompt ensembles) or linear (``vitrina.models.fewshot``).
    """
    from vitrina.models.fewshot import TIP_ALPHA, TIP_BETA, fit_fewshot, read_shots_folder
    from vitrina.models.zeroshot import class_embeddings, logit_scale_of

    paths, labels, names = read_shots_folder(shots_folder)
    text_vectors = class_embeddings(names, encoder) if method == "tip-adapter" else None
    classifier = fit_fewshot(
        encode_images_batched(paths, encoder),
        labels,
        names,
        method=method,
        text_vectors=text_vectors,
        scale=logit_scale_of(encoder),
        alpha=TIP_ALPHA if alpha is None else alpha,
        beta=TIP_BETA if beta is None else beta,
    )
    probs = classifier.probabilities(encode_images_batched(images, encoder))  # (B, C)
    order = np.argsort(-probs, axis=1, kind="stable")[:, : top or len(names)]
    return names, [[(names[c], float(row[c])) for c in ranked] for row, ranked in zip(probs, order, strict=True)]
