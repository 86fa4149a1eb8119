"""An index directory: SQLite is the source of truth; the FAISS files are derived views of it.

Layout of ``INDEX_DIR``:

* ``meta.sqlite`` (WAL), shared by every model version:

  - ``items``: one row per indexed image (relative path, content hash, size, mtime, label, caption);
  - ``ledger``: files that could not be indexed, and why;
  - ``versions``: one row per model version: model reference, identity and weights digest, vector
    width, ANN kind, state (``building`` until every item has a vector, then ``ready``), created,
    and a *generation* counter bumped by every transaction that changes that version's vectors;
  - ``vectors``: (version, item) -> float32 vector;
  - ``info``: key/value: format, collection root, the active version.

* ``versions/<N>/``: the published ANN file of version N (``vitrina.index.ann``);
* ``writer.lock``: held by the one writer (``vitrina.index.lock``).

Writers (the indexer, ``versions``, ``import``) change SQLite in short transactions and publish ANN
files; readers (search, the server) only read SQLite and load what was published, so a search never
builds or writes anything and never waits for a rebuild.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vitrina.digest import short
from vitrina.errors import UserError
from vitrina.index import ann, ivf
from vitrina.index.ann import (  # noqa: F401 - re-exported: the index's public names
    FLAT_MAX,
    INDEX_KINDS,
    AnnView,
    build_faiss_index,
    choose_index_kind,
)
from vitrina.index.lock import LOCK_FILE

META_FILE = "meta.sqlite"
FORMAT = 2  # 1: one model, vectors in ``items`` and one ``vectors.faiss`` (upgraded by ``open_for_writing``)
BUILDING, READY = "building", "ready"
RETRAIN_GROWTH = 2  # a writer re-trains a version's PQ/IVF quantizer once the version doubled since the last training

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    label TEXT,
    caption TEXT
);
CREATE TABLE IF NOT EXISTS ledger(
    path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    detail TEXT,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions(
    id INTEGER PRIMARY KEY,
    model_ref TEXT NOT NULL,
    identity TEXT NOT NULL,
    digest TEXT,
    embed_dim INTEGER NOT NULL,
    index_kind TEXT NOT NULL,
    preprocess TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL CHECK(state IN ('building', 'ready')),
    created REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    precision TEXT NOT NULL DEFAULT 'fp32'
);
CREATE TABLE IF NOT EXISTS vectors(
    version INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    item INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    vector BLOB NOT NULL,
    PRIMARY KEY(version, item)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_by_item ON vectors(item);
"""


@dataclass(frozen=True)
class Hit:
    """One search result: the item's id, absolute path, cosine score and metadata."""

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
class StorePart:
    """The vectors of one version with item ids in [lo, hi): a part of a parallel IVF build (``vitrina.index.ivf``).

    Loaded in any process through its own read-only connection (WAL: the writer's commits do not block it).
    """

    index_dir: str
    version: int
    lo: int
    hi: int
    rows: int

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(n,) item ids and (n, D) vectors, by id."""
        with IndexStore.open(Path(self.index_dir)) as store:
            chunks = list(store.iter_vectors(version=self.version, ids=(self.lo, self.hi)))
            dim = store._embed_dim(self.version)
        if not chunks:
            return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32)
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def item_location(root: Path, path: str) -> str:
    """Where an item is: its path under the collection ``root``, or a URL / absolute path as listed."""
    return path if "://" in path else str(Path(root) / path)


@dataclass(frozen=True)
class FileState:
    """What the store remembers about an indexed file, to decide whether to re-embed it."""

    id: int
    content_hash: str
    size: int
    mtime: float
    label: str | None
    caption: str | None


@dataclass(frozen=True)
class Version:
    """One model version of an index: whose vectors, how many, and whether it is complete and active."""

    id: int
    model_ref: str
    identity: dict
    digest: str | None
    embed_dim: int
    index_kind: str
    preprocess: dict
    state: str
    created: float
    generation: int
    active: bool
    precision: str = "fp32"  # the arithmetic its vectors were embedded with ("fp32+int8" if runs mixed them)

    @property
    def name(self) -> str:
        """``v<N>``, as the CLI shows and accepts it."""
        return f"v{self.id}"

    @property
    def model_name(self) -> str:
        """The model reference as a short name (a checkpoint folder's name)."""
        return Path(self.model_ref).name if "/" in self.model_ref and ":" not in self.model_ref else self.model_ref

    def describe(self) -> str:
        """``v2 (model runs/b, digest 1a2b3c4d5e6f)`` for messages."""
        return f"{self.name} (model {self.model_ref}, digest {short(self.digest)})"

    def to_json(self) -> dict:
        """A JSON-ready dict (``name`` included)."""
        return {"name": self.name, **asdict(self)}


def parse_version(text: str | int) -> int:
    """``v2``, ``V2`` or ``2`` -> 2; ``UserError`` for anything else."""
    raw = str(text).strip().lower().removeprefix("v")
    if not raw.isdigit():
        raise UserError(f"version {text!r}: give a version as listed by `vitrina versions`, e.g. v1")
    return int(raw)


class IndexStore:
    """The index directory's SQLite database: shared items and ledger, per-version vectors."""

    def __init__(self, index_dir: Path, conn: sqlite3.Connection) -> None:
        self.index_dir = index_dir
        self._conn = conn
        self._view: AnnView | None = None
        self._trained: dict[int, tuple[str, int, object]] = {}  # version -> (kind, trained at n, empty trained index)

    # --- opening -----------------------------------------------------------------------------

    @staticmethod
    def _connect(index_dir: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(index_dir / META_FILE, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL survives a killed process (only power loss can drop the last commits).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")  # a reader waits out the writer's short commits
        return conn

    @classmethod
    def create(cls, index_dir: Path, *, root: Path) -> IndexStore:
        """Create a new index without versions in ``index_dir`` (made if missing) for the collection ``root``."""
        index_dir = Path(index_dir)
        if (index_dir / META_FILE).exists():
            raise UserError(f"{index_dir}: already holds an index; open it, or choose another --out folder")
        if index_dir.exists() and not index_dir.is_dir():
            raise UserError(f"{index_dir}: exists and is not a folder; choose another --out")
        index_dir.mkdir(parents=True, exist_ok=True)
        (index_dir / LOCK_FILE).touch()
        conn = cls._connect(index_dir)
        conn.executescript(_SCHEMA)
        store = cls(index_dir, conn)
        with store._transaction():
            store._set_info(format=str(FORMAT), root=str(Path(root).resolve()), active_version="")
        return store

    @classmethod
    def open(cls, index_dir: Path) -> IndexStore:
        """Open an existing index for reading (and writing, under the writer lock)."""
        index_dir = Path(index_dir)
        if not (index_dir / META_FILE).is_file():
            raise UserError(f"{index_dir}: no index here ({META_FILE} missing); build one with `vitrina index`")
        try:
            store = cls(index_dir, cls._connect(index_dir))
            info = dict(store._conn.execute("SELECT key, value FROM info"))
        except sqlite3.DatabaseError as error:
            raise UserError(f"{index_dir / META_FILE}: not a readable index database ({error})") from None
        if info.get("format") != str(FORMAT):
            if "identity" in info and "root" in info:  # format 1
                store.close()
                raise UserError(
                    f"{index_dir}: index of an older vitrina (format 1); run `vitrina index FOLDER --model MODEL "
                    f"--out {index_dir}` once with the model it was built with to upgrade it (nothing is re-embedded)"
                )
            store.close()
            raise UserError(f"{index_dir / META_FILE}: index metadata incomplete; re-index into a new folder")
        return store

    @classmethod
    def open_for_writing(cls, index_dir: Path) -> IndexStore:
        """Open an index as its writer (hold ``WriterLock`` first): upgrades a format-1 index in place."""
        index_dir = Path(index_dir)
        if (index_dir / META_FILE).is_file():
            try:
                conn = cls._connect(index_dir)
                info = dict(conn.execute("SELECT key, value FROM info"))
                if "format" not in info and "identity" in info:
                    _upgrade_format_1(conn, index_dir, info)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(versions)")}
                if columns and "precision" not in columns:  # a format-2 index from before the column
                    conn.execute("ALTER TABLE versions ADD COLUMN precision TEXT NOT NULL DEFAULT 'fp32'")
                conn.close()
            except sqlite3.DatabaseError as error:
                raise UserError(f"{index_dir / META_FILE}: not a readable index database ({error})") from None
        return cls.open(index_dir)

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
        return _Transaction(self._conn)

    def _set_info(self, **values: str) -> None:
        self._conn.executemany(
            "INSERT INTO info(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            list(values.items()),
        )

    @property
    def info(self) -> dict:
        """Key/value metadata of the index (format, root, active version)."""
        return dict(self._conn.execute("SELECT key, value FROM info"))

    @property
    def root(self) -> Path:
        """The collection folder the relative item paths are resolved against."""
        return Path(self._conn.execute("SELECT value FROM info WHERE key='root'").fetchone()[0])

    @property
    def count(self) -> int:
        """Number of indexed items."""
        return self._conn.execute("SELECT count(*) FROM items").fetchone()[0]

    # --- versions ----------------------------------------------------------------------------

    def versions(self) -> list[Version]:
        """Every version, oldest first."""
        active = self._active_id()
        precision = "precision" if self._has_precision_column() else "'fp32'"  # an index from before the column
        rows = self._conn.execute(
            "SELECT id, model_ref, identity, digest, embed_dim, index_kind, preprocess, state, created, generation, "
            f"{precision} FROM versions ORDER BY id"
        )
        return [
            Version(i, ref, json.loads(ident), dig, dim, kind, json.loads(pre), state, created, gen, i == active, prec)
            for i, ref, ident, dig, dim, kind, pre, state, created, gen, prec in rows
        ]

    def _has_precision_column(self) -> bool:
        return any(row[1] == "precision" for row in self._conn.execute("PRAGMA table_info(versions)"))

    def note_precision(self, version: int, precision: str) -> None:
        """Record that ``version`` got vectors embedded at ``precision`` (joined to the others it has)."""
        current = self.version(version).precision
        used = "+".join(sorted(set(current.split("+")) | {precision}))
        if used != current:
            with self._transaction() as conn:
                conn.execute("UPDATE versions SET precision=? WHERE id=?", (used, version))

    def _active_id(self) -> int | None:
        row = self._conn.execute("SELECT value FROM info WHERE key='active_version'").fetchone()
        return int(row[0]) if row and row[0] else None

    def version(self, version: int | str) -> Version:
        """The version with this number (``v2``/``2``); ``UserError`` naming the ones there are."""
        number = parse_version(version)
        for v in self.versions():
            if v.id == number:
                return v
        names = ", ".join(v.name for v in self.versions()) or "none"
        raise UserError(f"{self.index_dir}: no version v{number} (versions: {names}); see `vitrina versions`")

    def active_version(self) -> Version:
        """The version searches use; ``UserError`` when none is active yet."""
        active = self._active_id()
        if active is None:
            raise UserError(
                f"{self.index_dir}: no active version yet (the first `vitrina index` run has not finished); "
                "run it again to complete the index"
            )
        return self.version(active)

    def find_version(self, digest: str | None) -> Version | None:
        """The version built with weights of this digest, or None."""
        if digest is None:
            return None
        return next((v for v in self.versions() if v.digest == digest), None)

    def add_version(
        self, *, identity: dict, model_ref: str, index_kind: str, preprocess: dict, precision: str = "fp32"
    ) -> Version:
        """A new, empty version in state ``building`` (not active) for vectors of ``identity``."""
        choose_index_kind(0, index_kind)  # validate early
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO versions(model_ref, identity, digest, embed_dim, index_kind, preprocess, state, created, "
                "precision) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    model_ref,
                    json.dumps(identity, sort_keys=True),
                    identity.get("digest"),
                    int(identity["embed_dim"]),
                    index_kind,
                    json.dumps(preprocess, sort_keys=True),
                    BUILDING,
                    time.time(),
                    precision,
                ),
            )
            number = cursor.lastrowid
        return self.version(number)

    def adopt_identity(self, version: int, identity: dict, *, model_ref: str) -> None:
        """Record the identity and weights digest of a version built before digests were kept."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE versions SET identity=?, digest=?, model_ref=? WHERE id=? AND digest IS NULL",
                (json.dumps(identity, sort_keys=True), identity.get("digest"), model_ref, version),
            )

    def mark_ready(self, version: int) -> None:
        """Record that ``version`` has a vector for every item (it may now be activated)."""
        with self._transaction() as conn:
            conn.execute("UPDATE versions SET state=? WHERE id=?", (READY, version))

    def activate(self, version: int | str) -> Version:
        """Make a complete version the one searches use; a running server swaps to it by itself."""
        target = self.version(version)
        if target.state != READY:
            raise UserError(
                f"{self.index_dir}: {target.name} is still being built ({self.vector_count(target.id)} of "
                f"{self.count} items); finish it with `vitrina index FOLDER --model {target.model_ref} "
                f"--out {self.index_dir} --new-version`"
            )
        if ann.published_generation(self.index_dir, target.id) is None:
            raise UserError(f"{self.index_dir}: {target.name} has no published ANN file; re-run `vitrina index`")
        with self._transaction():
            self._set_info(active_version=str(target.id))
        return self.version(target.id)

    def drop(self, version: int | str) -> Version:
        """Delete a version that is not active: its vectors and ANN files."""
        target = self.version(version)
        if target.active:
            raise UserError(
                f"{self.index_dir}: {target.name} is the active version; activate another first "
                "(`vitrina versions IX --activate vN`)"
            )
        with self._transaction() as conn:
            conn.execute("DELETE FROM vectors WHERE version=?", (target.id,))
            conn.execute("DELETE FROM versions WHERE id=?", (target.id,))
        ann.drop_files(self.index_dir, target.id)
        return target

    def set_index_kind(self, version: int, kind: str) -> None:
        """Switch a version's FAISS kind (one of ``INDEX_KINDS``); the writer republishes its ANN file."""
        choose_index_kind(0, kind)
        with self._transaction() as conn:
            conn.execute("UPDATE versions SET index_kind=?, generation=generation+1 WHERE id=?", (kind, version))

    def generation(self, version: int) -> int:
        """Counter bumped by every transaction that changes ``version``'s vectors."""
        row = self._conn.execute("SELECT generation FROM versions WHERE id=?", (version,)).fetchone()
        if row is None:
            raise UserError(f"{self.index_dir}: no version v{version}")
        return int(row[0])

    def vector_count(self, version: int) -> int:
        """How many items have a vector in ``version``."""
        return self._conn.execute("SELECT count(*) FROM vectors WHERE version=?", (version,)).fetchone()[0]

    # --- writing -----------------------------------------------------------------------------

    def upsert_batch(self, rows: list[ItemRow], vectors: np.ndarray, *, version: int) -> list[int]:
        """Insert or replace ``rows`` with their (B, D) ``version`` vectors in one transaction; return their ids.

        A path already present keeps its id, so the FAISS id of a re-embedded file is stable. A file whose
        content changed loses its vectors in every other version (they describe the old pixels): those
        versions get it back from the indexer's catch-up pass.
        """
        vectors = self._vectors_for(version, vectors, len(rows))
        ids = []
        with self._transaction() as conn:
            stale_elsewhere = False
            for row, vector in zip(rows, vectors, strict=True):
                old = conn.execute("SELECT content_hash FROM items WHERE path=?", (row.path,)).fetchone()
                item_id = conn.execute(
                    "INSERT INTO items(path, content_hash, size, mtime, label, caption) VALUES(?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(path) DO UPDATE SET content_hash=excluded.content_hash, size=excluded.size, "
                    "mtime=excluded.mtime, label=excluded.label, caption=excluded.caption RETURNING id",
                    (row.path, row.content_hash, row.size, row.mtime, row.label, row.caption),
                ).fetchone()[0]
                if old is not None and old[0] != row.content_hash:
                    stale_elsewhere |= (
                        conn.execute("DELETE FROM vectors WHERE item=? AND version!=?", (item_id, version)).rowcount > 0
                    )
                conn.execute(
                    "INSERT OR REPLACE INTO vectors(version, item, vector) VALUES(?, ?, ?)",
                    (version, item_id, vector.tobytes()),
                )
                ids.append(item_id)
            conn.executemany("DELETE FROM ledger WHERE path = ?", [(row.path,) for row in rows])
            if stale_elsewhere:
                conn.execute("UPDATE versions SET generation=generation+1")
            else:
                conn.execute("UPDATE versions SET generation=generation+1 WHERE id=?", (version,))
        return ids

    def put_vectors(self, version: int, ids: list[int], vectors: np.ndarray) -> None:
        """Store (B, D) ``vectors`` of existing items ``ids`` in ``version`` (a version catching up)."""
        vectors = self._vectors_for(version, vectors, len(ids))
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO vectors(version, item, vector) SELECT ?, id, ? FROM items WHERE id=?",
                [(version, vector.tobytes(), int(i)) for i, vector in zip(ids, vectors, strict=True)],
            )
            conn.execute("UPDATE versions SET generation=generation+1 WHERE id=?", (version,))

    def insert_items(self, version: int, rows: list[tuple[int, ItemRow]], vectors: np.ndarray) -> None:
        """Insert items with the given ids and their ``version`` vectors in one transaction (``vitrina import``)."""
        vectors = self._vectors_for(version, vectors, len(rows))
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO items(id, path, content_hash, size, mtime, label, caption) VALUES(?, ?, ?, ?, ?, ?, ?)",
                [(i, r.path, r.content_hash, r.size, r.mtime, r.label, r.caption) for i, r in rows],
            )
            conn.executemany(
                "INSERT INTO vectors(version, item, vector) VALUES(?, ?, ?)",
                [(version, i, v.tobytes()) for (i, _), v in zip(rows, vectors, strict=True)],
            )
            conn.execute("UPDATE versions SET generation=generation+1 WHERE id=?", (version,))

    def update_metadata(self, updates: list[tuple[str, int, float, str | None, str | None]]) -> None:
        """Refresh (path, size, mtime, label, caption) of files with unchanged content, in one transaction.

        The vectors are untouched, so the generations (and the ANN files) stay as they are.
        """
        if not updates:
            return
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE items SET size=?, mtime=?, label=?, caption=? WHERE path=?",
                [(size, mtime, label, caption, path) for path, size, mtime, label, caption in updates],
            )

    def delete_paths(self, paths: Iterable[str]) -> int:
        """Remove the items at these relative paths (their vectors in every version, their ledger rows)."""
        paths = [(p,) for p in paths]
        if not paths:
            return 0
        with self._transaction() as conn:
            before = self.count
            conn.executemany("DELETE FROM items WHERE path = ?", paths)  # vectors go by ON DELETE CASCADE
            conn.executemany("DELETE FROM ledger WHERE path = ?", paths)
            removed = before - self.count
            if removed:
                conn.execute("UPDATE versions SET generation=generation+1")
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

    @contextmanager
    def snapshot(self) -> Iterator[IndexStore]:
        """Reads inside ``with store.snapshot():`` see one consistent state, whatever a writer commits meanwhile."""
        self._conn.execute("BEGIN")  # deferred: WAL gives this read transaction a fixed snapshot
        try:
            yield self
        finally:
            self._conn.execute("COMMIT")

    def _vectors_for(self, version: int, vectors: np.ndarray, n: int) -> np.ndarray:
        """``vectors`` as float32, checked to be (n, D) for ``version``'s width D (a ``ValueError`` otherwise)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        dim = self._embed_dim(version)
        if vectors.shape != (n, dim):
            raise ValueError(f"vectors of shape {vectors.shape} for {n} rows of width {dim}")
        return vectors

    def _embed_dim(self, version: int) -> int:
        row = self._conn.execute("SELECT embed_dim FROM versions WHERE id=?", (version,)).fetchone()
        if row is None:
            raise UserError(f"{self.index_dir}: no version v{version}")
        return int(row[0])

    def _version_or_active(self, version: int | None) -> int:
        return self.active_version().id if version is None else version

    def file_states(self) -> dict[str, FileState]:
        """Relative path -> what is stored about it (for incremental re-indexing)."""
        rows = self._conn.execute("SELECT path, id, content_hash, size, mtime, label, caption FROM items")
        return {path: FileState(*rest) for path, *rest in rows}

    def missing_items(self, version: int) -> list[tuple[int, str, int, float, str | None, str | None]]:
        """(id, relative path, size, mtime, label, caption) of the items without a vector in ``version``."""
        return list(
            self._conn.execute(
                "SELECT id, path, size, mtime, label, caption FROM items WHERE id NOT IN "
                "(SELECT item FROM vectors WHERE version=?) ORDER BY id",
                (version,),
            )
        )

    def get(self, item_id: int) -> Hit | None:
        """The item with this id as a ``Hit`` (score 1.0), or None."""
        row = self._conn.execute("SELECT id, path, label, caption FROM items WHERE id=?", (item_id,)).fetchone()
        if row is None:
            return None
        return Hit(id=row[0], path=item_location(self.root, row[1]), score=1.0, label=row[2], caption=row[3])

    def content_hashes(self, ids: list[int]) -> dict[int, str]:
        """The content hash of each of these item ids (absent ids left out)."""
        found: dict[int, str] = {}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = [int(i) for i in ids[start : start + 900]]
            marks = ",".join("?" * len(part))
            found.update(self._conn.execute(f"SELECT id, content_hash FROM items WHERE id IN ({marks})", part))
        return found

    def item_vectors(self, ids: list[int], *, version: int | None = None) -> dict[int, np.ndarray]:
        """Stored (D,) vectors of these item ids in ``version`` (default: the active one); absent ids left out."""
        version = self._version_or_active(version)
        found: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = [int(i) for i in ids[start : start + 900]]
            marks = ",".join("?" * len(part))
            rows = self._conn.execute(
                f"SELECT item, vector FROM vectors WHERE version=? AND item IN ({marks})", [version, *part]
            )
            found.update((item_id, np.frombuffer(blob, dtype=np.float32)) for item_id, blob in rows)
        return found

    def iter_vectors(
        self, *, version: int | None = None, chunk: int = 65536, ids: tuple[int, int] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids (n,), vectors (n, D)) chunks of ``version``'s vectors, ordered by item id; ``ids``: only [lo, hi)."""
        version = self._version_or_active(version)
        dim = self._embed_dim(version)
        lo, hi = ids if ids is not None else (-(2**63), 2**63 - 1)
        cursor = self._conn.execute(
            "SELECT item, vector FROM vectors WHERE version=? AND item>=? AND item<? ORDER BY item", (version, lo, hi)
        )
        while rows := cursor.fetchmany(chunk):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            yield ids, vectors

    def iter_items_with_vectors(
        self, version: int, *, chunk: int = 65536
    ) -> Iterator[tuple[list[tuple[int, ItemRow]], np.ndarray]]:
        """([(id, ItemRow)], (n, D) vectors) chunks of every item that has a ``version`` vector, by id."""
        dim = self._embed_dim(version)
        cursor = self._conn.execute(
            "SELECT i.id, i.path, i.content_hash, i.size, i.mtime, i.label, i.caption, v.vector "
            "FROM vectors v JOIN items i ON i.id = v.item WHERE v.version=? ORDER BY i.id",
            (version,),
        )
        while rows := cursor.fetchmany(chunk):
            items = [(r[0], ItemRow(*r[1:7])) for r in rows]
            yield items, np.frombuffer(b"".join(r[7] for r in rows), dtype=np.float32).reshape(len(rows), dim)

    def all_vectors(self, *, version: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N,) int64 ids and (N, D) float32 vectors of ``version`` (default: active), ordered by id."""
        version = self._version_or_active(version)
        chunks = list(self.iter_vectors(version=version))
        if not chunks:
            return np.empty(0, dtype=np.int64), np.empty((0, self._embed_dim(version)), dtype=np.float32)
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    def vector_parts(self, version: int, rows: int) -> list[StorePart]:
        """``version``'s vectors as consecutive id ranges of ``rows`` vectors each (the last one shorter)."""
        cursor = self._conn.execute("SELECT item FROM vectors WHERE version=? ORDER BY item", (version,))
        parts, first, count, last = [], None, 0, None
        while batch := cursor.fetchmany(65536):
            for (item,) in batch:
                if first is None:
                    first = item
                count += 1
                last = item
                if count == rows:
                    parts.append(StorePart(str(self.index_dir), version, first, item + 1, count))
                    first, count = None, 0
        if count:
            parts.append(StorePart(str(self.index_dir), version, first, last + 1, count))
        return parts

    def items(self) -> list[tuple[int, str, str | None, str | None]]:
        """(id, absolute path, label, caption) of every item, ordered by id."""
        root = self.root
        rows = self._conn.execute("SELECT id, path, label, caption FROM items ORDER BY id")
        return [(item_id, item_location(root, path), label, caption) for item_id, path, label, caption in rows]

    def item_rows(self) -> list[tuple[int, str, str, int, float, str | None, str | None]]:
        """(id, relative path, content hash, size, mtime, label, caption) of every item, ordered by id."""
        return list(
            self._conn.execute("SELECT id, path, content_hash, size, mtime, label, caption FROM items ORDER BY id")
        )

    # --- the ANN view ------------------------------------------------------------------------

    def publish_ann(self, version: int) -> None:
        """Writer only: build ``version``'s FAISS index from SQLite and publish it at its current generation.

        A PQ or IVF quantizer trained by an earlier publish of this writer is reused until the version
        has doubled in size (k-means on 100k vectors takes seconds; adding to a trained index does not).
        """
        v = self.version(version)
        kind = choose_index_kind(self.vector_count(version), v.index_kind)
        if kind == "ivf" and self.vector_count(version) >= ann.ONDISK_MIN:
            self._publish_ivf_on_disk(v)
            return
        ids, vectors = self.all_vectors(version=version)
        cached = self._trained.get(version)
        reuse = cached is not None and cached[0] == kind and len(ids) <= RETRAIN_GROWTH * cached[1]
        index = build_faiss_index(vectors, ids, kind, trained=cached[2] if reuse else None)
        del vectors
        if not reuse and (part := ann.trained_part(index)) is not None:
            self._trained[version] = (kind, len(ids), part)
        ann.publish(self.index_dir, version, v.generation, index, kind)

    def _publish_ivf_on_disk(self, v: Version) -> None:
        """Train once on a sample of a few parts (or reuse this writer's training), fill every part in its
        own process, merge the lists into one data file, publish (``vitrina.index.ivf``)."""
        parts = self.vector_parts(v.id, ivf.PART_ROWS)
        n = sum(p.rows for p in parts)
        layout = ivf.ivf_layout(n, v.embed_dim)
        cached = self._trained.get(v.id)
        key = f"ivf-disk:{'pq' if layout.pq_m else 'flat'}"  # nlist follows n, but a trained one serves until 2x
        if cached is not None and cached[0] == key and n <= RETRAIN_GROWTH * cached[1]:
            trained = cached[2]
        else:
            trained = ivf.train_ivf(ivf.training_sample(parts, layout), layout)
            self._trained[v.id] = (key, n, trained)
        ann.publish_ivf_on_disk(self.index_dir, v.id, v.generation, trained, parts, workers=os.cpu_count() or 1)

    def is_published_current(self, version: int) -> bool:
        """Whether ``version``'s published ANN file was built from its current generation."""
        return ann.published_generation(self.index_dir, version) == self.generation(version)

    def load_view(self, version: int | None = None) -> AnnView:
        """Reader: the published ANN of ``version`` (default: active); never writes.

        With nothing published yet (a first run still going, or killed before it published), an exact
        index is built in memory from the stored vectors, and left unpublished.
        """
        version = self._version_or_active(version)
        view = ann.load_published(self.index_dir, version)
        if view is not None:
            return view
        generation = self.generation(version)
        ids, vectors = self.all_vectors(version=version)
        return AnnView(version, generation, build_faiss_index(vectors, ids, "flat"), published=False)

    @property
    def view(self) -> AnnView:
        """The ANN view searches use: loaded on first use, then replaced only by ``set_view``/``refresh_view``."""
        if self._view is None:
            self._view = self.load_view()
        return self._view

    def set_view(self, view: AnnView) -> None:
        """Swap in a view loaded elsewhere (the server's background loader); one reference assignment."""
        self._view = view

    def view_is_current(self) -> bool:
        """Whether the view in use is the active version's latest published one (cheap: one query, one small read)."""
        if self._view is None:
            return False
        active = self._active_id()
        return self._view.version == active and self._view.generation == ann.published_generation(
            self.index_dir, active
        )

    def refresh_view(self) -> bool:
        """Load the active version's newest published ANN on this thread if the view in use is older."""
        if self.view_is_current():
            return False
        self._view = self.load_view()
        return True

    def search(self, query_vectors: np.ndarray, k: int, *, view: AnnView | None = None) -> list[list[Hit]]:
        """Top-``k`` hits by inner product for each of the (Q, D) ``query_vectors``, from ``view`` (or ``self.view``).

        Items deleted since the view was published are left out; metadata is read live.
        """
        query_vectors = np.ascontiguousarray(np.atleast_2d(query_vectors), dtype=np.float32)
        view = view or self.view
        dim = self._embed_dim(view.version)
        if query_vectors.shape[1] != dim:
            raise UserError(f"query vectors have width {query_vectors.shape[1]}, the index holds width {dim}")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        if view.count == 0:
            return [[] for _ in query_vectors]
        scores, ids = view.search(query_vectors, k)
        meta = self._metadata(sorted({int(i) for i in ids.ravel() if i >= 0}))
        return [
            [
                Hit(id=int(i), path=meta[int(i)][0], score=float(s), label=meta[int(i)][1], caption=meta[int(i)][2])
                for s, i in zip(row_scores, row_ids, strict=True)
                if i >= 0 and int(i) in meta
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    def _metadata(self, ids: list[int]) -> dict[int, tuple[str, str | None, str | None]]:
        meta = {}
        root = self.root
        for chunk in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
            part = ids[chunk : chunk + 900]
            marks = ",".join("?" * len(part))
            for item_id, path, label, caption in self._conn.execute(
                f"SELECT id, path, label, caption FROM items WHERE id IN ({marks})", part
            ):
                meta[item_id] = (item_location(root, path), label, caption)
        return meta


class _Transaction:
    """``with store._transaction() as conn:`` commits on success, rolls back on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, exc_type, *exc: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _upgrade_format_1(conn: sqlite3.Connection, index_dir: Path, info: dict) -> None:
    """Move a format-1 index (one model, vectors in ``items``) to format 2 in one transaction: its vectors
    become version 1, whose weights digest is unknown (such an index accepts no new model without
    ``--new-version``). The old ``vectors.faiss`` is left for the writer to replace."""
    identity = json.loads(info["identity"])
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):  # one by one: executescript would commit the transaction
            if statement.strip():
                conn.execute(statement)
        conn.execute(
            "INSERT INTO versions(id, model_ref, identity, digest, embed_dim, index_kind, state, created, generation) "
            "VALUES(1, ?, ?, NULL, ?, ?, 'ready', ?, 1)",
            (
                info.get("model_ref", "unknown"),
                json.dumps(identity, sort_keys=True),
                int(identity["embed_dim"]),
                info.get("index_kind", "auto"),
                time.time(),
            ),
        )
        conn.execute("INSERT INTO vectors(version, item, vector) SELECT 1, id, vector FROM items")
        conn.execute("ALTER TABLE items DROP COLUMN vector")
        conn.execute("DELETE FROM info WHERE key IN ('identity', 'model_ref', 'embed_dim', 'index_kind', 'generation')")
        conn.executemany(
            "INSERT OR REPLACE INTO info(key, value) VALUES(?, ?)", [("format", str(FORMAT)), ("active_version", "1")]
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    (index_dir / "vectors.faiss").unlink(missing_ok=True)
    (index_dir / LOCK_FILE).touch()
