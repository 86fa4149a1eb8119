"""Fashion-MNIST classification: from scratch, distilled from a CNN teacher, and transferred from CLIP.

One named configuration and one seed per invocation (so runs can go one at a time, in the
background), each on the real 10k test set, merged into ``bench/results/fmnist_classify.json``: a
row per configuration holds every seed's results (``per_seed``), their mean (``test_acc`` ...) and
how many seeds that is (``n_seeds``), beside a learning-curve PNG of all its seeds
(``bench/results/fmnist_classify-<row>.png``); BENCHMARKS.md is rebuilt by ``bench/_report.py``.

Every row trains under a time budget (``TrainConfig.budget_minutes``): warm-up, then a cosine that
reaches its floor when ``--minutes`` of wall-clock time are spent, evaluations included, which ends
the run whatever the step rate. ``train_img_per_s`` is the median logged training rate of the run
itself. EMA of the weights and flip TTA are options of each row (``--ema``/``--no-ema``,
``--tta``/``--no-tta``), recorded in it. A distillation row learns from its teacher row's checkpoint
of the same seed; the teacher's training minutes stand beside it (and the minutes its cached view
logits took to build, for ``-views`` rows), with the total.

    .venv/bin/python bench/fmnist_classify.py --run cnn-teacher-deep --seed 0 --name cnn-teacher-deep-bf16
    .venv/bin/python bench/fmnist_classify.py --run hybrid-kd-deit --seed 0     # its teacher: that seed's
    .venv/bin/python bench/fmnist_classify.py --run hybrid-scratch --seed 1 --no-ema --name hybrid-scratch-no-ema

``--retest-of ROW`` trains nothing: it tests ROW's best checkpoint of ``--seed`` again with this
command's test settings (``--tta-shift``) into a row of its own, carrying the training facts over:

    .venv/bin/python bench/fmnist_classify.py --run hybrid-s8r1-scratch --retest-of hybrid-s8r1-scratch-amx \
        --tta-shift 1 --seed 0 --name hybrid-s8r1-scratch-amx-tta10

Smoke test (tiny, results kept out of bench/results):
    .venv/bin/python bench/fmnist_classify.py --run hybrid-scratch --minutes 0.3 --limit 2000 \\
        --out /tmp/fmnist-smoke --results-dir /tmp/fmnist-smoke/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench._report as report  # noqa: E402
from vitrina.checkpoint import load_model  # noqa: E402
from vitrina.config import PRECISIONS, TrainConfig  # noqa: E402
from vitrina.distill.trainer import (  # noqa: E402
    DistillSettings,
    KDKind,
    distill_classifier,
    ensemble_logits,
    load_teacher,
)
from vitrina.train.classify import (  # noqa: E402
    ClassifySettings,
    build_classifier,
    count_parameters,
    predict,
    preprocess_of,
    test_report,
    train_classifier,
)
from vitrina.train.classify_data import load_classification_data, unit_pixels  # noqa: E402
from vitrina.train.schedule import BUDGET_EPOCH_LIMIT  # noqa: E402
from vitrina.train.transfer import TransferSettings, transfer_classifier  # noqa: E402

BENCHMARK = "fmnist_classify"
SPLIT_SEED = 0  # the 54k/6k train/validation split is the same for every seed; --seed varies init and order
EMA_DECAY = 0.999  # horizon ~1k steps: a 30-minute run takes 10-30k steps of 128 images


@dataclass
class Run:
    """One configuration: what trains, from what, with which recipe.

    The default recipe is the short-budget one of the fast-training literature: AdamW (weight decay
    0.05), batch 128, linear warm-up over 5% of the budget then cosine to 0, label smoothing 0.1,
    light augmentation (random crop of the 2 px zero-padded image + horizontal flip; no erasing: a
    30-minute run underfits more than it overfits), EMA of the weights and flip TTA.
    """

    kind: str  # "scratch", "distill" or "transfer"
    model: str | None = None  # preset (scratch, distill student)
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.05
    crop_pad: int = 2
    erasing: float = 0.0
    ema: bool = True
    tta: bool = True
    tta_shift: int = 0  # px; > 0: the test averages 10 views (flips of the image and of 4 shifts), not 2
    distill: DistillSettings | None = None
    teacher_row: str | None = None  # the row whose checkpoint (same seed) a distill run learns from
    # instead of the same seed: the ensemble of teacher_row's checkpoints of these seeds, for every student seed
    teacher_seeds: tuple[int, ...] | None = None
    transfer: TransferSettings | None = None
    epochs: int | None = None  # fixed epochs instead of the time budget, for runs whose epochs cost little
    # TrainConfig.precision; "auto": bf16 autocast where the CPU has native bf16 (it pays off for CNNs there),
    # else fp32 (on an AVX2-only CPU a bf16 conv step measured ~10x slower than fp32)
    precision: str = "fp32"


def function_matching() -> DistillSettings:
    """Function matching (Beyer et al. 2022, "a good teacher is patient and consistent"): the teacher's
    distribution alone (alpha 1: no label term, T 1), on the very views the student sees (the cached views)."""
    return DistillSettings(KDKind.RESPONSE, alpha=1.0, temperature=1.0, teacher_bf16=True, cache_views=True)


# The first round's recipe: random erasing, no EMA, no TTA (its rows are kept comparable).
FIRST_ROUND = {"erasing": 0.25, "ema": False, "tta": False}
STUDENT = "vit-fmnist-28-fast"
HYBRID = "vit-hybrid-fmnist"
RUNS: dict[str, Run] = {
    # --- the teachers ---
    # resnet-fmnist-28-teacher: a second block in the 14 x 14 and 7 x 7 stages (0.68M parameters); the
    # teacher of hybrid-kd-deit. bf16 autocast where the CPU has it natively (--precision to choose).
    "cnn-teacher-deep": Run("scratch", "resnet-fmnist-28-teacher", lr=2e-3, precision="auto"),
    # The first round's teacher (0.31M parameters, one block per stage) of the vit-kd-* rows.
    "cnn-teacher": Run("scratch", "resnet-fmnist-28", lr=2e-3, precision="auto", **FIRST_ROUND),
    "cnn-resnet-mini": Run("scratch", "resnet-mini-28", lr=2e-3, **FIRST_ROUND),
    # --- ViTs from scratch ---
    # Conv stem (28 -> 14 -> 7) in place of the 4 px patch embedding: 49 tokens, width 192, depth 5, [CLS].
    "hybrid-scratch": Run("scratch", HYBRID),
    # Conv stem + sequence pooling (CCT-like), width 128, depth 4.
    "hybrid-seqpool-scratch": Run("scratch", "vit-hybrid-fmnist-seqpool"),
    # Three stride-2 convs (32-64-128) to 4 x 4 tokens, width 128, depth 6, sequence pooling: ~1.7x the steps.
    "hybrid-s8-scratch": Run("scratch", "vit-hybrid-fmnist-s8"),
    # The same with a residual stride-1 conv refining each stage of the stem (the ViT paper's hybrid, small).
    "hybrid-s8r1-scratch": Run("scratch", "vit-hybrid-fmnist-s8-r1"),
    # The r1 hybrid at width 256 (heads 8): the scratch row of the wide distilled student.
    "hybrid-s8r1w256-scratch": Run("scratch", "vit-hybrid-fmnist-s8-r1-w256"),
    # The plain-patch baselines: 4 px patches (49 tokens, width 192, depth 6), and 7 px (16 tokens, width 128,
    # depth 4: ~6x the img/s), each under the same budget recipe as the hybrids.
    "vit-scratch": Run("scratch", "vit-fmnist-28"),
    "vit-scratch-p7": Run("scratch", STUDENT),
    # --- distillation ---
    # DeiT (hard): the s8 hybrid with a distillation token beside its sequence pooling learns the deep teacher's
    # argmax; its own scratch row is hybrid-s8-scratch-chlast. The teacher is cnn-teacher-deep's recipe trained under
    # bf16 (`--run cnn-teacher-deep --name cnn-teacher-deep-bf16`, a CPU with native bf16), and its forward
    # runs under bf16 here too where the CPU has it.
    "hybrid-kd-deit": Run(
        "distill",
        "vit-hybrid-fmnist-s8",
        distill=DistillSettings(KDKind.DEIT_HARD, teacher_bf16=True),
        teacher_row="cnn-teacher-deep-bf16",
    ),
    # Hinton's soft targets (alpha 0.7, T 4) into the r1 hybrid; its own scratch row is hybrid-s8r1-scratch.
    # In 6-minute pilots (seed 0) soft targets beat a DeiT token on this student: 90.52% against 90.11%.
    "hybrid-r1-kd-response": Run(
        "distill",
        "vit-hybrid-fmnist-s8-r1",
        distill=DistillSettings(KDKind.RESPONSE, alpha=0.7, temperature=4.0, teacher_bf16=True),
        teacher_row="cnn-teacher-deep-bf16",
    ),
    # The same soft targets, looked up instead of computed per step: the teacher's logits for every shift/flip
    # view of every training image, built once beside the teacher checkpoint (DistillSettings.cache_views), so
    # the student steps at its scratch row's rate; the build's minutes stand beside the teacher's.
    "hybrid-r1-kd-response-views": Run(
        "distill",
        "vit-hybrid-fmnist-s8-r1",
        distill=DistillSettings(KDKind.RESPONSE, alpha=0.7, temperature=4.0, teacher_bf16=True, cache_views=True),
        teacher_row="cnn-teacher-deep-bf16",
    ),
    # Function matching (function_matching()) from one teacher.
    "hybrid-r1-kd-match-views": Run(
        "distill",
        "vit-hybrid-fmnist-s8-r1",
        distill=function_matching(),
        teacher_row="cnn-teacher-deep-bf16",
    ),
    # DIST (Huang et al. 2022, "knowledge distillation from a stronger teacher"): labels (CE) plus the Pearson
    # correlation of the student's class probabilities with the teacher's, per image and per class over the batch
    # (T 1, weight 1 as the paper's ImageNet runs), on the same cached views: relations, not the teacher's confidence.
    "hybrid-r1-kd-dist-views": Run(
        "distill",
        "vit-hybrid-fmnist-s8-r1",
        distill=DistillSettings(KDKind.DIST, temperature=1.0, beta=1.0, teacher_bf16=True, cache_views=True),
        teacher_row="cnn-teacher-deep-bf16",
    ),
    # The same function matching from the ensemble of two teachers (the deep teacher's seeds 0 and 1: their mean
    # softmax per view, each teacher's views cached beside its checkpoint): a stronger, equally consistent target.
    "hybrid-r1-kd-match-ens2": Run(
        "distill",
        "vit-hybrid-fmnist-s8-r1",
        distill=function_matching(),
        teacher_row="cnn-teacher-deep-bf16",
        teacher_seeds=(0, 1),
    ),
    # A student with twice the width (256, heads 8, depth 4: 2.43M parameters, 0.043 GMACs against 1.10M and
    # 0.021), to see whether the r1 student's capacity is what keeps it ~1 point under its teacher; its own scratch
    # row is hybrid-s8r1w256-scratch (the same preset and recipe).
    "hybrid-r1w256-kd-match-views": Run(
        "distill",
        "vit-hybrid-fmnist-s8-r1-w256",
        distill=function_matching(),
        teacher_row="cnn-teacher-deep-bf16",
    ),
    # The first round's KD rows: the vit-fmnist-28-fast student from cnn-teacher (baseline: vit-scratch-p7).
    "vit-kd-response": Run(
        "distill",
        STUDENT,
        distill=DistillSettings(KDKind.RESPONSE, alpha=0.7, temperature=4.0, teacher_bf16=True),
        teacher_row="cnn-teacher",
        **FIRST_ROUND,
    ),
    "vit-kd-feature": Run(
        "distill",
        STUDENT,
        distill=DistillSettings(KDKind.FEATURE, beta=1.0, teacher_bf16=True),
        teacher_row="cnn-teacher",
        **FIRST_ROUND,
    ),
    "vit-kd-relation": Run(
        "distill",
        STUDENT,
        distill=DistillSettings(KDKind.RELATION, beta=1.0, teacher_bf16=True),
        teacher_row="cnn-teacher",
        **FIRST_ROUND,
    ),
    "vit-kd-deit": Run(
        "distill",
        STUDENT,
        distill=DistillSettings(KDKind.DEIT_HARD, teacher_bf16=True),
        teacher_row="cnn-teacher",
        **FIRST_ROUND,
    ),
    # --- transfer: the demo's CLIP image tower (48 px) ---
    "clip-linear-probe": Run(
        "transfer",
        lr=3e-3,
        weight_decay=0.0,
        label_smoothing=0.0,
        transfer=TransferSettings("linear-probe"),
        epochs=40,  # on cached features an epoch takes a second; the time goes into one feature pass
        **FIRST_ROUND,
    ),
    "clip-finetune": Run(
        "transfer", lr=5e-4, transfer=TransferSettings("finetune", freeze="none", layer_decay=0.75), **FIRST_ROUND
    ),
}


def train_config(run: Run, *, minutes: float, epochs: int | None, seed: int, log_every: int = 10) -> TrainConfig:
    """The loop's settings: a ``minutes`` time budget, or fixed ``epochs`` (``minutes`` then a cap)."""
    common = dict(
        batch_size=run.batch_size,
        lr=run.lr,
        weight_decay=run.weight_decay,
        warmup_fraction=run.warmup_fraction,
        seed=seed,
        precision=run.precision,
        ema_decay=EMA_DECAY if run.ema else None,
        log_every=log_every,
    )
    if epochs is not None:
        return TrainConfig(epochs=epochs, max_minutes=minutes, **common)
    return TrainConfig(epochs=BUDGET_EPOCH_LIMIT, budget_minutes=minutes, **common)


def execute(run: Run, data, out: Path, config: TrainConfig, teachers: list[Path], clip: Path):
    """Train ``run`` into ``out``; returns the ``ClassifyOutcome``."""
    settings = ClassifySettings(
        label_smoothing=run.label_smoothing,
        crop_pad=run.crop_pad,
        erasing=run.erasing,
        tta=run.tta,
        tta_shift=run.tta_shift,
    )
    if run.kind == "scratch":
        model = build_classifier(run.model, len(data.class_names), seed=config.seed)
        return train_classifier(model=model, data=data, out_dir=out, train_config=config, settings=settings)
    if run.kind == "distill":
        return distill_classifier(
            teacher_paths=teachers,
            student_preset=run.model,
            data=data,
            out_dir=out,
            train_config=config,
            settings=settings,
            distill=run.distill,
        )
    return transfer_classifier(
        init=clip, data=data, out_dir=out, train_config=config, settings=settings, transfer=run.transfer
    )


def measured_img_per_s(metrics_path: Path) -> float | None:
    """Median training img/s over the logged windows, the first (warm-up) one left out."""
    rates = [r["img_per_s"] for r in map(json.loads, metrics_path.read_text().splitlines()) if "img_per_s" in r]
    return statistics.median(rates[1:] or rates) if rates else None


def teacher_minutes(teacher: Path) -> float | None:
    """Training minutes of the teacher checkpoint ``.../best``, from its run's ``results.json`` (None: unknown)."""
    results = teacher.parent / "results.json"
    if not results.is_file():
        return None
    return json.loads(results.read_text()).get("train_minutes")


def ensemble_test_acc(teachers: list[Path], data, *, tta: bool) -> float:
    """Test accuracy of the teachers' ensemble as the student learns it (the mean of their softmax,
    ``ensemble_logits``), each teacher tested as its own row is (flip TTA when ``tta``)."""
    logits = []
    for path in teachers:
        model, pre = load_teacher(path, data)  # as the distillation loaded it: eval mode, its own preprocessing
        logits.append(predict(model, unit_pixels(data.test, pre.image_size), pre, 500, tta=tta))
    return float((ensemble_logits(logits).argmax(dim=1) == data.test.labels).float().mean())


def recipe_of(run: Run, args) -> dict:
    """What every seed of a row shares: it decides the numbers, so seeds of different recipes never mix."""
    recipe = {
        "kind": run.kind,
        "preset": run.model,
        "budget_minutes": None if args.epochs else args.minutes,
        "fixed_epochs": args.epochs,
        "ema": run.ema,
        "ema_decay": EMA_DECAY if run.ema else None,
        "tta": run.tta,
        "lr": run.lr,
        "batch_size": run.batch_size,
        "weight_decay": run.weight_decay,
        "label_smoothing": run.label_smoothing,
        "warmup_fraction": run.warmup_fraction,
        "crop_pad": run.crop_pad,
        "erasing": run.erasing,
        "precision": run.precision,
        "split_seed": SPLIT_SEED,
        "limit": args.limit,
    }
    if run.tta_shift:  # only then: the rows written before the option keep their recipe
        recipe["tta_shift"] = run.tta_shift
    if run.distill is not None:
        recipe["distill"] = {k: str(v) if isinstance(v, KDKind) else v for k, v in asdict(run.distill).items()}
        if not run.distill.cache_views:  # only then: the rows written before the option keep their recipe
            del recipe["distill"]["cache_views"]
        recipe["teacher_row"] = run.teacher_row
        if run.teacher_seeds:  # only then: the rows written before ensembles keep their recipe
            recipe["teacher_seeds"] = list(run.teacher_seeds)
    if run.transfer is not None:
        recipe["transfer"] = asdict(run.transfer)
    return recipe


def learning_curves(runs: list[tuple[int, Path]], png: Path, title: str) -> None:
    """Training loss per logged step and validation accuracy per epoch of every seed, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    acc = ax.twinx()
    for i, (seed, metrics_path) in enumerate(runs):
        records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["eval"]["val/acc"]) for r in records if "eval" in r]
        style = ("-", "--", ":", "-.")[i % 4]
        if train:
            ax.plot(*zip(*train, strict=True), ls=style, color="tab:blue", lw=1, label=f"train loss, seed {seed}")
        if val:
            acc.plot(*zip(*val, strict=True), ls=style, color="tab:orange", marker="o", label=f"val acc, seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    acc.set_ylabel("val accuracy")
    ax.set_title(title)
    fig.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def apply_overrides(run: Run, args) -> Run:
    """The row's recipe with the command line's ``--ema``/``--tta``/``--precision``/``--teacher-bf16`` choices."""
    options = (("ema", args.ema), ("tta", args.tta), ("tta_shift", args.tta_shift), ("precision", args.precision))
    run = replace(run, **{k: v for k, v in options if v is not None})
    if run.precision == "auto":
        run = replace(run, precision="bf16" if cpu_has_bf16() else "fp32")
    if run.distill is not None:  # the row's teacher_bf16 means "where the CPU has it", as "auto" does
        wanted = run.distill.teacher_bf16 and cpu_has_bf16() if args.teacher_bf16 is None else args.teacher_bf16
        run = replace(run, distill=replace(run.distill, teacher_bf16=wanted))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=0, help="model init and data order (the split stays the same)")
    parser.add_argument("--minutes", type=float, default=30.0, help="the time budget of the training")
    parser.add_argument("--epochs", type=int, default=None, help="fixed epochs instead of the budget (a cap then)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="weight average (row's)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="flip TTA (row's)")
    parser.add_argument(
        "--tta-shift", type=int, default=None, metavar="PX", help="test: also 4 views shifted by PX px (row's: 0)"
    )
    parser.add_argument(
        "--retest-of",
        default=None,
        metavar="ROW",
        help="train nothing: test ROW's best checkpoint of --seed with this run's test settings (e.g. --tta-shift)",
    )
    parser.add_argument(
        "--precision",
        choices=[*PRECISIONS, "auto"],
        default=None,
        help="forward precision (row's); bf16-stem: a hybrid ViT's conv stem only",
    )
    parser.add_argument(
        "--teacher-bf16", action=argparse.BooleanOptionalAction, default=None, help="distill: teacher forward (row's)"
    )
    parser.add_argument(
        "--teacher",
        action="append",
        default=None,
        help="distill rows: teacher checkpoint, repeated for an ensemble (default: its row's seed or teacher_seeds)",
    )
    parser.add_argument("--clip", default="runs/demo/clip", help="transfer runs: the CLIP checkpoint")
    parser.add_argument("--out", default="runs/bench/fmnist", help="parent folder of the runs' checkpoints")
    parser.add_argument("--name", default=None, help="the row (default: --run), e.g. to keep another recipe apart")
    parser.add_argument("--limit", type=int, default=None, help="smoke runs: about N images per split")
    parser.add_argument("--log-every", type=int, default=10, help="steps per logged img/s window (smoke: 2)")
    parser.add_argument("--results-dir", default=None, help="write results here instead of bench/results")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = apply_overrides(RUNS[args.run], args)
    name = args.name or args.run
    out_root = Path(args.out)
    teachers: list[Path] = []
    if run.kind == "distill" and not args.retest_of:  # a re-test needs the student's checkpoint only
        seeds = run.teacher_seeds or (args.seed,)
        teachers = [Path(t) for t in args.teacher or [out_root / run.teacher_row / f"seed{s}" / "best" for s in seeds]]
        missing = [t for t in teachers if not t.is_dir()]
        if missing:
            raise SystemExit(
                f"--teacher {missing[0]}: not found; train it (`--run {run.teacher_row} --seed N`, same --out) "
                "or pass --teacher"
            )
    if run.kind == "transfer" and not Path(args.clip).is_dir():
        raise SystemExit(f"--clip {args.clip}: not found; run `vitrina demo` first (or pass --clip)")
    if args.results_dir:
        report.RESULTS_DIR = Path(args.results_dir)
        report.MARKDOWN = report.RESULTS_DIR / "BENCHMARKS.md"

    recipe = recipe_of(run, args)
    if args.retest_of:
        recipe["retest_of"] = args.retest_of
    report.check_recipe(BENCHMARK, name, recipe)  # before the run, not after it
    out = out_root / name / f"seed{args.seed}"
    data = load_classification_data("fashion-mnist", limit=args.limit, seed=SPLIT_SEED)
    if args.retest_of:
        seed_row, r = retest(args.retest_of, args.seed, recipe, data, out_root, out, run)
        record(name, args.seed, seed_row, recipe, r["test_acc"], out_root / args.retest_of)
        return
    epochs = args.epochs or run.epochs
    config = train_config(run, minutes=args.minutes, epochs=epochs, seed=args.seed, log_every=args.log_every)
    outcome = execute(run, data, out, config, teachers, Path(args.clip))
    r = outcome.results
    params = count_parameters(load_best(outcome.best_dir))[0]
    seed_row = {"test_acc": r["test_acc"], "params": params, "train_minutes": r["train_minutes"]}
    if teachers:  # beside the student's own minutes: what the whole recipe cost (every teacher of an ensemble)
        each = [teacher_minutes(t) for t in teachers]
        spent = None if None in each else sum(each)
        seed_row["teacher_minutes"] = spent
        views = r.get("teacher_view_logits_minutes")  # the cached views' build, once per teacher (reused)
        if views is not None:
            seed_row["teacher_view_logits_minutes"] = views
        seed_row["total_minutes"] = None if spent is None else spent + (views or 0.0) + r["train_minutes"]
    seed_row |= {
        "epochs": outcome.summary.epochs_done,
        "best_epoch": r["best_epoch"],
        "train_img_per_s": measured_img_per_s(out / "metrics.jsonl"),
        "budget_spent": r["budget_spent"],
        "test_images": r["test_images"],
        "tta_views": r["tta_views"],
        "checkpoint": str(outcome.best_dir),
    }
    if len(teachers) > 1:  # what the student learnt from, beside what it reached
        seed_row["teacher_ensemble_test_acc"] = ensemble_test_acc(teachers, data, tta=run.tta)
    if teachers:
        seed_row["teacher"] = str(teachers[0]) if len(teachers) == 1 else [str(t) for t in teachers]
    record(name, args.seed, seed_row, recipe, r["test_acc"], out_root / name)


# what a re-test may change: the test's settings, nothing that trains
TEST_ONLY = ("tta_shift", "retest_of")


def retest(source: str, seed: int, recipe: dict, data, out_root: Path, out: Path, run: Run) -> tuple[dict, dict]:
    """Test row ``source``'s best checkpoint of ``seed`` with ``run``'s test settings, training nothing.

    The source seed's training facts (minutes, epochs, img/s, the command and machine that trained
    it) are carried over, so the row says what its checkpoint cost; its recipe must be this one's
    but for the test settings (``TEST_ONLY``), or the carried facts would describe another recipe.
    """
    table = json.loads((report.RESULTS_DIR / f"{BENCHMARK}.json").read_text())
    trained = table.get(source, {}).get("per_seed", {}).get(str(seed))
    if trained is None:
        raise SystemExit(f"--retest-of {source}: the row has no seed {seed} in {BENCHMARK}.json; train it first")
    saved = table[source]["recipe"]
    differ = sorted(k for k in {*saved, *recipe} - set(TEST_ONLY) if saved.get(k) != recipe.get(k))
    if differ:
        raise SystemExit(f"--retest-of {source}: its recipe differs from --run's in {', '.join(differ)}")
    checkpoint = out_root / source / f"seed{seed}" / "best"
    if not checkpoint.is_dir():
        raise SystemExit(f"--retest-of {source}: {checkpoint} not found; train it again: {trained['command']}")
    model, config = load_model(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    r = test_report(model, data, preprocess_of(config, model), out, tta=run.tta, tta_shift=run.tta_shift)
    carried = ("train_minutes", "teacher_minutes", "teacher_view_logits_minutes", "total_minutes", "epochs")
    carried += ("best_epoch", "train_img_per_s")
    seed_row = {"test_acc": r["test_acc"], "params": count_parameters(model)[0]}
    seed_row |= {k: trained[k] for k in (*carried, "budget_spent") if k in trained}
    seed_row |= {"test_images": r["test_images"], "tta_views": r["tta_views"], "checkpoint": str(checkpoint)}
    seed_row["trained_by"] = {k: trained.get(k) for k in ("command", "machine", "date")}
    return seed_row, r


def record(name: str, seed: int, seed_row: dict, recipe: dict, test_acc: float, runs_of_row: Path) -> None:
    """Merge the seed into its row and redraw the row's learning curves (from ``runs_of_row``'s seeds)."""
    report.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    png = report.RESULTS_DIR / f"{BENCHMARK}-{name}.png"
    seeds = sorted((int(p.name[4:]), p / "metrics.jsonl") for p in runs_of_row.glob("seed*") if p.name[4:].isdigit())
    learning_curves([(s, m) for s, m in seeds if m.is_file()], png, f"{name}: seed {seed} {test_acc:.2%}")
    shown = ("preset", "budget_minutes", "ema", "tta")
    path = report.record_seed(BENCHMARK, name, seed, seed_row, recipe=recipe, shown=shown)
    print(f"{name} seed {seed}: test accuracy {test_acc:.4f}; written {path} and {png}")


def load_best(folder: Path):
    return load_model(folder)[0]


if __name__ == "__main__":
    main()
