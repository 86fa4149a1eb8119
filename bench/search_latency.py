"""Single-query search latency and ANN recall on random unit vectors (the index's own FAISS builder).

For each size N: N database vectors and 1,000 query vectors, all i.i.d. random unit vectors of
width 512 (seeded). Random queries on random data are the hard case for any ANN: there is no
cluster structure, and the 10 nearest neighbours are barely nearer than the 1,000th.

* exact: ``IndexFlatIP``, one query at a time (over the first 200 queries: it is slow at 1M);
* ANN: the kind that ``index_kind="auto"`` picks at N, built by ``vitrina.index.store.build_faiss_index``
  exactly as an index would be, one query at a time; recall@10 against the exact top 10.

Usage: ``.venv/bin/python bench/search_latency.py [--sizes 100000 1000000] [--threads 2] [--hnsw]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import record  # noqa: E402
from vitrina.index import store as store_module  # noqa: E402
from vitrina.index.store import build_faiss_index, choose_index_kind  # noqa: E402

DIM = 512
K = 10


def random_unit(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, DIM) float32 unit vectors, uniform on the sphere."""
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def rss_mib() -> float:
    """Resident memory of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def single_query_latencies(index: faiss.Index, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Search one query at a time: (Q,) latencies in ms and (Q, K) ids."""
    latencies, ids = [], []
    for q in queries:
        start = time.perf_counter()
        _, found = index.search(q[None, :], K)
        latencies.append((time.perf_counter() - start) * 1e3)
        ids.append(found[0])
    return np.asarray(latencies), np.asarray(ids)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top 10 present in the ANN's top 10."""
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def ann_params(index: faiss.Index) -> str:
    """A short description of the ANN's parameters, read back from the built index."""
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    if isinstance(inner, faiss.IndexRefine):
        base = faiss.downcast_index(inner.base_index)
        return f"PQ{base.M}x{base.nbits} fast-scan + exact re-rank of k*{int(inner.k_factor)}"
    if isinstance(inner, faiss.IndexHNSW):
        return f"HNSW M={store_module.HNSW_M} efC={inner.hnsw.efConstruction} efSearch={inner.hnsw.efSearch}"
    if isinstance(inner, faiss.IndexIVF):
        return f"IVF nlist={inner.nlist} nprobe={inner.nprobe}"
    return type(inner).__name__


def run(n: int, n_queries: int, kind: str, *, threads: int, search_threads: int, row_suffix: str = "") -> None:
    rng = np.random.default_rng(n)
    data = random_unit(n, rng)
    queries = random_unit(n_queries, rng)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(data)
    faiss.omp_set_num_threads(threads)
    _, truth = exact.search(queries, K)  # batched, all threads: ground truth
    faiss.omp_set_num_threads(search_threads)
    exact_ms, _ = single_query_latencies(exact, queries[:200])
    del exact

    kind = choose_index_kind(n, kind)
    before = rss_mib()
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index = build_faiss_index(data, np.arange(n), kind)
    build_s = time.perf_counter() - start
    index_mib = rss_mib() - before
    faiss.omp_set_num_threads(search_threads)
    ann_ms, found = single_query_latencies(index, queries)
    row = {
        "N": n,
        "dim": DIM,
        "queries": f"{n_queries} random unit vectors",
        "exact p50 ms": float(np.percentile(exact_ms, 50)),
        "exact p99 ms": float(np.percentile(exact_ms, 99)),
        "ann": kind,
        "ann params": ann_params(index),
        "ann build s": build_s,
        "ann memory MiB": index_mib,
        "ann p50 ms": float(np.percentile(ann_ms, 50)),
        "ann p99 ms": float(np.percentile(ann_ms, 99)),
        "recall@10": recall_at_10(found, truth),
        "build threads": threads,
        "search threads": search_threads,
    }
    print(row, flush=True)
    record("search_latency", f"{n // 1000}k {kind}{row_suffix}", row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads for builds and ground truth")
    parser.add_argument(
        "--search-threads",
        type=int,
        default=1,
        help="FAISS threads per single query (1: a server answers concurrent queries on the other cores)",
    )
    parser.add_argument("--hnsw", action="store_true", help="also measure HNSW at each size, for comparison")
    args = parser.parse_args()
    threads = {"threads": args.threads, "search_threads": args.search_threads}
    for n in args.sizes:
        run(n, args.queries, "auto", **threads)
        if args.hnsw:
            store_module.HNSW_EF_SEARCH = 512
            run(n, args.queries, "hnsw", row_suffix=" (comparison, efSearch 512)", **threads)


if __name__ == "__main__":
    main()
