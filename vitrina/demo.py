"""`vitrina demo`: the whole system on real offline data, in one command.

1. data   — the held-out emoji style and the Fashion-MNIST test set written as image folders;
2. train  — a small CLIP on three emoji drawing styles + Fashion-MNIST training images, minus a
            seeded set of held-out concepts (~10% of the emoji, in every style, and two garment
            classes: ``vitrina.data.holdout``); the best epoch by R@10 on a seeded half of the held-out
            style's (seen) concepts is kept (``selection_split``; the other half is never looked at);
3. index  — the fourth emoji style (never trained on) and the Fashion-MNIST test set;
4. search — a few text queries, ranked hits printed;
5. eval   — R@K / mAP tables; zero-shot accuracy on the held-out concepts only (with its chance
            level), prompted classification on the seen classes; the held-out style's R@1/5/10 by caption
            and by plain name, per part (``vitrina.eval.style``); written as JSON.

Every step is idempotent: re-running resumes training from its last checkpoint (or skips it when
done) and re-indexing embeds nothing that is already in the index.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from vitrina.data.emoji import EMOJI_STYLES
from vitrina.errors import UserError

# The trainer's choices, each a row of bench/retrieval_quality.py (held-out-style R@10 of the report half,
# captions / plain names, 10 minutes, seed 0):
# - several phrasings per emoji (name, "X emoji", subcategory, keywords) instead of one caption: 0.15 -> 0.21
#   with captions, 0.11 -> 0.18 with names (rows demo, caption-variants), at some cost to Fashion-MNIST
#   (prompted, seen classes: 0.74 -> 0.62);
# - each image against every training caption, not only the batch's: 0.19 / 0.20 -> 0.28 / 0.29 (rows
#   names-in-variants, caption-negatives; the second ran on a faster machine: 404 steps against 285);
# - 12 px patches (16 tokens instead of 36: twice the images per second): -> 0.51 / 0.51 (caption-negatives-p12);
# - batches of 128 instead of 256 (twice the steps; with every caption a negative, no fewer negatives):
#   -> 0.545 / 0.542 (caption-negatives-p12-batch128). A peak learning rate of 1e-3 instead of 5e-4 did not
#   help: 0.535 / 0.528, and 0.505 / 0.510 against 0.520 / 0.522 on the selection half, which choices look at;
#   nor did batches of 64 (0.458 / 0.460: more steps, but fewer images a second).
DEMO_PRESET = "clip-minilm-p12"
DEMO_SETTINGS = {"negatives": "captions"}  # ClipTrainSettings fields
FASHION_TRAIN_IMAGES = 6_000
BATCH_SIZE = 128
LEARNING_RATE = 5e-4
HELD_OUT_STYLE_SET = "held-out-style-selection"  # the watch set the best checkpoint is chosen by (half the style)

EMOJI_QUERIES = ["a smiling face with hearts", "a dog", "pizza", "the flag of japan", "a rocket", "a red heart"]
FASHION_QUERIES = ["an ankle boot", "a handbag", "a pair of trousers"]


def _step(console: Console, number: int, title: str) -> None:
    console.rule(f"[bold]{number}/5 {title}")


def demo_precision(checkpoint: Path) -> str:
    """The demo's training precision: that of the run already in ``checkpoint`` (a re-run resumes it, whatever
    this CPU would choose), else bf16 where the CPU computes in bf16 natively, else fp32.

    bf16 towers (float32 loss) pushed 1.3x the images through the 10 minutes (2,420 steps against 1,871), and
    held-out-style R@10 went 0.564 -> 0.597 with captions, 0.558 -> 0.588 with names (retrieval_quality.json:
    caption-negatives-p12-batch128[-bf16], means of seeds 0 and 1, all four runs on one day). Without
    native bf16 the same arithmetic is ~5x slower (BENCHMARKS.md, precision), so such CPUs train in fp32.
    """
    from vitrina.models.precision import native_bf16
    from vitrina.train.checkpointing import find_checkpoint, read_train_meta

    found = find_checkpoint(checkpoint)
    if found is not None:
        identity = read_train_meta(found).get("identity", {})
        return identity.get("train", {}).get("precision", "fp32")  # fp32 runs record none
    return "bf16" if native_bf16() else "fp32"


def train_demo_clip(
    checkpoint: Path,
    *,
    train_styles: Sequence[str],
    held_out_style: str,
    train_minutes: float,
    seed: int = 0,
    settings=None,
    caption_variants: bool = True,
    fashion_images: int = FASHION_TRAIN_IMAGES,
    preset: str = DEMO_PRESET,
    learning_rate: float = LEARNING_RATE,
    batch_size: int = BATCH_SIZE,
    precision: str | None = None,
    console: Console | None = None,
):
    """Step 2: train the demo's CLIP into ``checkpoint`` on ``train_styles`` + Fashion-MNIST, less the seeded
    held-out concepts, its best epoch chosen on half of ``held_out_style``; returns the ``HeldOut`` record.

    ``bench/trials/rerank_style_gap.py`` trains the same recipe on fewer styles.
    """
    from vitrina.config import TrainConfig, to_dict
    from vitrina.data.holdout import HoldOutRule, held_out_concepts, selection_split, split_held_out
    from vitrina.data.sources import load_training_items
    from vitrina.models.registry import build_model
    from vitrina.train.clip import ClipTrainSettings, train_clip
    from vitrina.train.schedule import BUDGET_EPOCH_LIMIT

    console = console or Console(emoji=False)
    variants = ":variants" if caption_variants else ""
    spec = f"emoji:{','.join(train_styles)}{variants}+fashion-mnist:train:{fashion_images}"
    all_pairs, all_concepts = load_training_items(spec, seed=seed)
    rule = HoldOutRule(seed=seed)
    pairs, concepts, held_pairs, held_out = split_held_out(
        all_pairs, all_concepts, held_out_concepts(all_concepts, rule)
    )
    n_emoji_held = sum(c.startswith("emoji:") for c in held_out.concepts)
    precision = precision or demo_precision(checkpoint)
    console.print(f"training pairs: {len(pairs)} from {spec!r}; preset {preset}, {precision}, cap {train_minutes} min")
    console.print(
        f"held out of training entirely: {n_emoji_held} emoji concepts (every style) and the garment classes "
        f"{', '.join(held_out.labels)} ({len(held_pairs)} pairs)"
    )
    style_pairs, style_concepts = load_training_items(f"emoji:{held_out_style}", seed=seed)
    # the best epoch is picked on half of the held-out style's concepts (the selection half); numbers on the
    # other half (bench/retrieval_quality.py's "report half") were never looked at by any choice
    # (held-out concepts stay out of it too: their facebook images are the zero-shot test)
    seen = [(p, c) for p, c in zip(style_pairs, style_concepts, strict=True) if c not in held_out.concepts]
    selection_pairs, _, _ = selection_split([p for p, _ in seen], [c for _, c in seen], seed=seed)
    # a time budget: the learning rate's cosine reaches its floor when the minutes are spent, however
    # many epochs the machine manages in them
    config = TrainConfig(
        epochs=BUDGET_EPOCH_LIMIT,
        batch_size=batch_size,
        lr=learning_rate,
        seed=seed,
        budget_minutes=train_minutes,
        precision=precision,
    )
    train_clip(
        model=build_model(preset),
        pairs=pairs,
        concepts=concepts,
        out_dir=checkpoint,
        train_config=config,
        settings=settings or ClipTrainSettings(**DEMO_SETTINGS),
        watch_sets={HELD_OUT_STYLE_SET: selection_pairs, "held-out-concepts": held_pairs},
        extra_config={"held_out": {"rule": to_dict(rule), **to_dict(held_out)}},
    )
    return held_out


def run_demo(
    *,
    out_dir: Path,
    train_minutes: float = 8.0,
    held_out_style: str = "facebook",
    seed: int = 0,
    settings=None,
    caption_variants: bool = True,
    fashion_images: int = FASHION_TRAIN_IMAGES,
    preset: str = DEMO_PRESET,
    learning_rate: float = LEARNING_RATE,
    batch_size: int = BATCH_SIZE,
    precision: str | None = None,
) -> dict:
    """Run the five steps; returns the evaluation results (also written to ``out_dir/eval.json``).

    ``settings`` (a ``ClipTrainSettings``), ``caption_variants`` (train on several phrasings of each emoji,
    keywords included, instead of one caption) and ``fashion_images`` (the Fashion-MNIST share of the mix)
    are the knobs ``bench/retrieval_quality.py`` ablates, with the model ``preset``, the peak
    ``learning_rate``, the ``batch_size`` and the training ``precision`` (``TrainConfig.precision``; None: bf16
    where the CPU computes in bf16 natively, else fp32).
    """
    from vitrina.checkpoint import best_checkpoint, load_encoder
    from vitrina.config import to_dict
    from vitrina.data.emoji import export_emoji
    from vitrina.data.fashion_mnist import export_fashion_mnist
    from vitrina.data.holdout import HoldOutRule
    from vitrina.eval.retrieval import evaluate_index, format_table
    from vitrina.eval.style import format_style_table, style_recalls
    from vitrina.index.embed import index_folder
    from vitrina.search import Searcher

    if held_out_style not in EMOJI_STYLES:
        raise UserError(f"--held-out {held_out_style!r}: choose one of {', '.join(EMOJI_STYLES)}")
    console = Console(emoji=False)  # a data spec like "fashion-mnist:train:6000" is not an emoji code
    started = time.monotonic()
    train_styles = [s for s in EMOJI_STYLES if s != held_out_style]
    collections = out_dir / "collections"
    emoji_folder = collections / f"emoji-{held_out_style}"
    fashion_folder = collections / "fashion-mnist-test"
    checkpoint = out_dir / "clip"

    _step(console, 1, "data")
    n_emoji = export_emoji(held_out_style, emoji_folder)
    n_fashion = export_fashion_mnist("test", fashion_folder)
    console.print(f"held-out emoji style [bold]{held_out_style}[/]: {n_emoji} images → {emoji_folder}")
    console.print(f"Fashion-MNIST test set: {n_fashion} images → {fashion_folder}")

    _step(console, 2, "train")
    held_out = train_demo_clip(
        checkpoint,
        train_styles=train_styles,
        held_out_style=held_out_style,
        train_minutes=train_minutes,
        seed=seed,
        settings=settings,
        caption_variants=caption_variants,
        fashion_images=fashion_images,
        preset=preset,
        learning_rate=learning_rate,
        batch_size=batch_size,
        precision=precision,
        console=console,
    )
    rule = HoldOutRule(seed=seed)
    n_emoji_held = sum(c.startswith("emoji:") for c in held_out.concepts)
    model_dir = best_checkpoint(checkpoint)
    console.print(f"model used from here on: {model_dir} (best R@10 on the selection half of the held-out style)")
    encoder = load_encoder(str(model_dir))

    _step(console, 3, "index")
    indexes = {"emoji": out_dir / f"index-emoji-{held_out_style}", "fashion": out_dir / "index-fashion-mnist"}
    for name, folder in (("emoji", emoji_folder), ("fashion", fashion_folder)):
        report = index_folder(folder, encoder, indexes[name], model_ref=str(model_dir))
        console.print(report.summary())

    _step(console, 4, "search")
    for name, queries in (("emoji", EMOJI_QUERIES), ("fashion", FASHION_QUERIES)):
        searcher = Searcher(indexes[name], encoder=encoder)
        for query in queries:
            hits = searcher.search_text(query, k=5)
            shown = "; ".join(f"{h.caption or h.label} ({h.score:.2f})" for h in hits)
            console.print(f"[bold]{query!r}[/] → {shown}")
        searcher.close()

    _step(console, 5, "evaluate")
    results: dict = {
        "held_out": {
            "rule": to_dict(rule),
            "emoji_concepts": n_emoji_held,
            "fashion_classes": held_out.labels,
            "note": "zero-shot numbers are on these held-out concepts only; seen classes are 'prompted'",
        }
    }
    for name, index_dir in indexes.items():
        results[name] = evaluate_index(index_dir, encoder=encoder, held_out=to_dict(held_out))
        console.print(f"[bold]{index_dir.name}[/]")
        console.print(format_table(results[name]))
    # the style's captions and plain names, split as bench/retrieval_quality.py reports them
    results["held_out_style"] = style_recalls(encoder, set(held_out.concepts), seed, style=held_out_style)
    console.print(format_style_table(results["held_out_style"], held_out_style))
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")

    minutes = (time.monotonic() - started) / 60
    console.rule("[bold]done")
    console.print(f"checkpoint: {model_dir}\nindexes:    {indexes['emoji']}  {indexes['fashion']}")
    console.print(f"evaluation: {out_dir / 'eval.json'}   ({minutes:.1f} min)")
    console.print("next, in .venv (source .venv/bin/activate):")
    console.print(f'  vitrina search {indexes["emoji"]} "a cat face" -k 10')
    console.print(f"  vitrina search {indexes['fashion']} --image {next(fashion_folder.rglob('*.png'), 'IMAGE')}")
    console.print(f"  vitrina eval retrieval {indexes['emoji']}")
    return results
