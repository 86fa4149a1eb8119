"""Decoding for the indexer: files -> checked, transformed pixel batches, in threads or processes.

A bad file never raises here: it comes back as a ``Decoded`` with a ``reason`` for the ledger. A job's
path is a local path, or a URL of any fsspec protocol that is installed (a list given to the Ray engine,
``vitrina.index.sources``): its bytes are fetched (at most ``MAX_BYTES``) and decoded by the same checks.
Each file is read once: the content hash is taken of the very bytes that are decoded.
Decoding runs ahead of the model (two batches in a thread pool, or a DataLoader's prefetch), so the
model waits for pixels as little as the cores allow.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitrina.data.images import MAX_BYTES, BadImageError, decode_image_bytes, read_image_bytes


@dataclass(frozen=True)
class Job:
    """One file to embed."""

    rel: str
    path: Path | str  # a local path, or a URL (``is_url``)
    size: int
    mtime: float
    label: str | None
    caption: str | None
    is_new: bool
    item_id: int | None = None  # set for an item that a version catches up on


@dataclass
class Decoded:
    """A decoded job: pixels and content hash, or why it could not be decoded."""

    job: Job
    pixels: torch.Tensor | None
    content_hash: str = ""
    reason: str = ""
    detail: str = ""


@dataclass
class Batch:
    """Decoded jobs in order, their pixels stripped and stacked: one tensor crosses process boundaries."""

    items: list[Decoded]
    pixels: torch.Tensor | None  # (G, 3, H, W) for the items without a ``reason``, in order
    vectors: np.ndarray | None = None  # (G, D) float32, once a model replica embedded them (``replicas``)


def collate(decoded: list[Decoded], normalize: Callable | None = None) -> Batch:
    """Stack the good items' pixels into one tensor (normalising a uint8 batch in one operation)."""
    good = [d.pixels for d in decoded if d.pixels is not None]
    for d in decoded:
        d.pixels = None
    pixels = torch.stack(good) if good else None
    if pixels is not None and pixels.dtype == torch.uint8 and normalize is not None:
        pixels = normalize(pixels)
    return Batch(decoded, pixels)


def _split(transform: Callable) -> tuple[Callable, Callable | None]:
    """(per-image step, per-batch step): a transform with ``to_uint8``/``normalize`` (``EvalTransform``) does
    its geometry per image and its arithmetic per batch; any other transform does it all per image.
    A split transform's per-image step takes a greyscale image as it is (``to_uint8`` resizes the one band,
    then makes it RGB): ``Decoding.of`` keeps such images grey."""
    to_uint8, normalize = getattr(transform, "to_uint8", None), getattr(transform, "normalize", None)
    if callable(to_uint8) and callable(normalize):
        return to_uint8, normalize
    return transform, None


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``proto://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path


def _open(path: Path | str):
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def file_stat(path: Path | str) -> tuple[int, float]:
    """(size in bytes, mtime) of a local file or a URL (mtime 0.0 where the store does not say); OSError if gone."""
    if not is_url(path):
        stat = Path(path).stat()
        return stat.st_size, stat.st_mtime
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    try:
        info = fs.info(inner)
    except OSError:
        raise
    except Exception as error:  # remote stores raise their own errors
        raise OSError(f"{path}: {error}") from None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or 0.0
    return int(info.get("size") or 0), float(mtime.timestamp() if hasattr(mtime, "timestamp") else mtime)


def content_hash(path: Path | str) -> str:
    """blake2b (128-bit) of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with _open(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_hash(data: bytes) -> str:
    """``content_hash`` of a file whose bytes are ``data`` (the same blake2b, 128-bit)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _read_url(job: Job) -> bytes:
    """A URL's bytes (no more than ``MAX_BYTES`` + 1 are fetched), checked as a local file's are."""
    try:
        with _open(job.path) as f:
            data = f.read(MAX_BYTES + 1)
    except Exception as error:  # any fsspec backend's "cannot read"
        raise BadImageError(job.path, "unreadable", str(error)) from None
    if not data:
        raise BadImageError(job.path, "empty", "0 bytes")
    if len(data) > MAX_BYTES:
        raise BadImageError(job.path, "too-large", f"over {MAX_BYTES} bytes")
    return data


def decode(job: Job, transform: Callable, draft_size: int | None = None, keep_grey: bool = False) -> Decoded:
    """Read, hash, decode and transform one file; never raises for a bad file (the ledger gets the reason).
    ``keep_grey``: ``transform`` takes a greyscale image in mode L (see ``_split``)."""
    try:
        data = _read_url(job) if is_url(job.path) else read_image_bytes(job.path)
        # Size checks happen before decoding (no decompression bombs); a JPEG is decoded at 1/2, 1/4 or
        # 1/8 scale when that still covers the tower's input (DCT scaling: most of the decode saved).
        image = decode_image_bytes(data, job.path, draft_size=draft_size, keep_grey=keep_grey)
        return Decoded(job, transform(image), bytes_hash(data))
    except BadImageError as error:
        return Decoded(job, None, reason=getattr(error, "reason", "unreadable"), detail=str(error))
    except OSError as error:  # vanished or unreadable between scan and decode
        return Decoded(job, None, reason="unreadable", detail=str(error))


@dataclass(frozen=True)
class Decoding:
    """How the files of one transform are decoded: its per-image and per-batch steps (``_split``), the JPEG draft
    size (the tower's input side), and whether the per-image step takes a greyscale image as it is. Called on
    a job, it decodes it (it pickles into worker processes)."""

    per_image: Callable
    normalize: Callable | None
    draft_size: int | None
    keep_grey: bool

    @classmethod
    def of(cls, transform: Callable) -> Decoding:
        per_image, normalize = _split(transform)
        return cls(per_image, normalize, getattr(transform, "size", None), keep_grey=normalize is not None)

    def __call__(self, job: Job) -> Decoded:
        return decode(job, self.per_image, self.draft_size, self.keep_grey)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_decoding(image_size: int | None, cpus: int | None = None, *, can_fork: bool = True) -> tuple[str, int]:
    """(decoder, workers) of a run that names neither: 2 model replicas (``vitrina.index.replicas``) for a
    tower of <= 64 px input on a machine of 2 CPUs or fewer, where forking is possible; 2 decoder threads
    beside the model otherwise.

    Measured on 2 cores (bench/results/index_throughput.json, medians of 3 rounds, Intel Xeon, 2026-12-05 12:25),
    end-to-end / model img/s with 2 replicas, the main thread, 2 decoder threads, 2 decoder processes: the
    demo's 48 px tower 0.58, 0.49, 0.43, 0.36; clip-minilm (48 px) 0.76, 0.64, 0.58, 0.52; clip-small (64 px)
    0.80, 0.76, 0.73, 0.65. A 224 px tower (ViT-B/32 on 300-640 px JPEGs, bench/full_size.json) keeps 0.93
    of its model's speed with 2 decoder threads (0.97 on an AMD EPYC): its products are long enough for two
    threads to share."""
    small_machine = (usable_cpus() if cpus is None else cpus) <= 2
    if small_machine and can_fork and image_size is not None and image_size <= 64:
        return "replica", 2
    return "thread", 2


def thread_batches(jobs: list[Job], transform: Callable, batch_size: int, workers: int) -> Iterator[Batch]:
    """Decode in a thread pool (PIL releases the GIL while decoding), two batches ahead of the model."""
    chunks = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    if workers <= 0:
        decoding = Decoding.of(transform)
        for chunk in chunks:
            yield collate([decoding(job) for job in chunk], decoding.normalize)
        return
    # One intra-op thread per decoder: a decode thread left at the default would start its own OpenMP
    # team and fight the model for the cores. Some builds make that setting process-wide, so the
    # model's own thread count is put back before every batch and at the end.
    model_threads = torch.get_num_threads()
    try:
        yield from _pooled_batches(chunks, transform, workers, model_threads)
    finally:
        torch.set_num_threads(model_threads)


def _pooled_batches(chunks: list, transform: Callable, workers: int, model_threads: int) -> Iterator[Batch]:
    decoding = Decoding.of(transform)
    with ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="vitrina-decode", initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        pending: deque = deque()
        chunk_iter = iter(chunks)
        for chunk in chunk_iter:
            pending.append([pool.submit(decoding, job) for job in chunk])
            if len(pending) >= 2:
                break
        while pending:
            futures = pending.popleft()
            next_chunk = next(chunk_iter, None)
            if next_chunk is not None:  # keep the pool busy while the model works on this batch
                pending.append([pool.submit(decoding, job) for job in next_chunk])
            batch = collate([future.result() for future in futures], decoding.normalize)
            torch.set_num_threads(model_threads)
            yield batch


class DecodeDataset(torch.utils.data.Dataset):
    """Jobs as a map-style dataset for a process-based DataLoader."""

    def __init__(self, jobs: list[Job], decoding: Decoding) -> None:
        self.jobs, self.decoding = jobs, decoding

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> Decoded:
        return self.decoding(self.jobs[i])


def process_batches(jobs: list[Job], transform: Callable, batch_size: int, workers: int) -> Iterator[Batch]:
    """Decode in ``workers`` processes through a torch DataLoader (a batch's pixels come back as one
    shared-memory tensor, stacked in the worker)."""
    decoding = Decoding.of(transform)
    loader = torch.utils.data.DataLoader(
        DecodeDataset(jobs, decoding),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=functools.partial(collate, normalize=decoding.normalize),
        prefetch_factor=2 if workers else None,
    )
    yield from loader
