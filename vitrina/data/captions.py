"""Image-caption pairs from a JSONL or CSV file.

JSONL: one object per line with the image under ``image``, ``path`` or ``file`` and the text under
``caption`` or ``text`` (optionally ``label``). CSV: a header row naming the same columns. Relative
image paths are relative to the file's folder. Any bad line is reported as ``FILE:LINE: what``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vitrina.errors import UserError

IMAGE_KEYS = ("image", "path", "file")
CAPTION_KEYS = ("caption", "text")


@dataclass(frozen=True)
class CaptionPair:
    path: Path
    caption: str
    label: str | None = None


def normalise_text(text: str) -> str:
    """Whitespace runs become one space; ends trimmed."""
    return " ".join(text.split())


def _pick(record: dict, keys: tuple[str, ...]) -> object:
    return next((record[k] for k in keys if k in record), None)


def _pair(record: dict, base: Path, where: str) -> CaptionPair:
    image, caption, label = _pick(record, IMAGE_KEYS), _pick(record, CAPTION_KEYS), record.get("label")
    if not isinstance(image, str) or not image.strip():
        raise UserError(f"{where}: no image path; give it under one of {', '.join(IMAGE_KEYS)}")
    if not isinstance(caption, str) or not caption.strip():
        raise UserError(f"{where}: missing or empty caption; give it under one of {', '.join(CAPTION_KEYS)}")
    if label is not None and not isinstance(label, str):
        raise UserError(f"{where}: label must be a string, got {type(label).__name__}")
    path = Path(os.path.normpath(base / image.strip()))  # an absolute image path stays as it is
    return CaptionPair(path, normalise_text(caption), normalise_text(label) if label else None)


def _read_jsonl(path: Path) -> list[CaptionPair]:
    pairs = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where}: not valid JSON ({error.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
            pairs.append(_pair(record, path.parent, where))
    return pairs


def _read_csv(path: Path) -> list[CaptionPair]:
    pairs = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if not set(header) & set(IMAGE_KEYS) or not set(header) & set(CAPTION_KEYS):
            raise UserError(
                f"{path}:1: the header must name an image column ({', '.join(IMAGE_KEYS)}) "
                f"and a caption column ({', '.join(CAPTION_KEYS)}); got {', '.join(header) or 'nothing'}"
            )
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise UserError(f"{where}: {len(row)} fields, the header has {len(header)}; quote captions with commas")
            pairs.append(_pair(dict(zip(header, row, strict=True)), path.parent, where))
    return pairs


def read_pairs(path: str | os.PathLike) -> list[CaptionPair]:
    """The pairs in a ``.jsonl`` or ``.csv`` file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise UserError(f"{path}: captions must be in a .jsonl or .csv file")
    if not path.is_file():
        raise UserError(f"{path}: captions file not found")
    try:
        return _read_jsonl(path) if suffix == ".jsonl" else _read_csv(path)
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason}); save it as UTF-8") from None
