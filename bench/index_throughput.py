"""End-to-end indexing throughput vs pure-model throughput: is image decoding the bottleneck?

Builds a folder of real files from the Fashion-MNIST test set (upscaled to 128 px, half JPEG and
half PNG, one sub-folder per class), then measures with the demo-sized encoder and one batch size:

* model: ``encode_image`` on pre-decoded, pre-transformed tensors (the ceiling): the same encoder object
  (fp32, as the indexer runs it), the same batch size, the same threads;
* end to end: ``index_folder`` into a fresh index (scan, read once and hash, decode with JPEG draft
  scaling, transform, encode, SQLite commits, FAISS publish; not the query towers' export), with worker
  processes, a thread pool, and the main thread (the default on 2 CPUs) as decoders.

The ratio end-to-end / model should be >= 0.9 (issue 11). The model is timed right before and after each
end-to-end run and the two averaged, because this 2-core machine is shared and noisy. The protocol, in
full: bench/notes/index_throughput.md.

Usage: ``.venv/bin/python bench/index_throughput.py [--model clip-small] [--images 2000] [--batch-size 64]``.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clip-small", help="the demo-sized encoder (preset or checkpoint)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "vitrina-bench-fmnist"))
    args = parser.parse_args()

    encoder = load_encoder(args.model)
    folder = Path(args.folder) / str(args.images)
    paths = make_folder(folder, args.images)
    pixels = torch.stack([encoder.image_transform(load_image(p)) for p in paths])  # (N, 3, H, W)

    # workers=0: decode in the main thread between batches (nothing competes with the model's threads).
    for decoder, workers in (("process", args.workers), ("thread", args.workers), ("thread", 0)):
        # The model is timed right before and right after each end-to-end run: the machine is shared,
        # so only measurements taken back to back are compared.
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
        row = {
            "model": args.model,
            "image px": "x".join(map(str, pixels.shape[-2:])),
            "images": args.images,
            "files": "Fashion-MNIST test, 128 px, half JPEG half PNG",
            "batch": args.batch_size,
            "decoders": f"{workers} {decoder}" + ("es" if decoder == "process" else "s") if workers else "main thread",
            "model img/s": model,
            "model img/s spread": abs(before - after) / model,
            "end-to-end img/s": report.images_per_s,
            "ratio": report.images_per_s / model,
            "torch threads": torch.get_num_threads(),
        }
        print(row, flush=True)
        record("index_throughput", f"{args.model} {decoder} x{workers}" if workers else f"{args.model} serial", row)


if __name__ == "__main__":
    main()
