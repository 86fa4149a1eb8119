"""Self-supervised features across drawing styles: pretrain on three emoji styles (labels unused),
then probe emoji categories in the fourth style, which neither the pretraining nor the probe saw.
ONE method per invocation, merged into bench/results/ssl_cross_style.json as it finishes.

Protocol (the same for every method):
* the emoji concepts drawn in all four styles, minus the categories with fewer than
  ``MIN_CONCEPTS`` of them, are split by concept (seed 0, stratified by category) into 70% probe-train
  and 30% probe-test concepts, so no test concept is seen by the probe in any style;
* backbone ``vit-demo-48-student-p12`` (48 px, 12 px patches: 16 tokens of width 128, as on the
  Fashion-MNIST benchmark), pretrained for at most ``--minutes`` on every image of the apple, google
  and twitter styles (the run is sized to the cap, so its cosine schedule completes);
* the probes of bench/ssl_probe.py on the frozen [CLS] features (logistic regression, weighted cosine
  kNN with k = 20, k-means NMI/ARI), fit on the probe-train concepts in the three pretraining
  styles and scored twice: on the probe-test concepts in those styles (``in_style_*``) and on the
  same concepts drawn in facebook's style (``linear_acc``, ``knn_acc``, ``nmi``: the headline);
* baselines: ``random-init`` (the untrained backbone) and ``pixels`` (the raw 48 x 48 x 3 pixels).

    python bench/ssl_cross_style.py --method simclr --minutes 5
    python bench/ssl_cross_style.py --method rotation --minutes 0.2 --dry-run   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _report  # noqa: E402
from bench.ssl_probe import SETTINGS, pretraining_row  # noqa: E402
from vitrina.data import emoji as emoji_data  # noqa: E402
from vitrina.data.splits import stratified_indices  # noqa: E402
from vitrina.eval.probe import load_probe_model, probe_representation  # noqa: E402
from vitrina.ssl.data import ImageSet, decode_images  # noqa: E402
from vitrina.ssl.run import run_pretraining  # noqa: E402

BACKBONE = "vit-demo-48-student-p12"
IMAGE_SIZE = 48
PRETRAIN_STYLES = ("apple", "google", "twitter")
HELD_OUT_STYLE = "facebook"
MIN_CONCEPTS = 20  # a category with fewer concepts gives a probe too few examples to learn it from
TEST_FRACTION = 0.3
METHODS = (*SETTINGS, "colorization")
BASELINES = ("random-init", "pixels")


def split_concepts(category_of: dict[str, str], seed: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(class names, concepts, their labels, which of them are probe-test concepts) from a concept ->
    category map: categories with fewer than ``MIN_CONCEPTS`` concepts are left out, the rest split
    ``TEST_FRACTION`` / rest by ``seed``, stratified by category."""
    counts = Counter(category_of.values())
    class_names = sorted(category for category, n in counts.items() if n >= MIN_CONCEPTS)
    ids = {name: i for i, name in enumerate(class_names)}
    concepts = [code for code, category in category_of.items() if category in ids]
    labels = np.array([ids[category_of[code]] for code in concepts], dtype=np.int64)
    is_test = np.zeros(len(concepts), dtype=bool)
    is_test[stratified_indices(labels, round(TEST_FRACTION * len(concepts)), seed)] = True
    return class_names, concepts, labels, is_test


def concept_splits(seed: int) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(probe-train in the pretraining styles, probe-test in those styles, probe-test in the held-out
    style): the emoji drawn in all four styles, split by concept, labelled by category."""
    styles = emoji_data.EMOJI_STYLES
    by_style = {style: {item.unified: item for item in emoji_data.load_emoji(style)} for style in styles}
    held_out = by_style[HELD_OUT_STYLE]
    shared = {code: item.category for code, item in held_out.items() if all(code in i for i in by_style.values())}
    class_names, concepts, labels, is_test = split_concepts(shared, seed)

    def image_set(styles: tuple[str, ...], in_test: bool, name: str) -> ImageSet:
        picked = [(style, i) for style in styles for i in np.flatnonzero(is_test == in_test)]
        pixels, kept = decode_images([by_style[style][concepts[i]].path for style, i in picked], IMAGE_SIZE)
        return ImageSet(pixels, labels[[picked[k][1] for k in kept]], class_names, name)

    seen = ",".join(PRETRAIN_STYLES)
    return (
        image_set(PRETRAIN_STYLES, False, f"emoji:{seen} (probe-train concepts)"),
        image_set(PRETRAIN_STYLES, True, f"emoji:{seen} (probe-test concepts)"),
        image_set((HELD_OUT_STYLE,), True, f"emoji:{HELD_OUT_STYLE} (probe-test concepts)"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=[*METHODS, *BASELINES])
    parser.add_argument("--minutes", type=float, default=10.0, help="pretraining time cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/ssl_cross_style", help="where the pretrained checkpoints go")
    parser.add_argument("--dry-run", action="store_true", help="smoke run: results to a temporary folder only")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="ssl_cross_style_")) if args.dry_run else _report.RESULTS_DIR
    runs = out / "runs" if args.dry_run else Path(args.runs)
    row: dict = {"backbone": BACKBONE if args.method != "pixels" else "-"}
    model = None
    if args.method in METHODS:
        batch_size, lr, _ = SETTINGS.get(args.method, (256, 1e-3, None))
        result = run_pretraining(
            args.method,
            backbone=BACKBONE,
            data="emoji:" + ",".join(PRETRAIN_STYLES),
            out_dir=runs / args.method,
            minutes=args.minutes,
            batch_size=batch_size,
            lr=lr,
            seed=args.seed,
        )
        model = result.method.backbone
        row.update(pretraining_row(result, runs / args.method, batch_size, lr))
    elif args.method == "random-init":
        model = load_probe_model(BACKBONE, seed=args.seed)
        row["pretrain_minutes"] = 0.0

    train, test_in_style, test_held_out = concept_splits(args.seed)
    in_style = probe_representation(model, train, test_in_style, runs / f"probe_{args.method}_in_style", seed=args.seed)
    held_out = probe_representation(
        model, train, test_held_out, runs / f"probe_{args.method}", seed=args.seed, label=f"{args.method}, facebook"
    )
    shutil.copyfile(runs / f"probe_{args.method}" / "tsne.png", out / f"ssl_cross_style_tsne_{args.method}.png")
    row.update(
        linear_acc=held_out["linear"]["accuracy"],
        knn_acc=held_out["knn"]["k20"],
        nmi=held_out["cluster"]["nmi"],
        ari=held_out["cluster"]["ari"],
        in_style_linear_acc=in_style["linear"]["accuracy"],
        in_style_knn_acc=in_style["knn"]["k20"],
        probe_train=len(train),
        probe_test=len(test_held_out),
        classes=len(train.class_names),
        # the accuracy of always answering the largest category: chance for these unbalanced classes
        majority_acc=float(np.bincount(test_held_out.labels).max() / len(test_held_out)),
    )
    if args.dry_run:
        print(json.dumps({args.method: row}, indent=2))
        print(f"smoke outputs in {out} (nothing recorded)")
        return
    path = _report.record("ssl_cross_style", args.method, row)
    print(f"{args.method}: {json.dumps(row)}\nwritten: {path}")


if __name__ == "__main__":
    main()
