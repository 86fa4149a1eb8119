"""The ANN files of an index: FAISS views of one version's vectors, built by the writer, loaded by readers.

Per version, ``versions/<N>/`` holds:

* ``ann-g<G>.faiss``: a plain FAISS file of the version's vectors as of generation ``G`` (FAISS ids
  are item ids);
* ``ann.json``: the pointer ``{"generation": G, "file": "ann-g<G>.faiss", "kind": ..., "count": n}``;
* ``towers/``: the version's query towers for the light runtime (``vitrina.runtime.towers``).

Publishing writes the FAISS file under its new name, then swaps the pointer (both atomically, see
``vitrina.atomic``), then deletes older files. A reader reads the pointer, then the file it names;
if the writer deleted that file in between, the reader reads the pointer again. So a reader never
sees a half-written file and never writes anything; only the indexer builds.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vitrina.atomic import atomic_write, atomic_write_text
from vitrina.errors import UserError

VERSIONS_DIR = "versions"
POINTER = "ann.json"

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


def choose_index_kind(n: int, kind: str = "auto") -> str:
    """Resolve ``auto`` to ``flat`` or ``pq`` by collection size; pass explicit kinds through."""
    if kind not in INDEX_KINDS:
        raise UserError(f"index kind {kind!r} is unknown; use one of {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n < FLAT_MAX else "pq"


def build_faiss_index(
    vectors: np.ndarray, ids: np.ndarray, kind: str = "auto", *, trained: faiss.Index | None = None
) -> faiss.Index:
    """Build an inner-product FAISS index over (N, D) unit ``vectors`` with the given int64 ``ids``.

    Always an ``IndexIDMap2`` around the searchable part, so FAISS ids are item ids whatever the kind.
    ``trained``: an empty, trained index of the same kind and width (``trained_part``) to fill instead
    of training again: the writer re-publishes a growing index without re-running k-means each time.
    """
    n, dim = vectors.shape
    kind = choose_index_kind(n, kind)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if trained is not None and n and kind in ("pq", "ivf") and trained.d == dim:
        index = faiss.IndexIDMap2(faiss.clone_index(trained))
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        return index
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


def trained_part(index: faiss.Index) -> faiss.Index | None:
    """An empty copy of a trained PQ/IVF index built by ``build_faiss_index`` (None for flat and HNSW)."""
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    if isinstance(inner, faiss.IndexRefineFlat):
        base = faiss.clone_index(faiss.downcast_index(inner.base_index))
        base.reset()
        empty = faiss.IndexRefineFlat(base)
        empty.k_factor = inner.k_factor
        return empty
    if isinstance(inner, faiss.IndexIVF):
        empty = faiss.clone_index(inner)
        empty.reset()
        return empty
    return None


@dataclass(frozen=True)
class AnnView:
    """A loaded, searchable FAISS index of one version at one generation (read-only once made)."""

    version: int
    generation: int
    index: faiss.Index
    published: bool  # False: built in memory because nothing was published yet (never written)

    @property
    def count(self) -> int:
        """Vectors in the view."""
        return int(self.index.ntotal)

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k') scores and ids of the top ``k`` (k' = min(k, count)); ids are -1 where FAISS found fewer."""
        return self.index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), min(k, self.count))


def version_dir(index_dir: Path, version: int) -> Path:
    """The folder of one version's ANN files."""
    return Path(index_dir) / VERSIONS_DIR / str(version)


def read_pointer(index_dir: Path, version: int) -> dict | None:
    """The published pointer of ``version`` (``generation``, ``file``, ``kind``, ``count``), or None."""
    try:
        pointer = json.loads((version_dir(index_dir, version) / POINTER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("generation"), int) or "file" not in pointer:
        return None
    return pointer


def published_generation(index_dir: Path, version: int) -> int | None:
    """The generation of the published ANN file of ``version``, or None when none is published."""
    pointer = read_pointer(index_dir, version)
    return None if pointer is None else pointer["generation"]


def publish(index_dir: Path, version: int, generation: int, index: faiss.Index, kind: str) -> Path:
    """Writer only: publish ``index`` as ``version``'s ANN at ``generation``; returns the FAISS file's path.

    File first, then the pointer, then the clean-up of older files; a kill anywhere leaves the old
    pointer (and its file) or the new ones.
    """
    folder = version_dir(index_dir, version)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"ann-g{generation}.faiss"
    atomic_write(folder / name, lambda tmp: faiss.write_index(index, str(tmp)))
    pointer = {"generation": generation, "file": name, "kind": kind, "count": int(index.ntotal), "at": time.time()}
    atomic_write_text(folder / POINTER, json.dumps(pointer) + "\n")
    for old in folder.glob("ann-g*.faiss"):
        if old.name != name:
            old.unlink(missing_ok=True)  # a reader that has it open keeps its copy (POSIX)
    return folder / name


def load_published(index_dir: Path, version: int, *, attempts: int = 3) -> AnnView | None:
    """Reader: the published ANN of ``version`` as a view, or None when nothing (readable) is published."""
    for _ in range(attempts):
        pointer = read_pointer(index_dir, version)
        if pointer is None:
            return None
        path = version_dir(index_dir, version) / pointer["file"]
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            if path.exists():  # present but unreadable: damaged, not replaced under us
                return None
            continue  # replaced between the two reads: follow the new pointer
        return AnnView(version, pointer["generation"], index, published=True)
    return None


def drop_files(index_dir: Path, version: int) -> None:
    """Writer only: remove a dropped version's folder (ANN files, exported query towers)."""
    folder = version_dir(index_dir, version)
    if not folder.is_dir():
        return
    (folder / POINTER).unlink(missing_ok=True)  # readers stop finding it first
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    folder.rmdir()
