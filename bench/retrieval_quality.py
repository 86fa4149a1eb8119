"""Retrieval quality within the demo's budget: one trainer configuration per row, measured on what it never saw.

Each row runs ``vitrina demo``'s whole job (``vitrina.demo.run_demo``: data, a CLIP trained for ``--minutes`` on
three emoji styles + Fashion-MNIST minus the held-out concepts, index, evaluate) into its own folder, with one
trainer knob changed (``--row``), then measures the best checkpoint (the epoch with the best R@10 on the
*selection half* of the held-out style, ``vitrina.data.holdout.selection_split``):

* **held-out style** (facebook emoji, 1,860 images, a drawing style never trained on), text -> image R@1/5/10
  over the whole style, for two kinds of query: the index's captions ("an emoji of a grinning face, smileys &
  emotion") and the plain emoji names ("grinning face"); an image is relevant when its caption (name) is the
  query. Given for the **report half** (concepts no choice ever looked at: the headline), the selection half
  (optimistic: the best epoch was picked on it) and the held-out concepts (never trained on in any style);
* **zero-shot**, only on what was held out of training (the held-out Fashion-MNIST classes among all ten, the
  held-out emoji concepts' captions), beside its chance level, and **prompted classification (seen classes)**,
  from the demo's own ``eval.json``;
* train minutes, steps and img/s of the run.

Rows (one trainer change each, everything else as ``vitrina demo``):
  demo                 the trainer as the demo first ran it this round: images in memory with batched crops/flips,
                       duplicate-aware targets, one caption per emoji, 6,000 Fashion-MNIST images
  caption-variants     + several phrasings per emoji (name, "X emoji", subcategory, keywords)
  variants-fmnist-1500 + those phrasings, and 1,500 Fashion-MNIST images instead of 6,000 (more emoji per batch)
  no-duplicate-aware   - duplicate-aware targets (every other pair of a batch is a negative)
  no-in-memory         - images in memory (per-image decode and transforms in DataLoader workers)
  names-in-variants    caption-variants again, now that the phrasings include the bare emoji name and label
                       (issue 13; the caption-variants and variants-fmnist-1500 rows recorded before trained
                       without them): a new name, so the old row stays what it measured
  flips-only           + flips alone (no random resized crops)
  flips-only-fmnist-1500  + 1,500 Fashion-MNIST images instead of 6,000
  caption-negatives    names-in-variants, each image contrasted with every training caption (all phrasings of its
                       concept positive), not only the batch's (``ClipTrainSettings(negatives="captions")``)
  caption-negatives-fmnist-1500  + 1,500 Fashion-MNIST images instead of 6,000
  p12                  names-in-variants on the clip-minilm-p12 preset: 12 px patches, 4 x 4 tokens instead of 6 x 6
                       (about twice the images per second: more samples in the same minutes)
  caption-negatives-p12  caption-negatives on the clip-minilm-p12 preset
  caption-negatives-p12-lr1e-3    + peak learning rate 1e-3 instead of 5e-4
  caption-negatives-p12-batch128  + batches of 128 instead of 256 (twice the steps; with every caption a
                       negative the image side loses no negatives)
  caption-negatives-p12-batch128-lr1e-3  + peak learning rate 1e-3
  caption-negatives-p12-batch64   caption-negatives-p12 with batches of 64
  caption-negatives-p12-batch128-fmnist-1500  caption-negatives-p12-batch128 with 1,500 Fashion-MNIST images
                       instead of 6,000 (more emoji per batch and per minute)

With ``--fewshot``: the row's model also gets ``vitrina eval fewshot`` (1/2/4/8/16 shots per class, 5 seeded draws,
prototype / Tip-Adapter / linear head, beside zero-shot) on the held-out style's categories and on Fashion-MNIST;
one row per task and method, the curve as ``bench/results/retrieval_quality-fewshot.png``.

Targets (issue 13): held-out-style R@10 >= 0.55 with captions and >= 0.50 with plain names in the 10-minute budget.

    .venv/bin/python bench/retrieval_quality.py --row demo                # 10 minutes of training + ~3 of the rest
    .venv/bin/python bench/retrieval_quality.py --row demo --minutes 0.3 --dry-run   # smoke: prints, records nothing

A row measured again on another day, or with another code path, gets its own ``--name`` so the old row stays
what it measured; ``--fused-attention`` trains as every trainer did before 2026-12-06 (all attention through the
fused SDPA kernel), the same-day baseline of ``vitrina.models.vit.attend`` (the ``attention`` column).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import record  # noqa: E402
from bench.train_step import fused_attention  # noqa: E402
from vitrina.checkpoint import best_checkpoint, load_encoder  # noqa: E402
from vitrina.demo import run_demo  # noqa: E402
from vitrina.eval.style import KS  # noqa: E402
from vitrina.models import vit  # noqa: E402
from vitrina.train.clip import ClipTrainSettings  # noqa: E402

BENCHMARK = "retrieval_quality"
STYLE = "facebook"
# What every row starts from: the trainer as this round found it (the demo's defaults have moved on since,
# to the winning row; spelled out here so a recorded row keeps measuring what it measured).
ROUND_START = {
    "preset": "clip-minilm",
    "learning_rate": 5e-4,
    "batch_size": 256,
    "caption_variants": True,
    "fashion_images": 6000,
    "precision": "fp32",
    "settings": ClipTrainSettings(),
}
CAPTION_NEGATIVES = ClipTrainSettings(negatives="captions")
ROWS = {
    name: {**ROUND_START, **change}
    for name, change in {
        "demo": {"caption_variants": False},
        "caption-variants": {},
        "variants-fmnist-1500": {"fashion_images": 1500},
        "no-duplicate-aware": {"settings": ClipTrainSettings(duplicate_aware=False)},
        "no-in-memory": {"settings": ClipTrainSettings(in_memory=False)},
        "names-in-variants": {},
        "flips-only": {"settings": ClipTrainSettings(crop=False)},
        "flips-only-fmnist-1500": {"fashion_images": 1500, "settings": ClipTrainSettings(crop=False)},
        "caption-negatives": {"settings": CAPTION_NEGATIVES},
        "caption-negatives-fmnist-1500": {"fashion_images": 1500, "settings": CAPTION_NEGATIVES},
        "p12": {"preset": "clip-minilm-p12"},
        "caption-negatives-p12": {"preset": "clip-minilm-p12", "settings": CAPTION_NEGATIVES},
        "caption-negatives-p12-lr1e-3": {
            "preset": "clip-minilm-p12",
            "learning_rate": 1e-3,
            "settings": CAPTION_NEGATIVES,
        },
        "caption-negatives-p12-batch128": {
            "preset": "clip-minilm-p12",
            "batch_size": 128,
            "settings": CAPTION_NEGATIVES,
        },
        "caption-negatives-p12-batch128-lr1e-3": {
            "preset": "clip-minilm-p12",
            "batch_size": 128,
            "learning_rate": 1e-3,
            "settings": CAPTION_NEGATIVES,
        },
        "caption-negatives-p12-batch128-fmnist-1500": {
            "preset": "clip-minilm-p12",
            "batch_size": 128,
            "fashion_images": 1500,
            "settings": CAPTION_NEGATIVES,
        },
        "caption-negatives-p12-batch64": {"preset": "clip-minilm-p12", "batch_size": 64, "settings": CAPTION_NEGATIVES},
        "caption-negatives-p12-batch128-bf16": {
            "preset": "clip-minilm-p12",
            "batch_size": 128,
            "precision": "bf16",
            "settings": CAPTION_NEGATIVES,
        },
    }.items()
}


def run_stats(checkpoint: Path) -> dict:
    """Train minutes, steps and median img/s of the run, from its metrics log."""
    lines = [json.loads(x) for x in (checkpoint / "metrics.jsonl").read_text().splitlines() if x.strip()]
    stats = {
        "steps": max((x["step"] for x in lines if isinstance(x.get("step"), int)), default=None),
        "train_minutes": max((x["elapsed_s"] for x in lines if "elapsed_s" in x), default=0.0) / 60,
    }
    rates = [x["img_per_s"] for x in lines if isinstance(x.get("img_per_s"), int | float)]
    if rates:
        stats["img/s"] = float(np.median(rates))
    return stats


def zero_shot_rows(results: dict) -> dict:
    """The demo's eval.json, flattened to what the table shows: zero-shot (held out) and prompted (seen)."""
    out = {}
    for name in ("fashion", "emoji"):
        labels = results.get(name, {}).get("labels", {})
        for key in ("zero_shot", "prompted_seen"):
            block = labels.get(key)
            if isinstance(block, dict):
                for metric in ("accuracy", "chance", "classes"):
                    if metric in block:
                        out[f"{name} {key} {metric}"] = block[metric]
        captions = results.get(name, {}).get("captions", {}).get("zero_shot")
        if isinstance(captions, dict):
            for metric, value in captions.items():
                if isinstance(value, int | float):
                    out[f"{name} zero-shot captions {metric}"] = value
    return out


def fewshot_rows(model_dir: Path, folder: Path, row_name: str, *, seeds: int = 5) -> None:
    """``vitrina eval fewshot`` on the row's model; one recorded row per task and method, and the plot."""
    from vitrina.eval.fewshot import run_fewshot_eval
    from vitrina.models.fewshot import FEWSHOT_METHODS

    shots = [1, 2, 4, 8, 16]
    encoder = load_encoder(str(model_dir))
    results = run_fewshot_eval(
        encoder,
        [f"emoji:{STYLE}", "fashion-mnist"],
        shots=shots,
        seeds=seeds,
        methods=list(FEWSHOT_METHODS),
        limit_test=2000,
        out_dir=folder / "fewshot",
    )
    shutil.copyfile(folder / "fewshot" / "fewshot.png", REPO / "bench" / "results" / f"{BENCHMARK}-fewshot.png")
    for task in results:
        for method, curve in task["methods"].items():
            row = {"zero-shot (prompted, all classes)": task["zero_shot"], "test images": task["test_images"]}
            for n, mean, std in zip(task["shots"], curve["mean"], curve["std"], strict=True):
                row[f"{n}-shot"] = mean
                row[f"{n}-shot std"] = std
            row["seeds"] = task["seeds"]
            record(BENCHMARK, f"few-shot · {task['task']} · {method} · model of {row_name}", row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", choices=list(ROWS), default="demo")
    parser.add_argument("--minutes", type=float, default=10.0, help="the training budget (the demo's: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "retrieval-quality"))
    parser.add_argument("--keep", action="store_true", help="reuse the row's folder (resume) instead of a fresh one")
    parser.add_argument("--dry-run", action="store_true", help="print the row, record nothing")
    parser.add_argument("--fewshot", action="store_true", help="also the few-shot curve of the row's model")
    parser.add_argument("--name", default=None, help="the row's name (default: --row), e.g. to keep another day apart")
    parser.add_argument(
        "--fused-attention",
        action="store_true",
        help="every attention through the fused SDPA kernel, as trainers ran before 2026-12-06 (a same-day baseline "
        "for vitrina.models.vit.attend's explicit short bf16 attention)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    name = args.name or args.row
    folder = Path(args.out) / f"{name}-seed{args.seed}"
    if folder.exists() and not args.keep:
        shutil.rmtree(folder)
    with fused_attention(args.fused_attention):
        results = run_demo(out_dir=folder, train_minutes=args.minutes, seed=args.seed, **ROWS[args.row])
    checkpoint = folder / "clip"
    model_dir = best_checkpoint(checkpoint)
    quality = results["held_out_style"]  # the demo's own table: its best checkpoint on the style, split as above
    row = {
        "budget_minutes": args.minutes,
        **run_stats(checkpoint),
        # the table's columns: the report half (the honest headline) and the whole style; every part in the JSON
        **{f"{kind} report R@{k}": quality[kind]["report_half"].get(f"R@{k}") for kind in quality for k in KS},
        **{f"{kind} all R@10": quality[kind]["all"].get("R@10") for kind in quality},
        **{f"{kind} held-out concepts R@10": quality[kind]["held_out_concepts"].get("R@10") for kind in quality},
        **zero_shot_rows(results),
        "held_out_style": quality,
        "seed": args.seed,
        "recipe row": args.row,
        "attention": "fused SDPA" if args.fused_attention else f"explicit bf16 up to {vit.EXPLICIT_BF16_MAX_KEYS} keys",
    }
    print(json.dumps({k: v for k, v in row.items() if k != "held_out_style"}, indent=1))
    # what a choice between configurations may look at (the report half is the headline nobody tunes on)
    print("selection half R@10:", {kind: quality[kind]["selection_half"].get("R@10") for kind in quality})
    if not args.dry_run:
        name = f"{name} · {args.minutes:g} min · seed {args.seed}"
        record(BENCHMARK, name, row)
        if args.fewshot:
            fewshot_rows(model_dir, folder, name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
