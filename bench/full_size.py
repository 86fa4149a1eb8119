"""Full size, side by side: a ViT-B/32 CLIP through `vitrina index` vs open_clip's own loop, same JPEGs, same run.

The model is built by open_clip's own code (``open_clip.create_model("ViT-B-32")``, random weights: none
can be downloaded here), saved to a file, and loaded by vitrina through ``open_clip:ViT-B-32/FILE`` (which
maps it onto vitrina's own ViT and text transformer, checked to 1e-4 against open_clip's outputs here).

The images: ``--images`` (256) Open Clip Art drawings re-encoded as JPEGs 300–640 px wide, the size of a
Caltech-256 photo (seeded widths, quality 90).

Rows, each timed end to end over the same files (model load excluded, one warm-up batch excluded):

* vitrina: ``index_folder`` into a fresh index (scan, read once and hash, decode with JPEG draft scaling,
  transform, encode, SQLite commits, ANN publish), ``--batch-size`` 32, its default decoders
  (``default_decoding()``: 2 decoder threads for a 224 px tower);
* open_clip loop: what its README does, batched: ``PIL.Image.open`` → open_clip's ``preprocess`` →
  ``model.encode_image`` → normalise, in a torch ``DataLoader`` with 2 worker processes (the faster of
  that and a plain loop in this process is the peer);
* text: p50 over ``--queries`` single-query calls: vitrina's text tower (``encode_text([q])``) vs
  open_clip's ``model.encode_text(tokenizer([q]))``.

Targets (issue 11): vitrina img/s ≥ 1.0× open_clip's; vitrina text p50 ≤ open_clip's; `index_vs_model` (the whole
indexer over the model alone on pre-decoded pixels, for a 224 px tower on Caltech-sized JPEGs) ≥ 0.9.

Usage: ``.venv/bin/python bench/full_size.py [--images 256] [--batch-size 32] [--queries 50]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import record  # noqa: E402
from vitrina.heap import keep_freed_memory  # noqa: E402

BENCHMARK = "full_size"
CLIPART = Path("/usr/share/openclipart/png")
QUERIES = ["a horse carrying hay", "a red bicycle", "a cat sleeping on a sofa", "two people on a beach", "a lighthouse"]


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` clip-art drawings as JPEGs of Caltech-like widths (300–640 px), on white, in 8 class folders."""
    sources = sorted(CLIPART.rglob("*.png"))
    if not sources:
        raise SystemExit(f"{CLIPART}: no PNGs; run `make data` (Debian's openclipart-png) first")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(sources), size=n, replace=len(sources) < n)
    paths = []
    for i, index in enumerate(chosen):
        with Image.open(sources[index]) as image:
            image = image.convert("RGBA")
            canvas = Image.new("RGB", image.size, "white")
            canvas.paste(image, mask=image.getchannel("A"))
        width = int(rng.integers(300, 641))
        height = max(200, round(canvas.height * width / max(1, canvas.width)))
        path = folder / f"class-{i % 8}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.resize((width, min(height, 640)), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            return self.preprocess(image.convert("RGB"))


def open_clip_loop(model, preprocess, paths: list[Path], batch_size: int, workers: int) -> float:
    """img/s of open_clip's decode → preprocess → encode_image loop over ``paths``."""
    loader = torch.utils.data.DataLoader(_Files(paths, preprocess), batch_size=batch_size, num_workers=workers)
    start, n = None, 0
    with torch.inference_mode():
        for i, pixels in enumerate(loader):
            torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
            if i == 0:  # warm-up batch excluded
                start = time.perf_counter()
                continue
            n += len(pixels)
    return n / (time.perf_counter() - start)


def vitrina_index(ref: str, folder: Path, paths: list[Path], batch_size: int, out: Path) -> tuple[float, float, object]:
    """(img/s of ``index_folder`` over ``folder``, the model's own img/s around it, the encoder); one batch is
    indexed into a throw-away index first. The model alone is timed right before and right after the indexing
    run and the two averaged: this machine drifts within minutes, so only back-to-back numbers are divided."""
    from vitrina.checkpoint import load_encoder
    from vitrina.index.embed import index_folder

    encoder = load_encoder(ref)
    warm = out / "warm"
    (warm / "x").mkdir(parents=True)
    for path in paths[:batch_size]:
        (warm / "x" / path.name).write_bytes(path.read_bytes())
    index_folder(warm, encoder, out / "warm-index", model_ref=ref, batch_size=batch_size, progress=False)
    before = model_only(encoder, paths, batch_size)
    report = index_folder(folder, encoder, out / "index", model_ref=ref, batch_size=batch_size, progress=False)
    after = model_only(encoder, paths, batch_size)
    return report.images_per_s, (before + after) / 2, encoder


def model_only(encoder, paths: list[Path], batch_size: int) -> float:
    """img/s of vitrina's ``encode_image`` alone on the same images, decoded and transformed beforehand."""
    from vitrina.data.images import load_image

    pixels = torch.stack([encoder.image_transform(load_image(p)) for p in paths])
    encoder.encode_image(pixels[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        encoder.encode_image(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - start)


def text_p50(encode, queries: int) -> float:
    """Median ms of one single-query call of ``encode`` (after 3 warm-up calls)."""
    for q in QUERIES[:3]:
        encode(q)
    times = []
    for i in range(queries):
        start = time.perf_counter()
        encode(QUERIES[i % len(QUERIES)])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    import open_clip

    torch.set_num_threads(2)
    keep_freed_memory()  # as `vitrina index` does (vitrina.heap); open_clip's loop runs in this process too
    with tempfile.TemporaryDirectory(prefix="vitrina-full-size-") as tmp:
        tmp = Path(tmp)
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
        model.eval()
        weights = tmp / "vit-b-32.pt"
        torch.save(model.state_dict(), weights)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        folder = tmp / "photos"
        paths = make_jpegs(folder, args.images)
        ref = f"open_clip:ViT-B-32/{weights}"

        ours_img_s, model_img_s, encoder = vitrina_index(ref, folder, paths, args.batch_size, tmp)
        peer = {f"{w} workers": open_clip_loop(model, preprocess, paths, args.batch_size, w) for w in (0, 2)}
        best_peer = max(peer, key=peer.get)
        # The towers agree: the same weights through vitrina's mapped model and through open_clip.
        with torch.inference_mode():
            theirs = torch.nn.functional.normalize(model.encode_text(tokenizer(QUERIES)), dim=-1)
        ours = encoder.encode_text(QUERIES)
        text_diff = float((ours - theirs).abs().max())

        def their_text(q: str):
            with torch.inference_mode():
                return torch.nn.functional.normalize(model.encode_text(tokenizer([q])), dim=-1)

        ours_ms = text_p50(lambda q: encoder.encode_text([q]), args.queries)
        theirs_ms = text_p50(their_text, args.queries)

    row = {
        "images": args.images,
        "files": "Open Clip Art as JPEG, 300-640 px wide",
        "batch": args.batch_size,
        "vitrina_index_img_s": ours_img_s,
        "open_clip_loop_img_s": peer[best_peer],
        "open_clip_loop": best_peer,
        **{f"open_clip_img_s ({k})": v for k, v in peer.items()},
        "index_ratio": ours_img_s / peer[best_peer],
        "vitrina_model_img_s": model_img_s,
        "index_vs_model": ours_img_s / model_img_s,
        "vitrina_text_p50_ms": ours_ms,
        "open_clip_text_p50_ms": theirs_ms,
        "text_ratio": theirs_ms / ours_ms,
        "text_max_abs_diff": text_diff,
    }
    print(
        f"index: vitrina {ours_img_s:.1f} img/s vs open_clip {peer[best_peer]:.1f} img/s ({best_peer}) "
        f"= {row['index_ratio']:.2f}x; text p50 {ours_ms:.1f} ms vs {theirs_ms:.1f} ms; text diff {text_diff:.1e}"
    )
    record(BENCHMARK, f"ViT-B/32 · {args.images} JPEGs · batch {args.batch_size}", row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
