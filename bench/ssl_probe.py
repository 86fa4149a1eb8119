"""Self-supervised pretraining on Fashion-MNIST, judged by how well a frozen backbone's features
serve a linear probe, kNN and k-means. ONE method per invocation, merged into
bench/results/ssl_probe.json as it finishes (run them one at a time, in the background).

Protocol (the same for every method):
* backbone ``vit-fmnist-28-fast`` (28 px, 7 px patches, width 128, depth 4), seed 0: on two cores
  it trains ~7x faster per image than ``vit-fmnist-28`` (4 px patches, width 192, depth 6), whose MAE
  run saw only 4 epochs in its cap; it is also the ViT student of bench/fmnist_classify.py;
* pretraining on the 60k Fashion-MNIST training images, labels unused, for at most ``--minutes``
  (the run is sized to the cap from a measured step rate, so its cosine schedule completes);
  DeepCluster on a seeded random 20k of them, so several cluster-and-train rounds fit the cap;
  the joint-embedding methods (``vicreg``, ``byol``, ``dino``) under a time budget instead
  (``TrainConfig.budget_minutes``: warm-up then cosine over ``--minutes`` of wall-clock time, which
  ends the run whatever the step rate) with multi-crop: 2 global views + ``--local-crops`` small ones;
* probes on the frozen [CLS] features: logistic regression on all 60k standardised training
  features, scored on the 10k test set (``linear_acc``), and beside it MAE's protocol, a
  BatchNorm(affine=False) + linear layer trained by SGD (``linear_bn_acc``, ``--no-probe-bn`` to
  skip), and DINO's multi-block probe (``linear_multiblock_acc``, ``--no-probe-multiblock`` to skip:
  the pooled features of the last 1 or 4 blocks, with or without the last block's mean patch token, the
  choice made on a held-out 10% of the training features); weighted cosine kNN (k = 20, T = 0.07; k = 200 too);
  k-means (10 clusters) NMI and ARI on the test features; t-SNE of 2,000 test points;
* baselines: ``random-init`` (the untrained backbone) and ``pixels`` (the raw 784 pixels).

Outputs: the row of ``--method`` in bench/results/ssl_probe.json, one seed at a time (``--seed``):
the row holds each seed's results and their mean (``n_seeds``); BENCHMARKS.md is regenerated;
``bench/results/ssl_probe_tsne_<method>.png`` and, for MAE, ``ssl_probe_mae_reconstructions.png``.
The pretrained checkpoint stays in ``runs/ssl_probe/<method>``; running the same command again
resumes an unfinished run, or only re-probes a finished one.

    python bench/ssl_probe.py --method simclr            # ~30 min pretraining + ~10 min probing
    python bench/ssl_probe.py --method vicreg --seed 1   # 30-min budget, 2 global + 4 local crops
    python bench/ssl_probe.py --method byol --minutes 0.3 --limit 2000 --results-dir /tmp/ssl-smoke  # smoke
    python bench/ssl_probe.py --method rotation --minutes 1 --probe-train 2000 --dry-run  # smoke
    python bench/ssl_probe.py --method simclr --finetune-epochs 10  # + full fine-tuning (`finetune_acc`)
    python bench/ssl_probe.py --method random-init --finetune-epochs 10  # its control: no pretraining
    python bench/ssl_probe.py --method mae --pool mean   # re-probe the finished run on mean-pooled tokens
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _report  # noqa: E402
from vitrina.data.splits import stratified_indices  # noqa: E402
from vitrina.errors import UserError  # noqa: E402
from vitrina.eval.probe import load_probe_model, probe_representation  # noqa: E402
from vitrina.ssl import METHODS as SSL_METHODS  # noqa: E402
from vitrina.ssl.data import probe_splits  # noqa: E402
from vitrina.ssl.run import MULTI_CROP_CONFIGS, parse_expander, run_pretraining  # noqa: E402
from vitrina.ssl.vicreg import VICRegConfig  # noqa: E402
from vitrina.train.schedule import BUDGET_EPOCH_LIMIT  # noqa: E402

BACKBONE = "vit-fmnist-28-fast"
# every method of vitrina.ssl but colorization, which needs colour images (Fashion-MNIST is grey)
METHODS = tuple(name for name in SSL_METHODS if name != "colorization")
# Trained under a time budget with multi-crop; 4 local views of 14 px (2 x 2 patches of 7 px) beside the
# two 28 px global views, as SwAV / DINO pair small crops with large ones.
JOINT_EMBEDDING = tuple(MULTI_CROP_CONFIGS)
LOCAL_CROPS = 4
BASELINES = ("random-init", "pixels")
FINETUNE_CAP_MINUTES = 30.0
# Hyper-parameters per method: (batch size, peak learning rate, images cap). Batches of 256 give
# SimCLR 510 negatives per anchor; relative position runs two tiles per image, hence 128.
SETTINGS = {
    "rotation": (256, 1e-3, None),
    "jigsaw": (256, 1e-3, None),
    "relative-position": (128, 1e-3, None),
    "inpainting": (256, 1e-3, None),
    "simclr": (256, 1e-3, None),
    "deepcluster": (256, 1e-3, 20_000),
    "mae": (256, 1e-3, None),
    "vicreg": (256, 1e-3, None),
    "byol": (256, 1e-3, None),
    "dino": (256, 1e-3, None),
}


def with_variant(names: tuple[str, str, str], shown: str, tag: str) -> tuple[str, str, str]:
    """(row name, file slug, run folder) of a recipe variant: ``, shown`` on the row name, ``_tag`` on the others."""
    row_name, slug, run_name = names
    return f"{row_name}, {shown}", f"{slug}_{tag}", f"{run_name}_{tag}"


def train_rate(run_dir: Path) -> float | None:
    """Median img/s of the training steps logged in ``metrics.jsonl`` (None when nothing was logged)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [r["img_per_s"] for r in map(json.loads, path.read_text().splitlines()) if "img_per_s" in r]
    return statistics.median(rates) if rates else None


def pretraining_row(result, run_dir: Path, batch_size: int, lr: float) -> dict:
    """The pretraining columns of a benchmark row: time, sizing and the measured training rate."""
    return {
        "pretrain_minutes": round(result.summary.total_minutes, 2),
        "epochs": result.summary.epochs_done,
        "pretrain_images": result.n_items,
        "batch_size": batch_size,
        "lr": lr,
        "train_img_per_s": train_rate(run_dir) or result.images_per_second,
    }


def finetune(run_dir: Path, args, *, limit: int | None) -> dict:
    """Full fine-tuning of the pretrained backbone (every layer trains, a new head) on the labelled
    training split, the transfer recipe of bench/fmnist_classify.py; scored on the 10k test set."""
    from vitrina.config import TrainConfig
    from vitrina.train.classify import ClassifySettings
    from vitrina.train.classify_data import load_classification_data
    from vitrina.train.transfer import TransferSettings, transfer_classifier

    data = load_classification_data("fashion-mnist", limit=limit, seed=args.seed)
    config = TrainConfig(epochs=args.finetune_epochs, batch_size=128, lr=1e-3, weight_decay=0.05, seed=args.seed,
                         max_minutes=FINETUNE_CAP_MINUTES)  # fmt: skip
    outcome = transfer_classifier(
        init=run_dir,
        data=data,
        out_dir=run_dir.with_name(f"finetune_{args.method}"),
        train_config=config,
        settings=ClassifySettings(label_smoothing=0.1),
        transfer=TransferSettings("finetune", freeze="none"),
        progress=False,
    )
    r = outcome.results
    return {
        "finetune_acc": r["test_acc"],
        "finetune_epochs": outcome.summary.epochs_done,
        "finetune_minutes": round(r["train_minutes"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=[*METHODS, *BASELINES])
    parser.add_argument("--minutes", type=float, default=30.0, help="pretraining time cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-train", type=int, default=60_000, help="training features for the probes")
    parser.add_argument("--probe-test", type=int, default=None, help="test images (default: all 10k)")
    parser.add_argument(
        "--finetune-epochs", type=int, default=0, help="also fine-tune the pretrained backbone for N epochs (0: no)"
    )
    parser.add_argument(
        "--pool",
        default=None,
        choices=["cls", "mean"],
        help="probe the [CLS] token or the mean of the patch tokens (default: the backbone's own pooling)",
    )
    parser.add_argument(
        "--backbone",
        default=BACKBONE,
        help=f"ViT preset to pretrain and probe (default {BACKBONE}); another one makes rows of its own",
    )
    parser.add_argument("--runs", default="runs/ssl_probe", help="where the pretrained checkpoints go")
    parser.add_argument("--dry-run", action="store_true", help="smoke run: results to a temporary folder only")
    parser.add_argument("--results-dir", default=None, help="write results (and runs) here instead of bench/results")
    parser.add_argument("--limit", type=int, default=None, help="smoke runs: at most N images to pretrain and probe")
    parser.add_argument(
        "--local-crops", type=int, default=LOCAL_CROPS, help="vicreg, byol, dino: small views beside the 2 global ones"
    )
    parser.add_argument(
        "--probe-bn", action=argparse.BooleanOptionalAction, default=True, help="also the BatchNorm + linear probe"
    )
    parser.add_argument(
        "--probe-multiblock",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also DINO's probe of the last 1 or 4 blocks [+ mean patch token], chosen on held-out training features",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16-stem"],
        default="fp32",
        help="joint-embedding pretraining: bf16-stem runs a hybrid backbone's conv stem under bf16 autocast",
    )
    parser.add_argument(
        "--expander", default=None, help="vicreg: expander widths, e.g. 2048x2048x2048 (default: VICRegConfig's)"
    )
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's in SETTINGS)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="pretraining batch size (default: the method's in SETTINGS)"
    )
    parser.add_argument(
        "--blur", type=float, default=None, help="joint-embedding views' blur probability (default: SimCLRAugment's)"
    )
    parser.add_argument("--log-every", type=int, default=10, help="steps per logged img/s window (smoke: 2)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.pool is not None and args.method == "pixels":
        parser.error("--pool: raw pixels have no tokens to pool")
    joint = args.method in JOINT_EMBEDDING
    if args.results_dir:
        _report.RESULTS_DIR = Path(args.results_dir)
        _report.MARKDOWN = _report.RESULTS_DIR / "BENCHMARKS.md"
        args.runs = str(_report.RESULTS_DIR / "runs")
    if args.limit is not None:
        args.probe_train = min(args.probe_train, args.limit)
        args.probe_test = min(args.probe_test or args.limit, args.limit)
    # a mean-pooled probe of a method is its own row, beside the [CLS] one; so is every other recipe
    # choice (backbone, multi-crop, expander, blur, learning rate, batch size, precision)
    mean_pooled = args.pool == "mean"
    row_name = f"{args.method}, mean-pooled" if mean_pooled else args.method
    slug = f"{args.method}_mean" if mean_pooled else args.method
    run_name = args.method  # the pretraining a row probes (a mean-pooled row probes its method's run)
    names = (row_name, slug, run_name)
    if args.backbone != BACKBONE and args.method != "pixels":
        names = with_variant(names, args.backbone, args.backbone)
    if joint and args.local_crops != LOCAL_CROPS:
        names = with_variant(names, f"{args.local_crops} local crops", f"{args.local_crops}local")
    expander_dims = None
    if args.expander:
        if args.method != "vicreg":
            parser.error("--expander: only vicreg has an expander")
        try:
            expander_dims = parse_expander(args.expander)
        except UserError as error:
            parser.error(str(error))
        if expander_dims == VICRegConfig().expander_dims:  # the default expander: the default row
            expander_dims = None
        else:
            label = "x".join(map(str, expander_dims))
            names = with_variant(names, f"expander {label}", f"expander{label}")
    if args.blur is not None:
        if not joint:
            parser.error("--blur: only the joint-embedding methods (vicreg, byol, dino) take it")
        names = with_variant(names, f"blur {args.blur:g}", f"blur{args.blur:g}")
    if args.lr is not None:
        if args.method not in METHODS:
            parser.error("--lr: only the pretraining methods take a learning rate")
        names = with_variant(names, f"lr {args.lr:g}", f"lr{args.lr:g}")
    if args.batch_size is not None:
        if args.method not in METHODS:
            parser.error("--batch-size: only the pretraining methods take a batch size")
        if args.batch_size < 2:
            parser.error("--batch-size: at least 2 (the joint-embedding losses need a batch's statistics)")
        names = with_variant(names, f"batch {args.batch_size}", f"batch{args.batch_size}")
    if args.precision != "fp32":
        if not joint:
            parser.error("--precision: only the time-budgeted joint-embedding methods (vicreg, byol, dino) take it")
        names = with_variant(names, args.precision, args.precision)
    row_name, slug, run_name = names
    out = Path(tempfile.mkdtemp(prefix="ssl_probe_")) if args.dry_run else _report.RESULTS_DIR
    # the pretrained checkpoint (for random-init, the untrained backbone saved for its fine-tune); seed 0
    # keeps the folder name of the runs from before seeds were a choice
    run_name = run_name if args.seed == 0 else f"{run_name}-seed{args.seed}"
    run_dir = (out / "runs" if args.dry_run else Path(args.runs)) / run_name
    row: dict = {"backbone": args.backbone if args.method != "pixels" else "-"}
    model = None
    if args.method in METHODS:
        batch_size, lr, max_items = SETTINGS[args.method]
        lr = args.lr if args.lr is not None else lr
        batch_size = args.batch_size if args.batch_size is not None else batch_size
        if args.limit is not None:
            max_items = min(max_items or args.limit, args.limit)
        if joint:  # a time budget: the schedule ends with --minutes, however fast the steps go
            sizing = {
                "epochs": BUDGET_EPOCH_LIMIT,
                "local_crops": args.local_crops,
                "expander_dims": expander_dims,
                "blur_p": args.blur,
            }
            sizing["train_settings"] = {
                "budget_minutes": args.minutes,
                "log_every": args.log_every,
                "precision": args.precision,
            }
        else:  # sized from a measured step rate, the cap as a safety stop
            sizing = {"minutes": args.minutes, "train_settings": {"log_every": args.log_every}}
        result = run_pretraining(
            args.method,
            backbone=args.backbone,
            data="fashion-mnist:train",
            out_dir=run_dir,
            batch_size=batch_size,
            lr=lr,
            seed=args.seed,
            max_items=max_items,
            **sizing,
        )
        model = result.method.backbone
        row.update(pretraining_row(result, run_dir, batch_size, lr))
        if args.method == "mae":
            shutil.copyfile(run_dir / "reconstructions.png", out / "ssl_probe_mae_reconstructions.png")
    elif args.method == "random-init":
        model = load_probe_model(args.backbone, seed=args.seed)
        row["pretrain_minutes"] = 0.0

    train, test = probe_splits("fashion-mnist", 28, seed=args.seed)
    if args.probe_train < len(train):
        train = train.subset(stratified_indices(train.labels, args.probe_train, args.seed))
    if args.probe_test is not None and args.probe_test < len(test):
        test = test.subset(stratified_indices(test.labels, args.probe_test, args.seed))
    probe_dir = (out if args.dry_run else Path(args.runs)) / f"probe_{slug}{f'-seed{args.seed}' if args.seed else ''}"
    pool = None if args.method == "pixels" else args.pool
    results = probe_representation(
        model,
        train,
        test,
        probe_dir,
        seed=args.seed,
        label=row_name,
        pool=pool,
        probe_bn=args.probe_bn,
        multi_block=args.probe_multiblock and model is not None,
    )
    multi = results.get("linear_multiblock")
    shutil.copyfile(probe_dir / "tsne.png", out / f"ssl_probe_tsne_{slug}.png")
    row.update(
        pool=results["pool"],
        linear_acc=results["linear"]["accuracy"],
        # MAE's BatchNorm + linear probe: another protocol, so a column of its own
        **({"linear_bn_acc": results["linear_bn"]["accuracy"]} if "linear_bn" in results else {}),
        # DINO's multi-block probe: wider features (up to 4 blocks + a mean token), so a column of its own too
        **(
            {
                "linear_multiblock_acc": multi["accuracy"],
                "multiblock_choice": multi["choice"],
                "multiblock_dim": multi["feature_dim"],
            }
            if multi
            else {}
        ),
        knn_acc=results["knn"]["k20"],
        knn200_acc=results["knn"]["k200"],
        nmi=results["cluster"]["nmi"],
        ari=results["cluster"]["ari"],
        probe_train=results["linear"]["n_train"],
        probe_minutes=round(sum(results["seconds"].values()) / 60, 2),
    )
    if args.finetune_epochs and args.method != "pixels" and not mean_pooled:
        if args.method == "random-init":  # the control: the same fine-tuning from the untrained backbone
            from vitrina.checkpoint import save_model

            save_model(model, run_dir)
        row.update(finetune(run_dir, args, limit=args.probe_train if args.dry_run else None))
    if args.dry_run:
        print(json.dumps({row_name: row}, indent=2))
        print(f"smoke outputs in {out} (nothing recorded)")
        return
    recipe = {
        "backbone": row["backbone"],
        "method": args.method,
        "pool": row["pool"],
        "minutes": args.minutes if args.method in METHODS else None,
        "budget": joint,
        "local_crops": args.local_crops if joint else None,
        "precision": args.precision,
        **({"expander": list(expander_dims)} if expander_dims else {}),
        **({"blur_p": args.blur} if args.blur is not None else {}),
        "batch_size": row.get("batch_size"),
        "lr": row.get("lr"),
        "probe_train": row["probe_train"],
        "probe_test": len(test),
        "finetune_epochs": args.finetune_epochs,
    }
    shown = ("backbone", "minutes", "local_crops") if joint else ("backbone",)
    listed = ("linear_acc", "linear_bn_acc", "linear_multiblock_acc")
    path = _report.record_seed("ssl_probe", row_name, args.seed, row, recipe=recipe, listed=listed, shown=shown)
    print(f"{row_name} seed {args.seed}: {json.dumps(row)}\nwritten: {path}")


if __name__ == "__main__":
    main()
