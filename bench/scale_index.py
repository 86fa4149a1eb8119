"""Past one machine, measured on one: the Ray engine's overhead, and the sharded IVF build against a one-shot one.

Two parts (``--part embed``, ``--part ivf``, or both):

* **embed**: the same folder of real files (Fashion-MNIST test images upscaled to 128 px, half JPEG half PNG,
  ``bench/index_throughput.py``'s) indexed into a fresh index by the local engine (thread decoders), by
  ``--engine ray`` on a Ray session of this machine's cores (started before the clock: a cluster is started
  once, not per run; one embedding actor per core by default, which then decode their own batches), then by
  the local engine again; img/s of each and the ratio Ray / mean local (target >= 0.8 on 2 cores). The Ray
  run's clock includes its actors' start (each imports torch and loads the model); its row also gives img/s
  with the session start counted.
* **ivf**: ``--vectors`` synthetic clustered unit vectors (default 1M) as ``--parts`` parts on disk: the
  one-shot build (``build_faiss_index(kind="ivf")``, the local path: train, add everything, write one file)
  against the sharded one (train on a seeded sample of parts, fill the parts in ``--workers`` processes,
  merge the lists on disk, write the index file), each phase timed; the two must hold the same ids in
  every list when built from the same quantizer (checked, not timed), except a vector that is a float32 tie
  between two centroids (score gap <= 1e-5): BLAS blocks a part's rows differently from all rows, so the
  last bit of a score may differ and such a vector may go to either list. The row counts them.

Usage: ``.venv/bin/python bench/scale_index.py [--part embed|ivf|all] [--model clip-small] [--images 10000]
[--vectors 1000000] [--dim 128] [--parts 4] [--no-record]``. ``--no-record`` prints the rows only (a try-out on
a small setting); otherwise rows go to bench/results/scale_index.json and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import record  # noqa: E402
from vitrina.index import ivf  # noqa: E402
from vitrina.index.ann import build_faiss_index  # noqa: E402

BENCHMARK = "scale_index"


def emit(row_name: str, row: dict, *, save: bool) -> None:
    print(row_name, row, flush=True)
    if save:
        record(BENCHMARK, row_name, row)


def bench_embed(args: argparse.Namespace) -> None:
    """Local engine, Ray engine, local engine again, on the same files, each into a fresh index."""
    import ray
    import torch

    from bench.index_throughput import make_folder  # imports torch: kept out of the IVF part's spawned workers
    from vitrina.checkpoint import load_encoder
    from vitrina.index.embed import index_folder
    from vitrina.index.ray_engine import index_with_ray

    encoder = load_encoder(args.model)
    folder = Path(args.folder) / str(args.images)
    make_folder(folder, args.images)
    common = dict(model_ref=args.model, batch_size=args.batch_size, progress=False, export_towers=False)
    work = Path(tempfile.mkdtemp(prefix="vitrina-bench-scale-"))
    try:
        local = []
        for run in range(2):
            if run == 1:
                start = time.perf_counter()
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
                ray_start_s = time.perf_counter() - start
                report = index_with_ray(
                    folder, encoder, work / "ray", actors=args.actors, decoders=args.decoders, **common
                )
                torch.set_num_threads(os.cpu_count() or 1)  # Ray's driver settings must not slow the local rerun
                ray.shutdown()
                assert report.embedded == args.images, report.summary()
                ray_report = report
            report = index_folder(folder, encoder, work / f"local-{run}", workers=args.workers, **common)
            assert report.embedded == args.images, report.summary()
            local.append(report.images_per_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shared = {
        "model": args.model,
        "images": args.images,
        "files": "Fashion-MNIST test, 128 px, half JPEG half PNG",
        "batch": args.batch_size,
        "cores": os.cpu_count(),
    }
    local_mean = sum(local) / len(local)
    emit(
        f"embed local ({args.model})",
        {**shared, "engine": f"local, {args.workers} decoder threads", "img/s": local_mean,
         "img/s spread": abs(local[0] - local[1]) / local_mean},
        save=args.record,
    )  # fmt: skip
    emit(
        f"embed ray ({args.model})",
        {
            **shared,
            "engine": f"ray, {args.actors} embedding actor(s) of 1 CPU, "
            + (
                f"{args.decoders} decoding actor(s)" if args.decoders else "decoding in the embedders if no CPU is left"
            ),
            "img/s": ray_report.images_per_s,
            "img/s with session start": args.images / (ray_report.seconds + ray_start_s),
            "ray / local": ray_report.images_per_s / local_mean,
        },
        save=args.record,
    )


def synthetic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around 256 random centres (embeddings cluster; uniform noise would not)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centres[rng.integers(0, 256, stop - start)] + 0.7 * rng.standard_normal((stop - start, dim))
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


TIE = 1e-5  # score gap under which two centroids are a float32 tie for a unit vector


def moved_ids(merged, reference, trained, ids: np.ndarray, vectors: np.ndarray) -> tuple[int, float]:
    """How many ids sit in another inverted list in ``merged`` than in ``reference``, and the largest gap
    between such a vector's scores against its two centroids (0.0 when none moved)."""
    import faiss

    def list_of(index) -> np.ndarray:
        where = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
        for k, members in enumerate(ivf.list_ids(index)):
            where[members] = k
        return where[ids]

    a, b = list_of(merged), list_of(reference)
    moved = np.nonzero(a != b)[0]
    if not len(moved):
        return 0, 0.0
    centroids = faiss.extract_index_ivf(trained).quantizer.reconstruct_n(0, faiss.extract_index_ivf(trained).nlist)
    x = vectors[moved]
    gaps = np.abs((x * centroids[a[moved]]).sum(1) - (x * centroids[b[moved]]).sum(1))
    return len(moved), float(gaps.max())


def bench_ivf(args: argparse.Namespace) -> None:
    """One-shot ``build_faiss_index(kind="ivf")`` against train-once, fill parts in parallel, merge on disk."""
    import faiss

    work = Path(tempfile.mkdtemp(prefix="vitrina-bench-ivf-"))
    try:
        vectors = synthetic(args.vectors, args.dim)
        ids = np.arange(1, args.vectors + 1, dtype=np.int64)
        bounds = np.linspace(0, args.vectors, args.parts + 1).astype(int)
        parts = [
            ivf.write_npy_part(work / f"part-{k}", ids[a:b], vectors[a:b])
            for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ]
        layout = ivf.ivf_layout(args.vectors, args.dim)

        start = time.perf_counter()
        one_shot = build_faiss_index(vectors, ids, "ivf")
        faiss.write_index(one_shot, str(work / "one-shot.faiss"))
        one_shot_s = time.perf_counter() - start
        del one_shot

        start = time.perf_counter()
        trained = ivf.train_ivf(ivf.training_sample(parts, layout), layout)
        train_s = time.perf_counter() - start
        filled = ivf.fill_parts(trained, parts, work / "filled", workers=args.workers)
        fill_s = time.perf_counter() - start - train_s
        merged = ivf.merge_on_disk(trained, [path for path, _, _ in filled], work / "merged.ivfdata")
        faiss.write_index(merged, str(work / "merged.faiss"))
        sharded_s = time.perf_counter() - start
        merge_s = sharded_s - train_s - fill_s

        reference = ivf.fill(trained, ids, vectors)  # the same quantizer, everything at once: the sameness check
        moved, gap = moved_ids(merged, reference, trained, ids, vectors)
        # A vector as close to two centroids as float32 can tell (gap ~1e-7) may go to either list, depending
        # on how BLAS blocks its batch (a part's rows vs all rows): that is a tie, not a difference.
        same = gap <= TIE
        assert same, f"the merged IVF differs from the one-shot fill: {moved} ids in other lists (gap {gap:.2e})"
        row = {
            "vectors": args.vectors,
            "dim": args.dim,
            "layout": layout.describe(),
            "training sample": layout.sample,
            "parts": args.parts,
            "workers": args.workers,
            "one-shot s": one_shot_s,
            "sharded s": sharded_s,
            "train s": train_s,
            "fill s": fill_s,
            "merge s": merge_s,
            "sharded / one-shot": sharded_s / one_shot_s,
            "data file MB": (work / "merged.ivfdata").stat().st_size / 1e6,
            "same lists": same,
            "ids in another list (float ties)": moved,
            "largest tie gap": gap,
        }
        emit(f"ivf build {args.vectors} x {args.dim}", row, save=args.record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["embed", "ivf", "all"], default="all")
    parser.add_argument("--model", default="clip-small", help="the demo-sized encoder (preset or checkpoint)")
    parser.add_argument("--images", type=int, default=10_000, help="Fashion-MNIST test has 10,000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="local decoder threads; IVF fill processes")
    parser.add_argument(
        "--actors", type=int, default=os.cpu_count() or 1, help="Ray embedding actors (default: one per core)"
    )
    parser.add_argument("--decoders", type=int, default=None, help="Ray decoding actors (default: the cores left)")
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "vitrina-bench-fmnist"))
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--no-record", dest="record", action="store_false", help="print the rows, record nothing")
    args = parser.parse_args()
    if args.part in ("embed", "all"):
        bench_embed(args)
    if args.part in ("ivf", "all"):
        bench_ivf(args)


if __name__ == "__main__":
    main()
