"""Retrieval metrics (pure functions on numpy arrays) and the evaluation of a whole index.

Conventions. A *ranked relevance* matrix ``rel`` is (Q, N) bool: ``rel[q, r]`` says whether the item
ranked ``r`` (0-based) for query ``q`` is relevant.

* R@K: a query scores 1 if any relevant item is in its top K (the CLIP/COCO convention).
* P@K: relevant items among the top K, divided by K.
* AP: mean of P@r over the ranks r of the relevant items, divided by the number of relevant items.
* AP@K: the same sum cut at K, divided by min(K, number of relevant items), so a perfect top K scores 1.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from vitrina.encoder import Encoder, as_numpy
from vitrina.eval.seen_unseen import caption_split, held_out_of, label_split
from vitrina.eval.zeroshot import class_embeddings, zero_shot_accuracy
from vitrina.index.store import IndexStore

KS = (1, 5, 10)


def _as_2d(relevance: np.ndarray) -> np.ndarray:
    return np.atleast_2d(np.asarray(relevance, dtype=bool))


def recall_at_k(relevance: np.ndarray, k: int) -> float:
    """Fraction of queries with at least one relevant item in the top ``k`` of (Q, N) ranked relevance."""
    return float(_as_2d(relevance)[:, :k].any(axis=1).mean())


def precision_at_k(relevance: np.ndarray, k: int) -> float:
    """Mean over queries of (relevant items in the top ``k``) / ``k``."""
    return float(_as_2d(relevance)[:, :k].sum(axis=1).mean() / k)


def average_precision(relevance: np.ndarray, n_relevant: int | None = None) -> float:
    """AP of one (N,) ranked relevance vector; ``n_relevant`` defaults to its number of relevant items."""
    rel = np.asarray(relevance, dtype=bool).ravel()
    n_relevant = int(rel.sum()) if n_relevant is None else n_relevant
    if n_relevant == 0:
        return 0.0
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)  # P@r for r = 1..N
    return float(precision[rel].sum() / n_relevant)


def map_at_k(relevance: np.ndarray, k: int, n_relevant: np.ndarray | None = None) -> float:
    """Mean AP@k over the (Q, N) ranked relevance; ``n_relevant`` (Q,) defaults to each row's total."""
    rel = _as_2d(relevance)
    totals = rel.sum(axis=1) if n_relevant is None else np.asarray(n_relevant)
    scores = []
    for row, total in zip(rel, totals, strict=True):
        cut = row[:k]
        denominator = min(k, int(total))
        precision = np.cumsum(cut) / np.arange(1, len(cut) + 1)
        scores.append(precision[cut].sum() / denominator if denominator else 0.0)
    return float(np.mean(scores))


def mean_average_precision(relevance: np.ndarray) -> float:
    """Mean AP over queries of a (Q, N) ranked relevance over the full ranking."""
    return float(np.mean([average_precision(row) for row in _as_2d(relevance)]))


def ranked_relevance(scores: np.ndarray, query_keys: np.ndarray, item_keys: np.ndarray) -> np.ndarray:
    """(Q, N) ranked relevance from (Q, N) scores: item n is relevant to query q when their keys are equal."""
    order = np.argsort(-scores, axis=1, kind="stable")  # (Q, N) item indices, best first
    return np.asarray(item_keys)[order] == np.asarray(query_keys)[:, None]


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(Q,) 0-based rank of each query's best-scored relevant item (ties counted in its favour).

    Needs no full sort, so it scales to caption sets where a (Q, N) argsort would not fit.
    """
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    return ((scores > best) & ~relevant).sum(axis=1)


def _recalls_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    return {f"R@{k}": float(np.mean(ranks < k)) for k in KS}


def caption_recalls(
    image_vectors: np.ndarray, captions: list[str], encoder: Encoder, chunk: int = 1024
) -> dict[str, dict]:
    """Text->image and image->text R@K; identical caption strings count as the same target."""
    unique, caption_of_image = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
    text = np.concatenate(
        [as_numpy(encoder.encode_text(list(unique[i : i + chunk]))) for i in range(0, len(unique), chunk)]
    ).astype(np.float32)  # (T, D), T unique captions
    t2i, i2t = [], []
    for start in range(0, len(unique), chunk):
        q = np.arange(start, min(start + chunk, len(unique)))
        scores = text[q] @ image_vectors.T  # (q, N)
        t2i.append(first_relevant_rank(scores, caption_of_image[None, :] == q[:, None]))
    for start in range(0, len(image_vectors), chunk):
        q = np.arange(start, min(start + chunk, len(image_vectors)))
        scores = image_vectors[q] @ text.T  # (q, T)
        i2t.append(first_relevant_rank(scores, np.arange(len(unique))[None, :] == caption_of_image[q][:, None]))
    return {
        "text_to_image": {
            "queries": len(unique),
            "gallery": len(image_vectors),
            **_recalls_from_ranks(np.concatenate(t2i)),
        },
        "image_to_text": {
            "queries": len(image_vectors),
            "gallery": len(unique),
            **_recalls_from_ranks(np.concatenate(i2t)),
        },
    }


def _label_metrics(image_vectors: np.ndarray, labels: list[str], encoder: Encoder) -> dict:
    """Class prompt ensembles as queries (one per class) over the labelled images, plus the accuracy of
    classifying every image among every class ("prompted": zero-shot only for classes never trained
    on, which ``vitrina.eval.seen_unseen`` reports apart when the model records them)."""
    classes = sorted(set(labels))
    class_vectors = class_embeddings(classes, encoder)  # (C, D)
    rel = ranked_relevance(
        class_vectors @ image_vectors.T, np.asarray(classes, dtype=object), np.asarray(labels, dtype=object)
    )  # (C, N)
    counts = np.asarray([labels.count(c) for c in classes])
    return {
        "classes": len(classes),
        "images": len(labels),
        **{f"R@{k}": recall_at_k(rel, k) for k in KS},
        "P@10": precision_at_k(rel, 10),
        "mAP@10": map_at_k(rel, 10),
        "mAP": mean_average_precision(rel),
        "prompted_accuracy": zero_shot_accuracy(image_vectors, labels, class_vectors, classes),
        "chance": 1.0 / len(classes),
        "majority": float(counts.max() / counts.sum()),
    }


def evaluate_index(
    index_dir: Path,
    encoder: Encoder | None = None,
    *,
    model_ref: str | None = None,
    version: str | int | None = None,
    held_out: dict | None = None,
) -> dict:
    """Evaluate the model behind one version of an index (default: the active one) on the index's own
    labels and/or captions.

    Uses the stored image vectors (no image is re-embedded) and exact inner products, so the numbers
    measure the model, not the ANN structure. ``held_out`` (``labels``, ``captions`` the model never
    trained on; default: the record in the model's checkpoint, if any) splits zero-shot from seen
    (``vitrina.eval.seen_unseen``).
    """
    from vitrina.index.encoders import check_encoder, encoder_for

    index_dir = Path(index_dir)
    with IndexStore.open(index_dir) as store:
        chosen = store.active_version() if version is None else store.version(version)
        if encoder is None:
            encoder = encoder_for(chosen, index_dir, model_ref=model_ref)
        else:
            check_encoder(encoder, chosen, index_dir, chosen=True)
        ids, vectors = store.all_vectors(version=chosen.id)
        by_id = {item_id: (path, label, caption) for item_id, path, label, caption in store.items()}
    items = [by_id[int(i)] for i in ids]  # the version's vectors, in id order
    results: dict = {
        "index": str(index_dir),
        "version": chosen.name,
        "model": model_ref or chosen.model_ref,
        "items": len(items),
    }
    if held_out is None:
        held_out = held_out_of(results["model"])
    labelled = [i for i, (_, label, _) in enumerate(items) if label]
    if len({items[i][1] for i in labelled}) >= 2:
        labels = [items[i][1] for i in labelled]
        results["labels"] = _label_metrics(vectors[labelled], labels, encoder)
        if held_out:
            results["labels"].update(label_split(vectors[labelled], labels, encoder, set(held_out["labels"])))
    captioned = [i for i, (_, _, caption) in enumerate(items) if caption]
    if captioned:
        captions = [items[i][2] for i in captioned]
        results["captions"] = caption_recalls(vectors[captioned], captions, encoder)
        if held_out:
            results["captions"].update(caption_split(vectors[captioned], captions, encoder, set(held_out["captions"])))
    return results


def headline_score(results: dict) -> float | None:
    """One number to compare two versions on the same collection: the mean of the label mAP and the
    caption → image R@10 that ``evaluate_index`` measured (None when the index has neither)."""
    scores = []
    if "labels" in results:
        scores.append(results["labels"]["mAP"])
    if "text_to_image" in results.get("captions", {}):
        scores.append(results["captions"]["text_to_image"]["R@10"])
    return float(np.mean(scores)) if scores else None


def compare_versions(index_dir: Path, a: str | int, b: str | int) -> dict:
    """Both versions evaluated side by side on the collection's own labels and captions, with headlines."""
    first, second = evaluate_index(index_dir, version=a), evaluate_index(index_dir, version=b)
    return {
        "index": str(index_dir),
        "versions": [first, second],
        "headline": [headline_score(first), headline_score(second)],
        "headline_metric": "mean of label mAP and caption→image R@10",
    }


def format_comparison(comparison: dict) -> str:
    """``compare_versions`` as a rich table: one row per metric, one column per version."""
    from rich.console import Console
    from rich.table import Table

    first, second = comparison["versions"]
    table = Table(title=f"{comparison['index']}: {first['version']} vs {second['version']}")
    table.add_column("task")
    table.add_column("metric")
    for result in (first, second):
        table.add_column(f"{result['version']} ({Path(str(result['model'])).name})", justify="right")
    table.add_column("Δ", justify="right")
    rows = _metric_rows(first)
    other = dict(((task, name), value) for task, name, value in _metric_rows(second))
    for task, name, value in rows:
        theirs = other.get((task, name))
        delta = f"{theirs - value:+.3f}" if isinstance(value, float) and isinstance(theirs, float) else ""
        table.add_row(task, name, _fmt(value), _fmt(theirs), delta)
    a, b = comparison["headline"]
    if a is not None and b is not None:
        table.add_row("headline", comparison["headline_metric"], _fmt(a), _fmt(b), f"{b - a:+.3f}")
    buffer = io.StringIO()
    Console(file=buffer, width=120, force_terminal=False).print(table)
    return buffer.getvalue()


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _metric_rows(results: dict) -> list[tuple[str, str, object]]:
    rows = []
    for task, metrics in _blocks(results):
        rows += [(task, name, value) for name, value in metrics.items()]
    return rows


BLOCK_TITLES = {
    ("labels", None): "class prompts → images",
    ("labels", "zero_shot"): "zero-shot classification (held-out classes)",
    ("labels", "prompted_seen"): "prompted classification (seen classes)",
    ("captions", "text_to_image"): "caption → image",
    ("captions", "image_to_text"): "image → caption",
    ("captions", "held_out_concepts"): "caption → image (held-out concepts)",
    ("captions", "seen_concepts"): "caption → image (seen concepts)",
    ("captions", "zero_shot"): "zero-shot caption matching (held-out concepts)",
}


def _blocks(results: dict) -> list[tuple[str, dict]]:
    """(title, flat metrics) of every block ``evaluate_index`` wrote, in table order."""
    blocks = []
    labels = results.get("labels")
    if labels:
        top = {k: v for k, v in labels.items() if not isinstance(v, dict)}
        blocks.append((BLOCK_TITLES["labels", None], top))
    for section in ("labels", "captions"):
        for key, value in (results.get(section) or {}).items():
            if isinstance(value, dict):
                title = BLOCK_TITLES.get((section, key), f"{section}: {key}")
                blocks.append((title, {k: v for k, v in value.items() if not isinstance(v, list)}))
    return blocks


def format_table(results: dict) -> str:
    """The results of ``evaluate_index`` as a rich table, rendered to text."""
    from rich.console import Console
    from rich.table import Table

    version = f"{results['version']}, " if "version" in results else ""
    table = Table(title=f"{results['index']}  ({results['items']} items, {version}model {results['model']})")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def add(task: str, metrics: dict) -> None:
        for name, value in metrics.items():
            table.add_row(task, name, f"{value:.3f}" if isinstance(value, float) else str(value))
            task = ""

    for title, metrics in _blocks(results):
        add(title, metrics)
    if "labels" not in results and "captions" not in results:
        table.add_row("-", "nothing to evaluate", "index has neither labels nor captions")
    buffer = io.StringIO()
    Console(file=buffer, width=100, force_terminal=False).print(table)
    return buffer.getvalue()
