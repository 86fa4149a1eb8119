"""The one training loop every trainer in vitrina reuses (CLIP, classification, distillation, SSL).

A trainer supplies a model, a ``step_fn(model, batch) -> StepOutput`` and a training ``Dataset``;
the loop owns everything else: seeding and the data order and the learning-rate schedule
(``vitrina.train.schedule``), AdamW, gradient clipping, an optional moving average of the weights
(``vitrina.train.ema``), a tqdm bar with img/s, the JSONL metrics log, evaluation, and checkpoints
with resume (``vitrina.train.checkpointing``).

When it stops
-------------
A run ends after ``epochs`` epochs, or, with a time budget (``budget_minutes``), when the budget is
spent, whichever comes first; either way it is complete and a rerun with the same folder does
nothing more. ``max_minutes`` is a cap on one invocation: the run stops cleanly after the step that
crosses it, with a checkpoint, and the next invocation with the same folder continues it.

Weight average
--------------
With ``ema_decay`` the loop keeps a moving average of the trainable weights, updated after every
step. Evaluations and the model files of every checkpoint (``save_fn``) see the average: the
published model *is* the average, and the metrics log marks those evaluations ``"ema": true``. The
train state keeps the live weights too (``ema/<name>`` beside ``model/<name>``), so resume continues
both; when ``train`` returns, the model holds the average.

Several processes (``torchrun``, see ``vitrina.train.distributed``)
-------------------------------------------------------------------
``batch_size`` is the global batch; each of N ranks takes its block of every global batch and the
model runs under ``DistributedDataParallel``. Position, schedule and checkpoint are those of one
process (``batch`` counts global batches; ``epoch_samples`` is the position in global samples),
so a checkpoint resumes with any N that divides the batch. Rank 0 takes the folder lock, logs,
evaluates (the others receive its results) and writes every checkpoint; the others wait for it.
The RNG state saved is rank 0's; on a start or resume rank r > 0 reseeds from ``(seed, step, r)``,
so the ranks draw different augmentations and dropout masks. Those draws depend on N; with
deterministic steps everything else agrees with one process to float summation order. A time
budget's clock is the mean of the ranks' clocks, taken at every step, so every rank applies the
same learning rate and stops at the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vitrina.atomic import atomic_write_text
from vitrina.config import TrainConfig, to_dict
from vitrina.errors import UserError
from vitrina.models.hybrid import ConvStem, stems_in_bf16
from vitrina.train import distributed
from vitrina.train.checkpointing import (
    METRICS_FILE,
    STATE_FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    check_out_dir,
    clean_leftovers,
    exclusive,
    find_checkpoint,
    load_train_state,
    optimizer_param_names,
    read_train_meta,
    save_train_state,
    write_checkpoint,
)
from vitrina.train.ema import WeightAverage
from vitrina.train.schedule import EpochOrder, LRSchedule, mix_seeds, rng_preserved, seed_everything

# find_checkpoint lives in checkpointing; it stays importable from here for train/clip.py
__all__ = [
    "CheckpointInfo",
    "StepOutput",
    "TrainSummary",
    "find_checkpoint",
    "param_groups_for",
    "train",
]

# Parameter names (last component) that are never weight-decayed, besides every 0/1-d tensor
# (biases, norm scales) and nn.Embedding tables: decaying these pulls positions and special
# tokens towards zero, and decaying the temperature would bias it.
_NO_DECAY_NAMES = frozenset({"pos_embed", "position_embedding", "positional_embedding", "cls_token", "logit_scale"})


@dataclass
class StepOutput:
    """What a ``step_fn`` returns: the loss to minimise, the batch size, and extra numbers to log."""

    loss: torch.Tensor
    n_items: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CheckpointInfo:
    """Passed to ``on_checkpoint`` once a checkpoint is complete and current."""

    path: Path
    epoch: int  # completed epochs
    step: int  # optimizer steps done
    epoch_complete: bool


@dataclass
class TrainSummary:
    """What a run did. ``metrics`` are the last evaluation's results plus the last train loss."""

    out_dir: Path
    epochs_done: int
    epochs: int
    steps: int
    minutes: float  # this invocation's wall time
    total_minutes: float  # training time over every run that built this checkpoint
    metrics: dict[str, float]
    stopped_early: bool
    resumed_from_step: int | None
    best: dict[str, Any] | None
    budget_minutes: float | None = None  # the run's time budget, if it had one
    budget_spent: bool = False  # the time budget ended the run

    def __str__(self) -> str:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if isinstance(v, (int, float)))
        epochs = f"{self.epochs_done}" if self.budget_minutes is not None else f"{self.epochs_done}/{self.epochs}"
        text = f"{epochs} epochs, {self.steps} steps, {self.minutes:.1f} min"
        if self.budget_minutes is not None:
            text += f" ({self.total_minutes:.1f} of a {self.budget_minutes:g}-min budget)"
        if shown:
            text += f"; {shown}"
        if self.stopped_early:
            text += "; stopped at the time cap: run again with the same output folder to continue"
        elif self.budget_spent:
            text += "; the time budget is spent"
        return text


StepFn = Callable[[nn.Module, Any], StepOutput]
EvalFn = Callable[[nn.Module], dict[str, float]]
SaveFn = Callable[[nn.Module, Path], None]
Clock = Callable[[], float]  # seconds from an arbitrary origin (time.perf_counter; tests pass a fake)


# --- optimizer ------------------------------------------------------------------------------


def param_groups_for(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only; none on biases, norms, embeddings, tokens, temperature.

    A model may name more parameters to spare with a ``no_weight_decay() -> set[str]`` method (the
    timm convention). Frozen parameters are left out.
    """
    spared = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    embedding_tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (
            p.ndim < 2
            or id(p) in embedding_tables
            or name in spared
            or leaf in _NO_DECAY_NAMES
            or leaf.endswith("_token")
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --- the loop -------------------------------------------------------------------------------


def forward_precision(model: nn.Module, precision: str) -> contextlib.AbstractContextManager:
    """The arithmetic of a training forward pass (``TrainConfig.precision``)."""
    if precision == "bf16-stem":
        return stems_in_bf16(model)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


class _MetricsLog:
    """Append-only JSONL log; on resume, lines past the checkpoint's step (a lost future) are dropped."""

    def __init__(self, path: Path, keep_up_to_step: int | None) -> None:
        self.path = path
        if keep_up_to_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if record.get("step", 0) <= keep_up_to_step:
                    kept.append(line)
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a")  # noqa: SIM115 - closed by close(), spans the whole run

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _NoLog:
    """The log of a rank other than 0: rank 0 writes the one log."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _Window:
    """Running sums between two log lines: item-weighted loss and metrics, throughput."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.items, self.loss, self.seconds, self.steps = 0, 0.0, 0.0, 0
        self.metrics: dict[str, float] = {}

    def add(self, out: StepOutput, loss: float, seconds: float, extra: dict[str, float]) -> None:
        self.items += out.n_items
        self.loss += loss * out.n_items
        self.seconds += seconds
        self.steps += 1
        for k, v in {**out.metrics, **extra}.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + float(v)

    def summary(self) -> dict[str, float]:
        return {
            "loss": self.loss / max(1, self.items),
            "img_per_s": self.items / max(self.seconds, 1e-9),
            **{k: v / max(1, self.steps) for k, v in self.metrics.items()},
        }


def _evaluate(model: nn.Module, eval_fn: EvalFn) -> dict[str, float]:
    """Run ``eval_fn`` in eval mode without gradients, RNGs preserved."""
    was_training = model.training
    model.eval()
    try:
        with rng_preserved(), torch.no_grad():
            return {k: float(v) for k, v in eval_fn(model).items()}
    finally:
        model.train(was_training)


class _Run:
    """One invocation of ``train``: optimizer, schedule, position and log, and the steps that move them."""

    def __init__(
        self,
        *,
        model,
        step_fn,
        train_data,
        out_dir,
        config,
        save_fn,
        eval_fn,
        collate_fn,
        param_groups,
        identity,
        steps_per_epoch,
        best_metric,
        higher_is_better,
        on_checkpoint,
        progress,
        clock,
    ) -> None:
        self.model, self.step_fn, self.train_data, self.out_dir = model, step_fn, train_data, out_dir
        self.config, self.save_fn, self.eval_fn, self.collate_fn = config, save_fn, eval_fn, collate_fn
        self.identity, self.steps_per_epoch = identity, steps_per_epoch
        self.best_metric, self.higher_is_better = best_metric, higher_is_better
        self.on_checkpoint, self.progress, self.clock = on_checkpoint, progress, clock

        groups = list(param_groups) if param_groups is not None else param_groups_for(model, config.weight_decay)
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        self.schedule = LRSchedule.of(config, total_steps=config.epochs * steps_per_epoch)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]  # per group (layer-wise decay)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.param_names = optimizer_param_names(model, self.optimizer)
        self.ema = WeightAverage(model, config.ema_decay) if config.ema_decay is not None else None

        self.epoch = self.batch = self.step = 0  # completed epochs, batches of the current one, steps
        self.elapsed_before = 0.0
        self.last_elapsed = 0.0  # the training clock when the last step read it
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self.resumed_from_step: int | None = None
        self.stopped_early = False
        self.window = _Window()
        self.start = clock()
        self.cap_s = config.max_minutes * 60 if config.max_minutes is not None else math.inf
        self.budget_s = self.schedule.budget_s if self.schedule.by_time else math.inf
        self.rank, self.world, self.main = distributed.rank(), distributed.world_size(), distributed.is_main()
        self.forward: nn.Module | None = None  # the DDP-wrapped step, with several processes

    def restore(self, checkpoint: Path | None) -> None:
        """Seed a fresh run, or take every state from ``checkpoint``."""
        if checkpoint is None:
            seed_everything(self.config.seed)
            self._reseed_rank()
            return
        meta, extra = load_train_state(checkpoint, model=self.model, optimizer=self.optimizer)
        if self.ema is not None:
            self.ema.load_state_tensors(extra, where=str(checkpoint / STATE_TENSORS))
        if meta.get("param_names") != self.param_names:
            raise UserError(f"{checkpoint}: the optimizer's parameters differ from this model's; use a new folder")
        self.epoch, self.step = meta["epoch"], meta["global_step"]
        # the position in global samples: the same global batches with any number of processes
        self.batch = meta.get("epoch_samples", meta["batch"] * self.config.batch_size) // self.config.batch_size
        self._reseed_rank()
        self.elapsed_before = self.last_elapsed = meta["elapsed_s"]
        self.best, self.last_eval = meta.get("best"), meta.get("last_eval", {})
        self.last_train = meta.get("last_train", {})
        self.resumed_from_step = self.step

    def _reseed_rank(self) -> None:
        """Rank r > 0 draws from its own stream, a function of the seed, the step and r (rank 0 keeps the saved one)."""
        if self.rank > 0:
            seed_everything(mix_seeds(self.config.seed, self.step, self.rank) % 2**32)

    def elapsed_total(self) -> float:
        """Seconds of training over every run that built this checkpoint."""
        return self.elapsed_before + self.clock() - self.start

    def budget_spent(self) -> bool:
        """Whether the time budget (if any) was used up at the last step: the run is complete.

        Judged on the clock as the last step read it (the same on every rank), not on a fresh reading.
        """
        return self.last_elapsed >= self.budget_s

    def agreed_elapsed(self) -> float:
        """``elapsed_total``, the same on every rank (their mean): the budget's LR and stop agree."""
        elapsed = self.elapsed_total()
        return distributed.mean_over_ranks([elapsed])[0] if self.world > 1 else elapsed

    def run(self) -> TrainSummary:
        """Train the remaining epochs (or until the time budget or cap); return the summary."""
        if self.main:
            self.log = _MetricsLog(self.out_dir / METRICS_FILE, keep_up_to_step=self.resumed_from_step)
        else:
            self.log = _NoLog()
        if self.world > 1:
            self.forward = distributed.data_parallel(self.model, self.step_fn)
        try:
            self.model.train()
            while self.epoch < self.config.epochs and not self.stopped_early and not self.budget_spent():
                self.run_epoch()
        finally:
            self.log.close()
        if self.ema is not None:
            self.ema.copy_to_model()  # what the checkpoints published is what the caller holds
        distributed.barrier()  # every file rank 0 writes is complete when any rank returns
        metrics = {**({"train/loss": self.last_train["loss"]} if self.last_train else {}), **self.last_eval}
        return TrainSummary(
            out_dir=self.out_dir,
            epochs_done=self.epoch,
            epochs=self.config.epochs,
            steps=self.step,
            minutes=(self.clock() - self.start) / 60,
            total_minutes=self.elapsed_total() / 60,
            metrics=metrics,
            stopped_early=self.stopped_early,
            resumed_from_step=self.resumed_from_step,
            best=self.best,
            budget_minutes=self.config.budget_minutes,
            budget_spent=self.budget_spent(),
        )

    def loader(self) -> DataLoader:
        """The rest of the current epoch: its fixed order, minus the batches already done."""
        c = self.config
        order = EpochOrder(len(self.train_data), seed=c.seed, epoch=self.epoch, skip=self.batch * c.batch_size)
        seed = mix_seeds(c.seed, self.epoch, self.batch)
        if self.world > 1:  # this rank's block of every global batch; its workers draw their own numbers
            order = distributed.ShardedOrder(order, batch_size=c.batch_size, rank=self.rank, world_size=self.world)
            seed = mix_seeds(c.seed, self.epoch, self.batch, self.rank)
        return DataLoader(
            self.train_data,
            batch_size=c.batch_size // self.world,
            sampler=order,
            drop_last=True,
            num_workers=c.num_workers,
            collate_fn=self.collate_fn,
            # worker processes seed their RNGs from this generator: tie them to the position
            generator=torch.Generator().manual_seed(seed),
        )

    def run_epoch(self) -> None:
        """Batches until the epoch ends (then evaluate and checkpoint) or the time cap stops the run."""
        c = self.config
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.batch,
            desc=f"epoch {self.epoch + 1}/{c.epochs}" if c.budget_minutes is None else f"epoch {self.epoch + 1}",
            unit="batch",
            disable=not (self.progress and self.main),
            dynamic_ncols=True,
        )
        tick = epoch_start = time.perf_counter()
        items = 0
        for batch in self.loader():
            loss, n = self.train_step(batch, seconds_since=tick)
            items += n
            bar.update(1)
            # the bar shows the rate since this epoch's first batch: steady, unlike a per-step rate
            rate = items / max(time.perf_counter() - epoch_start, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
            over_time = self.clock() - self.start > self.cap_s
            if self.world > 1 and self.cap_s < math.inf:
                over_time = distributed.any_rank(over_time)  # the ranks stop at the same step
            if self.batch == self.steps_per_epoch:
                # the epoch-end checkpoint below saves this step; stop after it unless it was the last
                self.stopped_early = over_time and self.epoch + 1 < c.epochs and not self.budget_spent()
                break
            if self.budget_spent():  # the schedule is at its end: the run is complete
                self.evaluate()
                self.checkpoint(epoch_complete=False)
                break
            if over_time:
                self.stopped_early = True
                self.evaluate()
                self.checkpoint(epoch_complete=False)
                break
            if c.checkpoint_every_steps and self.step % c.checkpoint_every_steps == 0:
                self.checkpoint(epoch_complete=False)
            tick = time.perf_counter()  # data loading counts towards img/s, checkpointing does not
        bar.close()
        if self.batch == self.steps_per_epoch:
            if self.window.steps:
                self.last_train = self.window.summary()
            self.epoch, self.batch = self.epoch + 1, 0
            self.evaluate()
            self.checkpoint(epoch_complete=True)

    def train_step(self, batch: Any, *, seconds_since: float) -> tuple[float, int]:
        """Forward, backward, clip, optimizer and schedule step, log; returns the loss and batch size."""
        with forward_precision(self.model, self.config.precision):
            out = self.step_fn(self.model, batch) if self.forward is None else StepOutput(*self.forward(batch))
        loss = float(out.loss.detach())
        logged = out
        if self.world > 1:
            # the global batch's loss and metrics (each rank's are means over equal shares of it)
            names = sorted(out.metrics)
            loss, *values = distributed.mean_over_ranks([loss, *(float(out.metrics[k]) for k in names)])
            logged = StepOutput(out.loss, out.n_items * self.world, dict(zip(names, values, strict=True)))
        if not math.isfinite(loss):
            raise UserError(
                f"training diverged: loss is {loss} at step {self.step + 1}; "
                f"lower the learning rate (now {self.config.lr:g}) or lengthen the warm-up"
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        extra = {}
        if self.config.grad_clip_norm is not None:
            # the norm before clipping, logged: spikes show instability before the loss does
            extra["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip_norm))
        # a budget's clock is read after the backward pass: the step's LR is that of the time it is applied
        elapsed = self.agreed_elapsed() if self.schedule.by_time else self.elapsed_total()
        factor = self.schedule.factor(step=self.step, elapsed_s=elapsed)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.last_elapsed = elapsed
        self.step += 1
        self.batch += 1
        self.window.add(logged, loss, time.perf_counter() - seconds_since, extra)
        if self.step % self.config.log_every == 0:
            self.last_train = self.window.summary()
            self.log.write(
                {
                    "step": self.step,
                    "epoch": self.epoch + 1,
                    "lr": lr,
                    **self.last_train,
                    "elapsed_s": round(self.elapsed_total(), 3),
                }
            )
            self.window.reset()
        return loss, logged.n_items

    def evaluate(self) -> None:
        """Run ``eval_fn`` (if any), log it, and track the best value of ``best_metric``."""
        if self.eval_fn is None:
            return
        # rank 0 evaluates; the others take its numbers (they decide the best checkpoint alike)
        with self.weights_to_publish():
            results = _evaluate(self.model, self.eval_fn) if self.main else None
        self.last_eval = distributed.broadcast_json(results)
        elapsed = round(self.elapsed_total(), 3)
        record = {"step": self.step, "epoch": self.epoch, "elapsed_s": elapsed, "eval": self.last_eval}
        self.log.write({**record, **({"ema": True} if self.ema is not None else {})})
        if self.best_metric is not None and self.best_metric in self.last_eval:
            value = self.last_eval[self.best_metric]
            best = self.best
            if best is None or (value > best["value"] if self.higher_is_better else value < best["value"]):
                self.best = {"metric": self.best_metric, "value": value, "epoch": self.epoch, "step": self.step}

    def weights_to_publish(self) -> contextlib.AbstractContextManager:
        """The model as evaluated and saved: the weight average when there is one, else as it is."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def checkpoint(self, *, epoch_complete: bool) -> None:
        """Write a checkpoint of the current position (the protocol in ``checkpointing``); rank 0 only."""
        if not self.main:
            distributed.barrier()
            return

        def fill(folder: Path) -> None:
            with rng_preserved(), self.weights_to_publish():
                self.save_fn(self.model, folder)
            clash = {STATE_JSON, STATE_TENSORS} & {p.name for p in folder.iterdir()}
            if clash:
                raise RuntimeError(f"save_fn wrote reserved file(s) {sorted(clash)}")
            meta = {
                "format": STATE_FORMAT,
                "epoch": self.epoch,
                "batch": self.batch,  # global batches of this epoch done
                "epoch_samples": self.batch * self.config.batch_size,
                "global_step": self.step,
                "world_size": self.world,  # how it was trained; a resume may use another
                "elapsed_s": self.elapsed_total(),
                "identity": self.identity,
                "config": to_dict(self.config),
                "param_names": self.param_names,
                "best": self.best,
                "last_eval": self.last_eval,
                "last_train": self.last_train,
            }
            extra = self.ema.state_tensors() if self.ema is not None else None
            save_train_state(folder, model=self.model, optimizer=self.optimizer, meta=meta, extra_tensors=extra)

        final = write_checkpoint(self.out_dir, self.step, fill)
        if self.on_checkpoint is not None:
            with rng_preserved(), self.weights_to_publish():
                self.on_checkpoint(CheckpointInfo(final, self.epoch, self.step, epoch_complete))
        distributed.barrier()


def train(
    *,
    model: nn.Module,
    step_fn: StepFn,
    train_data: Dataset,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    save_fn: SaveFn,
    eval_fn: EvalFn | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    param_groups: Sequence[dict[str, Any]] | None = None,
    run_identity: dict[str, Any] | None = None,
    resume: bool = True,
    best_metric: str | None = None,
    higher_is_better: bool = False,
    on_checkpoint: Callable[[CheckpointInfo], None] | None = None,
    progress: bool = True,
    clock: Clock = time.perf_counter,
) -> TrainSummary:
    """Train ``model`` for ``config.epochs`` epochs, checkpointing into ``out_dir``; resume when possible.

    ``step_fn(model, batch)`` computes the loss of one batch (the loop does backward, clipping, the
    optimizer and schedule steps). ``save_fn(model, folder)`` writes the public model files
    (``model.safetensors`` + ``config.json`` + anything else needed to load the model).
    ``eval_fn(model)`` runs after every epoch (and at a time-cap stop) in eval mode under
    ``no_grad``. ``param_groups`` replaces the default AdamW groups (``param_groups_for``).
    ``run_identity`` is anything else that must match for a resume (model and data settings).
    ``best_metric`` names an eval result to track. ``on_checkpoint`` is called after each checkpoint.
    ``clock`` times the run (the time cap and a time budget's schedule; tests pass a fake one).

    Started by torchrun with several processes, the run is data-parallel (module docstring):
    ``config.batch_size`` is then the global batch and must be a multiple of the process count.
    """
    config.validate()
    if config.precision == "bf16-stem" and not any(isinstance(m, ConvStem) for m in model.modules()):
        raise UserError(
            f"precision bf16-stem: the {type(model).__name__} has no convolutional stem (a hybrid ViT preset has); "
            "use bf16 or fp32"
        )
    out_dir = Path(out_dir)
    distributed.setup()
    world = distributed.world_size()
    if config.batch_size % world:
        raise UserError(
            f"a batch of {config.batch_size} does not split over {world} processes; give a multiple of {world}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; the output must be a folder")
    n_items = len(train_data)
    steps_per_epoch = n_items // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"the training set has {n_items} items, fewer than one batch of {config.batch_size}; "
            "lower the batch size or add data"
        )
    identity = {
        "train": config.trajectory(),
        "items": n_items,
        "steps_per_epoch": steps_per_epoch,
        "run": to_dict(run_identity or {}),
    }
    main = distributed.is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir) if main else contextlib.nullcontext():
        checkpoint = check_out_dir(out_dir, identity, resume)
        if world > 1:  # every rank resumes from the checkpoint rank 0 resumes from
            step = read_train_meta(checkpoint)["global_step"] if checkpoint else None
            distributed.same_on_every_rank(step, f"checkpoints in {out_dir}")
        if main:
            clean_leftovers(out_dir)
        run = _Run(
            model=model,
            step_fn=step_fn,
            train_data=train_data,
            out_dir=out_dir,
            config=config,
            save_fn=save_fn,
            eval_fn=eval_fn,
            collate_fn=collate_fn,
            param_groups=param_groups,
            identity=identity,
            steps_per_epoch=steps_per_epoch,
            best_metric=best_metric,
            higher_is_better=higher_is_better,
            on_checkpoint=on_checkpoint,
            progress=progress,
            clock=clock,
        )
        run.restore(checkpoint)
        return run.run()
