"""An index directory: SQLite is the source of truth, FAISS a derived, rebuildable view of it.

Layout of ``INDEX_DIR``:

* ``meta.sqlite`` (WAL): ``items`` (one row per indexed image, its vector as a float32 blob),
  ``ledger`` (files that could not be indexed, and why), ``info`` (key/value: encoder identity,
  model ref, width, index kind, collection root, and a *generation* counter bumped by every
  transaction that changes the vectors).
* ``vectors.faiss``: a header (magic + the generation it was built from) followed by a serialised
  FAISS index whose ids are the SQLite ids. It is written to a temp file and renamed into place,
  so it is either the old complete file or the new one; if its generation differs from SQLite's
  (a run killed before the rebuild, a file copied from elsewhere) or it is missing, opening the
  store rebuilds it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from vitrina.errors import UserError

META_FILE = "meta.sqlite"
FAISS_FILE = "vectors.faiss"
_MAGIC = b"VITRFAIS"
_HEADER = struct.Struct("<8sQ")  # magic, generation

INDEX_KINDS = ("auto", "flat", "pq", "hnsw", "ivf")
# Below this many vectors an exact scan takes a few ms at width 512 and has perfect recall. Above it
# `auto` picks "pq": a product-quantised fast-scan pass over all vectors (4-bit codes of 2-dim pieces)
# whose best k * k_factor candidates are re-ranked with the exact float vectors. On random unit vectors
# (the hard case: no cluster structure) it keeps recall@10 >= 0.95 at 1M where HNSW and IVF do not
# within the latency budget; bench/search_latency.py holds the measurements.
FLAT_MAX = 50_000
PQ_DIMS_PER_SUBQUANTIZER = 2  # 4-bit codes of 2-dim pieces: 1 byte per 4 dims, 128 B per 512-d vector
PQ_K_FACTOR = 100  # re-rank k * 100 candidates exactly (measured: recall@10 0.998 at 1M random vectors)
PQ_TRAIN_MAX = 100_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256
IVF_NPROBE_FRACTION = 1 / 16


_SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    label TEXT,
    caption TEXT,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger(
    path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    detail TEXT,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Hit:
    """One search result: the item's SQLite/FAISS id, absolute path, cosine score and metadata."""

    id: int
    path: str
    score: float
    label: str | None
    caption: str | None

    def to_json(self) -> dict:
        """A JSON-ready dict of the hit."""
        return asdict(self)


@dataclass(frozen=True)
class ItemRow:
    """Metadata of one image to upsert; its vector travels beside it in ``upsert_batch``."""

    path: str  # relative to the collection root, POSIX separators
    content_hash: str
    size: int
    mtime: float
    label: str | None = None
    caption: str | None = None


@dataclass(frozen=True)
class FileState:
    """What the store remembers about an indexed file, to decide whether to re-embed it."""

    id: int
    content_hash: str
    size: int
    mtime: float
    label: str | None
    caption: str | None


def choose_index_kind(n: int, kind: str = "auto") -> str:
    """Resolve ``auto`` to ``flat`` or ``pq`` by collection size; pass explicit kinds through."""
    if kind not in INDEX_KINDS:
        raise UserError(f"index kind {kind!r} is unknown; use one of {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n < FLAT_MAX else "pq"


def build_faiss_index(vectors: np.ndarray, ids: np.ndarray, kind: str = "auto") -> faiss.Index:
    """Build an inner-product FAISS index over (N, D) unit ``vectors`` with the given int64 ``ids``.

    Always an ``IndexIDMap2`` around the searchable part, so FAISS ids are SQLite ids whatever the kind.
    """
    n, dim = vectors.shape
    kind = choose_index_kind(n, kind)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind == "flat" or n == 0:
        inner: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "pq":
        # 4-bit fast-scan PQ needs dim divisible by the number of sub-quantizers; fall back to finer splits.
        m = next(m for m in (dim // PQ_DIMS_PER_SUBQUANTIZER, dim) if m and dim % m == 0)
        inner = faiss.IndexRefineFlat(faiss.IndexPQFastScan(dim, m, 4, faiss.METRIC_INNER_PRODUCT))
        rng = np.random.default_rng(0)
        sample = vectors if n <= PQ_TRAIN_MAX else vectors[np.sort(rng.choice(n, PQ_TRAIN_MAX, replace=False))]
        inner.train(sample)
        inner.k_factor = PQ_K_FACTOR
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        # ~4·sqrt(N) lists, each trained on at most 256 points per list (FAISS' own guidance).
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        inner = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = vectors if n <= 256 * nlist else vectors[rng.choice(n, 256 * nlist, replace=False)]
        inner.train(sample)
        inner.nprobe = max(1, int(nlist * IVF_NPROBE_FRACTION))
    else:  # pragma: no cover - choose_index_kind validated it
        raise AssertionError(kind)
    index = faiss.IndexIDMap2(inner)
    if n:
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def _check_identity(stored: dict, given: dict, index_dir: Path) -> None:
    """Refuse encoders of another kind or width; warn when only the name differs."""
    mismatch = [key for key in ("kind", "embed_dim") if stored.get(key) != given.get(key)]
    if mismatch:
        raise UserError(
            f"{index_dir}: index was built with encoder {json.dumps(stored, sort_keys=True)}, "
            f"but the given encoder is {json.dumps(given, sort_keys=True)} "
            f"({' and '.join(mismatch)} {'differ' if len(mismatch) > 1 else 'differs'}); "
            "use the model it was built with, or index into a new folder"
        )
    if stored.get("name") != given.get("name"):
        warnings.warn(
            f"{index_dir}: index built by {stored.get('name')!r}, searched with {given.get('name')!r} "
            "(same kind and width): scores are only meaningful if the weights are the same",
            stacklevel=3,
        )


class IndexStore:
    """The index directory: items + ledger in SQLite, vectors also in a derived FAISS file."""

    def __init__(self, index_dir: Path, conn: sqlite3.Connection) -> None:
        self.index_dir = index_dir
        self._conn = conn
        self._faiss: faiss.Index | None = None
        self._faiss_generation = -1

    # --- opening -----------------------------------------------------------------------------

    @staticmethod
    def _connect(index_dir: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(index_dir / META_FILE, isolation_level=None)  # explicit transactions
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL survives a killed process (only power loss can drop the last commits).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        return conn

    @classmethod
    def create(
        cls, index_dir: Path, *, identity: dict, model_ref: str, root: Path, index_kind: str = "auto"
    ) -> IndexStore:
        """Create a new, empty index in ``index_dir`` (made if missing) for vectors of ``identity``."""
        choose_index_kind(0, index_kind)  # validate early
        index_dir = Path(index_dir)
        if (index_dir / META_FILE).exists():
            raise UserError(f"{index_dir}: already holds an index; open it, or choose another --out folder")
        if index_dir.exists() and not index_dir.is_dir():
            raise UserError(f"{index_dir}: exists and is not a folder; choose another --out")
        index_dir.mkdir(parents=True, exist_ok=True)
        store = cls(index_dir, cls._connect(index_dir))
        with store._transaction():
            store._set_info(
                identity=json.dumps(identity, sort_keys=True),
                model_ref=model_ref,
                embed_dim=str(int(identity["embed_dim"])),
                index_kind=index_kind,
                root=str(Path(root).resolve()),
                generation="0",
            )
        return store

    @classmethod
    def open(cls, index_dir: Path, *, identity: dict | None = None) -> IndexStore:
        """Open an existing index; with ``identity``, refuse if the index was built by another kind/width."""
        index_dir = Path(index_dir)
        if not (index_dir / META_FILE).is_file():
            raise UserError(f"{index_dir}: no index here ({META_FILE} missing); build one with `vitrina index`")
        try:
            store = cls(index_dir, cls._connect(index_dir))
            info = store.info
        except sqlite3.DatabaseError as error:
            raise UserError(f"{index_dir / META_FILE}: not a readable index database ({error})") from None
        if "identity" not in info:
            raise UserError(f"{index_dir / META_FILE}: index metadata incomplete; re-index into a new folder")
        if identity is not None:
            _check_identity(info["identity"], identity, index_dir)
        return store

    def close(self) -> None:
        """Close the SQLite connection."""
        self._conn.close()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- info --------------------------------------------------------------------------------

    def _transaction(self) -> sqlite3.Connection:
        # sqlite3's context manager commits/rolls back but does not BEGIN under isolation_level=None.
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def _set_info(self, **values: str) -> None:
        self._conn.executemany(
            "INSERT INTO info(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            list(values.items()),
        )

    def set_index_kind(self, kind: str) -> None:
        """Switch the FAISS kind (one of ``INDEX_KINDS``); the FAISS file is rebuilt when next needed."""
        choose_index_kind(0, kind)
        self._set_info(index_kind=kind)
        self._faiss, self._faiss_generation = None, -1
        (self.index_dir / FAISS_FILE).unlink(missing_ok=True)

    def _bump_generation(self) -> None:
        self._conn.execute("UPDATE info SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    @property
    def info(self) -> dict:
        """Key/value metadata; ``identity`` decoded to a dict, ``embed_dim``/``generation`` to ints."""
        info: dict = dict(self._conn.execute("SELECT key, value FROM info"))
        if "identity" in info:
            info["identity"] = json.loads(info["identity"])
        for key in ("embed_dim", "generation"):
            if key in info:
                info[key] = int(info[key])
        return info

    @property
    def root(self) -> Path:
        """The collection folder the relative item paths are resolved against."""
        return Path(self.info["root"])

    @property
    def count(self) -> int:
        """Number of indexed items."""
        return self._conn.execute("SELECT count(*) FROM items").fetchone()[0]

    @property
    def generation(self) -> int:
        """Counter bumped by every transaction that changes the vectors."""
        return int(self._conn.execute("SELECT value FROM info WHERE key='generation'").fetchone()[0])

    # --- writing -----------------------------------------------------------------------------

    def upsert_batch(self, rows: list[ItemRow], vectors: np.ndarray) -> list[int]:
        """Insert or replace ``rows`` with their (B, D) ``vectors`` in one transaction; return their ids.

        A path already present keeps its id, so the FAISS id of a re-embedded file is stable.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        dim = self.info["embed_dim"]
        if vectors.shape != (len(rows), dim):
            raise ValueError(f"vectors of shape {vectors.shape} for {len(rows)} rows of width {dim}")
        ids = []
        conn = self._transaction()
        try:
            for row, vector in zip(rows, vectors, strict=True):
                cursor = conn.execute(
                    "INSERT INTO items(path, content_hash, size, mtime, label, caption, vector) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET "
                    "content_hash=excluded.content_hash, size=excluded.size, mtime=excluded.mtime, "
                    "label=excluded.label, caption=excluded.caption, vector=excluded.vector RETURNING id",
                    (
                        row.path,
                        row.content_hash,
                        row.size,
                        row.mtime,
                        row.label,
                        row.caption,
                        vector.tobytes(),
                    ),
                )
                ids.append(cursor.fetchone()[0])
            conn.executemany("DELETE FROM ledger WHERE path = ?", [(row.path,) for row in rows])
            self._bump_generation()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return ids

    def update_metadata(self, updates: list[tuple[str, int, float, str | None, str | None]]) -> None:
        """Refresh (path, size, mtime, label, caption) of files with unchanged content, in one transaction.

        The vectors are untouched, so the generation (and the FAISS file) stays as it is.
        """
        if not updates:
            return
        conn = self._transaction()
        try:
            conn.executemany(
                "UPDATE items SET size=?, mtime=?, label=?, caption=? WHERE path=?",
                [(size, mtime, label, caption, path) for path, size, mtime, label, caption in updates],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def delete_paths(self, paths: Iterable[str]) -> int:
        """Remove the items at these relative paths (and their ledger rows); return how many items went."""
        paths = [(p,) for p in paths]
        if not paths:
            return 0
        conn = self._transaction()
        try:
            before = self.count
            conn.executemany("DELETE FROM items WHERE path = ?", paths)
            conn.executemany("DELETE FROM ledger WHERE path = ?", paths)
            removed = before - self.count
            if removed:
                self._bump_generation()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return removed

    def add_ledger(self, path: str, reason: str, detail: str = "") -> None:
        """Record that ``path`` could not be indexed, and why (replaces an earlier entry for it)."""
        self._conn.execute(
            "INSERT INTO ledger(path, reason, detail, seen_at) VALUES(?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET "
            "reason=excluded.reason, detail=excluded.detail, seen_at=excluded.seen_at",
            (path, reason, detail, time.time()),
        )

    def ledger(self) -> list[tuple[str, str, str]]:
        """All (path, reason, detail) ledger rows, sorted by path."""
        return list(self._conn.execute("SELECT path, reason, detail FROM ledger ORDER BY path"))

    # --- reading -----------------------------------------------------------------------------

    def file_states(self) -> dict[str, FileState]:
        """Relative path -> what is stored about it (for incremental re-indexing)."""
        rows = self._conn.execute("SELECT path, id, content_hash, size, mtime, label, caption FROM items")
        return {path: FileState(*rest) for path, *rest in rows}

    def get(self, item_id: int) -> Hit | None:
        """The item with this id as a ``Hit`` (score 1.0), or None."""
        row = self._conn.execute("SELECT id, path, label, caption FROM items WHERE id=?", (item_id,)).fetchone()
        if row is None:
            return None
        return Hit(id=row[0], path=str(self.root / row[1]), score=1.0, label=row[2], caption=row[3])

    def item_vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        """Stored (D,) vectors of these item ids; ids not in the index are left out."""
        found: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = list(ids[start : start + 900])
            marks = ",".join("?" * len(part))
            rows = self._conn.execute(f"SELECT id, vector FROM items WHERE id IN ({marks})", part)
            found.update((item_id, np.frombuffer(blob, dtype=np.float32)) for item_id, blob in rows)
        return found

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,) int64 ids and (N, D) float32 vectors of every item, ordered by id."""
        n, dim = self.count, self.info["embed_dim"]
        ids = np.empty(n, dtype=np.int64)
        vectors = np.empty((n, dim), dtype=np.float32)
        i = 0
        for item_id, blob in self._conn.execute("SELECT id, vector FROM items ORDER BY id"):
            ids[i] = item_id
            vectors[i] = np.frombuffer(blob, dtype=np.float32)
            i += 1
        return ids[:i], vectors[:i]

    def items(self) -> list[tuple[int, str, str | None, str | None]]:
        """(id, absolute path, label, caption) of every item, ordered by id."""
        root = self.root
        rows = self._conn.execute("SELECT id, path, label, caption FROM items ORDER BY id")
        return [(item_id, str(root / path), label, caption) for item_id, path, label, caption in rows]

    # --- the FAISS view ----------------------------------------------------------------------

    def rebuild_vectors_index(self) -> faiss.Index:
        """Build the FAISS index from SQLite and write it atomically, stamped with the current generation."""
        generation = self.generation
        ids, vectors = self.all_vectors()
        index = build_faiss_index(vectors, ids, self.info["index_kind"])
        del vectors
        fd, tmp = tempfile.mkstemp(prefix=".vectors-", suffix=".tmp", dir=self.index_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, generation))
                faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))  # streamed: no 2nd copy in memory
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index_dir / FAISS_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._faiss, self._faiss_generation = index, generation
        return index

    def _faiss_file_generation(self) -> int | None:
        """The generation stamped in ``vectors.faiss``, or None when it is missing or not ours."""
        try:
            with open(self.index_dir / FAISS_FILE, "rb") as f:
                magic, generation = _HEADER.unpack(f.read(_HEADER.size))
        except (OSError, struct.error):
            return None
        return generation if magic == _MAGIC else None

    def _read_faiss_file(self) -> faiss.Index | None:
        try:
            with open(self.index_dir / FAISS_FILE, "rb") as f:
                f.seek(_HEADER.size)
                return faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except (OSError, RuntimeError):
            return None  # vanished or truncated: rebuild from SQLite

    def is_vectors_index_current(self) -> bool:
        """Whether ``vectors.faiss`` on disk exists and was built from the current generation."""
        return self._faiss_file_generation() == self.generation

    def vectors_index(self) -> faiss.Index:
        """The FAISS index matching SQLite's current generation, loading or rebuilding it as needed."""
        generation = self.generation
        if self._faiss is not None and self._faiss_generation == generation:
            return self._faiss
        if self._faiss_file_generation() == generation:
            loaded = self._read_faiss_file()
            if loaded is not None:
                self._faiss, self._faiss_generation = loaded, generation
                return loaded
        return self.rebuild_vectors_index()

    def search(self, query_vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` hits by inner product for each of the (Q, D) ``query_vectors``."""
        query_vectors = np.ascontiguousarray(np.atleast_2d(query_vectors), dtype=np.float32)
        dim = self.info["embed_dim"]
        if query_vectors.shape[1] != dim:
            raise UserError(f"query vectors have width {query_vectors.shape[1]}, the index holds width {dim}")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        index = self.vectors_index()
        if index.ntotal == 0:
            return [[] for _ in query_vectors]
        scores, ids = index.search(query_vectors, min(k, index.ntotal))
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        meta = {}
        root = self.root
        for chunk in range(0, len(wanted), 900):  # stay under SQLite's bound-parameter limit
            part = wanted[chunk : chunk + 900]
            marks = ",".join("?" * len(part))
            for item_id, path, label, caption in self._conn.execute(
                f"SELECT id, path, label, caption FROM items WHERE id IN ({marks})", part
            ):
                meta[item_id] = (str(root / path), label, caption)
        return [
            [
                Hit(
                    id=int(i),
                    path=meta[int(i)][0],
                    score=float(s),
                    label=meta[int(i)][1],
                    caption=meta[int(i)][2],
                )
                for s, i in zip(row_scores, row_ids, strict=True)
                if i >= 0 and int(i) in meta
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]
