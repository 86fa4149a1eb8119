"""Cross-attention re-ranking on a held-out emoji style: R@1 / R@5 with and without it, and its cost.

Protocol:
* the index: the demo's facebook emoji index (the style the demo CLIP never trained on), copied to a
  temporary folder first, so nothing is written beside the original;
* the re-ranker: ``--reranker`` when it exists, else trained now for at most ``--train-minutes`` on
  ``--data`` (default the three other styles, ``emoji:apple,google,twitter``) less the concepts the
  CLIP was kept from (its config's ``held_out``), with the index's own CLIP frozen
  (``vitrina.train.rerank``), into ``--reranker``;
* the queries: every distinct caption of the index (``--queries`` draws a seeded subset), each
  searched as one phrase; its relevant items are those indexed with exactly that caption; ``held_out``
  columns: the queries of the CLIP's held-out concepts alone;
* dual encoder: the top ``k`` of the FAISS search; re-ranked: the top ``--n`` re-scored by the
  re-ranker and reordered (the same N candidates), then the top ``k``;
* ms/query: the median wall time of ``Searcher.run`` per query, one query at a time: the dual encoder
  alone; re-ranked cold (no token file: the query reads its N candidate images from disk and runs the
  image tower on them); re-ranked with the index's token file (``vitrina.index.rerank_tokens``, made
  here in the copy by ``prepare_tokens``: the query reads N memory-mapped rows instead). The three runs
  search the same captions in that order, so the query texts' dual-encoder vectors are cached for the
  re-ranked runs in both cases; each re-ranked query still runs the text tower for its token states.

    python bench/rerank.py --train-minutes 10                  # for the record (a quiet machine)
    python bench/rerank.py --index runs/bench/retrieval-quality/ROW-seed0/index-emoji-facebook \
        --reranker runs/bench/rerank/reranker-ROW --train-minutes 10 --queries 400 --tag "ROW, DAY"
    python bench/rerank.py --train-minutes 0.2 --queries 20 --dry-run   # smoke: prints, records nothing
    python bench/rerank.py --train-minutes 0.2 --queries 20 --dry-run --skip-cold  # smoke, token file only
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _report  # noqa: E402
from vitrina.checkpoint import BEST_FOLDER  # noqa: E402
from vitrina.eval.seen_unseen import held_out_of  # noqa: E402
from vitrina.index.rerank_tokens import prepare_tokens  # noqa: E402
from vitrina.search import Query, Searcher, Term  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "runs" / "demo"


def train_if_missing(reranker: Path, model_ref: str, data: str, minutes: float) -> None:
    """Train a re-ranker into ``reranker`` for the CLIP ``model_ref`` unless one is there."""
    if (reranker / "config.json").is_file():
        return
    from vitrina.checkpoint import load_model, weights_digest
    from vitrina.config import TrainConfig
    from vitrina.data.holdout import split_held_out
    from vitrina.data.sources import load_training_items
    from vitrina.train.rerank import train_reranker

    clip, config = load_model(model_ref)
    pairs, concepts = load_training_items(data)
    # the concepts the CLIP was kept from stay out of the re-ranker's training too (their queries are zero-shot)
    held = set((held_out_of(model_ref) or {}).get("concepts", []))
    pairs = split_held_out(pairs, concepts, held)[0]
    summary = train_reranker(
        clip=clip,
        clip_ref=str(Path(model_ref).resolve()),
        clip_digest=weights_digest(model_ref, config),
        pairs=pairs,
        out_dir=reranker,
        train_config=TrainConfig(epochs=20, batch_size=32, lr=3e-4, max_minutes=minutes),
        data_spec=data,
    )
    print(f"trained {reranker}: {summary}")


def measure(searcher: Searcher, captions: list[str], relevant: dict[str, set[int]], n: int, rerank: bool) -> dict:
    """Per caption of ``captions``: whether a relevant item is at rank 1 / in the top 5 (re-ranking the top
    ``n`` or not); and the median ms per query."""
    first, top5, seconds = [], [], []
    for caption in captions:
        query = Query(terms=[Term(caption, 1.0)], k=max(5, n if rerank else 5), rerank=n if rerank else 0)
        start = time.perf_counter()
        results = searcher.run(query)
        seconds.append(time.perf_counter() - start)
        ids = [r.hit.id for r in results.hits]
        first.append(bool(relevant[caption] & set(ids[:1])))
        top5.append(bool(relevant[caption] & set(ids[:5])))
    return {"r1": np.asarray(first), "r5": np.asarray(top5), "ms_per_query": 1000 * float(np.median(seconds))}


def recall(hits: np.ndarray, picked: np.ndarray) -> float | None:
    """The share of ``hits`` among the ``picked`` queries (None when there are none)."""
    return float(hits[picked].mean()) if picked.any() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=str(DEMO / "index-emoji-facebook"))
    parser.add_argument("--reranker", default=str(Path(tempfile.gettempdir()) / "vitrina-bench-rerank" / "reranker"))
    parser.add_argument("--data", default="emoji:apple,google,twitter", help="what the re-ranker trains on")
    parser.add_argument("--train-minutes", type=float, default=10.0)
    parser.add_argument("--n", type=int, default=50, help="candidates re-scored per query")
    parser.add_argument("--queries", type=int, default=None, help="a seeded subset of the captions")
    parser.add_argument("--skip-cold", action="store_true", help="do not time re-ranking without the token file")
    parser.add_argument("--dry-run", action="store_true", help="print the row, record nothing")
    parser.add_argument("--tag", default=None, help="appended to the row's name, e.g. the dual encoder and the day")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vitrina-bench-rerank-") as tmp:
        index_dir = Path(tmp) / "index"
        shutil.copytree(args.index, index_dir, ignore=shutil.ignore_patterns("writer.lock", "thumbs"))
        with Searcher(index_dir, runtime="torch", reranker=args.reranker) as searcher:
            model_ref = searcher.served.version.model_ref
            train_if_missing(Path(args.reranker), model_ref, args.data, args.train_minutes)
            relevant: dict[str, set[int]] = {}
            for item_id, _, _, caption in searcher.store.items():
                if caption:
                    relevant.setdefault(caption, set()).add(item_id)
            captions = sorted(relevant)
            if args.queries is not None and args.queries < len(captions):
                picked = np.random.default_rng(0).choice(len(captions), size=args.queries, replace=False)
                captions = [captions[i] for i in sorted(picked)]
            held_captions = set((held_out_of(model_ref) or {}).get("captions", []))
            unseen = np.asarray([caption in held_captions for caption in captions], dtype=bool)
            searcher.run(Query(terms=[Term(captions[0], 1.0)], k=args.n, rerank=args.n))  # warm-up: loads it
            dual = measure(searcher, captions, relevant, args.n, rerank=False)
            cold = None if args.skip_cold else measure(searcher, captions, relevant, args.n, rerank=True)
            start = time.perf_counter()
            reranker = searcher.reranker()
            tokens = prepare_tokens(index_dir, reranker, progress=False)
            prepare_s = time.perf_counter() - start
            print(f"{tokens.summary()} in {prepare_s:.1f} s")
            reranked = measure(searcher, captions, relevant, args.n, rerank=True)
    everything = np.ones(len(captions), dtype=bool)
    row = {
        "queries": len(captions),
        "n": args.n,
        "r1_dual": recall(dual["r1"], everything),
        "r1_rerank": recall(reranked["r1"], everything),
        "r5_dual": recall(dual["r5"], everything),
        "r5_rerank": recall(reranked["r5"], everything),
        # the captions of concepts the CLIP (and the re-ranker) never trained on, in any style
        "held_out_queries": int(unseen.sum()),
        "r1_dual_held_out": recall(dual["r1"], unseen),
        "r1_rerank_held_out": recall(reranked["r1"], unseen),
        "ms_query_dual": dual["ms_per_query"],
        "ms_query_rerank": reranked["ms_per_query"],  # with the token file
        "ms_query_rerank_cold": None if cold is None else cold["ms_per_query"],  # decoding + image tower
        "r1_rerank_cold": None if cold is None else recall(cold["r1"], everything),
        "token_bytes_per_item": tokens.bytes_per_item,
        "prepare_s": prepare_s,
        "reranker": reranker.source,
        "clip": model_ref,  # the dual encoder whose top N is re-scored
        "train_minutes": args.train_minutes,
    }
    kind = "residual" if reranker.dual_scale else "logit alone"
    if Path(reranker.source).name == BEST_FOLDER:
        kind += ", best epoch by validation"
    name = f"{Path(args.index).name}-n{args.n} · {kind}, trained on {args.data}"
    if args.tag:
        name += f" · {args.tag}"
    if args.dry_run:
        print(name, row)
        return
    print(f"recorded {name} in {_report.record('rerank', name, row)}")


if __name__ == "__main__":
    main()
