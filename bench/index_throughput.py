"""End-to-end indexing throughput vs pure-model throughput: is image decoding the bottleneck?

Builds a folder of real files from the Fashion-MNIST test set (upscaled to 128 px, half JPEG and
half PNG, one sub-folder per class), then measures with the demo-sized encoder and one batch size:

* model: ``encode_image`` on pre-decoded, pre-transformed tensors (the ceiling): the same encoder object
  (fp32, as the indexer runs it), the same batch size, the same threads;
* end to end: ``index_folder`` into a fresh index (scan, read once and hash, decode with JPEG draft
  scaling, transform, encode, SQLite commits, FAISS publish; not the query towers' export), with worker
  processes, a thread pool, and the main thread (the default on 2 CPUs) as decoders.

The ratio end-to-end / model should be >= 0.9 (issue 11). The model is timed right before and after each
end-to-end run and the two averaged, because this 2-core machine is shared and noisy; every decoder setting
runs ``--rounds`` times, the settings in turn, and the median round is the row. The row also carries the
decode step's own cost (ms per image, one thread) and the ratio it allows a decoder that takes turns with
the model. The protocol, in full: bench/notes/index_throughput.md.

Usage:
    .venv/bin/python bench/index_throughput.py [--model clip-small] [--images 2000] [--batch-size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import record  # noqa: E402
from vitrina.checkpoint import load_encoder  # noqa: E402
from vitrina.data.fashion_mnist import FASHION_MNIST_PROMPT_NAMES, load_fashion_mnist  # noqa: E402
from vitrina.data.images import load_image  # noqa: E402
from vitrina.heap import keep_freed_memory  # noqa: E402
from vitrina.index.decode import Decoding, Job  # noqa: E402
from vitrina.index.embed import index_folder  # noqa: E402

SIDE = 128


def make_folder(root: Path, n: int) -> list[Path]:
    """Write ``n`` Fashion-MNIST test images as 128 px JPEG/PNG files in class folders (kept between runs)."""
    images, labels = load_fashion_mnist("test")
    paths = []
    for i in range(n):
        suffix = ".jpg" if i % 2 else ".png"
        path = root / FASHION_MNIST_PROMPT_NAMES[labels[i]] / f"{i:05d}{suffix}"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(images[i]).convert("RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        picture.save(path, quality=90)
    return paths


def model_throughput(encoder, pixels: torch.Tensor, batch_size: int) -> float:
    """Images/s of ``encode_image`` alone over pre-decoded (N, 3, H, W) pixels."""
    encoder.encode_image(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        encoder.encode_image(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - start)


def replica_model_throughput(encoder, pixels: torch.Tensor, batch_size: int, workers: int) -> float:
    """Images/s of ``encode_image`` alone in ``workers`` forked processes of one torch thread each (what
    ``--decoder replica`` runs), over the same pre-decoded pixels: the ceiling of that setting."""
    chunks = list(torch.split(pixels, batch_size))
    loader = torch.utils.data.DataLoader(
        chunks,
        batch_size=None,  # each item is a whole batch already
        num_workers=workers,
        collate_fn=lambda chunk: encoder.encode_image(chunk)[:0],  # only the time travels back
        multiprocessing_context="fork",
    )
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(pixels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clip-small", help="the demo-sized encoder (preset or checkpoint)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each decoder setting (the median is kept)")
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "vitrina-bench-fmnist"))
    args = parser.parse_args()
    # as every vitrina command that runs a model (bench/heap.py measures what it buys in a fresh process)
    heap = "kept freed memory" if keep_freed_memory() else "glibc default"

    encoder = load_encoder(args.model)
    folder = Path(args.folder) / str(args.images)
    paths = make_folder(folder, args.images)
    pixels = torch.stack([encoder.image_transform(load_image(p)) for p in paths])  # (N, 3, H, W)

    decode_ms = decode_cost(paths, encoder.image_transform)
    settings = [("replica", args.workers), ("process", args.workers), ("thread", args.workers), ("thread", 0)]
    runs: dict[tuple[str, int], list[tuple]] = {setting: [] for setting in settings}
    # Rounds of every setting in turn: the machine is shared and drifts by tens of percent over minutes, so
    # each setting is measured several times, spread over the run, and the median round is reported.
    for _ in range(args.rounds):
        for decoder, workers in settings:
            runs[decoder, workers].append(measure(encoder, pixels, folder, args, decoder, workers))
    for (decoder, workers), rounds in runs.items():
        ratios = [e2e / model for model, _, e2e, _ in rounds]
        middle = sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2]  # the median round
        model, spread, e2e, replica_model = rounds[middle]
        row = {
            "model": args.model,
            "image px": "x".join(map(str, pixels.shape[-2:])),
            "images": args.images,
            "files": "Fashion-MNIST test, 128 px, half JPEG half PNG",
            "batch": args.batch_size,
            "decoders": f"{workers} {decoder}" + ("es" if decoder == "process" else "s") if workers else "main thread",
            "model img/s": model,
            "model img/s spread": spread,
            "end-to-end img/s": e2e,
            "ratio": ratios[middle],
            "rounds": len(rounds),
            "ratio per round": [round(r, 3) for r in ratios],
            "decode ms/img": decode_ms,
            # what a decoder that takes turns with the model can keep at most: model time / (model + decode)
            "serial bound": 1 / (1 + decode_ms / 1000 * model),
            "torch threads": torch.get_num_threads(),
            "heap": heap,
        }
        if replica_model is not None:  # the model alone as this setting runs it: the ratio's other reading
            row["replica model img/s"] = replica_model
            row["ratio to replica model"] = e2e / replica_model
        print(row, flush=True)
        record("index_throughput", f"{args.model} {decoder} x{workers}" if workers else f"{args.model} serial", row)


def measure(encoder, pixels, folder: Path, args, decoder: str, workers: int) -> tuple:
    """(model img/s, its spread, end-to-end img/s, the replicas' model img/s or None) of one ``index_folder``
    run into a fresh index."""
    # The model is timed right before and right after the end-to-end run: only measurements taken back to
    # back are compared.
    before = model_throughput(encoder, pixels, args.batch_size)
    out = Path(tempfile.mkdtemp(prefix="vitrina-bench-index-"))
    try:
        report = index_folder(
            folder,
            encoder,
            out / "idx",
            model_ref=args.model,
            batch_size=args.batch_size,
            workers=workers,
            decoder=decoder,
            progress=False,
        )
    finally:
        shutil.rmtree(out)
    after = model_throughput(encoder, pixels, args.batch_size)
    assert report.embedded == args.images, report.summary()
    model = (before + after) / 2
    replica_model = None
    if decoder == "replica":
        replica_model = replica_model_throughput(encoder, pixels, args.batch_size, workers)
    return model, abs(before - after) / model, report.images_per_s, replica_model


def decode_cost(paths: list[Path], transform) -> float:
    """ms per image of the indexer's own decode step alone, in this thread: read the file once, hash it,
    decode (JPEG draft scaling; a greyscale file kept in one band through the resize, as the indexer does for
    a split transform), the per-image geometry (``vitrina.index.decode.decode``)."""
    decoding = Decoding.of(transform)
    jobs = [Job(p.name, p, 0, 0.0, None, None, is_new=True) for p in paths]
    for job in jobs[:32]:  # warm-up: the page cache and Pillow's plugins
        decoding(job)
    start = time.perf_counter()
    for job in jobs:
        assert decoding(job).pixels is not None
    return (time.perf_counter() - start) / len(jobs) * 1000


if __name__ == "__main__":
    main()
