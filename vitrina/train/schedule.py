"""What a training run follows besides its data: the learning-rate schedule, seeding, the data order.

Learning rate
-------------
Linear warm-up, then a cosine from 1 down to ``min_lr_ratio``, over one of two clocks:

* **steps** (the default): the run is ``epochs`` long, so the schedule is a function of the
  optimizer step (``lr_factor``); the time cap ``max_minutes`` may cut it short.
* **seconds** (``TrainConfig.budget_minutes``): the schedule is a function of the elapsed training
  seconds over the budget (``budget_lr_factor``), so the run ends at the budget at the end of its
  schedule whatever the step rate. The clock counts every second of the run (evaluations and
  checkpoints too) and is saved in the train state, so a resumed run continues it. Because the
  factor of a step depends on how fast the machine went, two such runs are not bit-identical.

Data order
----------
Epoch ``e`` visits the items in a permutation drawn from ``(seed, e)`` alone (``EpochOrder``), in
batches of ``batch_size`` (the last partial batch is dropped: a contrastive batch of 1 teaches
nothing). Because the order is a function of the epoch, a run resumed from any checkpoint meets the
same batches as an uninterrupted one; with ``num_workers=0`` (augmentations drawn from the saved
global RNG) it follows the same trajectory exactly, from epoch ends and from mid-epoch checkpoints
alike. With worker processes the augmentation draws are reproduced exactly from epoch boundaries only.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from vitrina.config import TrainConfig

# Epochs of a budget run given none: the time budget, not the data, ends it.
BUDGET_EPOCH_LIMIT = 10_000


# --- learning-rate schedules ----------------------------------------------------------------


def _cosine(progress: float, min_lr_ratio: float) -> float:
    """1 at ``progress`` 0 down to ``min_lr_ratio`` at 1 (and after)."""
    progress = min(1.0, progress)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for 0-based optimizer step ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` (so the first step already learns), then a cosine
    from 1 down to ``min_lr_ratio`` reached at the last step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    return _cosine((step - warmup_steps) / decay_steps, min_lr_ratio)


def budget_lr_factor(elapsed_s: float, *, budget_s: float, warmup_s: float, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate after ``elapsed_s`` seconds of a ``budget_s``-second run.

    Linear warm-up ``elapsed_s / warmup_s``, then a cosine from 1 down to ``min_lr_ratio``, reached
    at ``budget_s`` and held after it. The loop reads the clock after a step's backward pass, so
    even the first step has ``elapsed_s > 0`` and learns.
    """
    if elapsed_s < warmup_s:
        return elapsed_s / warmup_s
    return _cosine((elapsed_s - warmup_s) / max(budget_s - warmup_s, 1e-9), min_lr_ratio)


def warmup_steps_for(config: TrainConfig, total_steps: int) -> int:
    """``warmup_steps`` when set, else ``warmup_fraction`` of ``total_steps`` (rounded)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return round(config.warmup_fraction * total_steps)


@dataclass(frozen=True)
class LRSchedule:
    """A run's learning-rate factor: by step (``budget_s`` None) or by elapsed seconds."""

    min_lr_ratio: float
    total_steps: int = 0
    warmup_steps: int = 0
    budget_s: float | None = None
    warmup_s: float = 0.0

    @classmethod
    def of(cls, config: TrainConfig, total_steps: int) -> LRSchedule:
        """The schedule ``config`` asks for, for a run of ``total_steps`` steps (steps clock only)."""
        if config.budget_minutes is None:
            warmup = warmup_steps_for(config, total_steps)
            return cls(config.min_lr_ratio, total_steps=total_steps, warmup_steps=warmup)
        budget_s = config.budget_minutes * 60
        warmup_s = config.warmup_seconds if config.warmup_seconds is not None else config.warmup_fraction * budget_s
        return cls(config.min_lr_ratio, budget_s=budget_s, warmup_s=warmup_s)

    @property
    def by_time(self) -> bool:
        return self.budget_s is not None

    def factor(self, *, step: int, elapsed_s: float) -> float:
        """The factor of 0-based step ``step``, taken ``elapsed_s`` seconds into the run."""
        if self.budget_s is None:
            return lr_factor(
                step, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio
            )
        return budget_lr_factor(
            elapsed_s, budget_s=self.budget_s, warmup_s=self.warmup_s, min_lr_ratio=self.min_lr_ratio
        )


# --- seeding and RNG state ------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy and torch as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Leave every global RNG as it was: evaluation, saving and hooks must not shift the training
    trajectory (a resumed run does not redo them, and a hook may build models)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def mix_seeds(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (seed, epoch, ...)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> 1)


# --- data order -----------------------------------------------------------------------------


class EpochOrder(Sampler[int]):
    """Item order of one epoch: a permutation drawn from ``(seed, epoch)``, minus the first ``skip``."""

    def __init__(self, n: int, *, seed: int, epoch: int, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, epoch, skip

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(mix_seeds(self.seed, self.epoch))
        yield from torch.randperm(self.n, generator=g)[self.skip :].tolist()

    def __len__(self) -> int:
        return self.n - self.skip
