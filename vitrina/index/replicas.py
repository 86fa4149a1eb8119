"""Decode and embed in worker processes, each with its own copy of the model (``--decoder replica``).

A small tower (the demo's 48 px, 64 px) costs little more per image than decoding it, so decoding must
overlap the model; but a decoder thread or process beside a two-thread model takes turns with its matrix
products (an OpenMP team waits for its slowest thread, and the decoder takes that thread's core
mid-product). Here each of ``workers`` processes takes whole batches instead: it reads and decodes its batch,
then embeds it with its copy of the model on one torch thread (a DataLoader worker runs one), so one process
decodes while the other multiplies and no team is ever split. This process only writes what comes back.
Measured on 2 cores: bench/results/index_throughput.json (``default_decoding``).

The workers are forked: the model is shared copy-on-write, not pickled or loaded again. Forking is not
safe once CUDA is initialised, so such a process is refused (the thread decoders serve it instead).
"""

from __future__ import annotations

import functools
import multiprocessing
import sys
from collections.abc import Iterator

import torch

from vitrina.encoder import Encoder, as_numpy
from vitrina.errors import UserError
from vitrina.index.decode import Batch, Decoded, DecodeDataset, Decoding, Job, collate


def can_fork_replicas() -> bool:
    """Whether this process may fork model replicas: Linux (fork is the tested start method), no CUDA."""
    return sys.platform.startswith("linux") and not torch.cuda.is_initialized()


def check_can_fork_replicas() -> None:
    """``UserError`` unless ``can_fork_replicas()``."""
    if not can_fork_replicas():
        raise UserError(
            "--decoder replica forks the model into worker processes, which needs Linux and a process that has "
            "not started CUDA; use --decoder thread"
        )


def replica_batches(jobs: list[Job], encoder: Encoder, batch_size: int, workers: int) -> Iterator[Batch]:
    """``jobs`` as batches in order, each with the vectors of its good items (``Batch.vectors``, (G, D)
    float32) and no pixels; ``workers`` 0 decodes and embeds here, at this process's thread count. The caller
    checks ``can_fork_replicas()`` first (``index_folder`` does, before anything is written)."""
    decoding = Decoding.of(encoder.image_transform)
    loader = torch.utils.data.DataLoader(
        DecodeDataset(jobs, decoding),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=functools.partial(_embed_batch, encoder=encoder, normalize=decoding.normalize),
        prefetch_factor=2 if workers else None,
        multiprocessing_context=multiprocessing.get_context("fork") if workers else None,
    )
    yield from loader


def _embed_batch(decoded: list[Decoded], *, encoder: Encoder, normalize) -> Batch:
    """In a worker: one batch's pixels stacked and normalised, embedded, and dropped (only vectors travel)."""
    batch = collate(decoded, normalize)
    if batch.pixels is not None:
        batch.vectors = as_numpy(encoder.encode_image(batch.pixels))
        batch.pixels = None
    return batch
