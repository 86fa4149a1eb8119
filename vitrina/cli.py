"""The one `vitrina` command. Each sub-command parses its arguments and calls one function
of the package; heavy imports happen inside the handlers so `vitrina --help` is instant."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from vitrina.config import NEGATIVES, PRECISIONS
from vitrina.errors import UserError

# Nothing here may wait on a model hub: weights come from local folders or the packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _shown_path(path: str) -> str:
    """A hit's path as a table shows it: relative to the working directory when it lies below it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith("..") else relative


def _print_hits(hits, console=None) -> None:
    """The hits as a table (``--json`` prints them in ``cmd_search``)."""
    from rich.console import Console
    from rich.table import Table

    # a caption says what the image shows, a label what folder it came from: each gets a column when any hit has
    # one. The path folds onto more lines instead of losing its end: the file name is what a user opens.
    table = Table(show_edge=False)
    table.add_column("rank", no_wrap=True)
    table.add_column("score", no_wrap=True)
    texts = [name for name in ("caption", "label") if any(getattr(hit, name) for hit in hits)]
    for name in texts:
        table.add_column(name, overflow="fold", ratio=1)
    table.add_column("path", overflow="fold", ratio=2)
    for rank, hit in enumerate(hits, 1):
        shown = (getattr(hit, name) or "" for name in texts)
        table.add_row(str(rank), f"{hit.score:.3f}", *shown, _shown_path(hit.path))
    # captions and paths are shown as they are (no markup, emoji codes or highlighting read into them)
    (console or Console(emoji=False, markup=False, highlight=False)).print(table)


# Commands that must not pay for importing torch: a search runs the index's exported towers (vitrina.runtime)
# and imports torch only when it falls back to it; listing versions needs none.
LIGHT_COMMANDS = ("search", "versions")


def _prepare_for_models() -> None:
    """PyTorch on every core of this machine, and a heap that keeps freed activations (``vitrina.heap``):
    for the commands that run models."""
    import torch

    from vitrina.heap import keep_freed_memory

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    keep_freed_memory()


# the names of vitrina.ssl.METHODS, spelt out so that `vitrina --help` needs no torch import
SSL_METHODS = (
    "rotation", "jigsaw", "relative-position", "inpainting", "colorization", "simclr", "deepcluster", "mae",
    "vicreg", "byol", "dino",
)  # fmt: skip


# --- handlers -------------------------------------------------------------------------------


def _schedule_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig fields of the options ``_add_schedule_options`` adds (every trainer has them)."""
    from vitrina.train.schedule import BUDGET_EPOCH_LIMIT

    if args.warmup_seconds is not None and args.minutes is None:
        raise UserError("--warmup-seconds warms up within a time budget: give --minutes too, or leave it out")
    if args.epochs is None:  # a budget run lasts as long as its budget; otherwise ten passes
        epochs = BUDGET_EPOCH_LIMIT if args.minutes is not None else DEFAULT_EPOCHS
    else:
        epochs = args.epochs
    settings = {
        "epochs": epochs,
        "budget_minutes": args.minutes,
        "max_minutes": args.max_minutes,
        "warmup_seconds": args.warmup_seconds,
        "ema_decay": args.ema,
    }
    if args.warmup_fraction is not None:
        settings["warmup_fraction"] = args.warmup_fraction
    return settings


def cmd_train_clip(args: argparse.Namespace) -> None:
    from vitrina.checkpoint import best_checkpoint
    from vitrina.config import TrainConfig
    from vitrina.data.sources import load_training_items
    from vitrina.models.precision import warn_without_native_bf16
    from vitrina.models.registry import build_model
    from vitrina.train.clip import ClipTrainSettings, train_clip

    pairs, concepts = load_training_items(args.data, seed=args.seed)
    if not pairs:
        raise UserError(f"--data {args.data!r} yielded no image-caption pairs: check the spec and the data folder")
    model = build_model(args.preset)
    if args.precision == "bf16":
        warn_without_native_bf16("training with --precision bf16")
    config = TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        num_workers=args.workers,
        precision=args.precision,
        **_schedule_settings(args),
    )
    settings = ClipTrainSettings(
        in_memory=args.in_memory, duplicate_aware=args.duplicate_aware, crop=args.crop, negatives=args.negatives
    )
    summary = train_clip(
        model=model, pairs=pairs, concepts=concepts, out_dir=Path(args.out), train_config=config, settings=settings
    )
    best = best_checkpoint(args.out)
    print(f"checkpoint: {args.out}  ({summary})")
    if best != Path(args.out):
        print(f"best validation R@10: {best}")
    print(f"next: vitrina index FOLDER --model {best} --out INDEX_DIR")


def cmd_train_rerank(args: argparse.Namespace) -> None:
    from vitrina.checkpoint import load_model, weights_digest
    from vitrina.config import TrainConfig
    from vitrina.data.sources import load_training_pairs
    from vitrina.models.clip import CLIP
    from vitrina.models.rerank import reranker_folder
    from vitrina.train.rerank import RerankSettings, train_reranker

    clip, clip_config = load_model(args.model)
    if not isinstance(clip, CLIP):
        raise UserError(
            f"--model {args.model}: a {clip_config['kind']} checkpoint; the re-ranker reads a CLIP's towers"
        )
    pairs = load_training_pairs(args.data, seed=args.seed)
    out = Path(args.out) if args.out else reranker_folder(args.model)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_minutes=args.max_minutes
    )
    settings = RerankSettings(hard_pool=args.hard_pool, negatives=args.negatives)
    summary = train_reranker(
        clip=clip,
        clip_ref=str(Path(args.model).resolve()),
        clip_digest=weights_digest(args.model, clip_config),
        pairs=pairs,
        out_dir=out,
        train_config=config,
        settings=settings,
        data_spec=args.data,
    )
    print(f"re-ranker: {out}  ({summary})")
    hint = "" if out == reranker_folder(args.model) else f" --reranker {out}"
    if args.index:
        from vitrina.index.rerank_tokens import prepare_tokens
        from vitrina.models.rerank import load_reranker

        reranker = load_reranker(out, clip=clip, clip_digest=weights_digest(args.model, clip_config))
        print(prepare_tokens(Path(args.index), reranker, progress=True).summary())
        print(f'next: vitrina search {args.index} "a query" --rerank 50{hint}')
        return
    print(f'next: vitrina search INDEX "a query" --rerank 50{hint}')
    print(f"      vitrina rerank-prepare INDEX{hint}   (re-ranked queries then skip decoding their candidates)")


def cmd_rerank_prepare(args: argparse.Namespace) -> None:
    from vitrina.index.rerank_tokens import prepare_tokens
    from vitrina.index.store import IndexStore
    from vitrina.models.rerank import load_reranker, reranker_folder

    index_dir = Path(args.index)
    with IndexStore.open(index_dir) as store:
        version = store.version(args.version) if args.version else store.active_version()
    reranker = load_reranker(Path(args.reranker) if args.reranker else reranker_folder(version.model_ref))
    print(prepare_tokens(index_dir, reranker, version=args.version, progress=True).summary())


def _classify_train_config(args: argparse.Namespace):
    from vitrina.config import TrainConfig

    return TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        num_workers=args.workers,
        precision=args.precision,
        **_schedule_settings(args),
    )


def _classify_settings(args: argparse.Namespace):
    from vitrina.train.classify import ClassifySettings

    return ClassifySettings(
        label_smoothing=args.label_smoothing,
        augment=not args.no_augment,
        crop_pad=args.crop_pad,
        erasing=args.erasing,
        tta=args.tta,
        tta_shift=args.tta_shift,
    )


def _classify_data(args: argparse.Namespace):
    from vitrina.train.classify_data import load_classification_data

    return load_classification_data(args.data, fraction=args.fraction, limit=args.limit, seed=args.seed)


def _print_outcome(outcome, out: str) -> None:
    r = outcome.results
    print(f"checkpoint: {out}  ({outcome.summary})")
    print(f"best (epoch {r['best_epoch']}, val acc {r['best_val_acc']:.4f}): {outcome.best_dir}")
    print(f"test accuracy {r['test_acc']:.4f} on {r['test_images']} images; written: {out}/results.json, confusion.png")


def cmd_train_classify(args: argparse.Namespace) -> None:
    from vitrina.train.classify import build_classifier, count_parameters, train_classifier
    from vitrina.train.transfer import TransferSettings, transfer_classifier

    if args.init is None and (args.mode != "finetune" or args.freeze != "none" or args.layer_decay is not None):
        raise UserError("--mode, --freeze and --layer-decay apply to transfer learning: give --init CHECKPOINT too")
    if args.init is None and args.model is None:
        raise UserError("give --model PRESET (train from scratch) or --init CHECKPOINT (transfer)")
    data = _classify_data(args)
    config, settings = _classify_train_config(args), _classify_settings(args)
    if args.init is not None:
        transfer = TransferSettings(mode=args.mode, freeze=args.freeze, layer_decay=args.layer_decay)
        outcome = transfer_classifier(
            init=args.init, data=data, out_dir=Path(args.out), train_config=config, settings=settings, transfer=transfer
        )
    else:
        model = build_classifier(args.model, len(data.class_names), seed=args.seed)
        total, trainable = count_parameters(model)
        print(f"{args.model}: {total:,} parameters, {trainable:,} trainable; {len(data.train)} training images")
        outcome = train_classifier(
            model=model, data=data, out_dir=Path(args.out), train_config=config, settings=settings
        )
    _print_outcome(outcome, args.out)


def cmd_distill(args: argparse.Namespace) -> None:
    if args.target == "clip":
        from vitrina.data.sources import load_training_pairs
        from vitrina.distill.clip_tower import ClipDistillSettings, distill_clip_tower

        if args.data is None:
            raise UserError("vitrina distill clip needs --data SPEC (e.g. emoji:apple,google+fashion-mnist:train:6000)")
        if args.tta or args.tta_shift:
            raise UserError("--tta averages class logits over flips: it applies to classifiers, not to distill clip")
        if args.cache_teacher_views:
            raise UserError("--cache-teacher-views caches a classifier teacher's logits: not for distill clip")
        for name in ("alpha", "temperature", "beta", "kind"):
            if getattr(args, name) is not None:
                raise UserError(f"--{name} sets a classifier's distillation, not distill clip's; leave it out")
        if len(args.teacher) > 1:
            raise UserError(f"distill clip learns from one CLIP: give --teacher once, not {len(args.teacher)} times")
        pairs = load_training_pairs(args.data, seed=args.seed)
        settings = ClipDistillSettings(
            augment=not args.no_augment, similarity_weight=args.similarity_weight, text_weight=args.text_weight
        )
        summary = distill_clip_tower(
            teacher_path=args.teacher[0],
            student_preset=args.student,
            pairs=pairs,
            out_dir=Path(args.out),
            train_config=_classify_train_config(args),
            settings=settings,
        )
        print(f"checkpoint: {args.out}  ({summary})")
        print(f"next: vitrina index FOLDER --model {args.out} --out INDEX_DIR")
        return
    from vitrina.distill.trainer import DistillSettings, KDKind, distill_classifier

    if args.kind is None:
        raise UserError("give --kind response|feature|relation|dist|deit|deit-soft")
    if args.data is None:
        raise UserError("give --data fashion-mnist or a folder of class folders (the teacher's data)")
    kind = KDKind.parse(args.kind)
    weights = {"alpha": args.alpha, "temperature": args.temperature, "beta": args.beta}
    for name, value in weights.items():
        if value is not None and name not in kind.settings_read:
            reads = ", ".join(f"--{n}" for n in sorted(kind.settings_read)) or "none of --alpha, --temperature, --beta"
            raise UserError(f"--{name}: --kind {kind.value} does not read it (it reads {reads}); leave it out")
    distill = DistillSettings(
        kind=kind,
        teacher_bf16=args.teacher_bf16,
        cache_views=args.cache_teacher_views,
        **{name: value for name, value in weights.items() if value is not None},
    )
    outcome = distill_classifier(
        teacher_paths=args.teacher,
        student_preset=args.student,
        data=_classify_data(args),
        out_dir=Path(args.out),
        train_config=_classify_train_config(args),
        settings=_classify_settings(args),
        distill=distill,
    )
    _print_outcome(outcome, args.out)


def cmd_index(args: argparse.Namespace) -> None:
    from vitrina.checkpoint import load_encoder
    from vitrina.index.embed import index_folder

    folder = Path(args.folder)
    ray_flags = {"--address": args.address, "--actors": args.actors, "--cpus-per-actor": args.cpus_per_actor}
    ray_flags["--num-gpus"] = args.num_gpus
    ray_only = [flag for flag, given in {**ray_flags, "--shard-size": args.shard_size}.items() if given is not None]
    if args.engine == "local" and ray_only:
        raise UserError(f"{', '.join(ray_only)}: only for --engine ray; add it, or leave them out")
    if args.engine == "ray" and args.decoder is not None:
        raise UserError("--decoder: only for --engine local (Ray decodes in actors, --workers of them); leave it out")
    if args.engine == "local" and folder.is_file():
        raise UserError(f"{folder}: a list of images is read by --engine ray; add it, or give a folder")
    if args.engine == "local" and not folder.is_dir():
        raise UserError(f"{folder}: not a folder of images; give the collection's root folder")
    if args.no_activate and args.activate_if_better:
        raise UserError("--no-activate and --activate-if-better contradict each other; give one")
    if (args.no_activate or args.activate_if_better) and not args.new_version:
        raise UserError("--no-activate and --activate-if-better apply to --new-version; add it")
    from vitrina.models.precision import with_precision

    encoder = with_precision(load_encoder(args.model), args.precision)
    common = dict(
        model_ref=args.model,
        precision=args.precision,
        batch_size=args.batch_size,
        index_kind=args.index_kind,
        fraction=args.fraction,
        seed=args.seed,
        new_version=args.new_version,
        activate=not (args.no_activate or args.activate_if_better),
    )
    if args.engine == "ray":
        from vitrina.index.ray_engine import SHARD_SIZE, index_with_ray  # imports ray: only for this engine

        report = index_with_ray(
            folder,
            encoder,
            Path(args.out),
            address=args.address,
            actors=args.actors or 1,
            cpus_per_actor=args.cpus_per_actor or 1,
            decoders=args.workers,
            num_gpus=args.num_gpus or 0.0,
            shard_size=args.shard_size or SHARD_SIZE,
            **common,
        )
    else:
        report = index_folder(folder, encoder, Path(args.out), workers=args.workers, decoder=args.decoder, **common)
    print(report.summary())
    if args.new_version and report.ready and args.activate_if_better and not report.activated:
        _activate_if_better(Path(args.out), report.version)
    elif args.new_version and not report.ready:
        print(f"{report.version} is not complete yet; run the same command again to finish it")
    elif args.new_version and not report.activated:
        print(f"{report.version} is ready, not active: vitrina versions {args.out} --activate {report.version}")
    elif report.activated:
        print(f"active version: {report.version}")
    print(f'index: {args.out}\nnext: vitrina search {args.out} "a query"')


def _activate_if_better(index_dir: Path, candidate: str) -> None:
    """Score the new version against the active one on the collection's own labels and captions;
    activate it only if it does not score lower."""
    from vitrina.eval.retrieval import compare_versions, format_comparison
    from vitrina.index.lock import WriterLock
    from vitrina.index.store import IndexStore

    with IndexStore.open(index_dir) as store:
        active = store.active_version().name
    if active == candidate:
        return
    comparison = compare_versions(index_dir, active, candidate)
    print(format_comparison(comparison))
    old, new = comparison["headline"]
    if old is None or new is None:
        print(f"nothing to score {candidate} on (no labels or captions): it stays inactive; activate it by hand")
    elif new >= old:
        with WriterLock(index_dir, what="vitrina versions --activate"), IndexStore.open(index_dir) as store:
            store.activate(candidate)
        print(f"{candidate} scores {new:.3f} vs {old:.3f} for {active}: activated")
    else:
        print(f"{candidate} scores {new:.3f} vs {old:.3f} for {active}: lower, so {active} stays active")


def cmd_versions(args: argparse.Namespace) -> None:
    from vitrina.index.lock import WriterLock
    from vitrina.index.store import IndexStore

    index_dir = Path(args.index)
    if args.compare:
        from vitrina.eval.retrieval import compare_versions, format_comparison

        _prepare_for_models()
        comparison = compare_versions(index_dir, *args.compare)
        print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison))
        return
    if args.activate or args.drop:
        with WriterLock(index_dir, what="vitrina versions"), IndexStore.open(index_dir) as store:
            if args.activate:
                print(f"active: {store.activate(args.activate).describe()}")
            if args.drop:
                print(f"dropped: {store.drop(args.drop).describe()}")
    from vitrina.index.ann import version_dir
    from vitrina.runtime.towers import towers_dir, towers_summary

    with IndexStore.open(index_dir) as store:
        versions, count = store.versions(), store.count
        rows = [
            (v, store.vector_count(v.id), towers_summary(towers_dir(version_dir(index_dir, v.id)), v.digest))
            for v in versions
        ]
    if args.json:
        print(json.dumps([{**v.to_json(), "items": n, "towers": towers} for v, n, towers in rows], indent=2))
        return
    print(_versions_table(index_dir, rows, count))


def _versions_table(index_dir: Path, rows: list, count: int) -> str:
    import io
    import time

    from rich.console import Console
    from rich.table import Table

    from vitrina.digest import short

    table = Table(title=f"{index_dir}  ({count} items)")
    for column in ("version", "model", "digest", "items", "state", "active", "kind", "towers", "created"):
        table.add_column(column)
    for v, n, towers in rows:  # towers: the exported query towers a search can run without torch
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created))
        active = "*" if v.active else ""
        table.add_row(
            v.name, v.model_name, short(v.digest), f"{n}/{count}", v.state, active, v.index_kind, towers, created
        )
    buffer = io.StringIO()
    Console(file=buffer, width=120, force_terminal=False).print(table)
    return buffer.getvalue().rstrip()


def cmd_export(args: argparse.Namespace) -> None:
    from vitrina.index.export import export_index

    report = export_index(Path(args.index), Path(args.out), version=args.version)
    print(f"exported {report.version}: {report.count} items in {report.files} Parquet file(s) to {report.out}")


def cmd_import(args: argparse.Namespace) -> None:
    from vitrina.index.export import import_index

    report = import_index(
        Path(args.folder), Path(args.out), root=Path(args.root) if args.root else None, model_ref=args.model
    )
    print(f"imported {report.count} items into {report.out} (nothing re-embedded)")
    if not report.root_exists:
        print(f"note: the collection folder {report.root} is not on this machine; give --root to serve its images")


def cmd_search(args: argparse.Namespace) -> None:
    from vitrina.search import MAX_ABS_WEIGHT, Query, Searcher, Term, parse_query

    if args.query is None and args.image is None:
        raise UserError('give a text query or --image PATH, e.g. vitrina search INDEX "a beach" --not people')
    if args.k < 1:
        raise UserError(f"-k {args.k}: must be at least 1")
    if not abs(args.image_weight) <= MAX_ABS_WEIGHT:
        raise UserError(f"--image-weight {args.image_weight}: must be within ±{MAX_ABS_WEIGHT:g}")
    # The query language of the API (see vitrina.search); with an image, the text may only push away.
    terms = parse_query(args.query or "", require_positive=args.image is None)
    terms += [Term(" ".join(text.split()), -1.0) for text in args.negatives if text.strip()]
    images = [(Path(args.image), args.image_weight)] if args.image is not None else []
    if args.rerank < 0:
        raise UserError(f"--rerank {args.rerank}: give how many candidates to re-score (0: none)")
    query = Query(terms=terms, images=images, k=args.k, collapse=args.collapse, rerank=args.rerank)
    searcher = Searcher(
        Path(args.index), model_ref=args.model, runtime=args.runtime, precision=args.precision, reranker=args.reranker
    )
    with searcher:
        if "torch" in sys.modules:  # the PyTorch path (asked for, or no usable towers)
            _prepare_for_models()
        results = searcher.run(query)
        folded = {d: searcher.store.get(d) for ranked in results.hits for d in ranked.duplicates}
    if results.cancelled:
        print("vitrina: the terms cancel each other out; nothing to rank by (change their weights)", file=sys.stderr)
    if args.json:
        print(json.dumps([{**r.hit.to_json(), "duplicates": r.duplicates} for r in results.hits], indent=2))
        return
    _print_hits([r.hit for r in results.hits])
    for rank, ranked in enumerate(results.hits, 1):
        if ranked.duplicates:
            paths = [folded[d].path if folded[d] is not None else f"id {d}" for d in ranked.duplicates]
            print(f"  #{rank} also stands for {len(paths)} near-duplicate(s): {', '.join(paths)}")


def cmd_classify(args: argparse.Namespace) -> None:
    from vitrina.checkpoint import load_encoder
    from vitrina.search import classify, classify_fewshot

    if (args.labels is None) == (args.shots is None):
        raise UserError("give --labels a,b,c (zero-shot) or --shots DIR (few-shot: one subfolder of images per class)")
    if args.shots is None and (args.method != "prototype" or args.alpha is not None or args.beta is not None):
        raise UserError("--method, --alpha and --beta apply to few-shot classification: give --shots DIR too")
    if args.shots is not None:
        from vitrina.models.fewshot import read_shots_folder

        read_shots_folder(args.shots)  # a bad folder is reported before the model loads
        encoder = load_encoder(args.model)
        _, results = classify_fewshot(
            [Path(p) for p in args.images],
            args.shots,
            encoder,
            method=args.method,
            top=args.top,
            alpha=args.alpha,
            beta=args.beta,
        )
    else:
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


def cmd_eval_fewshot(args: argparse.Namespace) -> None:
    from vitrina.checkpoint import load_encoder
    from vitrina.eval.fewshot import format_fewshot, run_fewshot_eval

    shots = _int_list(args.shots, "--shots")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out)
    results = run_fewshot_eval(
        load_encoder(args.model),
        [d.strip() for d in args.data.split("+") if d.strip()],
        shots=shots,
        seeds=args.seeds,
        methods=methods,
        limit_test=args.limit_test,
        out_dir=out,
    )
    print(format_fewshot(results))
    print(f"written: {out / 'fewshot.json'}, {out / 'fewshot.png'}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated whole numbers, e.g. 1,2,4,8,16") from None
    if not values or values[0] < 1:
        raise UserError(f"{flag} {text!r}: give whole numbers of at least 1, e.g. 1,2,4,8,16")
    return values


def cmd_eval_retrieval(args: argparse.Namespace) -> None:
    from vitrina.eval.retrieval import evaluate_index, format_table

    results = evaluate_index(Path(args.index), model_ref=args.model, version=args.version)
    print(format_table(results))
    out = Path(args.json_out) if args.json_out else Path(args.index) / "eval.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from vitrina.ssl.run import parse_expander, run_pretraining

    if args.minutes is None and args.epochs is None:
        raise UserError("give --minutes (a time budget: the schedule ends with it) or --epochs")
    settings = _schedule_settings(args)
    settings["precision"] = args.precision
    result = run_pretraining(
        args.method,
        backbone=args.backbone,
        data=args.data,
        out_dir=Path(args.out),
        epochs=settings.pop("epochs"),
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        train_settings=settings,
        local_crops=args.local_crops,
        expander_dims=parse_expander(args.expander) if args.expander else None,
        blur_p=args.blur,
    )
    print(f"backbone checkpoint: {args.out}  ({result.summary})")
    print(f"next: vitrina eval probe --ckpt {args.out} --data DATA --out PROBE_DIR")


def cmd_eval_probe(args: argparse.Namespace) -> None:
    from vitrina.data.splits import stratified_indices
    from vitrina.eval.probe import PIXELS, load_probe_model, probe_representation
    from vitrina.ssl.data import cross_source_splits, probe_splits

    model = None if args.ckpt == PIXELS else load_probe_model(args.ckpt, seed=args.seed)
    size = 28 if model is None else model.config.image_size
    if model is None and args.image_size:
        size = args.image_size
    if args.train_data:
        train, test = cross_source_splits(args.train_data, args.data, size, seed=args.seed)
    else:
        train, test = probe_splits(args.data, size, seed=args.seed)
    if args.limit_train:
        train = train.subset(stratified_indices(train.labels, args.limit_train, args.seed))
    if args.limit_test:
        test = test.subset(stratified_indices(test.labels, args.limit_test, args.seed))
    options = {"seed": args.seed, "label": args.ckpt, "tsne_points": args.tsne_points, "pool": args.pool}
    options["probe_bn"], options["multi_block"] = args.probe_bn, args.multi_block
    results = probe_representation(model, train, test, Path(args.out), **options)
    knn = ", ".join(f"kNN@{k[1:]} {v:.4f}" for k, v in results["knn"].items())
    linear_bn = f"linear-bn {results['linear_bn']['accuracy']:.4f}, " if "linear_bn" in results else ""
    multi = results.get("linear_multiblock")
    if multi is not None:
        linear_bn += f"linear-multiblock {multi['accuracy']:.4f} ({multi['choice']}, {multi['feature_dim']} dims), "
    print(
        f"linear {results['linear']['accuracy']:.4f}, {linear_bn}{knn}, "
        f"NMI {results['cluster']['nmi']:.4f}, ARI {results['cluster']['ari']:.4f}"
    )
    print(f"written: {Path(args.out) / 'probe.json'}, {Path(args.out) / 'tsne.png'}")


def cmd_models(args: argparse.Namespace) -> None:
    from vitrina.models.registry import describe_presets

    print(describe_presets())


def cmd_explain(args: argparse.Namespace) -> None:
    from vitrina.checkpoint import load_model
    from vitrina.data.transforms import MEAN, STD
    from vitrina.models.explain import explain_images, vision_transformer
    from vitrina.models.registry import build_model, list_presets

    if not 0.0 <= args.discard_ratio < 1.0:
        raise UserError(f"--discard-ratio {args.discard_ratio}: must be in [0, 1), e.g. 0.9 keeps the top 10%")
    ref = Path(args.model)
    if ref.exists():
        model, _ = load_model(ref)
    elif args.model in list_presets():
        print(f"warning: {args.model} is an untrained preset (random weights): its maps show no learned structure")
        model = build_model(args.model)
    else:
        raise UserError(f"--model {args.model}: no such checkpoint folder or model preset (see `vitrina models`)")
    vit = vision_transformer(model, where=f"--model {args.model}")
    config = getattr(model, "config", None)  # a CLIP normalises with its own statistics
    mean, std = getattr(config, "image_mean", MEAN), getattr(config, "image_std", STD)
    images = [Path(p) for p in args.images]
    query_vector = _explain_query_vector(model, args) if args.query is not None else None
    written = explain_images(
        vit, images, Path(args.out), mean=mean, std=std, discard_ratio=args.discard_ratio, head_fusion=args.head_fusion
    )
    if query_vector is not None:
        from vitrina.models.explain import explain_query

        written += explain_query(model, images, Path(args.out), query=args.query, text_vector=query_vector)
    for path in written:
        print(f"written: {path}")


def _explain_query_vector(model, args: argparse.Namespace):
    """The unit (D,) vector of ``--query`` (the search query language: weighted and negative terms mixed)."""
    import torch

    from vitrina.encoder import as_numpy
    from vitrina.models.explain import clip_image_tower
    from vitrina.search import combine, parse_query

    clip_image_tower(model, where=f"--model {args.model} (--query)")  # a ViT classifier has no text tower
    terms = parse_query(args.query)
    with torch.inference_mode():
        texts = as_numpy(model.eval().encode_text(model.tokenize([t.text for t in terms])))  # (T, D)
    vector = combine([(v, t.weight) for v, t in zip(texts, terms, strict=True)])
    if vector is None:
        raise UserError(f"--query {args.query!r}: the terms cancel each other out; change their weights")
    return vector


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

    serve(
        Path(args.index),
        host=args.host,
        port=args.port,
        model_ref=args.model,
        precision=args.precision,
        runtime=args.runtime,
        reranker=args.reranker,
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from vitrina.demo import run_demo

    run_demo(out_dir=Path(args.out), train_minutes=args.minutes, held_out_style=args.held_out, seed=args.seed)


# --- parser ---------------------------------------------------------------------------------


DEFAULT_EPOCHS = 10


def _add_schedule_options(parser: argparse.ArgumentParser) -> None:
    """Epochs, time budget and cap, warm-up and weight average: the same for every trainer."""
    option = parser.add_argument
    option("--epochs", type=int, metavar="N", help=f"passes over the data ({DEFAULT_EPOCHS}; with --minutes: no limit)")
    option(
        "--minutes",
        type=float,
        metavar="M",
        help="time budget: warm-up and cosine decay over M minutes of wall-clock time; the run ends at M",
    )
    option(
        "--max-minutes",
        type=float,
        metavar="M",
        help="stop this invocation cleanly after M minutes, schedule unchanged; run again to continue",
    )
    option("--warmup-seconds", type=float, metavar="S", help="--minutes: warm-up length in seconds")
    option("--warmup-fraction", type=float, metavar="F", help="warm-up as a share of the steps or the budget (0.05)")
    option(
        "--ema",
        type=float,
        nargs="?",
        const=0.999,
        metavar="DECAY",
        help="evaluate and save a moving average of the weights (decay 0.999 if not given)",
    )


def _add_classify_options(parser: argparse.ArgumentParser, *, lr: float, data_required: bool = True) -> None:
    """Data and training options shared by `train classify` and `distill`."""
    parser.add_argument("--data", required=data_required, help="fashion-mnist, or a folder of class folders")
    parser.add_argument("--fraction", type=float, default=None, help="a stratified share of the images")
    parser.add_argument("--limit", type=int, default=None, help="at most about N images per split (smoke runs)")
    parser.add_argument("--out", required=True, help="checkpoint folder; an existing one is resumed")
    _add_schedule_options(parser)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--no-augment", action="store_true", help="train on the images as they are")
    parser.add_argument(
        "--crop-pad", type=int, default=2, metavar="PX", help="in-memory images: random crop shifts up to PX px (2)"
    )
    parser.add_argument(
        "--erasing", type=float, default=0.25, metavar="P", help="in-memory images: random erasing probability"
    )
    parser.add_argument("--tta", action="store_true", help="evaluate on the mean logits of each image and its flip")
    parser.add_argument(
        "--tta-shift",
        type=int,
        default=0,
        metavar="PX",
        help="with --tta: the test also averages 4 views shifted by PX px, and their flips (10 views)",
    )
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (folders of photos)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16: autocast forward (faster CNNs and small ViTs on AVX-512 BF16); bf16-stem: a hybrid ViT's stem only",
    )
    parser.add_argument("--seed", type=int, default=0)


def _add_query_precision_option(parser: argparse.ArgumentParser) -> None:
    """``--precision`` of the commands that embed queries (search, serve): the same choices and meaning."""
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "int8"],
        help="bf16: PyTorch autocast; int8: the exported towers' int8 twins (under --runtime torch: PyTorch's int8 "
        "Linear layers); see BENCHMARKS.md precision",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrina", description="Text-to-image retrieval on vision transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small CLIP on emoji + Fashion-MNIST, index held-out data, evaluate")
    demo.add_argument("--out", default="runs/demo", help="folder for the checkpoint, indexes and reports")
    demo.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes")
    demo.add_argument("--held-out", default="facebook", help="emoji style indexed but never trained on")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="what", required=True)
    clip = train.add_parser("clip", help="contrastive image-text training (CLIP)")
    clip.add_argument("--data", required=True, help="e.g. emoji:apple,google+fashion-mnist:train:10000 or pairs.jsonl")
    clip.add_argument("--preset", default="clip-minilm", help="model preset (see `vitrina models`)")
    clip.add_argument("--out", required=True, help="checkpoint folder; an existing one is resumed")
    _add_schedule_options(clip)
    clip.add_argument("--batch-size", type=int, default=128)
    clip.add_argument("--lr", type=float, default=1e-3)
    clip.add_argument("--workers", type=int, default=2, help="data-loading processes (per-sample path only)")
    clip.add_argument(
        "--in-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode every image once into memory and augment whole batches (default: when it fits 2 GiB)",
    )
    clip.add_argument(
        "--duplicate-aware",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one concept in several pairs of a batch (styles, phrasings) is not its own negative (default: on)",
    )
    clip.add_argument(
        "--crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random resized crops besides the flips (default: on; --no-crop: flips alone)",
    )
    clip.add_argument(
        "--negatives",
        choices=NEGATIVES,
        default="auto",
        help="what an image is contrasted with: the batch's captions (CLIP) or every training caption, each "
        "phrasing of its concept a positive (needs a locked text tower: its features are cached); auto "
        "(default): captions where the text tower is locked and one process trains, else batch",
    )
    clip.add_argument(
        "--precision",
        choices=("fp32", "bf16"),  # a CLIP's image tower has no conv stem for bf16-stem
        default="fp32",
        help="bf16: the towers' forward under bf16 autocast, the loss in float32 (pays on AVX-512 BF16 / AMX CPUs)",
    )
    clip.add_argument("--seed", type=int, default=0)
    clip.set_defaults(handler=cmd_train_clip)

    rerank = train.add_parser("rerank", help="cross-attention re-ranker on a CLIP's hard negatives")
    rerank.add_argument("--model", required=True, help="the CLIP checkpoint whose frozen towers it reads")
    rerank.add_argument("--data", required=True, help="e.g. emoji:apple,google,twitter (see `train clip --data`)")
    rerank.add_argument("--out", default=None, help="re-ranker folder (default: MODEL/reranker, found by search)")
    rerank.add_argument("--epochs", type=int, default=10)
    rerank.add_argument(
        "--batch-size", type=int, default=32, help="groups per step (a caption, a positive and its negatives)"
    )
    rerank.add_argument("--lr", type=float, default=3e-4)
    rerank.add_argument("--hard-pool", type=int, default=50, help="negatives come from the dual encoder's top-k")
    rerank.add_argument("--negatives", type=int, default=15, help="hard negatives per group")
    rerank.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this many minutes")
    rerank.add_argument("--seed", type=int, default=0)
    rerank.add_argument(
        "--index", default=None, help="then store its image tokens of this index's items (see rerank-prepare)"
    )
    rerank.set_defaults(handler=cmd_train_rerank)

    classify = train.add_parser("classify", help="supervised image classification (from scratch or transfer)")
    classify.add_argument("--model", default=None, help="ViT / Swin / CNN preset trained from scratch")
    classify.add_argument("--init", default=None, help="start from this checkpoint (a CLIP gives its image tower)")
    classify.add_argument("--mode", default="finetune", choices=["finetune", "linear-probe"])
    classify.add_argument("--freeze", default="none", help="none, all-but-head or first-N (fine-tuning)")
    classify.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay, e.g. 0.75")
    _add_classify_options(classify, lr=1e-3)
    classify.set_defaults(handler=cmd_train_classify)

    distill = sub.add_parser(
        "distill", help="knowledge distillation into a student classifier, or of a CLIP image tower (distill clip)"
    )
    distill.add_argument("target", nargs="?", default="classify", choices=["classify", "clip"])
    distill.add_argument(
        "--teacher",
        required=True,
        action="append",
        help="teacher checkpoint folder; repeat it to distil from the ensemble of several (their mean softmax)",
    )
    distill.add_argument("--student", required=True, help="student preset (see `vitrina models`)")
    distill.add_argument(
        "--kind", default=None, help="response, feature, relation, dist, deit (= deit-hard), deit-soft"
    )
    distill.add_argument("--alpha", type=float, default=None, help="response: weight of the soft-target term (0.7)")
    distill.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="response, deit-soft, dist: softmax temperature of soft targets (4; dist: 1)",
    )
    distill.add_argument("--teacher-bf16", action="store_true", help="teacher forward under bf16 autocast (faster)")
    distill.add_argument("--beta", type=float, default=None, help="feature, relation, dist: weight of that term (1)")
    distill.add_argument(
        "--cache-teacher-views",
        action="store_true",
        help="teacher logits of every shift/flip view built once beside the teacher (needs --erasing 0)",
    )
    distill.add_argument("--similarity-weight", type=float, default=1.0, help="clip: in-batch similarity KL weight")
    distill.add_argument(
        "--text-weight", type=float, default=0.0, help="clip: weight of the KL over the batch's captions (image-text)"
    )
    _add_classify_options(distill, lr=1e-3, data_required=False)
    distill.set_defaults(handler=cmd_distill)

    index = sub.add_parser("index", help="embed a folder of images into an index (incremental, resumable)")
    index.add_argument("folder", metavar="SOURCE", help="image folder; --engine ray: or a Parquet/CSV/JSONL list")
    index.add_argument("--model", required=True, help="checkpoint folder or preset name")
    index.add_argument("--out", required=True, help="index folder")
    index.add_argument("--fraction", type=float, default=None, help="index a per-class random fraction, e.g. 0.3")
    index.add_argument("--seed", type=int, default=0, help="seed of the fraction sample")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoders (or model replicas, --decoder replica); 0: decode in the main thread (default: 2; "
        "--engine ray: decoding actors, default the CPUs the embedding actors leave)",
    )
    index.add_argument(
        "--decoder",
        default=None,
        choices=["thread", "process", "replica"],
        help="thread / process: --workers decoders beside the model; replica: --workers processes that each decode "
        "and embed whole batches with their own copy of the model, one torch thread each (default: replica for a "
        "<= 64 px tower on 2 CPUs or fewer, else thread; measured in bench/results/index_throughput.json)",
    )
    index.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: this process (the default); ray: Ray Data decoding and embedding actors, here or on --address",
    )
    index.add_argument("--address", default=None, help="--engine ray: a running Ray cluster (e.g. auto, HOST:6379)")
    index.add_argument("--actors", type=int, default=None, help="--engine ray: embedding actors, each loads the model")
    index.add_argument("--cpus-per-actor", type=int, default=None, help="--engine ray: CPUs (torch threads) per actor")
    index.add_argument("--num-gpus", type=float, default=None, help="--engine ray: GPUs per actor (0.5: two share one)")
    index.add_argument("--shard-size", type=int, default=None, help="--engine ray: files per embedding shard (4096)")
    index.add_argument(
        "--index-kind",
        default=None,
        choices=["auto", "flat", "ivf", "hnsw", "pq"],
        help="ANN kind; omitted: keep the version's stored choice (a new index: auto)",
    )
    index.add_argument(
        "--new-version",
        action="store_true",
        help="embed with a model the index was not built with, beside the active version (which keeps serving)",
    )
    index.add_argument("--no-activate", action="store_true", help="--new-version: leave the new version inactive")
    index.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "int8"],
        help="image tower arithmetic: bf16 autocast or int8 Linear layers (faster, see BENCHMARKS.md precision)",
    )
    index.add_argument(
        "--activate-if-better",
        action="store_true",
        help="--new-version: activate only if it scores no lower on the collection's labels and captions",
    )
    index.set_defaults(handler=cmd_index)

    versions = sub.add_parser("versions", help="list, activate, drop or compare the model versions of an index")
    versions.add_argument("index")
    versions.add_argument("--activate", default=None, metavar="V", help="make version V (e.g. v2) the one searched")
    versions.add_argument("--drop", default=None, metavar="V", help="delete an inactive version's vectors and files")
    versions.add_argument(
        "--compare", nargs=2, default=None, metavar=("A", "B"), help="score two versions on the collection's labels"
    )
    versions.add_argument("--json", action="store_true")
    versions.set_defaults(handler=cmd_versions)

    export = sub.add_parser("export", help="write a version of an index as Parquet + manifest.json")
    export.add_argument("index")
    export.add_argument("--out", required=True, help="a new folder")
    export.add_argument("--version", default=None, help="default: the active version")
    export.set_defaults(handler=cmd_export)

    import_ = sub.add_parser("import", help="verify an export, then build an index from it without re-embedding")
    import_.add_argument("folder", help="a folder written by `vitrina export`")
    import_.add_argument("--out", required=True, help="a new index folder")
    import_.add_argument("--root", default=None, help="where the collection's images are here (default: as exported)")
    import_.add_argument("--model", default=None, help="the model's reference here; checked against the digest")
    import_.set_defaults(handler=cmd_import)

    prepare = sub.add_parser(
        "rerank-prepare",
        help="store the re-ranker's image tokens of every item, so --rerank N reads them instead of the images",
    )
    prepare.add_argument("index")
    prepare.add_argument("--reranker", default=None, help="re-ranker folder (default: the index model's reranker/)")
    prepare.add_argument("--version", default=None, help="default: the active version")
    prepare.set_defaults(handler=cmd_rerank_prepare)

    search = sub.add_parser(
        "search",
        help="search an index by text, by example image, or both",
        description='Query syntax: plain words form one phrase; -word or -"a phrase" pushes away; '
        'word^0.5 or "a phrase"^2 weighs (within ±10); e.g. beach -people "red umbrella"^0.5',
    )
    search.add_argument("index")
    search.add_argument("query", nargs="?", default=None, help="text query (see the syntax above)")
    search.add_argument(
        "--not", dest="negatives", action="append", default=[], metavar="TEXT", help="push away from TEXT (repeatable)"
    )
    search.add_argument("--image", default=None, help="search by this image (mixed with the text, if any)")
    search.add_argument("--image-weight", type=float, default=1.0, help="weight of --image against the text terms")
    search.add_argument("--collapse", action="store_true", help="show near-duplicate images as one hit")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--json", action="store_true", help="print hits as JSON (with their folded duplicates' ids)")
    search.add_argument("--model", default=None, help="override the model stored in the index (same kind/width)")
    search.add_argument(
        "--rerank", type=int, default=0, metavar="N", help="re-score the top N with the cross-attention re-ranker"
    )
    search.add_argument("--reranker", default=None, help="re-ranker folder (default: the index model's reranker/)")
    search.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "onnx", "torch"],
        help="auto: the index's exported ONNX towers where usable, else PyTorch (as --model always is); "
        "onnx: only the towers; torch: only PyTorch",
    )
    _add_query_precision_option(search)
    search.set_defaults(handler=cmd_search)

    serve = sub.add_parser("serve", help="HTTP API and web page over an index (127.0.0.1:8000 by default)")
    serve.add_argument("index")
    serve.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback exposes the index")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", default=None, help="override the model stored in the index (same kind/width)")
    serve.add_argument("--reranker", default=None, help="re-ranker folder for rerank=N (default: MODEL/reranker)")
    _add_query_precision_option(serve)
    serve.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "onnx", "torch"],
        help="what embeds query texts. auto: the index's exported ONNX text tower where the version has one, else "
        "PyTorch; onnx: only that tower; torch: only PyTorch. The PyTorch model is loaded in every case (uploads, "
        "explain maps, classification and re-ranking run it)",
    )
    serve.set_defaults(handler=cmd_serve)

    classify = sub.add_parser(
        "classify", help="zero-shot (--labels, prompt ensembles) or few-shot (--shots DIR) classification"
    )
    classify.add_argument("images", nargs="+")
    classify.add_argument("--model", required=True)
    classify.add_argument("--labels", default=None, help="comma-separated class names (zero-shot)")
    classify.add_argument("--shots", default=None, metavar="DIR", help="one subfolder of labelled images per class")
    classify.add_argument(
        "--method",
        default="prototype",
        choices=["prototype", "tip-adapter", "linear"],
        help="--shots: class prototypes, Tip-Adapter (shot cache + zero-shot prompts), or a logistic-regression head",
    )
    classify.add_argument("--alpha", type=float, default=None, help="tip-adapter: weight of the shot cache (1.0)")
    classify.add_argument("--beta", type=float, default=None, help="tip-adapter: sharpness of the affinities (5.5)")
    classify.add_argument("--top", type=int, default=3)
    classify.add_argument("--json", action="store_true")
    classify.set_defaults(handler=cmd_classify)

    evaluate = sub.add_parser("eval", help="evaluate").add_subparsers(dest="what", required=True)
    retrieval = evaluate.add_parser("retrieval", help="R@K, mAP and zero-shot accuracy of an index")
    retrieval.add_argument("index")
    retrieval.add_argument("--model", default=None)
    retrieval.add_argument("--version", default=None, help="a version of the index (default: the active one)")
    retrieval.add_argument("--json-out", default=None, help="default: INDEX/eval.json")
    retrieval.set_defaults(handler=cmd_eval_retrieval)

    fewshot = evaluate.add_parser("fewshot", help="1/2/4/8/16-shot accuracy over seeded draws, beside zero-shot")
    fewshot.add_argument("--model", required=True, help="CLIP checkpoint folder")
    fewshot.add_argument(
        "--data",
        default="emoji:facebook+fashion-mnist",
        help="'+'-separated: emoji:STYLE (categories), fashion-mnist (train shots, test images), or a class folder",
    )
    fewshot.add_argument("--shots", default="1,2,4,8,16", help="comma-separated shots per class")
    fewshot.add_argument("--seeds", type=int, default=5, help="seeded draws per shot count (error bars)")
    fewshot.add_argument("--methods", default="prototype,tip-adapter,linear", help="comma-separated methods")
    fewshot.add_argument("--limit-test", type=int, default=2000, help="a stratified subset of each test set")
    fewshot.add_argument("--out", required=True, help="folder for fewshot.json and fewshot.png")
    fewshot.set_defaults(handler=cmd_eval_fewshot)

    probe = evaluate.add_parser("probe", help="linear probe, kNN, k-means NMI/ARI and t-SNE of frozen features")
    probe.add_argument("--ckpt", required=True, help="checkpoint folder, a preset (random init) or 'pixels'")
    probe.add_argument("--data", default="fashion-mnist", help="fashion-mnist, emoji:STYLES or a class folder")
    probe.add_argument(
        "--train-data", default=None, help="fit the probes on this source, score on --data (e.g. another emoji style)"
    )
    probe.add_argument("--limit-train", type=int, default=None, help="a stratified subset of the train split")
    probe.add_argument("--limit-test", type=int, default=None, help="a stratified subset of the test split")
    probe.add_argument("--tsne-points", type=int, default=2000, help="points in the t-SNE plot")
    probe.add_argument("--pool", default=None, choices=["cls", "mean"], help="ViT features: override the pooling")
    probe.add_argument("--image-size", type=int, default=None, help="pixel baseline only: resize images to this")
    probe.add_argument(
        "--probe-bn", action="store_true", help="also the BatchNorm(affine=False) + linear probe, as linear_bn"
    )
    probe.add_argument(
        "--multi-block",
        action="store_true",
        help="ViT: also DINO's probe of the last 1 or 4 blocks [+ mean patch token], as linear_multiblock",
    )
    probe.add_argument("--out", required=True, help="folder for probe.json and tsne.png")
    probe.add_argument("--seed", type=int, default=0)
    probe.set_defaults(handler=cmd_eval_probe)

    pretrain = sub.add_parser("pretrain", help="self-supervised pretraining of a ViT backbone")
    pretrain.add_argument("method", choices=SSL_METHODS)
    pretrain.add_argument("--backbone", default="vit-fmnist-28", help="ViT preset (see `vitrina models`)")
    pretrain.add_argument("--data", default="fashion-mnist", help="fashion-mnist[:train[:N]], emoji:STYLES or a folder")
    pretrain.add_argument("--out", required=True, help="checkpoint folder; an existing one is resumed")
    _add_schedule_options(pretrain)
    pretrain.add_argument("--batch-size", type=int, default=256)
    pretrain.add_argument("--lr", type=float, default=1e-3)
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument(
        "--local-crops", type=int, default=0, help="vicreg, byol, dino: small multi-crop views beside the 2 global ones"
    )
    pretrain.add_argument(
        "--expander", default=None, help="vicreg: expander layer widths, e.g. 2048x2048x2048 (default 512x512x512)"
    )
    pretrain.add_argument(
        "--blur",
        type=float,
        default=None,
        help="vicreg, byol, dino: probability of blurring a view (default 0.5)",
    )
    pretrain.add_argument(
        "--precision",
        choices=("fp32", "bf16-stem"),  # whole-model bf16 would put the methods' losses (covariances...) in bf16
        default="fp32",
        help="bf16-stem: a hybrid backbone's conv stem under bf16 autocast, the rest and the loss in float32",
    )
    pretrain.set_defaults(handler=cmd_pretrain)

    models = sub.add_parser("models", help="list model presets with parameters and measured GMACs per image")
    models.set_defaults(handler=cmd_models)

    explain = sub.add_parser(
        "explain", help="attention rollout, position-embedding similarity and query heat maps of images (ViT)"
    )
    explain.add_argument("images", nargs="+", help="image files")
    explain.add_argument("--model", required=True, help="ViT or CLIP checkpoint folder, or preset name")
    explain.add_argument(
        "--out", required=True, help="folder for <stem>-rollout.png, <stem>-query.png and pos-embed-similarity.png"
    )
    explain.add_argument(
        "--query", default=None, help="CLIP: also map each patch's similarity to this text (search query syntax)"
    )
    explain.add_argument("--discard-ratio", type=float, default=0.0, help="drop this fraction of faint weights")
    explain.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"])
    explain.set_defaults(handler=cmd_explain)

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


def _finish_process_group() -> None:
    """Under torchrun, no rank leaves the process group before every rank is done (see ``finish``)."""
    if "vitrina.train.distributed" in sys.modules:  # only training joins a group; others skip the import
        from vitrina.train import distributed

        distributed.finish()


@contextlib.contextmanager
def _stdout_of_this_rank() -> Iterator[None]:
    """Under torchrun only rank 0 prints: every other rank would repeat its summary lines word for word.
    Their errors and warnings still reach stderr."""
    world = os.environ.get("WORLD_SIZE", "1")
    if os.environ.get("RANK", "0") == "0" or not world.isdigit() or int(world) < 2:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command not in LIGHT_COMMANDS:
            _prepare_for_models()
        with _stdout_of_this_rank():
            args.handler(args)
        _finish_process_group()
    except UserError as error:
        print(f"vitrina: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitrina: interrupted; everything committed so far is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
