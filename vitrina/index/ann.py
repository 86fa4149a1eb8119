"""The ANN files of an index: FAISS views of one version's vectors, built by the writer, loaded by readers.

Per version, ``versions/<N>/`` holds:

* ``ann-g<G>.faiss``: a plain FAISS file of the version's vectors as of generation ``G`` (FAISS ids
  are item ids);
* ``ann-g<G>.ivfdata``: for an IVF built on disk (``vitrina.index.ivf``: past ``ONDISK_MIN`` vectors), its
  inverted lists; ``ann-g<G>.faiss`` then holds the coarse quantizer and names this file;
* ``ann.json``: the pointer ``{"generation": G, "file": "ann-g<G>.faiss", "kind": ..., "count": n}``, plus
  ``"data": "ann-g<G>.ivfdata"`` when there is a data file;
* ``towers/``: the version's query towers for the light runtime (``vitrina.runtime.towers``).

Publishing writes the data file (if any) and the FAISS file under their new names, then swaps the
pointer (all atomically, see ``vitrina.atomic``), then deletes older files. A reader reads the pointer,
then the files it names (a data file memory-mapped read-only); if the writer deleted one in between, the
reader reads the pointer again. So a reader never sees a half-written file and never writes anything;
only the indexer builds.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vitrina.atomic import atomic_write, atomic_write_text, fsync_dir
from vitrina.errors import UserError
from vitrina.index import ivf

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
IVF_NPROBE_FRACTION = ivf.NPROBE_FRACTION
# From this many vectors on, kind "ivf" is built part by part and published on disk (two files, the lists
# memory-mapped by readers); below it, one in-memory file as the other kinds. From ivf.IVF_PQ_MIN on,
# "auto" picks "ivf" (IVF-PQ codes on disk): "pq" keeps every float32 vector in RAM for its re-ranking.
ONDISK_MIN = 1_000_000


def choose_index_kind(n: int, kind: str = "auto") -> str:
    """Resolve ``auto`` to ``flat``, ``pq`` or (from ``ivf.IVF_PQ_MIN`` on) ``ivf`` by collection size;
    pass explicit kinds through."""
    if kind not in INDEX_KINDS:
        raise UserError(f"index kind {kind!r} is unknown; use one of {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n < FLAT_MAX else "pq" if n < ivf.IVF_PQ_MIN else "ivf"


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
        # The one-part case of vitrina.index.ivf: the same layout, sample and training; the vectors are
        # added behind the id map here (one file, in memory), into the lists themselves on disk.
        layout = ivf.ivf_layout(n, dim)
        inner = ivf.train_ivf(ivf.sample_rows(vectors, layout.sample), layout)
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


def publish(
    index_dir: Path, version: int, generation: int, index: faiss.Index, kind: str, *, data_file: Path | None = None
) -> Path:
    """Writer only: publish ``index`` as ``version``'s ANN at ``generation``; returns the FAISS file's path.

    ``data_file``: the complete inverted lists of an on-disk IVF (``ann-g<G>.ivfdata``, the name the index
    holds), fsynced and renamed into the version's folder first. Then the FAISS file, then the pointer,
    then the clean-up of older files; a kill anywhere leaves the old pointer (and its files) or the new ones.
    """
    folder = version_dir(index_dir, version)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"ann-g{generation}.faiss"
    pointer = {"generation": generation, "file": name, "kind": kind, "count": int(index.ntotal), "at": time.time()}
    if data_file is not None:
        data_file = Path(data_file)
        with open(data_file, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(data_file, folder / data_file.name)
        fsync_dir(folder)
        inner = faiss.downcast_index(faiss.extract_index_ivf(index))
        codes = f"PQ{inner.pq.M}" if isinstance(inner, faiss.IndexIVFPQ) else "Flat"
        pointer.update(data=data_file.name, layout=f"IVF{inner.nlist},{codes}")
    atomic_write(folder / name, lambda tmp: faiss.write_index(index, str(tmp)))
    atomic_write_text(folder / POINTER, json.dumps(pointer) + "\n")
    keep = {name, pointer.get("data")}
    for old in [*folder.glob("ann-g*.faiss"), *folder.glob("ann-g*.ivfdata")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)  # a reader that has it open (or mapped) keeps its copy (POSIX)
    return folder / name


def publish_ivf_on_disk(
    index_dir: Path,
    version: int,
    generation: int,
    trained: faiss.IndexIVF,
    parts: Sequence[ivf.Part],
    *,
    workers: int = 2,
) -> Path:
    """Writer only: fill ``trained`` with ``parts`` in parallel, merge on disk, publish as kind ``ivf``.

    Built in a temporary folder inside the version's folder (so the data file is renamed, not copied, into
    place); a kill leaves that folder, which the next publish of the version removes.
    """
    folder = version_dir(index_dir, version)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-g{generation}-", dir=folder))
    try:
        with _quiet_stdout():  # FAISS prints each resize of the data file
            index, data = ivf.build_on_disk(trained, parts, work, f"ann-g{generation}.ivfdata", workers=workers)
        return publish(index_dir, version, generation, index, "ivf", data_file=data)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _quiet_stdout:
    """Send C-level stdout (FAISS' printf) to /dev/null for a moment: a writer's stdout is its report."""

    def __enter__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None)
        self._libc.fflush(None)
        self._saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    def __exit__(self, *exc: object) -> None:
        self._libc.fflush(None)
        os.dup2(self._saved, 1)
        os.close(self._saved)


def read_ivf_on_disk(index_file: Path, data_file: Path) -> faiss.Index:
    """Reader: an IVF whose lists are in ``data_file``, memory-mapped read-only; never writes.

    The index file names its data file by base name (the last field of FAISS' on-disk lists); it is
    replaced by ``data_file``'s absolute path before FAISS opens it, so the folder may have moved and
    nothing is printed (FAISS' ``IO_FLAG_ONDISK_SAME_DIR`` does the same, with a printf).
    """
    raw = Path(index_file).read_bytes()
    name = Path(data_file).name.encode()
    stored = struct.pack("<Q", len(name)) + name
    if len(raw) < len(stored) + 8 or raw[-8 - len(stored) : -8] != stored:
        raise RuntimeError(f"{index_file}: does not name {Path(data_file).name} as its inverted lists")
    if not Path(data_file).is_file():
        raise RuntimeError(f"{data_file}: missing")
    target = str(Path(data_file).resolve()).encode()
    patched = raw[: -8 - len(stored)] + struct.pack("<Q", len(target)) + target + raw[-8:]
    return faiss.deserialize_index(np.frombuffer(patched, dtype=np.uint8))


def load_published(index_dir: Path, version: int, *, attempts: int = 3) -> AnnView | None:
    """Reader: the published ANN of ``version`` as a view, or None when nothing (readable) is published."""
    for _ in range(attempts):
        pointer = read_pointer(index_dir, version)
        if pointer is None:
            return None
        folder = version_dir(index_dir, version)
        path = folder / pointer["file"]
        data = folder / pointer["data"] if isinstance(pointer.get("data"), str) else None
        try:
            index = faiss.read_index(str(path)) if data is None else read_ivf_on_disk(path, data)
        except RuntimeError:
            if path.exists() and (data is None or data.exists()):  # present but unreadable: damaged
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
