"""Embed a folder of images into an index directory: incremental, resumable, safe on bad files.

One run: scan the collection, compare it with the store (size + mtime first, the content hash only
when those differ), drop rows of deleted files, decode the new/changed files in parallel, embed them
batch by batch (each batch committed in one SQLite transaction, so a kill loses at most the batch in
flight), then rebuild the FAISS file once. Files that cannot be decoded go into the ledger.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vitrina.data.folder import scan_collection, stratified_fraction
from vitrina.data.images import BadImageError, load_image
from vitrina.encoder import Encoder
from vitrina.errors import UserError
from vitrina.index.store import META_FILE, IndexStore, ItemRow

# Test hook: after this many committed batches the run sleeps, so a test can SIGKILL it at a known point.
PAUSE_ENV = "VITRINA_PAUSE_AFTER_BATCHES"
DECODERS = ("thread", "process")


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
            f"{self.embedded} embedded in {self.seconds:.1f}s ({self.images_per_s:.1f} img/s)"
        )
        return f"{line}\n{self.message}" if self.message else line


@dataclass(frozen=True)
class _Job:
    """One file to embed."""

    rel: str
    path: Path
    size: int
    mtime: float
    label: str | None
    caption: str | None
    is_new: bool


@dataclass
class _Decoded:
    """A decoded job: pixels and content hash, or why it could not be decoded."""

    job: _Job
    pixels: torch.Tensor | None
    content_hash: str = ""
    reason: str = ""
    detail: str = ""


@dataclass
class _Batch:
    """Decoded jobs in order, their pixels stripped and stacked: one tensor crosses process boundaries."""

    items: list[_Decoded]
    pixels: torch.Tensor | None  # (G, 3, H, W) for the items without a ``reason``, in order


def _collate(decoded: list[_Decoded]) -> _Batch:
    good = [d.pixels for d in decoded if d.pixels is not None]
    for d in decoded:
        d.pixels = None
    return _Batch(decoded, torch.stack(good) if good else None)


def content_hash(path: Path) -> str:
    """blake2b (128-bit) of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _decode(job: _Job, transform: Callable) -> _Decoded:
    """Decode and transform one file; never raises for a bad file (the ledger gets the reason)."""
    try:
        image = load_image(job.path)  # size checks happen before decoding: no decompression bombs
        pixels = transform(image)
        return _Decoded(job, pixels, content_hash(job.path))
    except BadImageError as error:
        return _Decoded(job, None, reason=getattr(error, "reason", "unreadable"), detail=str(error))
    except OSError as error:  # vanished or unreadable between scan and decode
        return _Decoded(job, None, reason="unreadable", detail=str(error))


def _thread_batches(jobs: list[_Job], transform: Callable, batch_size: int, workers: int) -> Iterator[_Batch]:
    """Decode in a thread pool (PIL releases the GIL while decoding), two batches ahead of the model."""
    chunks = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    if workers <= 0:
        for chunk in chunks:
            yield _collate([_decode(job, transform) for job in chunk])
        return
    # One intra-op thread per decoder: a decode thread left at the default would start its own OpenMP
    # team and fight the model for the cores. Some builds make that setting process-wide, so the
    # model's own thread count is put back before every batch and at the end.
    model_threads = torch.get_num_threads()
    try:
        yield from _pooled_batches(chunks, transform, workers, model_threads)
    finally:
        torch.set_num_threads(model_threads)


def _pooled_batches(chunks: list, transform: Callable, workers: int, model_threads: int) -> Iterator[_Batch]:
    with ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="vitrina-decode", initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        pending: deque = deque()
        chunk_iter = iter(chunks)
        for chunk in chunk_iter:
            pending.append([pool.submit(_decode, job, transform) for job in chunk])
            if len(pending) >= 2:
                break
        while pending:
            futures = pending.popleft()
            next_chunk = next(chunk_iter, None)
            if next_chunk is not None:  # keep the pool busy while the model works on this batch
                pending.append([pool.submit(_decode, job, transform) for job in next_chunk])
            batch = _collate([future.result() for future in futures])
            torch.set_num_threads(model_threads)
            yield batch


class _DecodeDataset(torch.utils.data.Dataset):
    """Jobs as a map-style dataset for a process-based DataLoader."""

    def __init__(self, jobs: list[_Job], transform: Callable) -> None:
        self.jobs, self.transform = jobs, transform

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> _Decoded:
        return _decode(self.jobs[i], self.transform)


def _process_batches(jobs: list[_Job], transform: Callable, batch_size: int, workers: int) -> Iterator[_Batch]:
    """Decode in ``workers`` processes through a torch DataLoader (a batch's pixels come back as one
    shared-memory tensor, stacked in the worker)."""
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(jobs, transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers else None,
    )
    yield from loader


def _plan(
    store: IndexStore, root: Path, entries: list, report: IndexReport
) -> tuple[list[_Job], list[str], list[tuple]]:
    """Split the scanned entries into jobs to embed, stale paths to delete, and metadata-only updates."""
    states = store.file_states()
    jobs: list[_Job] = []
    updates: list[tuple] = []
    seen: set[str] = set()
    for entry in entries:
        path = Path(entry.path)
        path = path if path.is_absolute() else root / path
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:  # a scanner that hands back resolved symlinks
            rel = path.resolve().relative_to(root).as_posix()
        seen.add(rel)
        state = states.get(rel)
        try:
            stat = path.stat()
        except OSError:  # a dangling link, or gone since the scan: the decoder puts it in the ledger
            jobs.append(_Job(rel, path, 0, 0.0, entry.label, entry.caption, is_new=state is None))
            continue
        label, caption = entry.label, entry.caption
        if state is not None:
            same_stat = state.size == stat.st_size and state.mtime == stat.st_mtime
            # Stat data differ: only the content hash can say whether the pixels changed.
            if same_stat or content_hash(path) == state.content_hash:
                report.unchanged += 1
                if not same_stat or (state.label, state.caption) != (label, caption):
                    updates.append((rel, stat.st_size, stat.st_mtime, label, caption))
                continue
        jobs.append(_Job(rel, path, stat.st_size, stat.st_mtime, label, caption, is_new=state is None))
    stale = [rel for rel in states if rel not in seen]
    stale += [rel for rel, _, _ in store.ledger() if rel not in seen]
    report.seen = len(seen)
    return jobs, stale, updates


def _open_store(index_dir: Path, encoder: Encoder, *, model_ref: str, root: Path, index_kind: str) -> IndexStore:
    if Path(model_ref).is_dir():  # a checkpoint folder: store it absolute, so search works from anywhere
        model_ref = str(Path(model_ref).resolve())
    if not (index_dir / META_FILE).exists():
        return IndexStore.create(
            index_dir, identity=encoder.identity, model_ref=model_ref, root=root, index_kind=index_kind
        )
    store = IndexStore.open(index_dir, identity=encoder.identity)
    if store.root != root:
        store.close()
        raise UserError(
            f"{index_dir}: this index holds the collection {store.root}, not {root}; "
            "give the same folder again, or another --out for a new index"
        )
    return store


def index_folder(
    folder: Path,
    encoder: Encoder,
    index_dir: Path,
    *,
    model_ref: str,
    batch_size: int = 64,
    workers: int = 2,
    index_kind: str = "auto",
    fraction: float | None = None,
    seed: int = 0,
    progress: bool = True,
    decoder: str = "thread",
) -> IndexReport:
    """Embed the images under ``folder`` into ``index_dir`` (created, or brought up to date).

    Only new and changed files are embedded; rows of deleted files are dropped; bad files go to the
    ledger. ``decoder`` picks a thread pool or a process-based DataLoader of ``workers`` decoders.
    """
    start = time.perf_counter()
    folder, index_dir = Path(folder), Path(index_dir)
    if decoder not in DECODERS:
        raise UserError(f"decoder {decoder!r} is unknown; use one of {', '.join(DECODERS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of images; give the collection's root folder")
    root = folder.resolve()
    entries = scan_collection(root)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {fraction}")
        entries = stratified_fraction(entries, fraction, seed)

    report = IndexReport(index_dir=str(index_dir))
    store = _open_store(index_dir, encoder, model_ref=model_ref, root=root, index_kind=index_kind)
    with store:
        if store.info["index_kind"] != index_kind:
            store.set_index_kind(index_kind)
        jobs, stale, updates = _plan(store, root, entries, report)
        report.deleted = store.delete_paths(stale)
        store.update_metadata(updates)
        _embed_jobs(
            store,
            encoder,
            jobs,
            report,
            batch_size=batch_size,
            workers=workers,
            decoder=decoder,
            progress=progress,
        )
        if not store.is_vectors_index_current():
            store.rebuild_vectors_index()
        report.total = store.count
    if not entries:
        report.message = f"{folder}: no images found (looked for image files, also in sub-folders); index is empty"
    report.seconds = time.perf_counter() - start
    return report


def _embed_jobs(
    store: IndexStore,
    encoder: Encoder,
    jobs: list[_Job],
    report: IndexReport,
    *,
    batch_size: int,
    workers: int,
    decoder: str,
    progress: bool,
) -> None:
    """Decode, embed and commit ``jobs`` batch by batch, counting outcomes into ``report``."""
    pause_after = int(os.environ.get(PAUSE_ENV, "0") or 0)
    bad: Counter = Counter(report.bad)
    batches = (_thread_batches if decoder == "thread" else _process_batches)(
        jobs, encoder.image_transform, batch_size, workers
    )
    bar = tqdm(total=len(jobs), unit="img", desc="embedding", disable=not progress or not jobs, file=sys.stderr)
    with bar:
        for n_batch, batch in enumerate(batches, 1):
            good = [d for d in batch.items if not d.reason]
            failed = [d for d in batch.items if d.reason]
            for d in failed:
                store.add_ledger(d.job.rel, d.reason, d.detail)
                bad[d.reason] += 1
            # A file that was indexed and is now unreadable must not keep its old vector.
            store.delete_paths([d.job.rel for d in failed if not d.job.is_new])
            if good:
                vectors = encoder.encode_image(batch.pixels).detach().cpu().numpy().astype(np.float32)  # (B, D)
                rows = [
                    ItemRow(d.job.rel, d.content_hash, d.job.size, d.job.mtime, d.job.label, d.job.caption)
                    for d in good
                ]
                store.upsert_batch(rows, vectors)
                report.embedded += len(good)
                report.new += sum(d.job.is_new for d in good)
                report.changed += sum(not d.job.is_new for d in good)
            bar.update(len(batch.items))
            bar.set_postfix(bad=sum(bad.values()))
            if pause_after and n_batch >= pause_after:
                print(f"vitrina: paused after {n_batch} batches ({PAUSE_ENV})", file=sys.stderr, flush=True)
                time.sleep(3600)
    report.bad = dict(bad)
