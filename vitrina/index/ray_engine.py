"""``vitrina index SOURCE --engine ray``: the local engine's run, with its embedding passes on Ray Data.

Everything but the embedding is ``vitrina.index.embed``'s, unchanged: the writer lock, the choice of
version (another model is refused unless ``--new-version``), the plan against the items, deletions,
the catch-up of every other version, publishing, activation, the query towers. Each *pass* (a version,
the files it must embed) runs here:

1. the files are cut into shards (``vitrina.index.shards``); shards a killed run finished are kept;
2. Ray Data takes the pending shards' files as blocks (of a few batches each), decodes them with the local engine's
   safe decoder (``vitrina.index.decode.decode``: a bad file becomes a row with a reason, never an error) in
   a pool of decoding actors on the CPUs the embedders leave free (or, when none is left, in the embedders),
   and ``map_batches`` embeds them in a pool of actors that each load the model once (``load_encoder(model_ref)``,
   checked against the version's weights digest);
3. the driver gathers the rows by shard and writes each complete shard atomically (Parquet + manifest);
4. every shard is ingested, in shard order, through ``_Run.commit``: the local engine's write path (items
   upserted by path, so the store assigns ids exactly as the local engine does, and a shard ingested twice
   adds nothing; bad files to the ledger);
5. the pass's shards are removed.

Item ids: assigned by the store when a shard is ingested (a path keeps its id forever; new paths get the
next ids in listing order). Ids fixed before the job would tie each finished shard to one state of the
store, so a run killed half-way through ingesting would have to re-embed every shard after it.

Workers read the images (a shared file system or URLs) and load the model by its reference (a preset, a
checkpoint folder they can see); the index folder is written by the driver only. Ray is imported only here.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image
from tqdm import tqdm

from vitrina.encoder import Encoder
from vitrina.errors import UserError
from vitrina.index import shards as shard_files
from vitrina.index.decode import Job, _split, decode, is_url
from vitrina.index.embed import (
    PUBLISH_EVERY_S,
    EncoderLoader,
    IndexReport,
    _default_loader,
    _locate,
    _Run,
    index_entries,
)
from vitrina.index.sources import open_source
from vitrina.index.store import Version

SHARD_SIZE = 4096  # listing positions per shard: ~8 MB of 512-d vectors, minutes of work on a CPU actor
BLOCK_BATCHES = 4  # batches per Ray Data block: the unit an actor takes at a time


def index_with_ray(
    source: str | Path,
    encoder: Encoder,
    index_dir: Path,
    *,
    model_ref: str,
    address: str | None = None,
    actors: int = 1,
    cpus_per_actor: int = 1,
    decoders: int | None = None,
    num_gpus: float = 0.0,
    batch_size: int = 64,
    shard_size: int = SHARD_SIZE,
    index_kind: str | None = None,
    fraction: float | None = None,
    seed: int = 0,
    progress: bool = True,
    new_version: bool = False,
    activate: bool = True,
    load_encoder: EncoderLoader = _default_loader,
    publish_every_s: float = PUBLISH_EVERY_S,
    export_towers: bool = True,
    precision: str = "fp32",
    keep_shards: bool = False,
) -> IndexReport:
    """Index ``source`` (a folder, or a Parquet/CSV/JSON-lines list of image paths and URLs) into ``index_dir``.

    The arguments are ``index_folder``'s, plus: ``address`` of a running Ray cluster (None: start one on
    this machine, stopped at the end; a session already started in this process is used as it is),
    ``actors`` embedding actors of ``cpus_per_actor`` CPUs (and torch threads) and ``num_gpus`` GPUs each (0: CPU),
    ``decoders``: at most this many decoding actors of 1 CPU (0: each embedder decodes its own batches; None:
    one per CPU the embedders leave free, or 0 if none is), ``shard_size`` listing positions per
    shard. ``load_encoder`` loads the model in each actor (it must be importable or picklable there).
    ``keep_shards``: leave the ingested shards on disk (tests, inspection).
    """
    if actors < 1:
        raise UserError(f"--actors must be at least 1, got {actors}")
    if cpus_per_actor < 1:
        raise UserError(f"--cpus-per-actor must be at least 1, got {cpus_per_actor}")
    if decoders is not None and decoders < 0:
        raise UserError(
            f"--workers (decoding actors on Ray; 0: the embedders decode) must be 0 or more, got {decoders}"
        )
    if num_gpus < 0:
        raise UserError(f"--num-gpus must be 0 or more (GPUs per actor), got {num_gpus}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    collection = open_source(source, fraction=fraction, seed=seed)
    if address is not None:
        check_address(address)  # before anything is written: Ray itself would retry for minutes
    passes = RayPasses(
        index_dir=Path(index_dir),
        address=address,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        decoders=decoders,
        num_gpus=num_gpus,
        batch_size=batch_size,
        shard_size=shard_size,
        progress=progress,
        precision=precision,
        keep_shards=keep_shards,
    )
    try:
        return index_entries(
            collection.root,
            passes.listing(collection.root, collection.list_entries),
            encoder,
            index_dir,
            model_ref=model_ref,
            run_pass=passes,
            batch_size=batch_size,
            index_kind=index_kind,
            fraction=fraction,
            new_version=new_version,
            activate=activate,
            load_encoder=load_encoder,
            publish_every_s=publish_every_s,
            export_towers=export_towers,
            precision=precision,
            empty_message=collection.empty_message,
        )
    finally:
        passes.close()


def check_address(address: str, *, timeout_s: float = 5.0) -> None:
    """``UserError`` at once when ``HOST:PORT`` does not answer (``auto`` and ``ray://`` addresses are left to Ray)."""
    import socket

    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise UserError(
            f"--address {address}: no Ray cluster answers there ({error}); start one with `ray start --head` "
            "and give the address it prints, or leave --address out to run Ray on this machine"
        ) from None


class RayPasses:
    """The ``PassRunner`` of the Ray engine (see the module docstring); connects to Ray on first need."""

    def __init__(
        self,
        *,
        index_dir: Path,
        address: str | None,
        actors: int,
        cpus_per_actor: int,
        decoders: int | None,
        num_gpus: float,
        batch_size: int,
        shard_size: int,
        progress: bool,
        precision: str,
        keep_shards: bool,
    ) -> None:
        self.index_dir, self.address, self.actors, self.num_gpus = index_dir, address, actors, num_gpus
        self.decoders, self.cpus_per_actor = decoders, cpus_per_actor
        self.batch_size, self.shard_size, self.progress = batch_size, shard_size, progress
        self.precision, self.keep_shards = precision, keep_shards
        self.ranks: dict[str, int] = {}
        self._started = False

    def listing(self, root: Path, list_entries: Callable[[], list]) -> Callable[[], list]:
        """Wrap the source's listing to remember each file's place in it (shards are cut by place)."""

        def entries() -> list:
            listed = list_entries()
            self.ranks = {_locate(entry.path, root)[0]: i for i, entry in enumerate(listed)}
            return listed

        return entries

    def __call__(self, run: _Run, version: Version, jobs: list[Job], *, upsert: bool, on_commit: Callable) -> None:
        encoder = run.encoder_of(version)  # the driver's copy: digest, width, the decoder's transform
        dim = int(encoder.identity["embed_dim"])
        folder = shard_files.shards_dir(self.index_dir, version.id)
        plans = shard_files.plan_shards(
            jobs, self.ranks, self.shard_size, version=version.id, digest=version.digest, upsert=upsert
        )
        pending = [p for p in plans if not shard_files.is_done(folder, p, digest=version.digest, dim=dim)]
        reused = {p.number for p in plans} - {p.number for p in pending}
        if pending:
            self._embed(run, version, encoder, pending, folder, dim)
        for plan in plans:  # in shard order: ids come out as the local engine's
            good = ingest_shard(run, version, folder, plan, dim=dim, upsert=upsert)
            if plan.number in reused:
                run.report.from_shards += good
            on_commit()
        if not self.keep_shards:
            shutil.rmtree(folder, ignore_errors=True)

    # --- Ray ---------------------------------------------------------------------------------

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        logging.getLogger("ray").setLevel(logging.WARNING)
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = self.address or "a new local cluster"
            raise UserError(
                f"Ray: cannot connect to {where} ({error}); start one with `ray start --head` and give its "
                "address to --address, or leave --address out to run Ray on this machine"
            ) from None
        self._started = True

    def close(self) -> None:
        """Stop the Ray session this runner started (one started by the caller is left running)."""
        if self._started:
            ray.shutdown()
            self._started = False

    def _embed(self, run: _Run, version: Version, encoder: Encoder, pending: list, folder: Path, dim: int) -> None:
        """Embed the ``pending`` shards on Ray and write each one as soon as all its rows are back."""
        import pyarrow as pa

        self._connect()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # this module's bar counts the images instead
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plan, timings and hints; errors still show
        context.execution_options.preserve_order = False  # shards are written as they complete, in any order
        per_image, _ = _split(encoder.image_transform)
        probe = per_image(Image.new("RGB", (64, 64)))  # the decoder's output shape and dtype
        decoding = {
            "transform": per_image,
            "draft": getattr(encoder.image_transform, "size", None),
            "shape": tuple(probe.shape),
            "dtype": probe.numpy().dtype,
        }
        # Blocks of a few batches, in shard order (a block is what one actor call gets: one block per shard
        # would leave every actor but one idle on a small run); rows are filed back under their shards.
        rows = [(plan.number, job) for plan in pending for job in plan.jobs]
        step = BLOCK_BATCHES * self.batch_size
        blocks = [
            pa.table(
                {
                    "shard": pa.array([number for number, _ in chunk], pa.int64()),
                    "rel": pa.array([job.rel for _, job in chunk], pa.string()),
                    "uri": pa.array([str(job.path) for _, job in chunk], pa.string()),
                }
            )
            for chunk in (rows[i : i + step] for i in range(0, len(rows), step))
        ]
        dataset = ray.data.from_arrow(blocks)
        decoders = self.decoders
        if decoders is None:  # the CPUs the embedders leave free, if any
            decoders = max(0, int(ray.cluster_resources().get("CPU", 0)) - self.actors * self.cpus_per_actor)
        if decoders:  # a pool of their own, 1 CPU each: decoding overlaps embedding
            dataset = dataset.map_batches(
                _Decoder,
                fn_constructor_kwargs=decoding,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decoders),
                batch_size=self.batch_size,
                batch_format="numpy",
                num_cpus=1,
            )
        dataset = dataset.map_batches(
            _Embedder,
            fn_constructor_kwargs={
                "model_ref": version.model_ref,
                "digest": version.digest,
                "loader": run.load_encoder,
                "precision": self.precision if version.id == run.target.id else "fp32",
                "use_gpu": self.num_gpus > 0,
                "threads": self.cpus_per_actor,
                "decoding": None if decoders else decoding,  # no decoders: each actor decodes its batches
            },
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            batch_size=self.batch_size,
            batch_format="numpy",
            num_cpus=self.cpus_per_actor,
            num_gpus=self.num_gpus,
        )
        gathering = {plan.number: shard_files.ShardRows(plan, {}, set(), set()) for plan in pending}
        jobs = {plan.number: {job.rel: job for job in plan.jobs} for plan in pending}
        total = sum(len(plan.jobs) for plan in pending)
        bar = tqdm(total=total, unit="img", desc=f"embedding on Ray ({version.name})", disable=not self.progress,
                   file=sys.stderr)  # fmt: skip
        try:
            with bar:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for number in self._gather(batch, gathering, jobs):
                        shard = gathering.pop(number)
                        shard_files.write_shard(folder, shard, version=version.id, digest=version.digest, dim=dim)
                    bar.update(len(batch["rel"]))
        except ray.exceptions.RayError as error:
            cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise UserError(
                f"{self.index_dir}: the Ray job failed ({cause}); the finished shards are kept in {folder}, "
                "run the same command again to resume"
            ) from None
        if gathering:  # pragma: no cover - Ray returned fewer rows than it was given
            raise RuntimeError(f"Ray returned no rows for shards {sorted(gathering)}")

    @staticmethod
    def _gather(batch: dict, gathering: dict, jobs: dict) -> list[int]:
        """File a batch's rows under their shards; the numbers of the shards it completed."""
        completed = []
        for i, rel in enumerate(batch["rel"]):
            number = int(batch["shard"][i])
            shard = gathering[number]
            job = jobs[number][rel]
            reason = str(batch["reason"][i])
            shard.rows[rel] = {
                "id": job.item_id,
                "path": rel,
                "file_hash": str(batch["file_hash"][i]),
                "size": job.size,
                "mtime": job.mtime,
                "label": job.label,
                "caption": job.caption,
                "is_new": job.is_new,
                "embedding": None if reason else np.asarray(batch["embedding"][i], dtype=np.float32),
                "reason": reason or None,
                "detail": str(batch["detail"][i]) or None,
            }
            shard.pids.add(int(batch["pid"][i]))
            shard.decode_pids.add(int(batch["decode_pid"][i]))
            if shard.complete:
                completed.append(number)
        return completed


def ingest_shard(
    run: _Run, version: Version, folder: Path, plan: shard_files.ShardPlan, *, dim: int, upsert: bool
) -> int:
    """Write a finished shard into the store through the local engine's ``_Run.commit``; returns its good rows.

    Idempotent: items are upserted by path (a path keeps its id) and vectors replaced, so a shard ingested
    twice (a run killed while ingesting, then resumed) adds nothing.
    """
    decoded, vectors = shard_files.read_shard(folder, plan, dim=dim)
    run.commit(version, decoded, vectors if len(vectors) else None, upsert=upsert)
    return len(vectors)


def _decode_rows(batch: dict, *, transform: Callable, draft: int | None, shape: tuple, dtype) -> dict:
    """Decode a batch of files with the local engine's safe decoder; a bad file's pixels are zeros."""
    decoded = [
        decode(Job(str(rel), str(uri) if is_url(str(uri)) else Path(uri), 0, 0.0, None, None, True), transform, draft)
        for rel, uri in zip(batch["rel"], batch["uri"], strict=True)
    ]
    pixels = np.zeros((len(decoded), *shape), dtype=dtype)
    for i, d in enumerate(decoded):
        if not d.reason:
            pixels[i] = d.pixels.numpy()
    return {
        "shard": batch["shard"],
        "rel": batch["rel"],
        "file_hash": np.array([d.content_hash for d in decoded], dtype=object),
        "reason": np.array([d.reason for d in decoded], dtype=object),
        "detail": np.array([d.detail for d in decoded], dtype=object),
        "pixels": pixels,
        "decode_pid": np.full(len(decoded), os.getpid(), dtype=np.int64),
    }


class _Decoder:
    """Ray actor: decodes batches of files (``_decode_rows``) for the embedders."""

    def __init__(self, **decoding) -> None:
        torch.set_num_threads(1)
        self.decoding = decoding

    def __call__(self, batch: dict) -> dict:
        return _decode_rows(batch, **self.decoding)


class _Embedder:
    """Ray actor: loads the model once, then embeds batches of decoded pixels (or of files it decodes itself)."""

    def __init__(
        self,
        *,
        model_ref: str,
        digest: str | None,
        loader: EncoderLoader,
        precision: str,
        use_gpu: bool,
        threads: int,
        decoding: dict | None,
    ) -> None:
        torch.set_num_threads(threads)
        encoder = loader(model_ref)
        found = encoder.identity.get("digest")
        if digest is not None and found != digest:
            raise RuntimeError(
                f"the model {model_ref} on this worker has other weights (digest {str(found)[:12]}) than the "
                f"version it embeds for ({digest[:12]}); give every worker the same model"
            )
        if precision != "fp32":
            from vitrina.models.precision import with_precision

            encoder = with_precision(encoder, precision)
        model = getattr(encoder, "model", None)
        if use_gpu and model is not None and torch.cuda.is_available():
            model.to("cuda")
        self.encoder, self.decoding = encoder, decoding
        _, self.normalize = _split(encoder.image_transform)
        self.pid = os.getpid()

    def __call__(self, batch: dict) -> dict:
        if self.decoding is not None:  # no decoder pool: decode here, then embed
            batch = _decode_rows(batch, **self.decoding)
        good = np.array([not r for r in batch["reason"]], dtype=bool)
        n = len(good)
        vectors = np.zeros((n, int(self.encoder.identity["embed_dim"])), dtype=np.float32)
        if good.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))
            if pixels.dtype == torch.uint8 and self.normalize is not None:
                pixels = self.normalize(pixels)
            vectors[good] = self.encoder.encode_image(pixels).detach().cpu().numpy()
        out = {k: batch[k] for k in ("shard", "rel", "file_hash", "reason", "detail", "decode_pid")}
        out["embedding"] = vectors
        out["pid"] = np.full(n, self.pid, dtype=np.int64)
        return out
