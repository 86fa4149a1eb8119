"""The training loop's checkpoints: where they live, how they are written so a kill never leaves a
half one, what a train state holds, and which folder a run may resume from.

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

Writing the checkpoint of step ``s`` (``write_checkpoint``):

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
whole state dict (``model/<name>``, frozen weights too), the optimizer tensors
(``optim/<param index>/<key>``) and any extra tensors of the loop (``ema/<name>``: the weight
average); ``train_state.json`` holds the position (epoch, batch, step), the elapsed seconds, the
RNG states as lists, the optimizer's scalar settings, the best metric, the last evaluation and the
config. Nothing is pickled.

Resume: when ``out_dir`` holds a checkpoint whose run identity (the ``TrainConfig`` fields that
decide the numbers, the data size, and the caller's ``run_identity``) equals this run's, training
continues from it. A different identity, or ``resume=False``, is a ``UserError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vitrina.checkpoint import BEST_FOLDER
from vitrina.config import to_dict
from vitrina.errors import UserError
from vitrina.train.schedule import rng_state, set_rng_state

CHECKPOINTS = "checkpoints"
CURRENT = "current"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
STATE_FORMAT = 1


# --- finding and publishing -----------------------------------------------------------------


def find_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The current complete checkpoint folder inside ``out_dir``, or None when there is none."""
    current = Path(out_dir) / CHECKPOINTS / CURRENT
    if not current.is_symlink():
        return None
    target = current.parent / os.readlink(current)
    return target if (target / STATE_JSON).is_file() else None


def read_train_meta(checkpoint: Path) -> dict[str, Any]:
    """The JSON half of a checkpoint folder's training state: epoch, step, config, identity, best..."""
    return json.loads((checkpoint / STATE_JSON).read_text())


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


def clean_leftovers(out_dir: Path) -> None:
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


def write_checkpoint(out_dir: Path, step: int, fill: Callable[[Path], None]) -> Path:
    """The whole protocol for the checkpoint of ``step``: ``fill(folder)`` writes its files; returns
    the published ``step-*`` folder."""
    root = out_dir / CHECKPOINTS
    root.mkdir(exist_ok=True)
    tmp = root / f"tmp-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    fill(tmp)
    _fsync_tree(tmp)
    final = root / f"step-{step:08d}"
    n = 0
    while final.exists():  # a step saved before, e.g. by a run stopped at the cap right there
        n += 1
        final = root / f"step-{step:08d}.{n}"
    os.rename(tmp, final)
    _publish(out_dir, final)
    return final


# --- the train state ------------------------------------------------------------------------


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of the optimizer's parameters, group by group: a resume checks they still match."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, frozen weights included: a resumed run must not depend on the caller
    rebuilding frozen (e.g. randomly initialised, locked) weights exactly as before."""
    # clone: safetensors refuses tensors that share memory (tied weights, views)
    return {n: t.detach().clone().contiguous() for n, t in model.state_dict().items()}


def save_train_state(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``train_state.safetensors`` + ``train_state.json`` (with the RNG states) into ``folder``.

    ``extra_tensors`` are stored under their own names, which must start with a prefix other than
    ``model/`` and ``optim/`` (e.g. ``ema/``).
    """
    tensors = {f"model/{n}": t for n, t in _model_tensors(model).items()}
    optim_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optim_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors.update({k: t.detach().clone().contiguous() for k, t in (extra_tensors or {}).items()})
    save_file(tensors, str(folder / STATE_TENSORS))
    meta = {
        **meta,
        "optimizer": {"param_groups": to_dict(optim_state["param_groups"]), "scalars": scalars},
        "rng": rng_state(),
    }
    (folder / STATE_JSON).write_text(json.dumps(meta, indent=1))


def load_train_state(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load the model, optimizer and RNG states saved in ``folder``; return the JSON and the extra tensors."""
    meta = read_train_meta(folder)
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
    extra: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
        elif not key.startswith("model/"):
            extra[key] = value
    for index, values in meta["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    set_rng_state(meta["rng"])
    return meta, extra


# --- may this run write here? ---------------------------------------------------------------


def _identity_diff(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _identity_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def check_out_dir(out_dir: Path, identity: dict[str, Any], resume: bool) -> Path | None:
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
    meta = read_train_meta(checkpoint)
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


@contextlib.contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
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


# --- the best model of a run, beside its last checkpoint ------------------------------------------


class BestKeeper:
    """Keeps ``out_dir/best``: the model of the best ``metric`` value evaluated so far (higher is better).

    The evaluation only notes a new best; the folder is written after the loop's checkpoint of the
    same step (``on_checkpoint``), so a kill never leaves a ``best`` beside no checkpoint. The value
    to beat survives a resume: it is read back from ``best/config.json``.
    """

    def __init__(
        self, model: nn.Module, out_dir: Path, metric: str, save: Callable[[nn.Module, Path, dict], None]
    ) -> None:
        self.model, self.folder, self.metric, self.save = model, out_dir / BEST_FOLDER, metric, save
        self.value = self._saved_value()
        self.pending: dict[str, Any] | None = None

    def _saved_value(self) -> float | None:
        config = self.folder / "config.json"
        if not config.is_file():
            return None
        best = json.loads(config.read_text()).get("best") or {}
        return best.get("value") if best.get("metric") == self.metric else None

    def note(self, results: dict[str, float]) -> None:
        """After an evaluation: remember it when ``metric`` beats the best so far."""
        value = results.get(self.metric)
        if value is not None and (self.value is None or value > self.value):
            self.value, self.pending = value, {"metric": self.metric, "value": value}

    def on_checkpoint(self, info) -> None:
        """Write the pending best (the model as it is at this checkpoint) beside, then swap it in;
        ``info``: the loop's ``CheckpointInfo`` of that checkpoint."""
        if self.pending is None:
            return
        record = {**self.pending, "epoch": info.epoch, "step": info.step}
        staged = self.folder.with_name(f"{BEST_FOLDER}.tmp")
        old = self.folder.with_name(f"{BEST_FOLDER}.old")
        for leftover in (staged, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        self.save(self.model, staged, record)
        if self.folder.exists():
            os.rename(self.folder, old)
        os.rename(staged, self.folder)
        shutil.rmtree(old, ignore_errors=True)
        self.pending = None
