"""Inference precision: what bf16 autocast and int8 dynamic quantization buy and cost, beside fp32, in one run.

The model: the demo's trained CLIP (``runs/demo/clip``, made by ``make demo``); the data: its held-out
emoji style (``runs/demo/collections/emoji-facebook``: 1,860 images with captions, never trained on).

Per precision (``vitrina.models.precision``; the same model object wrapped three ways):

* image img/s: ``encode_image`` on pre-decoded pixels, batch ``--batch-size``, median of ``--rounds``
  rounds, precisions timed alternately within each round (this machine is noisy);
* text q/s: ``encode_text`` of one query at a time (what a search does), same protocol;
* caption → image R@10 on the held-out style with both towers at that precision.

Each is also given relative to fp32. Target (issue 11): int8 or bf16 >= 1.8x fp32 img/s at >= 0.99x its R@10.

Usage: ``.venv/bin/python bench/precision.py [--model runs/demo/clip] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import record  # noqa: E402
from vitrina.checkpoint import load_encoder  # noqa: E402
from vitrina.data.images import load_image  # noqa: E402
from vitrina.eval.retrieval import caption_recalls  # noqa: E402
from vitrina.models.precision import PRECISIONS, native_bf16, with_precision  # noqa: E402

BENCHMARK = "precision"


def held_out(collection: Path) -> tuple[list[Path], list[str]]:
    """(image paths, captions) of a collection written by ``vitrina data export emoji``."""
    records = [json.loads(line) for line in (collection / "captions.jsonl").read_text().splitlines() if line]
    return [collection / r["image"] for r in records], [r["caption"] for r in records]


def rate(fn, items: int) -> float:
    """Items per second of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return items / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "runs/demo/clip"))
    parser.add_argument("--collection", default=str(REPO / "runs/demo/collections/emoji-facebook"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512, help="images per img/s round")
    parser.add_argument("--queries", type=int, default=64, help="single-text queries per q/s round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not Path(args.model).is_dir() or not Path(args.collection).is_dir():
        raise SystemExit(f"{args.model} or {args.collection} missing: run `make demo` first")
    torch.set_num_threads(2)
    base = load_encoder(args.model)
    encoders = {p: with_precision(base, p) for p in PRECISIONS}
    paths, captions = held_out(Path(args.collection))
    pixels = torch.stack([base.image_transform(load_image(p)) for p in paths])  # (N, 3, H, W)
    sample = pixels[: args.images]
    queries = captions[: args.queries]

    def images(encoder) -> None:
        for i in range(0, len(sample), args.batch_size):
            encoder.encode_image(sample[i : i + args.batch_size])

    def texts(encoder) -> None:
        for q in queries:
            encoder.encode_text([q])

    for encoder in encoders.values():  # warm-up (int8 kernels, autocast caches)
        encoder.encode_image(sample[: args.batch_size])
        encoder.encode_text(queries[:2])
    img_s = {p: [] for p in PRECISIONS}
    text_qs = {p: [] for p in PRECISIONS}
    for _ in range(args.rounds):
        for p, encoder in encoders.items():
            img_s[p].append(rate(lambda e=encoder: images(e), len(sample)))
            text_qs[p].append(rate(lambda e=encoder: texts(e), len(queries)))
    recall = {}
    for p, encoder in encoders.items():
        vectors = torch.cat([encoder.encode_image(pixels[i : i + 256]) for i in range(0, len(pixels), 256)]).numpy()
        recall[p] = caption_recalls(vectors, captions, encoder)["text_to_image"]["R@10"]
    reference = {"img": statistics.median(img_s["fp32"]), "text": statistics.median(text_qs["fp32"])}
    for p in PRECISIONS:
        row = {
            "img_s": statistics.median(img_s[p]),
            "img_s_vs_fp32": statistics.median(img_s[p]) / reference["img"],
            "text_q_s": statistics.median(text_qs[p]),
            "text_q_s_vs_fp32": statistics.median(text_qs[p]) / reference["text"],
            "caption_R@10": recall[p],
            "R@10_vs_fp32": recall[p] / recall["fp32"] if recall["fp32"] else float("nan"),
            "held_out_images": len(paths),
            "batch": args.batch_size,
            "rounds": args.rounds,
            "native_bf16": native_bf16(),
        }
        print(
            f"{p}: {row['img_s']:.0f} img/s ({row['img_s_vs_fp32']:.2f}x), {row['text_q_s']:.0f} q/s "
            f"({row['text_q_s_vs_fp32']:.2f}x), R@10 {recall[p]:.4f} ({row['R@10_vs_fp32']:.3f}x)"
        )
        record(BENCHMARK, f"{Path(args.model).name} · {p}", row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
