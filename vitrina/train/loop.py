"""The one training loop every trainer in vitrina reuses (CLIP, classification, distillation, SSL).

A trainer supplies a model, a ``step_fn(model, batch) -> StepOutput`` and a training ``Dataset``;
the loop owns everything else: seeding, the data order, AdamW with a warm-up + cosine schedule,
gradient clipping, a tqdm bar with img/s, the JSONL metrics log, checkpoints and resume.

Data order
----------
Epoch ``e`` visits the items in a permutation drawn from ``(seed, e)`` alone, in batches of
``batch_size`` (the last partial batch is dropped: a contrastive batch of 1 teaches nothing).
Because the order is a function of the epoch, a run resumed from any checkpoint meets the same
batches as an uninterrupted one; with ``num_workers=0`` (augmentations drawn from the saved global
RNG) it follows the same trajectory exactly, from epoch ends and from mid-epoch checkpoints alike.
With worker processes the augmentation draws are reproduced exactly from epoch boundaries only.

Checkpoint layout and protocol (a kill at any moment leaves one complete checkpoint)
------------------------------------------------------------------------------------
::

    out_dir/
      model.safetensors -> checkpoints/current/model.safetensors   one relative link per file
      config.json       -> checkpoints/current/config.json         of the current checkpoint
      train_state.safetensors, train_state.json -> …               (model files come from save_fn)
      metrics.jsonl                                                append-only log (a real file)
      checkpoints/
        current -> step-00000120                                   the single switch
        step-00000120/                                             a complete checkpoint

Writing the checkpoint of step ``s``:

1. ``save_fn`` and the loop write every file into ``checkpoints/tmp-<s>/``; each file and the
   folder are fsynced.
2. ``tmp-<s>`` is renamed to ``step-<s>`` (a ``step-*`` folder is complete by construction).
3. A new symlink ``checkpoints/current.new -> step-<s>`` is renamed over ``current``: rename(2) is
   atomic, so ``current`` names either the old or the new complete checkpoint, never a mix.
4. Top-level links are added for files the new checkpoint brings (they point through
   ``current``, so readers of ``out_dir/model.safetensors`` always see one complete set);
   links to files it lacks are removed; older ``step-*`` folders are deleted.

A kill before step 3 leaves ``current`` on the previous checkpoint; leftovers (``tmp-*``, extra
``step-*``) are removed when the next run starts. ``train_state.safetensors`` holds the model's
whole state dict (``model/<name>``, frozen weights too) and the optimizer
tensors (``optim/<param index>/<key>``); ``train_state.json`` holds the position (epoch, batch,
step), the scheduler state, the RNG states as lists, the optimizer's scalar settings, the best
metric, the last evaluation and the config. Nothing is pickled.

Resume: when ``out_dir`` holds a checkpoint whose run identity (the ``TrainConfig`` fields that
decide the numbers, the data size, and the caller's ``run_identity``) equals this run's, training
continues from it. A different identity, or ``resume=False``, is a ``UserError``.

Several processes (``torchrun``, see ``vitrina.train.distributed``)
-------------------------------------------------------------------
``batch_size`` is the global batch; each of N ranks takes its block of every global batch and the
model runs under ``DistributedDataParallel``. Position, schedule and checkpoint are those of one
process (``batch`` counts global batches; ``epoch_samples`` is the position in global samples),
so a checkpoint resumes with any N that divides the batch. Rank 0 takes the folder lock, logs,
evaluates (the others receive its results) and writes every checkpoint; the others wait for it.
The RNG state saved is rank 0's; on a start or resume rank r > 0 reseeds from ``(seed, step, r)``,
so the ranks draw different augmentations and dropout masks. Those draws depend on N; with
deterministic steps everything else agrees with one process to float summation order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from vitrina.atomic import atomic_write_text
from vitrina.config import TrainConfig, to_dict
from vitrina.errors import UserError
from vitrina.train import distributed

CHECKPOINTS = "checkpoints"
CURRENT = "current"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
STATE_FORMAT = 1

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

    def __str__(self) -> str:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if isinstance(v, (int, float)))
        text = f"{self.epochs_done}/{self.epochs} epochs, {self.steps} steps, {self.minutes:.1f} min"
        if shown:
            text += f"; {shown}"
        if self.stopped_early:
            text += "; stopped at the time cap: run again with the same output folder to continue"
        return text


StepFn = Callable[[nn.Module, Any], StepOutput]
EvalFn = Callable[[nn.Module], dict[str, float]]
SaveFn = Callable[[nn.Module, Path], None]


# --- schedule, optimizer, seeding -----------------------------------------------------------


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for 0-based optimizer step ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` (so the first step already learns), then a cosine
    from 1 down to ``min_lr_ratio`` reached at the last step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(config: TrainConfig, total_steps: int) -> int:
    """``warmup_steps`` when set, else ``warmup_fraction`` of ``total_steps`` (rounded)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return round(config.warmup_fraction * total_steps)


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


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (seed, epoch, ...)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochOrder(Sampler[int]):
    """Item order of one epoch: a permutation drawn from ``(seed, epoch)``, minus the first ``skip``."""

    def __init__(self, n: int, *, seed: int, epoch: int, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, epoch, skip

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        yield from torch.randperm(self.n, generator=g)[self.skip :].tolist()

    def __len__(self) -> int:
        return self.n - self.skip


# --- checkpoint files -----------------------------------------------------------------------


def find_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The current complete checkpoint folder inside ``out_dir``, or None when there is none."""
    current = Path(out_dir) / CHECKPOINTS / CURRENT
    if not current.is_symlink():
        return None
    target = current.parent / os.readlink(current)
    return target if (target / STATE_JSON).is_file() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _clean_leftovers(out_dir: Path) -> None:
    """Remove half-written (``tmp-*``) and superseded checkpoint folders from an earlier run."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return
    keep = find_checkpoint(out_dir)
    for child in root.iterdir():
        if child.name == CURRENT or (keep is not None and child.resolve() == keep.resolve()):
            continue
        if child.is_symlink() or child.is_file():
            child.unlink()
        else:
            shutil.rmtree(child)


def _publish(out_dir: Path, folder: Path) -> None:
    """Steps 3 and 4 of the protocol: switch ``current`` to ``folder``, then fix the top-level links."""
    root = out_dir / CHECKPOINTS
    link = root / f"{CURRENT}.new"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(folder.name, link)
    os.replace(link, root / CURRENT)
    _fsync_dir(root)
    prefix = f"{CHECKPOINTS}/{CURRENT}/"
    names = {p.name for p in folder.iterdir()}
    for name in names:
        top = out_dir / name
        if not top.is_symlink():
            if top.exists():
                raise UserError(f"{top} is in the way of the checkpoint's link; move it out of {out_dir}")
            os.symlink(prefix + name, top)
    for top in out_dir.iterdir():
        if top.is_symlink() and os.readlink(top).startswith(prefix) and top.name not in names:
            top.unlink()
    _fsync_dir(out_dir)
    for child in root.iterdir():
        if child.name == CURRENT or child == folder:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, frozen weights included: a resumed run must not depend on the caller
    rebuilding frozen (e.g. randomly initialised, locked) weights exactly as before."""
    # clone: safetensors refuses tensors that share memory (tied weights, views)
    return {n: t.detach().clone().contiguous() for n, t in model.state_dict().items()}


def _save_train_state(folder: Path, *, model, optimizer, scheduler, meta: dict[str, Any]) -> None:
    tensors = {f"model/{n}": t for n, t in _model_tensors(model).items()}
    optim_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optim_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, str(folder / STATE_TENSORS))
    meta = {
        **meta,
        "optimizer": {"param_groups": to_dict(optim_state["param_groups"]), "scalars": scalars},
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    (folder / STATE_JSON).write_text(json.dumps(meta, indent=1))


def _load_train_state(folder: Path, *, model, optimizer, scheduler) -> dict[str, Any]:
    meta = json.loads((folder / STATE_JSON).read_text())
    tensors = load_file(str(folder / STATE_TENSORS))
    model_tensors = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    expected = set(model.state_dict())
    if set(model_tensors) != expected:
        missing = sorted(expected - set(model_tensors))[:3]
        raise UserError(
            f"{folder / STATE_TENSORS} does not match this model (e.g. {missing or 'extra tensors'}); "
            "use a new output folder"
        )
    model.load_state_dict(model_tensors)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(meta["rng"])
    return meta


def _identity_diff(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _check_out_dir(out_dir: Path, identity: dict[str, Any], resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuse what would overwrite another run."""
    checkpoint = find_checkpoint(out_dir)
    if checkpoint is None:
        ours = {METRICS_FILE, CHECKPOINTS, LOCK_FILE}
        foreign = [p.name for p in out_dir.iterdir() if p.name not in ours] if out_dir.is_dir() else []
        if foreign:
            raise UserError(
                f"{out_dir} already holds files ({', '.join(sorted(foreign)[:3])}) but no training "
                "checkpoint; choose a new or empty output folder"
            )
        return None
    meta = json.loads((checkpoint / STATE_JSON).read_text())
    where = f"{out_dir} holds a checkpoint (epoch {meta['epoch']}, step {meta['global_step']})"
    if not resume:
        raise UserError(f"{where}; resume it, choose another output folder, or delete it to start over")
    diffs = _identity_diff(meta.get("identity", {}), json.loads(json.dumps(identity)))
    if diffs:
        raise UserError(
            f"{where} of a run with other settings ({'; '.join(diffs[:4])}); "
            "use a new output folder, or delete this one to start over"
        )
    return checkpoint


# --- the loop -------------------------------------------------------------------------------


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


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Leave every global RNG as it was: evaluation, saving and hooks must not shift the training
    trajectory (a resumed run does not redo them, and a hook may build models)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _evaluate(model: nn.Module, eval_fn: EvalFn) -> dict[str, float]:
    """Run ``eval_fn`` in eval mode without gradients, RNGs preserved."""
    was_training = model.training
    model.eval()
    try:
        with _rng_preserved(), torch.no_grad():
            return {k: float(v) for k, v in eval_fn(model).items()}
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/.lock`` so two runs never write one folder (the OS drops it if we are killed)."""
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"{out_dir}: another training run is writing to this folder; wait for it or use another"
        ) from None
    try:
        yield
    finally:
        os.close(fd)


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
    ) -> None:
        self.model, self.step_fn, self.train_data, self.out_dir = model, step_fn, train_data, out_dir
        self.config, self.save_fn, self.eval_fn, self.collate_fn = config, save_fn, eval_fn, collate_fn
        self.identity, self.steps_per_epoch = identity, steps_per_epoch
        self.best_metric, self.higher_is_better = best_metric, higher_is_better
        self.on_checkpoint, self.progress = on_checkpoint, progress

        total_steps = config.epochs * steps_per_epoch
        warmup = warmup_steps_for(config, total_steps)
        groups = list(param_groups) if param_groups is not None else param_groups_for(model, config.weight_decay)
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )

        def schedule(step: int) -> float:
            return lr_factor(step, warmup_steps=warmup, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.param_names = _optimizer_param_names(model, self.optimizer)

        self.epoch = self.batch = self.step = 0  # completed epochs, batches of the current one, steps
        self.elapsed_before = 0.0
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self.resumed_from_step: int | None = None
        self.stopped_early = False
        self.window = _Window()
        self.start = time.perf_counter()
        self.cap_s = config.max_minutes * 60 if config.max_minutes is not None else math.inf
        self.rank, self.world, self.main = distributed.rank(), distributed.world_size(), distributed.is_main()
        self.forward: nn.Module | None = None  # the DDP-wrapped step, with several processes

    def restore(self, checkpoint: Path | None) -> None:
        """Seed a fresh run, or take every state from ``checkpoint``."""
        if checkpoint is None:
            seed_everything(self.config.seed)
            self._reseed_rank()
            return
        meta = _load_train_state(checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        if meta.get("param_names") != self.param_names:
            raise UserError(f"{checkpoint}: the optimizer's parameters differ from this model's; use a new folder")
        self.epoch, self.step = meta["epoch"], meta["global_step"]
        # the position in global samples: the same global batches with any number of processes
        self.batch = meta.get("epoch_samples", meta["batch"] * self.config.batch_size) // self.config.batch_size
        self._reseed_rank()
        self.elapsed_before = meta["elapsed_s"]
        self.best, self.last_eval = meta.get("best"), meta.get("last_eval", {})
        self.last_train = meta.get("last_train", {})
        self.resumed_from_step = self.step

    def _reseed_rank(self) -> None:
        """Rank r > 0 draws from its own stream, a function of the seed, the step and r (rank 0 keeps the saved one)."""
        if self.rank > 0:
            seed_everything(_mix(self.config.seed, self.step, self.rank) % 2**32)

    def elapsed_total(self) -> float:
        """Seconds of training over every run that built this checkpoint."""
        return self.elapsed_before + time.perf_counter() - self.start

    def run(self) -> TrainSummary:
        """Train the remaining epochs (or until the time cap); return the summary."""
        if self.main:
            self.log = _MetricsLog(self.out_dir / METRICS_FILE, keep_up_to_step=self.resumed_from_step)
        else:
            self.log = _NoLog()
        if self.world > 1:
            self.forward = distributed.data_parallel(self.model, self.step_fn)
        try:
            self.model.train()
            while self.epoch < self.config.epochs and not self.stopped_early:
                self.run_epoch()
        finally:
            self.log.close()
        distributed.barrier()  # every file rank 0 writes is complete when any rank returns
        metrics = {**({"train/loss": self.last_train["loss"]} if self.last_train else {}), **self.last_eval}
        return TrainSummary(
            out_dir=self.out_dir,
            epochs_done=self.epoch,
            epochs=self.config.epochs,
            steps=self.step,
            minutes=(time.perf_counter() - self.start) / 60,
            total_minutes=self.elapsed_total() / 60,
            metrics=metrics,
            stopped_early=self.stopped_early,
            resumed_from_step=self.resumed_from_step,
            best=self.best,
        )

    def loader(self) -> DataLoader:
        """The rest of the current epoch: its fixed order, minus the batches already done."""
        c = self.config
        order = EpochOrder(len(self.train_data), seed=c.seed, epoch=self.epoch, skip=self.batch * c.batch_size)
        seed = _mix(c.seed, self.epoch, self.batch)
        if self.world > 1:  # this rank's block of every global batch; its workers draw their own numbers
            order = distributed.ShardedOrder(order, batch_size=c.batch_size, rank=self.rank, world_size=self.world)
            seed = _mix(c.seed, self.epoch, self.batch, self.rank)
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
            desc=f"epoch {self.epoch + 1}/{c.epochs}",
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
            over_time = time.perf_counter() - self.start > self.cap_s
            if self.world > 1 and self.cap_s < math.inf:
                over_time = distributed.any_rank(over_time)  # the ranks stop at the same step
            if self.batch == self.steps_per_epoch:
                # the epoch-end checkpoint below saves this step; stop after it unless it was the last
                self.stopped_early = over_time and self.epoch + 1 < c.epochs
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
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
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
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
        self.last_eval = distributed.broadcast_json(_evaluate(self.model, self.eval_fn) if self.main else None)
        elapsed = round(self.elapsed_total(), 3)
        self.log.write({"step": self.step, "epoch": self.epoch, "elapsed_s": elapsed, "eval": self.last_eval})
        if self.best_metric is not None and self.best_metric in self.last_eval:
            value = self.last_eval[self.best_metric]
            best = self.best
            if best is None or (value > best["value"] if self.higher_is_better else value < best["value"]):
                self.best = {"metric": self.best_metric, "value": value, "epoch": self.epoch, "step": self.step}

    def checkpoint(self, *, epoch_complete: bool) -> None:
        """Write a checkpoint of the current position (the protocol in the module docstring); rank 0 only."""
        if not self.main:
            distributed.barrier()
            return
        root = self.out_dir / CHECKPOINTS
        root.mkdir(exist_ok=True)
        tmp = root / f"tmp-{self.step:08d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with _rng_preserved():
            self.save_fn(self.model, tmp)
        clash = {STATE_JSON, STATE_TENSORS} & {p.name for p in tmp.iterdir()}
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
        _save_train_state(tmp, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, meta=meta)
        _fsync_tree(tmp)
        final = root / f"step-{self.step:08d}"
        n = 0
        while final.exists():  # a step saved before, e.g. by a run stopped at the cap right there
            n += 1
            final = root / f"step-{self.step:08d}.{n}"
        os.rename(tmp, final)
        _publish(self.out_dir, final)
        if self.on_checkpoint is not None:
            with _rng_preserved():
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
) -> TrainSummary:
    """Train ``model`` for ``config.epochs`` epochs, checkpointing into ``out_dir``; resume when possible.

    ``step_fn(model, batch)`` computes the loss of one batch (the loop does backward, clipping, the
    optimizer and schedule steps). ``save_fn(model, folder)`` writes the public model files
    (``model.safetensors`` + ``config.json`` + anything else needed to load the model).
    ``eval_fn(model)`` runs after every epoch (and at a time-cap stop) in eval mode under
    ``no_grad``. ``param_groups`` replaces the default AdamW groups (``param_groups_for``).
    ``run_identity`` is anything else that must match for a resume (model and data settings).
    ``best_metric`` names an eval result to track. ``on_checkpoint`` is called after each checkpoint.

    Started by torchrun with several processes, the run is data-parallel (module docstring):
    ``config.batch_size`` is then the global batch and must be a multiple of the process count.
    """
    config.validate()
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
    with _exclusive(out_dir) if main else contextlib.nullcontext():
        checkpoint = _check_out_dir(out_dir, identity, resume)
        if world > 1:  # every rank resumes from the checkpoint rank 0 resumes from
            step = json.loads((checkpoint / STATE_JSON).read_text())["global_step"] if checkpoint else None
            distributed.same_on_every_rank(step, f"checkpoints in {out_dir}")
        if main:
            _clean_leftovers(out_dir)
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
        )
        run.restore(checkpoint)
        return run.run()
