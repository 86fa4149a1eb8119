"""The exported towers of one index version: the folder's layout and its manifest.

``INDEX/versions/<N>/towers/`` holds, as the writer publishes them (each file atomically, the manifest last):

* ``text.onnx`` (+ ``text.onnx.data``, its weights): token ids + attention mask (B, L) int64 -> (B, D) unit vectors;
* ``image.onnx`` (+ ``image.onnx.data``): pixels (B, 3, H, W) float32 -> (B, D) unit vectors;
* ``tokenizer.json``: the ``tokenizers`` tokenizer, padding and truncation included, that gives the PyTorch
  path's token ids;
* ``towers.json``: the manifest. Per tower a ``status``: ``ok`` (use it), ``rejected`` (exported, but its
  outputs differed from the PyTorch tower's by more than the tolerance) or ``unavailable`` (this kind of
  model cannot be exported), with the ``reason`` and the measured ``max_abs_diff``; the weights ``digest``
  of the version the towers were exported from, ``embed_dim``, the preprocessing and tokenizer settings,
  the opset and the library versions.

The graphs are saved after ONNX Runtime's portable ("extended") graph optimisations, so a query does not
pay for them again; the weights sit beside each graph so that loading them is a plain read.
"""

from __future__ import annotations

import json
from pathlib import Path

TOWERS_DIR = "towers"
MANIFEST = "towers.json"
TOKENIZER_FILE = "tokenizer.json"
TOWER_FILES = {"text": "text.onnx", "image": "image.onnx"}
DATA_SUFFIX = ".data"  # a graph's weights file: text.onnx -> text.onnx.data
FORMAT = 1
OK, REJECTED, UNAVAILABLE = "ok", "rejected", "unavailable"


class TowersUnavailable(Exception):
    """A tower cannot answer this query here; ``reason`` says why (the caller falls back to PyTorch)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def towers_dir(version_dir: str | Path) -> Path:
    """The towers folder inside a version's folder (``vitrina.index.ann.version_dir``)."""
    return Path(version_dir) / TOWERS_DIR


def read_manifest(folder: str | Path) -> dict | None:
    """The ``towers.json`` in ``folder`` (a towers folder), or None when there is none of this format."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return manifest


def is_current(manifest: dict | None, digest: str | None) -> bool:
    """Whether ``manifest`` describes towers exported from the weights ``digest`` (None: never)."""
    return manifest is not None and digest is not None and manifest.get("digest") == digest


def tower_status(manifest: dict | None, tower: str) -> tuple[str, str]:
    """(status, reason) of ``tower`` ("text" or "image") in ``manifest``."""
    entry = (manifest or {}).get(tower)
    if not isinstance(entry, dict):
        return UNAVAILABLE, "no towers exported for this version"
    return str(entry.get("status", UNAVAILABLE)), str(entry.get("reason", ""))


def towers_summary(folder: str | Path, digest: str | None) -> str:
    """A few words for ``vitrina versions``: which towers a query can use (``text+image``, ``text``, ``none``)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "none"
    if not is_current(manifest, digest):
        return "stale"
    usable = [tower for tower in TOWER_FILES if tower_status(manifest, tower)[0] == OK]
    rejected = [tower for tower in TOWER_FILES if tower_status(manifest, tower)[0] == REJECTED]
    text = "+".join(usable) or "none"
    return f"{text} ({', '.join(rejected)} rejected)" if rejected else text
