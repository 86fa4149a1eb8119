"""Training settings, and the JSON helpers every config dataclass in vitrina uses.

Configs are plain dataclasses. ``to_dict``/``from_dict`` (and the ``to_json``/``from_json``,
``save_json``/``load_json`` wrappers) turn any of them into JSON and back, nested dataclasses,
tuples and optional fields included, so a config written beside the weights reads back into the
same object. An unknown or badly typed field in a file is a ``UserError`` that names the field.
"""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from vitrina.errors import UserError

T = TypeVar("T")


PRECISIONS = ("fp32", "bf16", "bf16-stem")
# what a CLIP training image is contrasted with (ClipTrainSettings.negatives): its batch, every training caption,
# or auto (the captions where the run can have them)
NEGATIVES = ("batch", "captions", "auto")


@dataclass
class TrainConfig:
    """How to train: optimisation, schedule, seeding, logging and limits.

    Warm-up is ``warmup_steps`` when given, else ``warmup_fraction`` of all steps; the learning rate
    then follows a cosine from ``lr`` down to ``lr * min_lr_ratio``. With ``budget_minutes`` the
    schedule runs over wall-clock time instead: warm-up for ``warmup_seconds`` (or
    ``warmup_fraction`` of the budget), the cosine's floor reached when the budget is spent, which
    ends the run (``epochs`` is then only an upper bound). ``max_minutes`` stops one invocation
    cleanly after the step that crosses it (a checkpoint is still written; the next run with the
    same ``out_dir`` resumes from there). ``checkpoint_every_steps`` adds checkpoints inside an
    epoch, on top of the one written at every epoch end. ``ema_decay`` keeps a moving average of the
    weights that is evaluated and saved as the model (``vitrina.train.ema``).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int | None = None
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip_norm: float | None = 1.0
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    max_minutes: float | None = None
    budget_minutes: float | None = None
    warmup_seconds: float | None = None
    ema_decay: float | None = None
    checkpoint_every_steps: int | None = None
    val_fraction: float = 0.1
    # "bf16" runs the forward pass (and the loss) under CPU autocast to bfloat16: the weights, their
    # gradients and the optimizer stay float32. On CPUs with AVX-512 BF16 convolutions run ~1.8x faster, and
    # since short attention skips the fused kernel in bf16 (``vitrina.models.vit.attend``) the small ViTs'
    # training steps ~1.4-1.7x (BENCHMARKS.md, train_step). "bf16-stem" puts only a hybrid ViT's convolutional
    # stem under autocast (``vitrina.models.hybrid.stems_in_bf16``), its transformer in float32: the fastest
    # setting while the fused kernel made bf16 attention slow, now behind "bf16". Evaluation always runs in float32.
    precision: str = "fp32"

    # Fields that change how a run is carried out but not what it computes: a run may be resumed
    # with other values for these (e.g. a new time cap). ``num_workers`` is here because it is a
    # machine setting; note that data augmentation draws differ with another worker count.
    RESUMABLE_CHANGES: typing.ClassVar[frozenset[str]] = frozenset(
        {"num_workers", "log_every", "max_minutes", "checkpoint_every_steps"}
    )

    def validate(self) -> None:
        """Raise ``UserError`` naming the first setting that cannot work."""
        checks = [
            (self.epochs >= 1, "epochs", "must be at least 1"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.lr > 0, "lr", "must be positive"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]"),
            (self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm", "must be positive"),
            (self.num_workers >= 0, "num_workers", "must be >= 0"),
            (self.log_every >= 1, "log_every", "must be at least 1"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be positive"),
            (self.budget_minutes is None or self.budget_minutes > 0, "budget_minutes", "must be positive"),
            (
                self.warmup_seconds is None
                or (self.budget_minutes is not None and 0 <= self.warmup_seconds < self.budget_minutes * 60),
                "warmup_seconds",
                "needs a time budget (budget_minutes) and must be in [0, the budget's seconds)",
            ),
            (
                self.budget_minutes is None or self.warmup_steps is None,
                "warmup_steps",
                "counts steps; a time budget warms up for warmup_seconds or warmup_fraction of it",
            ),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1), e.g. 0.999"),
            (
                self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
                "checkpoint_every_steps",
                "must be at least 1",
            ),
            (0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)"),
            (self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise UserError(f"training setting {name}={getattr(self, name)!r} {why}")

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide the numbers a run computes (what a resumed run must share)."""
        settings = {k: v for k, v in to_dict(self).items() if k not in self.RESUMABLE_CHANGES}
        if settings["precision"] == "fp32":
            del settings["precision"]  # runs saved before the field existed were fp32: they still resume
        return settings


# --- JSON helpers ---------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """A dataclass (nested ones too) -> JSON-ready dict; tuples become lists, paths strings."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def non_default_dict(obj: Any) -> Any:
    """``to_dict`` without the fields that hold their default value, at every level.

    Hashing this instead of the full dict keeps an identity stable when a later version adds a
    field with a default that keeps the old behaviour.
    """
    if not is_dataclass(obj):
        return to_dict(obj)
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        if default is MISSING or to_dict(value) != to_dict(default):
            out[f.name] = non_default_dict(value)
    return out


def from_dict(cls: type[T], data: Any, *, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data`` (as ``to_dict`` wrote it); missing fields take defaults.

    ``where`` names the source (a file) in error messages.
    """
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(
            f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
            f"valid fields: {', '.join(sorted(known))}"
        )
    kwargs = {name: _convert(hints[name], value, f"{where}: {name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Turn a JSON value back into the type ``hint`` names (dataclasses, tuples, optionals)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except UserError:
                continue
        raise UserError(f"{where}: {value!r} is not a valid {hint}")
    if is_dataclass(hint):
        return from_dict(hint, value, where=where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        if args and len(args) != len(value):
            raise UserError(f"{where}: expected {len(args)} values, got {len(value)}")
        if not args:
            return tuple(value)
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(hint) or (Any,)
        return [_convert(arg, v, where) for v in value]
    if origin is dict or hint is Any or origin is typing.Literal:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int or hint is bool or hint is str:
        if type(value) is not hint:
            raise UserError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    if hint is Path:
        return Path(value)
    return value


def to_json(obj: Any) -> str:
    """A dataclass -> indented JSON text (keys in field order)."""
    return json.dumps(to_dict(obj), indent=2) + "\n"


def from_json(cls: type[T], text: str, *, where: str = "config") -> T:
    """JSON text -> dataclass ``cls``; malformed JSON is a ``UserError`` naming ``where``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e}); fix or delete the file") from None
    return from_dict(cls, data, where=where)


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write a dataclass as JSON; the file is replaced atomically (temp file + rename)."""
    from vitrina.atomic import atomic_write_text

    atomic_write_text(path, to_json(obj))


def load_json(cls: type[T], path: str | os.PathLike) -> T:
    """Read a dataclass written by ``save_json``; a missing file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    return from_json(cls, path.read_text(), where=str(path))
