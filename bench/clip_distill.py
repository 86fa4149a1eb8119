"""CLIP image-tower distillation: a smaller student tower vs the demo's teacher, on held-out emoji.

1. Distil the teacher's image tower (``--teacher``, default the demo's ``runs/demo/clip``) into the
   ``--student`` tower on the demo's training images (``--data``, default the demo's spec), capped
   at ``--minutes``; a resumed run continues where it stopped.
2. Index the demo's held-out emoji collection with teacher and student; ``evaluate_index`` on both
   (caption -> image R@10, class-prompt R@10).
3. Embedding throughput of both image encoders on the same batches, alternating rounds.

Row ``{student}``: R@10 of each, the student/teacher R@10 ratio (target >= 0.95) and the
throughput ratio (target >= 4).

    .venv/bin/python bench/clip_distill.py                 # after `vitrina demo`
Smoke: .venv/bin/python bench/clip_distill.py --minutes 0.5 --limit 2000 --out /tmp/cd --results-dir /tmp/cd/r
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench._report as report  # noqa: E402
from vitrina.checkpoint import load_encoder  # noqa: E402
from vitrina.config import TrainConfig  # noqa: E402
from vitrina.data.emoji import EMOJI_STYLES  # noqa: E402
from vitrina.data.holdout import split_held_out  # noqa: E402
from vitrina.data.sources import load_training_items  # noqa: E402
from vitrina.demo import FASHION_TRAIN_IMAGES  # noqa: E402
from vitrina.distill.clip_tower import ClipDistillSettings, distill_clip_tower  # noqa: E402
from vitrina.eval.retrieval import evaluate_index  # noqa: E402
from vitrina.eval.seen_unseen import held_out_of  # noqa: E402
from vitrina.index.embed import index_folder  # noqa: E402

BENCHMARK = "clip_distill"
HELD_OUT = "facebook"


def throughput(encoders: dict, batch: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """Median img/s of each encoder's ``encode_image`` on ``batch``, timed in alternating rounds."""
    rates: dict[str, list[float]] = {name: [] for name in encoders}
    for encoder in encoders.values():
        encoder.encode_image(batch)  # warm-up
    for _ in range(rounds):
        for name, encoder in encoders.items():
            start = time.perf_counter()
            encoder.encode_image(batch)
            rates[name].append(len(batch) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="runs/demo/clip", help="CLIP checkpoint (made by `vitrina demo`)")
    parser.add_argument("--student", default="vit-demo-48-student")
    parser.add_argument("--collection", default=f"runs/demo/collections/emoji-{HELD_OUT}")
    train_styles = ",".join(s for s in EMOJI_STYLES if s != HELD_OUT)
    parser.add_argument("--data", default=f"emoji:{train_styles}+fashion-mnist:train:{FASHION_TRAIN_IMAGES}")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget (the schedule ends with it)")
    parser.add_argument("--epochs", type=int, default=1000, help="an upper bound; the budget ends the run")
    parser.add_argument("--limit", type=int, default=None, help="smoke runs: at most N training images")
    parser.add_argument("--text-weight", type=float, default=0.0, help="weight of the image-caption KL term")
    parser.add_argument("--seed", type=int, default=0, help="the student's init and data order (another row)")
    parser.add_argument("--out", default="runs/bench/clip-distill")
    parser.add_argument("--results-dir", default=None, help="write results here instead of bench/results")
    args = parser.parse_args()
    teacher = Path(args.teacher)
    if not (teacher / "config.json").is_file():
        raise SystemExit(f"--teacher {teacher}: no CLIP checkpoint there; run `vitrina demo` first (or pass --teacher)")
    if not Path(args.collection).is_dir():
        raise SystemExit(f"--collection {args.collection}: not found; run `vitrina demo` first")
    if args.results_dir:
        report.RESULTS_DIR = Path(args.results_dir)
        report.MARKDOWN = report.RESULTS_DIR / "BENCHMARKS.md"
    out = Path(args.out)
    pairs, concepts = load_training_items(args.data, seed=0)
    # the concepts the teacher was kept from (its config's held_out) stay out of the student's images too
    held = set((held_out_of(str(teacher)) or {}).get("concepts", []))
    pairs = split_held_out(pairs, concepts, held)[0]
    if args.limit:
        pairs = pairs[: args.limit]
    # the schedule (warm-up, cosine) is laid over the budget's wall-clock time and ends with it; --epochs only caps it
    config = TrainConfig(
        epochs=args.epochs, batch_size=128, lr=1e-3, weight_decay=0.05, budget_minutes=args.minutes, seed=args.seed
    )
    summary = distill_clip_tower(
        teacher_path=teacher,
        student_preset=args.student,
        pairs=pairs,
        out_dir=out / "student",
        train_config=config,
        settings=ClipDistillSettings(text_weight=args.text_weight),
    )
    print(f"student: {summary}")

    encoders = {"teacher": load_encoder(teacher), "student": load_encoder(out / "student")}
    results = {}
    for name, encoder in encoders.items():
        index_dir = out / f"index-{name}"
        ref = str(teacher if name == "teacher" else out / "student")
        index_folder(Path(args.collection), encoder, index_dir, model_ref=ref, progress=False)
        results[name] = evaluate_index(index_dir, encoder=encoder)
    images = [p for p in sorted(Path(args.collection).rglob("*.png"))[:64]]
    from PIL import Image

    batch = torch.stack([encoders["teacher"].image_transform(Image.open(p).convert("RGB")) for p in images])
    rates = throughput(encoders, batch)

    def r10(name: str, task: str) -> float:
        section = results[name]["captions"]["text_to_image"] if task == "captions" else results[name]["labels"]
        return section["R@10"]

    row = {
        "teacher_caption_R@10": r10("teacher", "captions"),
        "student_caption_R@10": r10("student", "captions"),
        "caption_R@10_ratio": r10("student", "captions") / max(r10("teacher", "captions"), 1e-9),
        "teacher_label_R@10": r10("teacher", "labels"),
        "student_label_R@10": r10("student", "labels"),
        "teacher_img_per_s": rates["teacher"],
        "student_img_per_s": rates["student"],
        "throughput_ratio": rates["student"] / rates["teacher"],
        "train_minutes": summary.total_minutes,
        "epochs": summary.epochs_done,
        "budget_minutes": args.minutes,
        "val_cosine": summary.metrics.get("val/cosine"),
    }
    name = (
        args.student
        + (f"-text{args.text_weight:g}" if args.text_weight else "")
        + (f"-seed{args.seed}" if args.seed else "")
    )
    path = report.record(BENCHMARK, name, row | {"text_weight": args.text_weight, "seed": args.seed})
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    print(f"written {path}")


if __name__ == "__main__":
    main()
