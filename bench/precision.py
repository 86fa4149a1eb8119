"""Inference precision: what bf16 autocast and int8 cost and buy, beside PyTorch fp32, in one run.

The model: the demo's trained CLIP (``runs/demo/clip``, made by ``make demo``); the data: its held-out
emoji style (``runs/demo/collections/emoji-facebook``: 1,860 images with captions, never trained on).

One row per runtime and precision, all of the same weights:

* ``torch · fp32``: the reference; ``CLIPEncoder`` as it is;
* ``torch · bf16``: every forward under ``torch.autocast("cpu", torch.bfloat16)`` (``vitrina.models.precision``);
* ``torch · int8``: ``torch.ao`` dynamic quantization of the ``nn.Linear`` layers
  (``--precision int8 --runtime torch``);
* ``onnx · fp32``: the towers the indexer exports (``vitrina.models.export``), in ONNX Runtime (``--runtime onnx``);
* ``onnx · int8``: their int8 twins (``vitrina.models.quantize_onnx``; what ``--precision int8`` runs under
  ``--runtime auto``): the text tower's weights 8-bit per block (``MatMulNBits``), the image tower's MatMuls
  dynamically quantized with per-channel weight scales (rows before 2026-12-04: both dynamic).

And the pairs a user deploys, each tower at its own precision: ``index torch · bf16 + queries onnx · fp32`` is
``vitrina index --precision bf16`` (the images embedded under bf16 autocast) searched by a default
``vitrina search`` / ``serve`` (the version's exported fp32 text tower); ``index torch · int8 + ...`` likewise
for ``--precision int8``. Their img/s is the index row's, their q/s the query row's (both timed above), their
R@10 and overlap are computed from the index row's image vectors and the query row's text vectors.

Per row:

* image img/s: ``encode_image`` on pre-decoded pixels (the PyTorch transform's, for every row), batch
  ``--batch-size``, median of ``--rounds`` rounds, rows timed alternately within each round (this machine is noisy);
* text q/s: ``encode_text`` of one query at a time (what a search does: tokenizing included), same protocol;
* caption -> image R@10 on the held-out style with both towers of that row;
* top-10 overlap: per unique caption, the share of its 10 nearest images that the fp32 row also ranks in its
  top 10, averaged (steadier than R@10: it counts every query, not only the ones whose target is near the cut).

Each speed and R@10 is also given relative to ``torch · fp32``. Target (issue 11): int8 or bf16 >= 1.8x fp32
img/s and text q/s at >= 0.99x its R@10. All rows on ``torch.set_num_threads(2)`` / 2 ONNX Runtime threads.

Usage: ``.venv/bin/python bench/precision.py [--model runs/demo/clip] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import record  # noqa: E402
from vitrina.checkpoint import load_encoder  # noqa: E402
from vitrina.data.images import load_image  # noqa: E402
from vitrina.encoder import as_numpy  # noqa: E402
from vitrina.eval.retrieval import caption_recalls  # noqa: E402
from vitrina.models.export import export_towers  # noqa: E402
from vitrina.models.precision import native_bf16, with_precision  # noqa: E402
from vitrina.runtime import OnnxQueryEncoder, read_manifest  # noqa: E402

BENCHMARK = "precision"


# (the index's image tower, the query's text tower): what `vitrina index --precision X` then a default search runs
DEPLOYED_PAIRS = [("torch · bf16", "onnx · fp32"), ("torch · int8", "onnx · fp32")]


def model_label(model: Path) -> str:
    """A row's model name: the checkpoint's folder, or the run's above ``clip/best`` (``best`` says nothing)."""
    while model.name in ("best", "clip") and model.parent != model:
        model = model.parent
    return model.name


def held_out(collection: Path) -> tuple[list[Path], list[str]]:
    """(image paths, captions) of a collection written by ``vitrina data export emoji``."""
    records = [json.loads(line) for line in (collection / "captions.jsonl").read_text().splitlines() if line]
    return [collection / r["image"] for r in records], [r["caption"] for r in records]


def rate(fn, items: int) -> float:
    """Items per second of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return items / (time.perf_counter() - start)


def top10(text: np.ndarray, images: np.ndarray) -> np.ndarray:
    """(T, D) query vectors, (N, D) image vectors -> (T, 10) indices of each query's 10 best images."""
    return np.argsort(-(text @ images.T), axis=1)[:, :10]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "runs/demo/clip"))
    parser.add_argument("--collection", default=str(REPO / "runs/demo/collections/emoji-facebook"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512, help="images per img/s round")
    parser.add_argument("--queries", type=int, default=64, help="single-text queries per q/s round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--label", help="the model's name in the rows (default: its folder's, or its run's for .../clip/best)"
    )
    args = parser.parse_args()
    label = args.label or model_label(Path(args.model))
    if not Path(args.model).is_dir() or not Path(args.collection).is_dir():
        raise SystemExit(f"{args.model} or {args.collection} missing: run `make demo` first")
    torch.set_num_threads(2)
    base = load_encoder(args.model)
    towers = Path(tempfile.mkdtemp(prefix="precision-towers-"))
    print(f"exporting towers: {export_towers(base, towers).summary()}")
    manifest = read_manifest(towers)
    encoders = {
        "torch · fp32": base,
        "torch · bf16": with_precision(base, "bf16"),
        "torch · int8": with_precision(base, "int8"),
        "onnx · fp32": OnnxQueryEncoder(towers, manifest, threads=2),
        "onnx · int8": OnnxQueryEncoder(towers, manifest, threads=2, precision="int8"),
    }
    for name in ("onnx · fp32", "onnx · int8"):
        for tower in ("text", "image"):
            if encoders[name].why_not(tower):
                raise SystemExit(f"{name}: {encoders[name].why_not(tower)}")
    names = list(encoders)
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

    for encoder in encoders.values():  # warm-up (int8 kernels, autocast caches, ONNX Runtime sessions)
        encoder.encode_image(sample[: args.batch_size])
        encoder.encode_text(queries[:2])
    img_s = {p: [] for p in names}
    text_qs = {p: [] for p in names}
    for _ in range(args.rounds):
        for p, encoder in encoders.items():
            img_s[p].append(rate(lambda e=encoder: images(e), len(sample)))
            text_qs[p].append(rate(lambda e=encoder: texts(e), len(queries)))
    recall, nearest, image_vectors, text_vectors = {}, {}, {}, {}
    unique = sorted(set(captions))
    for p, encoder in encoders.items():
        image_vectors[p] = np.concatenate(
            [as_numpy(encoder.encode_image(pixels[i : i + 256])) for i in range(0, len(pixels), 256)]
        )
        recall[p] = caption_recalls(image_vectors[p], captions, encoder)["text_to_image"]["R@10"]
        text_vectors[p] = np.concatenate(
            [as_numpy(encoder.encode_text(unique[i : i + 256])) for i in range(0, len(unique), 256)]
        )
        nearest[p] = top10(text_vectors[p], image_vectors[p])
    for index_row, query_row in DEPLOYED_PAIRS:
        p = f"index {index_row} + queries {query_row}"
        names.append(p)
        img_s[p], text_qs[p] = img_s[index_row], text_qs[query_row]
        recall[p] = caption_recalls(image_vectors[index_row], captions, encoders[query_row])["text_to_image"]["R@10"]
        nearest[p] = top10(text_vectors[query_row], image_vectors[index_row])
    ref = "torch · fp32"
    reference = {"img": statistics.median(img_s[ref]), "text": statistics.median(text_qs[ref])}
    for p in names:
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nearest[p], nearest[ref], strict=True)]))
        row = {
            "img_s": statistics.median(img_s[p]),
            "img_s_vs_fp32": statistics.median(img_s[p]) / reference["img"],
            "text_q_s": statistics.median(text_qs[p]),
            "text_q_s_vs_fp32": statistics.median(text_qs[p]) / reference["text"],
            "caption_R@10": recall[p],
            "R@10_vs_fp32": recall[p] / recall[ref] if recall[ref] else float("nan"),
            "top10_overlap_fp32": overlap,
            "held_out_images": len(paths),
            "batch": args.batch_size,
            "rounds": args.rounds,
            "native_bf16": native_bf16(),
        }
        print(
            f"{p}: {row['img_s']:.0f} img/s ({row['img_s_vs_fp32']:.2f}x), {row['text_q_s']:.0f} q/s "
            f"({row['text_q_s_vs_fp32']:.2f}x), R@10 {recall[p]:.4f} ({row['R@10_vs_fp32']:.3f}x), "
            f"top-10 overlap {overlap:.3f}"
        )
        record(BENCHMARK, f"{label} · {p}", row)
    shutil.rmtree(towers, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
