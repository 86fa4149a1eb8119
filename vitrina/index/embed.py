"""Embed a folder of images into an index directory: incremental, resumable, safe on bad files, and
kept up to date in every model version the index holds.

One run, under the index's writer lock:

1. choose the version the given model writes to: the one built with the same weights (by digest), or
   a new one with ``new_version``; any other model is refused before anything is written;
2. scan the collection and compare it with the items (size + mtime first, the content hash only when
   those differ); drop the items of deleted files;
3. embed new and changed files with the active version's model (the "primary" pass), batch by batch,
   each batch one SQLite transaction, so a kill loses at most the batch in flight;
4. catch every other version up: each embeds the items it has no vector for (a new version: all of
   them; an older one: the files that just arrived), so no version falls behind;
5. publish each changed version's ANN file (also every ``publish_every_s`` during a long primary
   pass, so a running server sees new items), mark a complete new version ready and activate it;
6. export the query towers (``vitrina.models.export``) of every version that has none, or has towers of
   other weights, so a search runs without torch; once per version, timed apart from the embedding.

Files that cannot be decoded go into the ledger. Steps 3 and 4 run a *pass* (a version, its jobs) at a
time: in this process (``index_folder``, the default), or on a Ray cluster (``vitrina.index.ray_engine``,
which calls ``index_entries`` with its own ``PassRunner``); everything else is this module's, for both.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from vitrina.data.folder import scan_collection, stratified_fraction
from vitrina.digest import short
from vitrina.encoder import Encoder, as_numpy
from vitrina.errors import UserError
from vitrina.index.ann import choose_index_kind
from vitrina.index.decode import (
    Decoded,
    Job,
    content_hash,
    default_decoding,
    file_stat,
    is_url,
    process_batches,
    thread_batches,
)
from vitrina.index.lock import WriterLock
from vitrina.index.replicas import can_fork_replicas, check_can_fork_replicas, replica_batches
from vitrina.index.store import META_FILE, READY, IndexStore, ItemRow, Version

DECODERS = {"thread": "decoder threads", "process": "decoder processes", "replica": "model replicas"}
PUBLISH_EVERY_S = 60.0  # during a long primary pass, publish the active ANN this often


@dataclass
class IndexReport:
    """What one ``index_folder`` run did."""

    index_dir: str
    seen: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    embedded: int = 0
    total: int = 0
    seconds: float = 0.0
    message: str = ""
    version: str = ""  # the version the given model wrote to
    activated: bool = False  # this run made ``version`` the active one
    ready: bool = True  # ``version`` has a vector for every item
    by_version: dict[str, int] = field(default_factory=dict)  # images embedded per version
    towers: dict[str, str] = field(default_factory=dict)  # version -> what exporting its query towers did
    towers_seconds: float = 0.0  # spent exporting towers (not in ``seconds``: a one-off per version)
    from_shards: int = 0  # images whose vectors came from embedding shards a killed run had finished (Ray engine)
    decoding: str = ""  # how the local engine decoded, e.g. "2 model replicas" (``decoding_of``)

    @property
    def images_per_s(self) -> float:
        """Embedded images per second of the whole run (decode + model + writes)."""
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for the CLI."""
        n_bad = sum(self.bad.values())
        bad = f"{n_bad} bad" + (f" ({', '.join(f'{r}: {n}' for r, n in sorted(self.bad.items()))})" if n_bad else "")
        line = (
            f"{self.seen} files seen: {self.new} new, {self.changed} changed, {self.unchanged} unchanged, "
            f"{self.deleted} deleted, {bad}; {self.total} in index; "
            f"{self.embedded} embedded in {self.seconds:.1f}s ({self.images_per_s:.1f} img/s"
            + (f", {self.decoding})" if self.decoding and self.embedded else ")")
        )
        if len(self.by_version) > 1:
            line += " [" + ", ".join(f"{v}: {n}" for v, n in sorted(self.by_version.items())) + "]"
        if self.from_shards:
            line += f"; {self.from_shards} of them from shards an earlier run had finished"
        for version, what in sorted(self.towers.items()):
            line += f"\nquery towers of {version}: {what}"
        return f"{line}\n{self.message}" if self.message else line


def decoding_of(decoder: str, workers: int) -> str:
    """How a local pass decodes, in words for the summary line."""
    return f"{workers} {DECODERS[decoder]}" if workers else "decoded in the main thread"


def _plan(
    store: IndexStore, root: Path, entries: list, report: IndexReport
) -> tuple[list[Job], list[str], list[tuple]]:
    """Split the scanned entries into jobs to embed, stale paths to delete, and metadata-only updates."""
    states = store.file_states()
    jobs: list[Job] = []
    updates: list[tuple] = []
    seen: set[str] = set()
    for entry in entries:
        rel, path = _locate(entry.path, root)
        seen.add(rel)
        state = states.get(rel)
        try:
            size, mtime = file_stat(path)
        except OSError:  # a dangling link, or gone since the scan: the decoder puts it in the ledger
            jobs.append(Job(rel, path, 0, 0.0, entry.label, entry.caption, is_new=state is None))
            continue
        label, caption = entry.label, entry.caption
        if state is not None:
            same_stat = state.size == size and state.mtime == mtime
            # Stat data differ: only the content hash can say whether the pixels changed.
            if same_stat or content_hash(path) == state.content_hash:
                report.unchanged += 1
                if not same_stat or (state.label, state.caption) != (label, caption):
                    updates.append((rel, size, mtime, label, caption))
                continue
        jobs.append(Job(rel, path, size, mtime, label, caption, is_new=state is None))
    stale = [rel for rel in states if rel not in seen]
    stale += [rel for rel, _, _ in store.ledger() if rel not in seen]
    report.seen = len(seen)
    return jobs, stale, updates


def _locate(entry_path: Path | str, root: Path) -> tuple[str, Path | str]:
    """(the item's path as stored, where to read it): relative to ``root`` where it lies inside it; a listed
    file outside it keeps its absolute path, a URL stays a URL (``vitrina.index.sources``)."""
    if is_url(entry_path):
        return str(entry_path), str(entry_path)
    path = Path(entry_path)
    path = path if path.is_absolute() else root / path
    try:
        return path.relative_to(root).as_posix(), path
    except ValueError:  # a scanner that hands back resolved symlinks, or a listed file elsewhere
        try:
            return path.resolve().relative_to(root).as_posix(), path
        except ValueError:
            return path.as_posix(), path


def job_path(root: Path, rel: str) -> Path | str:
    """Where to read the stored item path ``rel`` (the inverse of ``_locate``)."""
    return rel if is_url(rel) else root / rel


def preprocess_of(encoder: Encoder) -> dict:
    """What the image tower expects (size, mean, std, interpolation), as recorded per version and exported."""
    transform = encoder.image_transform
    describe = getattr(transform, "describe", None)
    return describe() if callable(describe) else {"transform": type(transform).__name__}


def _same_model_family(version: Version, identity: dict) -> bool:
    """A version from before weights digests (upgraded format 1) adopts the first model of its kind/width/name."""
    stored = version.identity
    return version.digest is None and all(stored.get(k) == identity.get(k) for k in ("kind", "embed_dim", "name"))


def _target_version(
    store: IndexStore, encoder: Encoder, *, model_ref: str, new_version: bool
) -> tuple[Version | None, Version | None]:
    """(the version ``encoder`` writes to, or None: create one; a legacy version to adopt the digest of).

    Refuses, before anything is written, a model that matches no version unless ``new_version``.
    """
    identity = encoder.identity
    match = store.find_version(identity.get("digest"))
    if match is not None and all(match.identity.get(k) == identity.get(k) for k in ("kind", "embed_dim")):
        return match, None
    legacy = next((v for v in store.versions() if _same_model_family(v, identity)), None)
    if legacy is not None:
        return legacy, legacy
    versions = store.versions()
    if not versions or new_version:
        return None, None
    active = next((v for v in versions if v.active), versions[-1])
    raise UserError(
        f"{store.index_dir}: built with {active.describe()}, but the given model {model_ref} has other weights "
        f"(digest {short(identity.get('digest'))}); add --new-version to embed the collection with it beside "
        f"{active.name} (which keeps serving until the new version is complete), or index with the model it was "
        "built with"
    )


EncoderLoader = Callable[[str], Encoder]


def _default_loader(ref: str) -> Encoder:
    from vitrina.checkpoint import load_encoder

    return load_encoder(ref)


def index_folder(
    folder: Path,
    encoder: Encoder,
    index_dir: Path,
    *,
    model_ref: str,
    batch_size: int = 64,
    workers: int | None = None,
    index_kind: str | None = None,
    fraction: float | None = None,
    seed: int = 0,
    progress: bool = True,
    decoder: str | None = None,
    new_version: bool = False,
    activate: bool = True,
    load_encoder: EncoderLoader = _default_loader,
    publish_every_s: float = PUBLISH_EVERY_S,
    export_towers: bool = True,
    precision: str = "fp32",
) -> IndexReport:
    """Embed the images under ``folder`` into ``index_dir`` (created, or brought up to date in every version).

    Only new and changed files are embedded; rows of deleted files are dropped; bad files go to the
    ledger. ``encoder`` must be the model of one of the index's versions (same weights digest), or
    ``new_version`` builds a version for it beside the others, activated when complete unless
    ``activate`` is False. The other versions' models are loaded with ``load_encoder(model_ref)`` when
    they have files to catch up on. ``index_kind`` None keeps the version's stored choice. ``decoder``
    picks ``workers`` decoders beside the model in a thread pool ("thread") or a process-based DataLoader
    ("process"), or ``workers`` processes that decode and embed whole batches with their own copy of the
    model ("replica", ``vitrina.index.replicas``); 0 workers decode in the main thread. None: the measured
    default (``default_decoding()``).
    ``export_towers``: export the query towers of versions that lack them (``report.towers``, timed in
    ``report.towers_seconds``).
    """
    if decoder is not None and decoder not in DECODERS:
        raise UserError(f"--decoder {decoder!r} is unknown; use one of {', '.join(DECODERS)}")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}")
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of images; give the collection's root folder")
    default_decoder, default_count = default_decoding(
        getattr(encoder.image_transform, "size", None), can_fork=can_fork_replicas()
    )
    decoder = decoder or default_decoder
    workers = default_count if workers is None else workers
    if decoder == "replica" and workers:
        check_can_fork_replicas()  # before anything is written

    def entries() -> list:
        found = scan_collection(folder.resolve())
        return stratified_fraction(found, fraction, seed) if fraction is not None else found

    def run_pass(run: _Run, version: Version, jobs: list[Job], *, upsert: bool, on_commit: Callable) -> None:
        run.embed_here(
            version, jobs, upsert=upsert, on_commit=on_commit, batch_size=batch_size, workers=workers,
            decoder=decoder, progress=progress,
        )  # fmt: skip

    return index_entries(
        folder.resolve(),
        entries,
        encoder,
        index_dir,
        model_ref=model_ref,
        run_pass=run_pass,
        batch_size=batch_size,
        index_kind=index_kind,
        fraction=fraction,
        new_version=new_version,
        activate=activate,
        load_encoder=load_encoder,
        publish_every_s=publish_every_s,
        export_towers=export_towers,
        precision=precision,
        empty_message=f"{folder}: no images found (looked for image files, also in sub-folders); empty index",
    )


class PassRunner(Protocol):
    """Embeds ``jobs`` with ``version``'s model into the store, calling ``on_commit`` after each commit.

    ``upsert``: new/changed files (item rows written with the vector); else existing items (``Job.item_id``)
    whose vector this version lacks. Bad files go to the ledger; ``run.report`` counts what was done.
    """

    def __call__(self, run: _Run, version: Version, jobs: list[Job], *, upsert: bool, on_commit: Callable) -> None: ...


def index_entries(
    root: Path,
    entries: Callable[[], list],
    encoder: Encoder,
    index_dir: Path,
    *,
    model_ref: str,
    run_pass: PassRunner,
    batch_size: int = 64,
    index_kind: str | None = None,
    fraction: float | None = None,
    new_version: bool = False,
    activate: bool = True,
    load_encoder: EncoderLoader = _default_loader,
    publish_every_s: float = PUBLISH_EVERY_S,
    export_towers: bool = True,
    precision: str = "fp32",
    empty_message: str = "no images found; empty index",
) -> IndexReport:
    """One indexing run over the collection ``root`` whose images ``entries()`` lists (called once the model
    was accepted), each pass run by ``run_pass``: the steps of the module docstring, under the writer lock."""
    start = time.perf_counter()
    index_dir = Path(index_dir)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if index_kind is not None:
        choose_index_kind(0, index_kind)
    if fraction is not None and not 0 < fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    if index_dir.exists() and not index_dir.is_dir():
        raise UserError(f"{index_dir}: exists and is not a folder; choose another --out")
    if Path(model_ref).is_dir():  # a checkpoint folder: store it absolute, so search works from anywhere
        model_ref = str(Path(model_ref).resolve())

    report = IndexReport(index_dir=str(index_dir))
    fresh = not (index_dir / META_FILE).exists()
    if fresh:
        index_dir.mkdir(parents=True, exist_ok=True)
    with WriterLock(index_dir):
        store = IndexStore.create(index_dir, root=root) if fresh else IndexStore.open_for_writing(index_dir)
        with store:
            run = _Run(store, encoder, model_ref=model_ref, report=report, load_encoder=load_encoder)
            run.precision = precision  # what ``encoder`` computes in (it is already wrapped for it)
            run.choose_version(root, new_version=new_version, index_kind=index_kind)  # may refuse: nothing written
            listed = entries()
            run.embed(listed, root, run_pass=run_pass, publish_every_s=publish_every_s)
            run.finish(activate=activate and new_version)
            if not listed:
                report.message = empty_message
            report.seconds = time.perf_counter() - start
            if export_towers:
                run.export_towers()
                report.towers_seconds = time.perf_counter() - start - report.seconds
    return report


class _Run:
    """One indexing run's state: the store, the target version, the encoder of each version it touches."""

    def __init__(
        self, store: IndexStore, encoder: Encoder, *, model_ref: str, report: IndexReport, load_encoder: EncoderLoader
    ) -> None:
        self.store, self.encoder, self.model_ref, self.report = store, encoder, model_ref, report
        self.load_encoder = load_encoder
        self.target: Version | None = None
        self.precision = "fp32"
        self._encoders: dict[int, Encoder] = {}

    def choose_version(self, root: Path, *, new_version: bool, index_kind: str | None) -> None:
        """Find or make the version this run's model writes to; refuse a mismatch before any write."""
        store = self.store
        if store.versions() and store.root != root:
            raise UserError(
                f"{store.index_dir}: this index holds the collection {store.root}, not {root}; "
                "give the same folder again, or another --out for a new index"
            )
        target, legacy = _target_version(store, self.encoder, model_ref=self.model_ref, new_version=new_version)
        if legacy is not None:
            store.adopt_identity(legacy.id, self.encoder.identity, model_ref=self.model_ref)
        if target is None:
            inherited = next((v.index_kind for v in store.versions() if v.active), "auto")
            target = store.add_version(
                identity=self.encoder.identity,
                model_ref=self.model_ref,
                index_kind=index_kind or inherited,
                preprocess=preprocess_of(self.encoder),
                precision=self.precision,
            )
        elif index_kind is not None and index_kind != target.index_kind:
            store.set_index_kind(target.id, index_kind)
        self.target = store.version(target.id)
        self.report.version = self.target.name
        self._encoders[self.target.id] = self.encoder

    def encoder_of(self, version: Version) -> Encoder:
        """The model of ``version``: this run's, or loaded from its reference and checked by digest."""
        if version.id not in self._encoders:
            try:
                loaded = self.load_encoder(version.model_ref)
            except UserError as error:
                raise UserError(
                    f"{self.store.index_dir}: {version.name} must embed the new files too, but its model cannot be "
                    f"loaded ({error}); restore it, or drop the version (`vitrina versions IX --drop {version.name}`)"
                ) from None
            digest = loaded.identity.get("digest")
            if version.digest is not None and digest != version.digest:
                raise UserError(
                    f"{self.store.index_dir}: {version.describe()} must embed the new files too, but "
                    f"{version.model_ref} now holds other weights (digest {short(digest)}); restore them, or drop "
                    f"the version (`vitrina versions IX --drop {version.name}`)"
                )
            self._encoders[version.id] = loaded
        return self._encoders[version.id]

    def embed(self, entries: list, root: Path, *, run_pass: PassRunner, publish_every_s: float) -> None:
        """Plan, delete, then the primary pass and every version's catch-up pass, each run by ``run_pass``."""
        store, report = self.store, self.report
        jobs, stale, updates = _plan(store, root, entries, report)
        report.deleted = store.delete_paths(stale)
        store.update_metadata(updates)
        versions = store.versions()
        active = next((v for v in versions if v.active and v.state == READY), None)
        primary = active or self.target
        publisher = _Publisher(store, primary.id if primary.active else None, publish_every_s)
        if jobs:
            run_pass(self, primary, jobs, upsert=True, on_commit=publisher.maybe_publish)
        # Ready versions first (they serve, or may be activated again), the version being built last.
        others = [v for v in versions if v.id != primary.id and v.state == READY]
        if self.target.id != primary.id and self.target.state != READY:
            others.append(self.target)
        for version in others:
            missing = store.missing_items(version.id)
            if missing:
                catch_up = [
                    Job(rel, job_path(root, rel), size, mtime, label, caption, is_new=False, item_id=item_id)
                    for item_id, rel, size, mtime, label, caption in missing
                ]
                run_pass(self, version, catch_up, upsert=False, on_commit=lambda: None)
        report.total = store.count

    def embed_here(
        self,
        version: Version,
        jobs: list[Job],
        *,
        upsert: bool,
        on_commit: Callable[[], None],
        batch_size: int,
        workers: int,
        decoder: str,
        progress: bool,
    ) -> None:
        """The local ``PassRunner``: decode, embed with ``version``'s model and commit ``jobs`` batch by batch."""
        encoder = self.encoder_of(version)
        self.report.decoding = decoding_of(decoder, workers)
        if decoder == "replica":
            batches = replica_batches(jobs, encoder, batch_size, workers)
        else:
            batches = (thread_batches if decoder == "thread" else process_batches)(
                jobs, encoder.image_transform, batch_size, workers
            )
        desc = f"embedding ({version.name})"
        bar = tqdm(total=len(jobs), unit="img", desc=desc, disable=not progress or not jobs, file=sys.stderr)
        with bar:
            for batch in batches:
                good = [d for d in batch.items if not d.reason]
                vectors = batch.vectors  # (G, D), where a replica embedded the batch
                if good and vectors is None:
                    vectors = as_numpy(encoder.encode_image(batch.pixels))
                self.commit(version, batch.items, vectors, upsert=upsert)
                if good:
                    on_commit()
                bar.update(len(batch.items))
                bar.set_postfix(bad=sum(self.report.bad.values()))

    def commit(self, version: Version, decoded: list[Decoded], vectors: np.ndarray | None, *, upsert: bool) -> None:
        """Write one batch: bad files to the ledger, the (G, D) ``vectors`` of the good ones (in order) to
        ``version``, in the store's transactions; count it all in the report. Both engines end here."""
        store, report = self.store, self.report
        good = [d for d in decoded if not d.reason]
        failed = [d for d in decoded if d.reason]
        bad: Counter = Counter(report.bad)
        for d in failed:
            store.add_ledger(d.job.rel, d.reason, d.detail)
            bad[d.reason] += 1
        report.bad = dict(bad)
        # A file that was indexed and is now unreadable must not keep its old vectors.
        store.delete_paths([d.job.rel for d in failed if not d.job.is_new])
        if not good:
            return
        if upsert:
            rows = [
                ItemRow(d.job.rel, d.content_hash, d.job.size, d.job.mtime, d.job.label, d.job.caption) for d in good
            ]
            store.upsert_batch(rows, vectors, version=version.id)
            report.new += sum(d.job.is_new for d in good)
            report.changed += sum(not d.job.is_new for d in good)
        else:
            store.put_vectors(version.id, [d.job.item_id for d in good], vectors)
        report.embedded += len(good)
        report.by_version[version.name] = report.by_version.get(version.name, 0) + len(good)
        if report.by_version.get(version.name):
            store.note_precision(version.id, self.precision if version.id == self.target.id else "fp32")

    def finish(self, *, activate: bool) -> None:
        """Publish every version whose ANN is behind; mark a complete target ready; activate it if asked."""
        store, report = self.store, self.report
        for version in store.versions():
            if not store.is_published_current(version.id):
                store.publish_ann(version.id)
        target = store.version(self.target.id)
        if target.state != READY and not store.missing_items(target.id):
            store.mark_ready(target.id)
            target = store.version(target.id)
        report.ready = target.state == READY
        if report.ready and not target.active and (activate or not any(v.active for v in store.versions())):
            store.activate(target.id)
            report.activated = True
        report.total = store.count

    def export_towers(self) -> None:
        """Export the query towers of every version without current ones (none, or of other weights).

        A tower that cannot be exported, or whose outputs differ from PyTorch's, is recorded as such and
        its queries use PyTorch; a version whose model cannot be loaded keeps no towers. Neither fails the run.
        """
        from vitrina.index.ann import version_dir
        from vitrina.models.export import export_towers, towers_current
        from vitrina.runtime.towers import towers_dir

        for version in self.store.versions():
            folder = towers_dir(version_dir(self.store.index_dir, version.id))
            if version.digest is None or towers_current(folder, version.digest):
                continue
            try:
                encoder = self._reference_encoder(version, self.encoder_of(version))
            except UserError as error:
                self.report.towers[version.name] = f"not exported: its model cannot be loaded ({error})"
                continue
            self.report.towers[version.name] = export_towers(encoder, folder).summary()

    def _reference_encoder(self, version: Version, encoder: Encoder) -> Encoder:
        """The float32 encoder of ``version``: towers are exported (and checked) at the reference precision,
        not at a run's bf16 or int8 arithmetic (``vitrina.models.precision``), which queries may not share."""
        if getattr(encoder, "precision", "fp32") == "fp32":
            return encoder
        inner = getattr(encoder, "inner", None)
        if encoder.precision == "bf16" and inner is not None:
            return inner  # bf16 is autocast around the float32 model
        loaded = self.load_encoder(version.model_ref)  # int8 replaced the model's layers: load it again
        if loaded.identity.get("digest") != version.digest:
            raise UserError(f"{version.model_ref} now holds other weights than {version.name} was built with")
        return loaded


class _Publisher:
    """Publishes the active version's ANN at most every ``every_s`` seconds during a long primary pass, and
    never more often than ten times as long as the last publication took (a large IVF built on disk takes
    minutes: the run keeps over 90% of its time for embedding)."""

    def __init__(self, store: IndexStore, version: int | None, every_s: float) -> None:
        self.store, self.version, self.every_s = store, version, every_s
        self.last, self.took = time.monotonic(), 0.0

    def maybe_publish(self) -> None:
        if self.version is None or time.monotonic() - self.last < max(self.every_s, 10 * self.took):
            return
        start = time.monotonic()
        self.store.publish_ann(self.version)
        self.last = time.monotonic()
        self.took = self.last - start
