"""Few-shot evaluation: accuracy after 1, 2, 4, 8, 16 labelled images per class, beside zero-shot.

A task has a *pool* the shots are drawn from and a fixed *test* set: Fashion-MNIST draws its shots
from the train split and tests on (a stratified subset of) the test split; an emoji style or a class
folder is split in two halves, stratified and seeded, shots from one and test on the other. Classes
with fewer than twice the largest shot count are left out (emoji's tiny "Component"), and said so.

Every seed draws its shots with ``vitrina.models.fewshot.draw_shots`` (fewer shots are a subset of
more), so only the images drawn at the largest count are ever embedded. The mean and standard
deviation over seeds are the error bars; the scoring itself is the runtime code of
``vitrina.models.fewshot`` and ``vitrina.models.zeroshot``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vitrina.data.splits import stratified_indices
from vitrina.encoder import Encoder
from vitrina.errors import UserError
from vitrina.models.fewshot import FEWSHOT_METHODS, draw_shots, fit_fewshot
from vitrina.models.zeroshot import class_embeddings, logit_scale_of
from vitrina.search import encode_images_batched

SPLIT_SEED = 0  # the pool/test split of an emoji style or folder is fixed: only the shots vary with the seed


@dataclass
class FewShotTask:
    """Labelled images to draw shots from (``pool``) and to test on; images are decoded on demand."""

    name: str
    class_names: list[str]
    pool_labels: np.ndarray
    pool_image: Callable[[int], Image.Image]
    test_labels: np.ndarray
    test_image: Callable[[int], Image.Image]
    dropped: list[str] = field(default_factory=list)


def _halves(name: str, images: list, labels: list[str], max_shots: int, limit_test: int | None, load) -> FewShotTask:
    """A task from one labelled list: classes too small dropped, then a stratified half as the test set."""
    names, counts = np.unique(np.asarray(labels, dtype=object), return_counts=True)
    kept = [str(n) for n, c in zip(names, counts, strict=True) if c >= 2 * max_shots]
    dropped = [str(n) for n in names if str(n) not in kept]
    if len(kept) < 2:
        raise UserError(f"{name}: fewer than two classes with {2 * max_shots} images or more; lower --shots")
    index = {n: i for i, n in enumerate(kept)}
    rows = [i for i, label in enumerate(labels) if label in index]
    y = np.asarray([index[labels[i]] for i in rows], dtype=np.int64)
    test = stratified_indices(y, len(y) // 2, SPLIT_SEED)
    pool = np.setdiff1d(np.arange(len(y)), test)
    if limit_test is not None:
        test = test[stratified_indices(y[test], limit_test, SPLIT_SEED)]
    return FewShotTask(
        name,
        kept,
        y[pool],
        lambda i: load(images[rows[pool[i]]]),
        y[test],
        lambda i: load(images[rows[test[i]]]),
        dropped,
    )


def load_task(spec: str, *, max_shots: int, limit_test: int | None = None) -> FewShotTask:
    """``emoji:STYLE`` (emoji categories), ``fashion-mnist``, or a folder of class folders."""
    from vitrina.data.images import load_image

    if spec == "fashion-mnist":
        from vitrina.data.fashion_mnist import FASHION_MNIST_PROMPT_NAMES, load_fashion_mnist

        train_images, train_labels = load_fashion_mnist("train")
        test_images, test_labels = load_fashion_mnist("test")
        test = stratified_indices(test_labels, limit_test or len(test_labels), SPLIT_SEED)

        def grey(array: np.ndarray) -> Image.Image:
            return Image.fromarray(array).convert("RGB")

        return FewShotTask(
            "fashion-mnist test",
            list(FASHION_MNIST_PROMPT_NAMES),
            train_labels,
            lambda i: grey(train_images[i]),
            test_labels[test],
            lambda i: grey(test_images[test[i]]),
        )
    if spec.startswith("emoji:"):
        from vitrina.data.emoji import category_folder, load_emoji
        from vitrina.data.folder import clean_class_name

        style = spec.split(":", 1)[1]
        items = load_emoji(style)
        labels = [clean_class_name(category_folder(item.category)) for item in items]  # as the index labels them
        return _halves(f"emoji {style}", [i.path for i in items], labels, max_shots, limit_test, load_image)
    if Path(spec).is_dir():
        from vitrina.data.folder import scan_collection

        entries = [e for e in scan_collection(spec) if e.label]
        if not entries:
            raise UserError(f"{spec}: no image inside a class folder; sort the images into one folder per class")
        labels = [e.label for e in entries]
        return _halves(Path(spec).name, [e.path for e in entries], labels, max_shots, limit_test, load_image)
    raise UserError(f"--data {spec!r}: use emoji:STYLE, fashion-mnist or a folder of class folders")


def evaluate_task(task: FewShotTask, encoder: Encoder, *, shots: list[int], seeds: int, methods: list[str]) -> dict:
    """Zero-shot accuracy and, per method and shot count, the accuracy of every seed with their mean and std."""
    test_vectors = encode_images_batched([task.test_image(i) for i in range(len(task.test_labels))], encoder)
    text_vectors = class_embeddings(task.class_names, encoder)  # (C, D)
    scale = logit_scale_of(encoder)
    zero_shot = float(np.mean((test_vectors @ text_vectors.T).argmax(axis=1) == task.test_labels))
    draws = [draw_shots(task.pool_labels, max(shots), seed) for seed in range(seeds)]
    needed = np.unique(np.concatenate(draws))  # the only pool images ever embedded
    pool_vectors = encode_images_batched([task.pool_image(i) for i in needed], encoder)  # (len(needed), D)
    embedded = dict(zip(needed.tolist(), pool_vectors, strict=True))
    runs = {method: [[0.0] * seeds for _ in shots] for method in methods}
    for seed in range(seeds):
        for s, n in enumerate(shots):
            picked = draw_shots(task.pool_labels, n, seed)  # a subset of draws[seed]
            vectors = np.stack([embedded[i] for i in picked.tolist()])  # (C * n, D)
            for method in methods:
                classifier = fit_fewshot(
                    vectors,
                    task.pool_labels[picked],
                    task.class_names,
                    method=method,
                    text_vectors=text_vectors,
                    scale=scale,
                    seed=seed,
                )
                accuracy = np.mean(classifier.predict(test_vectors) == task.test_labels)
                runs[method][s][seed] = float(accuracy)
    return {
        "task": task.name,
        "classes": task.class_names,
        "dropped_classes": task.dropped,
        "test_images": len(task.test_labels),
        "shots": shots,
        "seeds": seeds,
        "zero_shot": zero_shot,
        "methods": {
            method: {
                "mean": [float(np.mean(r)) for r in per_shot],
                "std": [float(np.std(r)) for r in per_shot],
                "runs": per_shot,
            }
            for method, per_shot in runs.items()
        },
    }


def run_fewshot_eval(
    encoder: Encoder,
    specs: list[str],
    *,
    shots: list[int],
    seeds: int,
    methods: list[str],
    limit_test: int | None,
    out_dir: Path,
) -> list[dict]:
    """Every task of ``specs`` evaluated; ``fewshot.json`` and ``fewshot.png`` written into ``out_dir``."""
    unknown = [m for m in methods if m not in FEWSHOT_METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {','.join(methods)}: choose from {', '.join(FEWSHOT_METHODS)}")
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be at least 1")
    if not specs:
        raise UserError("--data: name at least one data set, e.g. emoji:facebook+fashion-mnist")
    tasks = [load_task(spec, max_shots=max(shots), limit_test=limit_test) for spec in specs]
    results = [evaluate_task(task, encoder, shots=shots, seeds=seeds, methods=methods) for task in tasks]
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"model": encoder.identity, "results": results}
    (out_dir / "fewshot.json").write_text(json.dumps(payload, indent=2) + "\n")
    save_fewshot_plot(results, out_dir / "fewshot.png")
    return results


def save_fewshot_plot(results: list[dict], path: Path) -> Path:
    """One panel per task: accuracy against shots (log 2 axis), mean ± std per method, zero-shot dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8 * len(results), 3.8), dpi=100)
    for i, result in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        for method, curve in result["methods"].items():
            ax.errorbar(result["shots"], curve["mean"], yerr=curve["std"], marker="o", capsize=3, label=method)
        ax.axhline(result["zero_shot"], linestyle="--", color="grey", label="zero-shot")
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["shots"], [str(s) for s in result["shots"]])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{result['task']} ({len(result['classes'])} classes, {result['seeds']} seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(path, bbox_inches="tight")
    return path


def format_fewshot(results: list[dict]) -> str:
    """A plain table: one row per task and method, mean ± std accuracy per shot count."""
    lines = []
    for result in results:
        header = "  ".join(f"{s:>2}-shot     " for s in result["shots"])
        lines.append(f"{result['task']}: {result['test_images']} test images, zero-shot {result['zero_shot']:.3f}")
        if result["dropped_classes"]:
            lines.append(f"  left out (too few images): {', '.join(result['dropped_classes'])}")
        lines.append(f"  {'method':<12} {header}")
        for method, curve in result["methods"].items():
            cells = "  ".join(f"{m:.3f}±{s:.3f}" for m, s in zip(curve["mean"], curve["std"], strict=True))
            lines.append(f"  {method:<12} {cells}")
    return "\n".join(lines)
