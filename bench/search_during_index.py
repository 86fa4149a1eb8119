"""Searches while the index grows: 4 HTTP clients query ``vitrina serve`` while a writer adds 20k vectors.

The index: ``--items`` (100k) synthetic unit vectors of width 256 written through ``IndexStore.upsert_batch``
as the indexer writes them (batches of 64, one transaction each), then published as the indexer
publishes (``IndexStore.publish_ann``; ``--index-kind``, default ``auto``, which is PQ at this size). The
model is a CLIP of the tiny preset's shape with a 256-d joint space, saved as a checkpoint: text queries
run its real text tower, so the server does all it does for a user.

Two phases of ``--seconds`` each, same clients and queries (``GET /api/search?q=…&k=10``):

* idle: nobody writes;
* during: a writer process adds ``--add`` (20k) more vectors at ``--rate`` vectors/s (an indexer's pace on
  this machine) and publishes the ANN file every ``--publish-every`` seconds and at the end; the server
  notices each publish and swaps it in on its background loader.

Reported: p50/p99 per phase, requests, errors, the number of swaps the server made (``/api/info``'s
generation moves), and whether the final count reached the server. Target: 0 errors, p99 during <= 2x idle.

Usage: ``.venv/bin/python bench/search_during_index.py [--items 100000] [--add 20000] [--seconds 30]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import record  # noqa: E402
from bench.serve_load import load, run_server, wait_healthy  # noqa: E402

BENCHMARK = "search_during_index"
DIM = 256
BATCH = 64
QUERIES = ["a red circle", "a photo of a dog", "something green -blue", "a small bird", "a cat face", "a beach"]


def make_model(folder: Path) -> tuple[Path, dict]:
    """A CLIP checkpoint of the tiny preset's shape with a 256-d joint space -> (path, encoder identity)."""
    import dataclasses

    from vitrina.checkpoint import load_encoder, save_model
    from vitrina.models.registry import build_from_config, preset_config

    config = dataclasses.replace(preset_config("clip-tiny"), embed_dim=DIM)
    save_model(build_from_config(config), folder / "model")
    return folder / "model", load_encoder(folder / "model").identity


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_vectors(index_dir: Path, start: int, n: int, seed: int, rate: float, publish_every: float) -> None:
    """Writer (its own process, under the writer lock): ``n`` items from number ``start``, batches of 64,
    paced at ``rate`` items/s (0: as fast as it can), publishing every ``publish_every`` s and at the end."""
    from vitrina.index.lock import WriterLock
    from vitrina.index.store import IndexStore, ItemRow

    rng = np.random.default_rng(seed)
    began = last_publish = time.monotonic()
    with WriterLock(index_dir), IndexStore.open(index_dir) as store:
        version = store.versions()[-1].id
        for offset in range(0, n, BATCH):
            size = min(BATCH, n - offset)
            numbers = range(start + offset, start + offset + size)
            rows = [ItemRow(f"synthetic/{number:07d}.jpg", f"h{number}", 1, 0.0) for number in numbers]
            store.upsert_batch(rows, unit_vectors(rng, size), version=version)
            if rate > 0:  # keep an indexer's pace: sleep until this batch is due
                time.sleep(max(0.0, began + (offset + size) / rate - time.monotonic()))
            if publish_every > 0 and time.monotonic() - last_publish >= publish_every and store.active_version():
                store.publish_ann(version)
                last_publish = time.monotonic()
        store.publish_ann(version)


def build_index(folder: Path, items: int, kind: str) -> tuple[Path, str]:
    """The starting index: ``items`` synthetic vectors, one ready, active version -> (index dir, model ref)."""
    from vitrina.index.store import IndexStore

    model, identity = make_model(folder)
    index_dir = folder / "index"
    (folder / "photos").mkdir()
    with IndexStore.create(index_dir, root=folder / "photos") as store:
        version = store.add_version(identity=identity, model_ref=str(model), index_kind=kind, preprocess={}).id
    write_vectors(index_dir, 0, items, seed=0, rate=0, publish_every=0)
    with IndexStore.open(index_dir) as store:
        store.mark_ready(version)
        store.activate(version)
    return index_dir, str(model)


def info(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=10).json()


def watch(port: int, stop: threading.Event, generations: list[int]) -> None:
    """Poll ``/api/info`` twice a second, noting the served generation (each change is a swap)."""
    while not stop.wait(0.5):
        generations.append(info(port)["generation"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--add", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=None, help="writer items/s (default: --add over --seconds)")
    parser.add_argument("--publish-every", type=float, default=5.0, help="writer publishes this often (s)")
    parser.add_argument("--index-kind", default="auto")
    args = parser.parse_args()
    rate = args.rate or args.add / (0.8 * args.seconds)  # done within the phase, the last publish included

    with tempfile.TemporaryDirectory(prefix="vitrina-search-during-index-") as tmp:
        started = time.perf_counter()
        index_dir, _ = build_index(Path(tmp), args.items, args.index_kind)
        print(f"index of {args.items} vectors built in {time.perf_counter() - started:.1f}s")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        spawn = multiprocessing.get_context("spawn")
        server = spawn.Process(target=run_server, args=(str(index_dir), port))
        server.start()
        rows, failed = {}, False
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server)
            load(port, QUERIES, 1, 2.0)  # warm-up
            before = info(port)
            for phase in ("idle", "during"):
                writer = None
                if phase == "during":
                    writer = spawn.Process(
                        target=write_vectors,
                        args=(index_dir, args.items, args.add, 1, rate, args.publish_every),
                    )
                    writer.start()
                generations: list[int] = []
                stop = threading.Event()
                watcher = threading.Thread(target=watch, args=(port, stop, generations))
                watcher.start()
                latencies, errors, elapsed = load(port, QUERIES, args.clients, args.seconds)
                if writer is not None:
                    writer.join(timeout=600)
                    time.sleep(2.0)  # the server's loader polls twice a second
                stop.set()
                watcher.join()
                after = info(port)
                ms = np.asarray(latencies) * 1e3
                rows[phase] = {
                    "requests": len(latencies),
                    "errors": errors,
                    "qps": len(latencies) / elapsed,
                    "p50_ms": float(np.percentile(ms, 50)),
                    "p99_ms": float(np.percentile(ms, 99)),
                    "swaps_seen": len(set(generations + [after["generation"]]) - {before["generation"]}),
                    "count_after": after["count"],
                }
                before = after
                print(
                    f"{phase:>6}: {rows[phase]['qps']:.1f} req/s, p50 {rows[phase]['p50_ms']:.1f} ms, "
                    f"p99 {rows[phase]['p99_ms']:.1f} ms, {errors} errors / {len(latencies)}, "
                    f"{rows[phase]['swaps_seen']} swaps, {after['count']} items served"
                )
                failed = failed or errors > 0
        finally:
            server.terminate()
            server.join(timeout=10)
    idle, during = rows["idle"], rows["during"]
    row = {
        "items": args.items,
        "added": args.add,
        "clients": args.clients,
        "writer_rate": round(rate, 1),
        "publish_every_s": args.publish_every,
        "idle_p50_ms": idle["p50_ms"],
        "idle_p99_ms": idle["p99_ms"],
        "during_p50_ms": during["p50_ms"],
        "during_p99_ms": during["p99_ms"],
        "p99_ratio": during["p99_ms"] / idle["p99_ms"],
        "idle_requests": idle["requests"],
        "during_requests": during["requests"],
        "errors": idle["errors"] + during["errors"],
        "swaps": during["swaps_seen"],
        "served_count_after": during["count_after"],
    }
    print(f"p99 during / idle = {row['p99_ratio']:.2f} (target <= 2), errors {row['errors']} (target 0)")
    record(BENCHMARK, f"{args.items} + {args.add} vectors · {DIM}-d · {args.index_kind} · {args.clients} clients", row)
    ok = not failed and row["served_count_after"] == args.items + args.add
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
