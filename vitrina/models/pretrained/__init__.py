"""Pretrained models of other libraries behind our ``Encoder``: which reference names which backend.

Name forms (``vitrina index/search/classify --model REF``, ``vitrina.checkpoint.load_encoder(REF)``):

* ``hf:openai/clip-vit-base-patch32`` - a Hugging Face ``CLIPModel`` repo, from the Hugging Face
  cache (``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``) or, where one is reachable, the hub;
* ``hf:DIR`` or plain ``DIR`` - a folder written by ``CLIPModel.save_pretrained`` (its ``config.json``
  says ``"model_type": "clip"``) plus the tokenizer (``CLIPProcessor.save_pretrained`` into the same DIR);
* ``open_clip:ViT-B-32/laion2b_s34b_b79k`` - an open_clip model name and pretrained tag (weights in the
  Hugging Face cache); ``open_clip:ViT-B-32/PATH`` - that model with a local checkpoint file;
  ``open_clip:DIR`` or plain ``DIR`` - a folder with ``open_clip_config.json`` and its weights file;
* ``timm:vit_small_patch16_224`` - a timm image model (Hugging Face cache); ``timm:NAME/FILE`` -
  that architecture with a local ``model.safetensors``; ``timm:DIR`` - a folder with ``config.json`` +
  ``model.safetensors`` as ``timm.models.save_for_hf`` writes it. An image-only encoder: it serves
  image -> image search, not text queries.

Where the layout maps cleanly, the weights are copied into OUR classes: a CLIP (HF or open_clip
ViT + causal text transformer) becomes ``vitrina.models.clip.CLIP`` - with the checkpoint's own BPE
tokenizer - so it can be saved with ``vitrina.checkpoint.save_model`` and fine-tuned or distilled
from; a timm ``VisionTransformer`` becomes our ``ViT``. Anything else is wrapped behind the same
interface (``encoders.WrappedEncoder``). Every encoder's ``identity["digest"]`` names its weights:
the sha256 of the file(s) they were read from, else of the tensors. Offline (the CLI sets
``HF_HUB_OFFLINE=1``) a name that is not cached is a ``UserError`` saying where to put a local copy.

The package, one job a module (each imports only those above it)::

    hub       offline mode, the HF cache and snapshots, weights files and their digest, advice
    mapping   timm ViT -> our ViT, activation names, OpenAI image statistics
    encoders  WrappedEncoder (identity, transform, normalisation) and its kinds: image-only, open_clip
    hf        Hugging Face CLIPModel -> our CLIP
    timm      timm image models -> our ViT, or wrapped
    openclip  open_clip models -> our CLIP, or wrapped
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vitrina.encoder import Encoder
from vitrina.errors import UserError
from vitrina.models.pretrained.encoders import ImageOnlyEncoder, OpenCLIPEncoder, WrappedEncoder
from vitrina.models.pretrained.hf import load_hf
from vitrina.models.pretrained.hub import hub_cache
from vitrina.models.pretrained.mapping import vit_config_from_timm, vit_state_dict_from_timm
from vitrina.models.pretrained.openclip import load_open_clip
from vitrina.models.pretrained.timm import load_timm

PREFIXES = ("hf:", "open_clip:", "timm:")


def folder_backend(path: Path) -> str | None:
    """``"hf"``, ``"open_clip"`` or ``"timm"`` for a folder of another library's model; None for ours/others."""
    if not path.is_dir():
        return None
    if (path / "open_clip_config.json").is_file():
        return "open_clip"
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # not ours to judge: the vitrina checkpoint reader reports a damaged file
    if not isinstance(config, dict):
        return None
    if config.get("model_type") == "clip":
        return "hf"
    if "architecture" in config and "kind" not in config:
        return "timm"
    return None


def is_pretrained_ref(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names a pretrained backend (a prefix, or a folder of HF / open_clip / timm files)."""
    return str(ref).startswith(PREFIXES) or folder_backend(Path(ref)) is not None


def load_pretrained(ref: str | os.PathLike) -> Encoder:
    """The ``Encoder`` for a pretrained reference (see the module docstring for the name forms)."""
    ref = str(ref)
    backend, _, rest = ref.partition(":") if ref.startswith(PREFIXES) else ("", "", ref)
    if not backend:
        backend = folder_backend(Path(ref)) or ""
    if backend == "hf":
        return load_hf(rest, ref=ref)
    if backend == "open_clip":
        return load_open_clip(rest, ref=ref)
    if backend == "timm":
        return load_timm(rest, ref=ref)
    raise UserError(f"{ref}: not a pretrained model reference; use hf:NAME, open_clip:NAME/TAG or timm:NAME")


__all__ = [
    "PREFIXES",
    "ImageOnlyEncoder",
    "OpenCLIPEncoder",
    "WrappedEncoder",
    "folder_backend",
    "hub_cache",
    "is_pretrained_ref",
    "load_hf",
    "load_open_clip",
    "load_pretrained",
    "load_timm",
    "vit_config_from_timm",
    "vit_state_dict_from_timm",
]
