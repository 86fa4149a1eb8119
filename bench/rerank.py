"""Cross-attention re-ranking on a held-out emoji style: R@1 / R@5 with and without it, and its cost.

Protocol:
* the index: the demo's facebook emoji index (the style the demo CLIP never trained on), copied to a
  temporary folder first, so nothing is written beside the original;
* the re-ranker: ``--reranker`` when it exists, else trained now for at most ``--train-minutes`` on
  ``--data`` (default the three other styles, ``emoji:apple,google,twitter``) with the index's own
  CLIP frozen (``vitrina.train.rerank``), into ``--reranker``;
* the queries: every distinct caption of the index (``--queries`` draws a seeded subset), each
  searched as one phrase; its relevant items are those indexed with exactly that caption;
* dual encoder: the top ``k`` of the FAISS search; re-ranked: the top ``--n`` re-scored by the
  re-ranker and reordered (the same N candidates), then the top ``k``;
* ms/query: the median wall time of ``Searcher.run`` per query, one query at a time: the dual encoder
  alone; re-ranked cold (no token file: the query reads its N candidate images from disk and runs the
  image tower on them); re-ranked with the index's token file (``vitrina.index.rerank_tokens``, made
  here in the copy by ``prepare_tokens``: the query reads N memory-mapped rows instead). The three runs
  search the same captions in that order, so the query texts' dual-encoder vectors are cached for the
  re-ranked runs in both cases; each re-ranked query still runs the text tower for its token states.

    python bench/rerank.py --train-minutes 10                  # for the record (a quiet machine)
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
from vitrina.index.rerank_tokens import prepare_tokens  # noqa: E402
from vitrina.search import Query, Searcher, Term  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "runs" / "demo"


def train_if_missing(reranker: Path, model_ref: str, data: str, minutes: float) -> None:
    """Train a re-ranker into ``reranker`` for the CLIP ``model_ref`` unless one is there."""
    if (reranker / "config.json").is_file():
        return
    from vitrina.checkpoint import load_model, weights_digest
    from vitrina.config import TrainConfig
    from vitrina.data.sources import load_training_pairs
    from vitrina.train.rerank import train_reranker

    clip, config = load_model(model_ref)
    summary = train_reranker(
        clip=clip,
        clip_ref=str(Path(model_ref).resolve()),
        clip_digest=weights_digest(model_ref, config),
        pairs=load_training_pairs(data),
        out_dir=reranker,
        train_config=TrainConfig(epochs=20, batch_size=128, lr=3e-4, max_minutes=minutes),
        data_spec=data,
    )
    print(f"trained {reranker}: {summary}")


def measure(searcher: Searcher, captions: list[str], relevant: dict[str, set[int]], n: int, rerank: bool) -> dict:
    """R@1, R@5 and ms per query over ``captions``, re-ranking the top ``n`` or not."""
    hits_at = {1: 0, 5: 0}
    seconds = []
    for caption in captions:
        query = Query(terms=[Term(caption, 1.0)], k=max(5, n if rerank else 5), rerank=n if rerank else 0)
        start = time.perf_counter()
        results = searcher.run(query)
        seconds.append(time.perf_counter() - start)
        ids = [r.hit.id for r in results.hits]
        for k in hits_at:
            hits_at[k] += bool(relevant[caption] & set(ids[:k]))
    return {
        "r1": hits_at[1] / len(captions),
        "r5": hits_at[5] / len(captions),
        "ms_per_query": 1000 * float(np.median(seconds)),
    }


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
            searcher.run(Query(terms=[Term(captions[0], 1.0)], k=args.n, rerank=args.n))  # warm-up: loads it
            dual = measure(searcher, captions, relevant, args.n, rerank=False)
            cold = None if args.skip_cold else measure(searcher, captions, relevant, args.n, rerank=True)
            start = time.perf_counter()
            tokens = prepare_tokens(index_dir, searcher.reranker(), progress=False)
            prepare_s = time.perf_counter() - start
            print(f"{tokens.summary()} in {prepare_s:.1f} s")
            reranked = measure(searcher, captions, relevant, args.n, rerank=True)
    row = {
        "queries": len(captions),
        "n": args.n,
        "r1_dual": dual["r1"],
        "r1_rerank": reranked["r1"],
        "r5_dual": dual["r5"],
        "r5_rerank": reranked["r5"],
        "ms_query_dual": dual["ms_per_query"],
        "ms_query_rerank": reranked["ms_per_query"],  # with the token file
        "ms_query_rerank_cold": None if cold is None else cold["ms_per_query"],  # decoding + image tower
        "r1_rerank_cold": None if cold is None else cold["r1"],
        "token_bytes_per_item": tokens.bytes_per_item,
        "prepare_s": prepare_s,
        "reranker": args.reranker,
        "train_minutes": args.train_minutes,
    }
    name = f"{Path(args.index).name}-n{args.n}"
    if args.dry_run:
        print(name, row)
        return
    print(f"recorded {name} in {_report.record('rerank', name, row)}")


if __name__ == "__main__":
    main()
