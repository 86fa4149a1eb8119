"""The IVF index at scale: trained once on a seeded sample, filled part by part in parallel, merged on disk.

One build, whatever the size (``build_faiss_index(kind="ivf")`` is the one-part, in-memory case):

1. ``ivf_layout(n, dim)`` fixes the number of inverted lists, the codes (exact float32 vectors, or PQ
   codes from ``IVF_PQ_MIN`` vectors on) and the training sample size;
2. ``training_sample`` draws that sample from a seeded choice of parts (never the whole collection) and
   ``train_ivf`` runs k-means (and the PQ training) on it, once;
3. ``fill_parts`` gives every part an empty copy of the trained index to fill with its own vectors and
   item ids (the ids live in the inverted lists), in separate processes;
4. ``merge_on_disk`` concatenates the parts' inverted lists, list by list, into one ``.ivfdata`` file
   (FAISS ``OnDiskInvertedLists``, as ``faiss.contrib.ondisk.merge_ondisk``) behind a small index file
   that holds the coarse quantizer and names the data file; readers memory-map it read-only.

Memory arithmetic, at width d (float32), n vectors, nlist = min(4 sqrt(n), n / 39, 65,536) lists:

* **inverted lists** (on disk, memory-mapped; the OS pages in what searches touch): per vector, the code
  plus an 8-byte item id: 4d + 8 bytes for exact IVF (2,056 B at d = 512: 20.6 GB for 10M vectors), and
  d/8 + 8 bytes for IVF-PQ from 10M on (64-byte PQ codes of 8-dim pieces at d = 512: 72 B per vector,
  72 GB for 1B vectors); plus, per list, ~24 bytes of offsets and sizes;
* **coarse quantizer** (in RAM in every reader): nlist x d x 4 bytes: 128 MiB at 65,536 lists, d = 512;
  IVF-PQ adds its codebooks, 256 x d x 4 bytes (512 KiB);
* **training** (once, in the writer): min(n, 256 nlist, 39 x 65,536 = 2.56M) vectors x 4d bytes:
  5.2 GB at d = 512 for the largest layout, k-means over it is the one long step of a build;
* **filling** (per worker process): one part, ``PART_ROWS`` vectors x (4d + code + 8) bytes at once
  (2.1 GB for 500k vectors at d = 512 exact), so ``workers`` processes need ``workers`` x that.

Nothing here knows about SQLite or shards: a part is anything with ``load() -> (ids, vectors)``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

IVF_PQ_MIN = 10_000_000  # from this many vectors on, the lists hold PQ codes instead of float32 vectors
NLIST_MAX = 65_536
POINTS_PER_LIST = 256  # FAISS' k-means uses at most 256 training points per centroid
MIN_POINTS_PER_LIST = 39  # ...and warns below 39
TRAIN_MAX = MIN_POINTS_PER_LIST * NLIST_MAX
PQ_DIMS_PER_CODE = 8  # one 8-bit PQ code per 8 dims: d/8 bytes per vector
PQ_TRAIN_MIN = 256 * MIN_POINTS_PER_LIST  # 256 centroids per PQ sub-quantizer
NPROBE_FRACTION = 1 / 16  # lists searched per query, as a fraction of nlist
PART_ROWS = 500_000  # vectors per part when a version is split for a parallel fill
SAMPLE_PARTS_MIN = 8  # draw the training sample from at least this many parts (spread over the collection)
SAMPLE_OVERDRAW = 4  # ...holding at least this many times the sample size, so rows are picked, not all taken


class Part(Protocol):
    """A slice of one version's vectors: its size, and a way to load it in any process."""

    rows: int

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(n,) int64 item ids and (n, D) float32 unit vectors."""
        ...


@dataclass(frozen=True)
class NpyPart:
    """A part stored as ``<stem>.ids.npy`` + ``<stem>.vectors.npy`` (benchmarks and tests; memory-mapped)."""

    stem: str
    rows: int

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.load(f"{self.stem}.ids.npy", mmap_mode="r")
        vectors = np.load(f"{self.stem}.vectors.npy", mmap_mode="r")
        return np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(vectors, dtype=np.float32)


def write_npy_part(stem: str | os.PathLike, ids: np.ndarray, vectors: np.ndarray) -> NpyPart:
    """Save ``ids`` and ``vectors`` as an ``NpyPart``."""
    np.save(f"{stem}.ids.npy", np.asarray(ids, dtype=np.int64))
    np.save(f"{stem}.vectors.npy", np.asarray(vectors, dtype=np.float32))
    return NpyPart(str(stem), len(ids))


@dataclass(frozen=True)
class IvfLayout:
    """How an IVF of ``n`` vectors of width ``dim`` is laid out (see the module docstring for the bytes)."""

    n: int
    dim: int
    nlist: int
    pq_m: int  # PQ sub-quantizers (bytes per code); 0: the lists hold exact float32 vectors
    sample: int  # training vectors

    @property
    def code_bytes(self) -> int:
        """Bytes of one vector's code in the inverted lists."""
        return self.pq_m or 4 * self.dim

    @property
    def list_bytes_per_vector(self) -> int:
        """Code + 8-byte item id."""
        return self.code_bytes + 8

    @property
    def nprobe(self) -> int:
        """Lists a query visits by default."""
        return max(1, int(self.nlist * NPROBE_FRACTION))

    def describe(self) -> str:
        """The FAISS factory string: ``IVF1024,Flat`` or ``IVF65536,PQ64``."""
        return f"IVF{self.nlist},{f'PQ{self.pq_m}' if self.pq_m else 'Flat'}"

    def memory(self) -> dict[str, int]:
        """Bytes: inverted lists (on disk), coarse quantizer (RAM per reader), training sample (writer)."""
        return {
            "lists": self.n * self.list_bytes_per_vector + 24 * self.nlist,
            "quantizer": self.nlist * self.dim * 4 + (256 * self.dim * 4 if self.pq_m else 0),
            "training": self.sample * self.dim * 4,
        }


def pq_subquantizers(dim: int) -> int:
    """d/8 sub-quantizers (8-dim pieces, one byte each), or the nearest coarser split that divides ``dim``."""
    return next(m for m in range(max(1, dim // PQ_DIMS_PER_CODE), 0, -1) if dim % m == 0)


def ivf_layout(n: int, dim: int, *, pq: bool | None = None) -> IvfLayout:
    """The layout for ``n`` vectors: ~4 sqrt(n) lists with >= 39 points each (at most 65,536); PQ codes
    from ``IVF_PQ_MIN`` on (``pq`` overrides); a sample of <= 256 points per list, <= ``TRAIN_MAX``."""
    nlist = max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST or 1, NLIST_MAX))
    use_pq = n >= IVF_PQ_MIN if pq is None else pq
    pq_m = pq_subquantizers(dim) if use_pq else 0
    sample = min(n, POINTS_PER_LIST * nlist, TRAIN_MAX)
    if pq_m:
        sample = min(n, max(sample, PQ_TRAIN_MIN))
    return IvfLayout(n=n, dim=dim, nlist=nlist, pq_m=pq_m, sample=sample)


def train_ivf(sample: np.ndarray, layout: IvfLayout) -> faiss.IndexIVF:
    """An empty inner-product IVF (exact or PQ codes) with its coarse quantizer trained on ``sample``."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    quantizer = faiss.IndexFlatIP(layout.dim)
    if layout.pq_m:
        index = faiss.IndexIVFPQ(quantizer, layout.dim, layout.nlist, layout.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, layout.dim, layout.nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    index.nprobe = layout.nprobe
    return faiss.clone_index(index)  # one self-contained object (owns its quantizer)


def sample_rows(vectors: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """``size`` rows of ``vectors`` picked by a seeded draw, in their original order (all when fewer)."""
    if size >= len(vectors):
        return np.asarray(vectors)
    pick = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return np.asarray(vectors[pick])


def training_sample(parts: Sequence[Part], layout: IvfLayout, *, seed: int = 0) -> np.ndarray:
    """``layout.sample`` vectors from a seeded choice of parts (one part in memory at a time).

    Parts are taken in a seeded random order until they hold ``SAMPLE_OVERDRAW`` times the sample and
    number at least ``SAMPLE_PARTS_MIN`` (parts follow the collection's order, so a few of them could be
    a few classes only); each chosen part gives rows in proportion to its size.
    """
    rng = np.random.default_rng(seed)
    total = sum(p.rows for p in parts)
    chosen, held = [], 0
    for k in rng.permutation(len(parts)):
        chosen.append(int(k))
        held += parts[k].rows
        if held >= min(total, SAMPLE_OVERDRAW * layout.sample) and len(chosen) >= min(len(parts), SAMPLE_PARTS_MIN):
            break
    want = min(layout.sample, held)
    quotas = _quotas([parts[k].rows for k in sorted(chosen)], want)
    pieces = []
    for k, quota in zip(sorted(chosen), quotas, strict=True):
        if quota:
            _, vectors = parts[k].load()
            pieces.append(sample_rows(vectors, quota, seed=int(rng.integers(2**31))))
    return np.concatenate(pieces) if pieces else np.empty((0, layout.dim), dtype=np.float32)


def _quotas(sizes: list[int], want: int) -> list[int]:
    """Split ``want`` over parts of ``sizes`` in proportion (largest remainders), never above a part's size."""
    held = sum(sizes)
    if held == 0:
        return [0] * len(sizes)
    exact = [want * s / held for s in sizes]
    quotas = [min(s, int(e)) for s, e in zip(sizes, exact, strict=True)]
    for k in sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True):
        if sum(quotas) >= want:
            break
        if quotas[k] < sizes[k]:
            quotas[k] += 1
    return quotas


def fill(trained: faiss.IndexIVF, ids: np.ndarray, vectors: np.ndarray) -> faiss.IndexIVF:
    """A copy of the empty ``trained`` IVF holding ``vectors`` under their item ``ids`` (in the lists)."""
    index = faiss.clone_index(trained)
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def _fill_to_file(trained_bytes: np.ndarray, part: Part, out: str, threads: int) -> tuple[str, int, int]:
    """Worker: fill an empty copy of the trained index with ``part`` and write it to ``out``."""
    faiss.omp_set_num_threads(threads)
    trained = faiss.deserialize_index(trained_bytes)
    ids, vectors = part.load()
    faiss.write_index(fill(trained, ids, vectors), out)
    return out, len(ids), os.getpid()


def fill_parts(
    trained: faiss.IndexIVF, parts: Sequence[Part], folder: Path, *, workers: int = 2
) -> list[tuple[Path, int, int]]:
    """Fill one copy of ``trained`` per part, ``workers`` processes at a time; [(file, rows, pid)] in part order.

    One worker (or one part) fills in this process. Processes are spawned, not forked: the indexer has
    PyTorch's threads running, which a fork would copy in a broken state.
    """
    folder.mkdir(parents=True, exist_ok=True)
    outs = [str(folder / f"part-{k:05d}.faiss") for k in range(len(parts))]
    cores = os.cpu_count() or 1
    trained_bytes = faiss.serialize_index(trained)
    if workers <= 1 or len(parts) <= 1:
        return [
            (Path(o), n, pid)
            for o, n, pid in (_fill_to_file(trained_bytes, p, o, cores) for p, o in zip(parts, outs, strict=True))
        ]
    workers = min(workers, len(parts))
    threads = max(1, cores // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        done = pool.map(_fill_to_file, [trained_bytes] * len(parts), parts, outs, [threads] * len(parts))
        return [(Path(o), n, pid) for o, n, pid in done]


def merge_on_disk(trained: faiss.IndexIVF, filled: Sequence[Path], data_file: Path) -> faiss.IndexIVF:
    """One IVF whose inverted lists are ``filled``'s, concatenated list by list into ``data_file``.

    ``faiss.contrib.ondisk.merge_ondisk`` without its leak: the parts are memory-mapped while merged and
    released after. The index names its data file by base name only; readers open it with
    ``faiss.IO_FLAG_ONDISK_SAME_DIR`` (read-only, beside the index file), so the folder may move.
    """
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    assert index.ntotal == 0, "merge into an empty trained index"
    loaded = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in filled]
    lists = faiss.InvertedListsPtrVector()
    for part in loaded:
        lists.push_back(faiss.extract_index_ivf(part).invlists)
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_file))
    ntotal = invlists.merge_from_multiple(lists.data(), lists.size(), False)
    del lists, loaded  # unmaps the parts
    invlists.filename = Path(data_file).name
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()  # the index owns it now
    return index


def build_on_disk(
    trained: faiss.IndexIVF, parts: Sequence[Part], work: Path, data_name: str, *, workers: int = 2
) -> tuple[faiss.IndexIVF, Path]:
    """Fill ``parts`` in parallel and merge them into ``work/data_name``; returns (index, data file).

    The filled part files are deleted once merged; the data file stays in ``work`` for the caller to
    publish (``vitrina.index.ann.publish``).
    """
    parts_dir = Path(tempfile.mkdtemp(prefix="parts-", dir=work))
    try:
        filled = fill_parts(trained, parts, parts_dir, workers=workers)
        data_file = work / data_name
        index = merge_on_disk(trained, [path for path, _, _ in filled], data_file)
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
    return index, data_file


def list_ids(index: faiss.Index) -> list[np.ndarray]:
    """The sorted item ids in each inverted list of an IVF (through an ``IndexIDMap`` when wrapped)."""
    outer = faiss.downcast_index(index)
    id_map = faiss.vector_to_array(outer.id_map) if hasattr(outer, "id_map") else None
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    out = []
    for k in range(ivf.nlist):
        size = invlists.list_size(k)
        ids = faiss.rev_swig_ptr(invlists.get_ids(k), size).copy() if size else np.empty(0, dtype=np.int64)
        out.append(np.sort(id_map[ids] if id_map is not None else ids))
    return out


def empty_from_file(index_file: str | os.PathLike) -> faiss.IndexIVF:
    """The empty, trained IVF of an index file (quantizer and codes, no lists): works for an on-disk IVF,
    whose lists cannot be cloned; its data file is not opened."""
    index = faiss.read_index(str(index_file), faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    index.ntotal = ivf.ntotal = 0
    return faiss.clone_index(index)
