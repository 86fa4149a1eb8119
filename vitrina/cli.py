"""The one `vitrina` command. Each sub-command parses its arguments and calls one function
of the package; heavy imports happen inside the handlers so `vitrina --help` is instant."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vitrina.errors import UserError

# Nothing here may wait on a model hub: weights come from local folders or the packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _print_hits(hits, as_json: bool) -> None:
    if as_json:
        print(json.dumps([hit.to_json() for hit in hits], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False)
    for column in ("rank", "score", "label / caption", "path"):
        table.add_column(column)
    for rank, hit in enumerate(hits, 1):
        text = hit.label or hit.caption or ""
        table.add_row(str(rank), f"{hit.score:.3f}", text, str(hit.path))
    Console().print(table)


# --- handlers -------------------------------------------------------------------------------


def cmd_train_clip(args: argparse.Namespace) -> None:
    from vitrina.config import TrainConfig
    from vitrina.data.sources import load_training_pairs
    from vitrina.models.registry import build_model
    from vitrina.train.clip import train_clip

    pairs = load_training_pairs(args.data, seed=args.seed)
    if not pairs:
        raise UserError(f"--data {args.data!r} yielded no image-caption pairs: check the spec and the data folder")
    model = build_model(args.preset)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_minutes=args.max_minutes,
        num_workers=args.workers,
    )
    summary = train_clip(model=model, pairs=pairs, out_dir=Path(args.out), train_config=config)
    print(f"checkpoint: {args.out}  ({summary})")
    print(f"next: vitrina index FOLDER --model {args.out} --out INDEX_DIR")


def cmd_index(args: argparse.Namespace) -> None:
    from vitrina.checkpoint import load_encoder
    from vitrina.index.embed import index_folder

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of images; give the collection's root folder")
    encoder = load_encoder(args.model)
    report = index_folder(
        folder,
        encoder,
        Path(args.out),
        model_ref=args.model,
        batch_size=args.batch_size,
        workers=args.workers,
        index_kind=args.index_kind,
        fraction=args.fraction,
        seed=args.seed,
    )
    print(report.summary())
    print(f'index: {args.out}\nnext: vitrina search {args.out} "a query"')


def cmd_search(args: argparse.Namespace) -> None:
    from vitrina.search import Searcher

    searcher = Searcher(Path(args.index), model_ref=args.model)
    if args.image:
        hits = searcher.search_image(Path(args.image), k=args.k)
    elif args.query:
        hits = searcher.search_text(args.query, k=args.k)
    else:
        raise UserError("give a text query or --image PATH")
    _print_hits(hits, args.json)


def cmd_classify(args: argparse.Namespace) -> None:
    from vitrina.checkpoint import load_encoder
    from vitrina.search import classify

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise UserError("--labels needs at least two comma-separated labels, e.g. --labels cat,dog,horse")
    encoder = load_encoder(args.model)
    results = classify([Path(p) for p in args.images], labels, encoder, top=args.top)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for path, ranked in zip(args.images, results, strict=True):
        best = ", ".join(f"{label} {prob:.2f}" for label, prob in ranked)
        print(f"{path}: {best}")


def cmd_eval_retrieval(args: argparse.Namespace) -> None:
    from vitrina.eval.retrieval import evaluate_index, format_table

    results = evaluate_index(Path(args.index), model_ref=args.model)
    print(format_table(results))
    out = Path(args.json_out) if args.json_out else Path(args.index) / "eval.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out}")


def cmd_models(args: argparse.Namespace) -> None:
    from vitrina.models.registry import describe_presets

    print(describe_presets())


def cmd_data_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.source == "emoji":
        from vitrina.data.emoji import export_emoji

        n = export_emoji(args.style, out)
    else:
        from vitrina.data.fashion_mnist import export_fashion_mnist

        n = export_fashion_mnist(args.split, out, limit=args.limit)
    print(f"{out}: {n} images")


def cmd_serve(args: argparse.Namespace) -> None:
    from vitrina.serve import serve

    serve(Path(args.index), host=args.host, port=args.port, model_ref=args.model)


def cmd_demo(args: argparse.Namespace) -> None:
    from vitrina.demo import run_demo

    run_demo(out_dir=Path(args.out), train_minutes=args.minutes, held_out_style=args.held_out, seed=args.seed)


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrina", description="Text-to-image retrieval on vision transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small CLIP on emoji + Fashion-MNIST, index held-out data, evaluate")
    demo.add_argument("--out", default="runs/demo", help="folder for the checkpoint, indexes and reports")
    demo.add_argument("--minutes", type=float, default=10.0, help="training time cap in minutes")
    demo.add_argument("--held-out", default="facebook", help="emoji style indexed but never trained on")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="what", required=True)
    clip = train.add_parser("clip", help="contrastive image-text training (CLIP)")
    clip.add_argument("--data", required=True, help="e.g. emoji:apple,google+fashion-mnist:train:10000 or pairs.jsonl")
    clip.add_argument("--preset", default="clip-minilm", help="model preset (see `vitrina models`)")
    clip.add_argument("--out", required=True, help="checkpoint folder; an existing one is resumed")
    clip.add_argument("--epochs", type=int, default=10)
    clip.add_argument("--batch-size", type=int, default=128)
    clip.add_argument("--lr", type=float, default=1e-3)
    clip.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this many minutes")
    clip.add_argument("--workers", type=int, default=2, help="data-loading processes")
    clip.add_argument("--seed", type=int, default=0)
    clip.set_defaults(handler=cmd_train_clip)

    index = sub.add_parser("index", help="embed a folder of images into an index (incremental, resumable)")
    index.add_argument("folder")
    index.add_argument("--model", required=True, help="checkpoint folder or preset name")
    index.add_argument("--out", required=True, help="index folder")
    index.add_argument("--fraction", type=float, default=None, help="index a per-class random fraction, e.g. 0.3")
    index.add_argument("--seed", type=int, default=0, help="seed of the fraction sample")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--workers", type=int, default=2, help="parallel image decoders")
    index.add_argument("--index-kind", default="auto", choices=["auto", "flat", "ivf", "hnsw", "pq"])
    index.set_defaults(handler=cmd_index)

    search = sub.add_parser("search", help="search an index by text or by example image")
    search.add_argument("index")
    search.add_argument("query", nargs="?", default=None)
    search.add_argument("--image", default=None, help="search by this image instead of text")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--json", action="store_true", help="print hits as JSON")
    search.add_argument("--model", default=None, help="override the model stored in the index (same kind/width)")
    search.set_defaults(handler=cmd_search)

    serve = sub.add_parser("serve", help="HTTP API and web page over an index (127.0.0.1:8000 by default)")
    serve.add_argument("index")
    serve.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback exposes the index")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", default=None, help="override the model stored in the index (same kind/width)")
    serve.set_defaults(handler=cmd_serve)

    classify = sub.add_parser("classify", help="zero-shot classification with prompt ensembles")
    classify.add_argument("images", nargs="+")
    classify.add_argument("--model", required=True)
    classify.add_argument("--labels", required=True, help="comma-separated class names")
    classify.add_argument("--top", type=int, default=3)
    classify.add_argument("--json", action="store_true")
    classify.set_defaults(handler=cmd_classify)

    evaluate = sub.add_parser("eval", help="evaluate").add_subparsers(dest="what", required=True)
    retrieval = evaluate.add_parser("retrieval", help="R@K, mAP and zero-shot accuracy of an index")
    retrieval.add_argument("index")
    retrieval.add_argument("--model", default=None)
    retrieval.add_argument("--json-out", default=None, help="default: INDEX/eval.json")
    retrieval.set_defaults(handler=cmd_eval_retrieval)

    models = sub.add_parser("models", help="list model presets")
    models.set_defaults(handler=cmd_models)

    data = sub.add_parser("data", help="export offline data sets as image folders").add_subparsers(
        dest="what", required=True
    )
    export = data.add_parser("export", help="write a data set as a folder that `vitrina index` takes")
    export.add_argument("source", choices=["emoji", "fashion-mnist"])
    export.add_argument("--out", required=True)
    export.add_argument("--style", default="google", help="emoji drawing style")
    export.add_argument("--split", default="test", choices=["train", "test"], help="Fashion-MNIST split")
    export.add_argument("--limit", type=int, default=None)
    export.set_defaults(handler=cmd_data_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        args.handler(args)
    except UserError as error:
        print(f"vitrina: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitrina: interrupted; everything committed so far is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
