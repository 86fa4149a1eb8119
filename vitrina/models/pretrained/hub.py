"""Where pretrained weights come from: offline mode, the Hugging Face cache and its snapshots, reading a
weights file, the digest that names the files, and the advice a user gets when a copy is missing.

Every backend of this package (``hf``, ``timm``, ``openclip``) builds on it; it imports none of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from vitrina.errors import UserError


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the network (the CLI sets it): only cached copies load."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (tests and users may move it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def read_json(path: Path) -> dict:
    """A JSON object from a model folder; ``UserError`` naming the file when it is damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e}); re-save the model folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; re-save the model folder")
    return data


# --- what to do when a copy is missing ----------------------------------------------------------


def hf_advice(name: str) -> str:
    """How to make hub repo ``name`` (a ``CLIPModel``) available offline."""
    return (
        f"download it elsewhere with `CLIPModel.from_pretrained('{name}').save_pretrained(DIR)` and "
        f"`CLIPProcessor.from_pretrained('{name}').save_pretrained(DIR)` and pass the folder DIR, "
        f"or put it in the Hugging Face cache at {hub_cache()}"
    )


def open_clip_advice(model_name: str, tag: str) -> str:
    """How to make open_clip's ``model_name`` with pretrained ``tag`` available offline."""
    return (
        f"download it elsewhere with `open_clip.create_model('{model_name}', pretrained='{tag}', "
        f"cache_dir=DIR)` and copy DIR to the Hugging Face cache at {hub_cache()}, or pass a local weights file "
        f"as open_clip:{model_name}/PATH"
    )


def timm_advice(name: str) -> str:
    """How to make timm's pretrained ``name`` available offline."""
    return (
        f"download it elsewhere with `timm.models.save_for_hf(timm.create_model('{name}', pretrained=True), DIR, "
        f"safe_serialization=True)` and pass timm:DIR, or put it in the Hugging Face cache at {hub_cache()}"
    )


# --- hub snapshots and weights files ------------------------------------------------------------


def hf_snapshot(name: str) -> Path:
    """The local folder of hub repo ``name``: the cached snapshot, downloaded first when online."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors"]
    try:
        folder = Path(
            snapshot_download(name, cache_dir=hub_cache(), allow_patterns=patterns, local_files_only=offline())
        )
        if not list(folder.glob("*.safetensors")):  # older repos: the weights only as a (weights-only) torch file
            folder = Path(
                snapshot_download(
                    name, cache_dir=hub_cache(), allow_patterns=["pytorch_model.bin"], local_files_only=offline()
                )
            )
    except Exception as e:  # huggingface_hub raises many types (offline, missing repo, network): all the user's
        if offline():
            raise UserError(f"hf:{name} is not available offline; {hf_advice(name)}") from None
        raise UserError(f"hf:{name} could not be loaded ({type(e).__name__}: {e}); {hf_advice(name)}") from None
    return folder


def read_weights(path: Path) -> dict:
    """Tensors by name from safetensors, or from a torch file read with ``weights_only`` (no code runs)."""
    import torch
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # both libraries raise their own types for damaged files
        raise UserError(f"{path}: cannot read the weights ({e}); re-download the model") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def first_file(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` that is a file in ``folder`` (a library's order of preference), else None."""
    return next((folder / name for name in names if (folder / name).is_file()), None)


def weights_digest(files: Sequence[Path]) -> str:
    """The digest that names weights read from ``files``: one file's sha256, or ``files_sha256`` of shards."""
    from vitrina.digest import file_sha256, files_sha256

    if not files:
        raise ValueError("no weights files to digest")
    return file_sha256(files[0]) if len(files) == 1 else files_sha256(files)
