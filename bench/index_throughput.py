"""End-to-end indexing throughput vs pure-model throughput: is image decoding the bottleneck?

Builds a folder of real files from the Fashion-MNIST test set (upscaled to 128 px, half JPEG and
half PNG, one sub-folder per class), then measures with the demo-sized encoder and one batch size:

* model: ``encode_image`` on pre-decoded, pre-transformed tensors (the ceiling);
* end to end: ``index_folder`` into a fresh index (scan, hash, decode, transform, encode, SQLite
  commits, FAISS build), with a thread pool and with worker processes as decoders.

The ratio end-to-end / model should be >= 0.8. The model is measured before and after the
end-to-end runs and averaged, because this 2-core machine is noisy.

Usage: ``.venv/bin/python bench/index_throughput.py [--model clip-small] [--images 2000] [--batch-size 64]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitrina.checkpoint import load_encoder  # noqa: E402

from bench._report import record  # noqa: E402
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
    paths = make_folder(Path(args.folder) / str(args.images), args.images)
    pixels = torch.stack([encoder.image_transform(load_image(p)) for p in paths])  # (N, 3, H, W)
    model_runs = [model_throughput(encoder, pixels, args.batch_size)]

    end_to_end = {}
    for decoder in ("thread", "process"):
        out = Path(tempfile.mkdtemp(prefix="vitrina-bench-index-"))
        try:
            report = index_folder(
                Path(args.folder) / str(args.images),
                encoder,
                out / "idx",
                model_ref=args.model,
                batch_size=args.batch_size,
                workers=args.workers,
                decoder=decoder,
                progress=False,
            )
        finally:
            shutil.rmtree(out)
        assert report.embedded == args.images, report.summary()
        end_to_end[decoder] = report.images_per_s
        print(f"{decoder}: {report.summary()}", flush=True)
    model_runs.append(model_throughput(encoder, pixels, args.batch_size))
    model = float(np.mean(model_runs))

    for decoder, rate in end_to_end.items():
        row = {
            "model": args.model,
            "image px": tuple(pixels.shape[-2:]).__repr__(),
            "images": args.images,
            "files": "Fashion-MNIST test, 128 px, half JPEG half PNG",
            "batch": args.batch_size,
            "decoders": f"{args.workers} {decoder}s",
            "model img/s": model,
            "end-to-end img/s": rate,
            "ratio": rate / model,
            "torch threads": torch.get_num_threads(),
        }
        print(row, flush=True)
        record("index_throughput", f"{args.model} {decoder} x{args.workers}", row)


if __name__ == "__main__":
    main()
