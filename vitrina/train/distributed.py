"""Data-parallel training under ``torchrun``: the process group, ranks, the feature gather, the data shard.

``torchrun --nproc-per-node N`` starts N copies of a command with ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. ``setup`` turns
those into a process group (gloo: the training loop runs on the CPU); without them, or with one
process, nothing here does anything and every helper answers for a world of one.

The loop's contract with N processes (``vitrina.train.loop``):

- ``TrainConfig.batch_size`` is the *global* batch: each rank takes ``batch_size / N`` items of
  every global batch (``ShardedOrder``), so the data order, the schedule and the checkpoints are
  those of one process with the same batch, whatever N is.
- The model is wrapped in ``DistributedDataParallel`` (``StepModule``): gradients are averaged
  over the ranks during backward. A contrastive loss sees the global batch through
  ``gather_with_grad``; each rank takes the loss of its own rows (``vitrina.losses.clip_loss_rows``),
  whose mean over ranks is the loss of the global batch.
- Rank 0 evaluates, logs, shows progress and writes every file; the others receive its results
  (``broadcast_json``) and wait at ``barrier`` where a file must be complete.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from vitrina.errors import UserError

BACKEND = "gloo"  # the loop's tensors live on the CPU (see README, "Past one machine")
_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True when the process was started as one of several by torchrun (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise UserError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start the run with torchrun"
        ) from None


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup() -> bool:
    """Join the process group torchrun describes (once per process); True when training is data-parallel.

    Each process gets ``cpu_count / LOCAL_WORLD_SIZE`` torch threads, so N processes on one
    machine share its cores instead of fighting over them. A run that succeeds ends with ``finish``;
    otherwise the group is destroyed at exit.
    """
    if active() or not launched():
        return active()
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the run with torchrun"
        )
    dist.init_process_group(BACKEND)
    atexit.register(cleanup)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return True


def cleanup() -> None:
    """Leave the process group (nothing when there is none).

    At exit this runs without waiting for the other ranks: a rank that failed must not block on
    peers that may never arrive. A run that succeeded ends with ``finish`` instead.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End a run that succeeded on this rank: wait for every rank, then leave the group.

    Why the barrier: a rank that tears its gloo connections down while a peer is still using them
    (the peer one step behind, finishing its last file) can abort that peer at exit with
    "terminate called without an active exception"; seen once in CI on two ranks, as SIGABRT
    after both had written every result. With the barrier no rank leaves before all are done.
    """
    barrier()
    cleanup()


def rank() -> int:
    """This process's rank in the group (0 without one)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes training together (1 without a group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on the process that writes files, logs and shows progress (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing without a group)."""
    if active():
        dist.barrier()


# --- small collectives ----------------------------------------------------------------------


def broadcast_json(value: Any) -> Any:
    """Rank 0's JSON-ready ``value`` on every rank (the others' argument is ignored). No pickling."""
    if not active():
        return value
    data = json.dumps(value).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    if is_main():
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    else:
        buffer = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    return value if is_main() else json.loads(buffer.numpy().tobytes().decode())


def mean_over_ranks(values: list[float]) -> list[float]:
    """The mean of each number over the ranks (float64 sums; the values themselves without a group)."""
    if not active() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a time cap crossed)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def same_on_every_rank(value: Any, what: str) -> None:
    """Raise ``UserError`` on every rank unless ``value`` (JSON-ready) is the same on all of them.

    The message names rank 0's ``what`` (e.g. its output folder) on every rank.
    """
    if not active():
        return
    main_value, main_what = broadcast_json([value, what])
    if any_rank(main_value != json.loads(json.dumps(value))):
        raise UserError(f"the {world_size()} processes see different {main_what}; give them one shared output folder")


# --- the feature gather ---------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """(b, D) on each of W ranks -> (W*b, D) on every rank, in rank order; gradients flow back.

    Backward: the loss of every rank depends on every rank's rows, so the gradient of rank r's
    rows is the sum over ranks of their gradients for those rows: an all-reduce (sum) of the whole
    (W*b, D) gradient, then this rank's slice. (A reduce-scatter would move less; gloo has none.)
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rows = rows.contiguous()
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows)
        ctx.start, ctx.stop = dist.get_rank() * rows.shape[0], (dist.get_rank() + 1) * rows.shape[0]
        return torch.cat(parts)  # (W*b, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop]  # (b, D)


def gather_with_grad(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's (b, D) rows -> the global batch (W*b, D), and the index of this rank's first row.

    Every rank must pass the same b (the loop's batches are equal by construction). Without a
    group it is ``(rows, 0)``.
    """
    if not active():
        return rows, 0
    return _GatherRows.apply(rows), rank() * rows.shape[0]


# --- the data shard -------------------------------------------------------------------------


class ShardedOrder(Sampler[int]):
    """Rank ``rank``'s share of a global item order: of every global batch of ``batch_size`` items,
    the ``rank``-th block of ``batch_size / world_size``; a partial global batch at the end is dropped.

    ``order`` is the whole epoch's order (the loop's ``EpochOrder``: a permutation drawn from
    ``(seed, epoch)``, minus the global batches already done), so the ranks' blocks of one global
    batch, side by side, are that batch as one process meets it, and each item of the epoch goes to
    exactly one rank. A new epoch is a new ``order``: the role of ``DistributedSampler.set_epoch``.
    """

    def __init__(self, order: Iterable[int], *, batch_size: int, rank: int, world_size: int) -> None:
        if batch_size % world_size:
            raise ValueError(f"a global batch of {batch_size} does not split over {world_size} ranks")
        self.order, self.batch_size, self.rank, self.world_size = order, batch_size, rank, world_size
        self.local = batch_size // world_size

    def __iter__(self) -> Iterator[int]:
        items = list(self.order)
        for start in range(0, len(items) - self.batch_size + 1, self.batch_size):
            first = start + self.rank * self.local
            yield from items[first : first + self.local]

    def __len__(self) -> int:
        return len(self.order) // self.batch_size * self.local  # type: ignore[arg-type]


# --- the model ------------------------------------------------------------------------------


class StepModule(nn.Module):
    """A ``step_fn(model, batch)`` as a module, so that it runs inside ``DistributedDataParallel``'s forward.

    Trainers' steps call model methods (``encode_image``, ``project_text``, ...), not ``forward``;
    DDP needs its own forward around whatever builds the graph to sync gradients in backward.
    ``forward`` returns ``(loss, n_items, metrics)``: a tuple DDP can look through.
    """

    def __init__(self, model: nn.Module, step_fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        out = self.step_fn(self.model, batch)
        return out.loss, out.n_items, out.metrics


def data_parallel(model: nn.Module, step_fn: Callable[[nn.Module, Any], Any]) -> nn.Module:
    """``StepModule(model, step_fn)`` under DDP: rank 0's weights are broadcast, gradients averaged.

    ``static_graph``: every step uses the same parameters, so DDP learns once which ones receive
    no gradient (a frozen-in-use tower, an unused head) instead of failing or searching each step.
    """
    return nn.parallel.DistributedDataParallel(StepModule(model, step_fn), static_graph=True)
