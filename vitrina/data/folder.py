"""A collection on disk: image files in class folders (Caltech-256, ImageFolder) and, optionally,
a ``captions.jsonl`` / ``captions.csv`` at its root; plus the seeded, per-class stratified subset."""

from __future__ import annotations

import math
import os
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

from vitrina.data.captions import read_pairs
from vitrina.data.images import is_image_path
from vitrina.errors import UserError

CAPTION_FILES = ("captions.jsonl", "captions.csv")


@dataclass(frozen=True)
class CollectionEntry:
    """One image of a collection: its path, class label (its folder's name) and caption, if any."""

    path: Path
    label: str | None = None
    caption: str | None = None


def clean_class_name(dirname: str) -> str:
    """A folder name as a class label: ``022.buddha-101`` -> ``buddha``, ``062.eiffel-tower`` ->
    ``eiffel tower``, ``ankle_boot`` -> ``ankle boot``; ``t-shirt`` and ``ak47`` stay as they are."""
    name = re.sub(r"^\d+\.", "", dirname.strip())  # Caltech's "NNN." class number
    name = re.sub(r"-101$", "", name)  # Caltech-256 marks the classes it shares with Caltech-101
    name = name.replace("_", " ")
    name = re.sub(r"(?<=\w\w)-(?=\w\w)", " ", name)  # word-word -> two words; t-shirt, x-ray stay
    return " ".join(name.lower().split())


def _caption_table(root: Path) -> dict[Path, tuple[str, str | None]]:
    for name in CAPTION_FILES:
        if (root / name).is_file():
            return {pair.path: (pair.caption, pair.label) for pair in read_pairs(root / name)}
    return {}


def scan_collection(root: str | os.PathLike) -> list[CollectionEntry]:
    """Every image under ``root`` (hidden files and folders skipped), sorted by relative path.

    A file's label is its folder's cleaned name (None at the root); a captions file at the root may
    give captions and labels.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; give the folder that holds the images")
    captions = _caption_table(root)
    found: list[tuple[str, Path, str | None]] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(folder)
        # Once per folder, not per file: a folder of thousands of images shares its label and prefix.
        prefix = base.relative_to(root).as_posix()
        label = None if prefix == "." else clean_class_name(base.name)
        for name in files:
            if not name.startswith(".") and is_image_path(name):
                found.append((name if prefix == "." else f"{prefix}/{name}", base / name, label))
    found.sort(key=lambda item: item[0])
    if not captions:
        return [CollectionEntry(path, label) for _, path, label in found]
    entries = []
    for _, path, label in found:
        caption, given_label = captions.get(Path(os.path.normpath(path)), (None, None))
        entries.append(CollectionEntry(path, given_label or label, caption))
    return entries


def _check_fraction(fraction: object) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0 < fraction <= 1:
        raise UserError(f"fraction must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def stratified_fraction(entries: Sequence[CollectionEntry], fraction: float, seed: int) -> list[CollectionEntry]:
    """A seeded random ``fraction`` of every class: round(fraction x n) images, at least one.

    A class's pick depends only on (seed, class, its files), not on listing order or on the other
    classes, so the same images are chosen whatever else the folder holds. Sorted by path.
    """
    fraction = _check_fraction(fraction)
    by_class: dict[str | None, list[CollectionEntry]] = defaultdict(list)
    for entry in entries:
        by_class[entry.label].append(entry)
    picked: list[CollectionEntry] = []
    for label, members in by_class.items():
        members.sort(key=lambda e: str(e.path))
        keep = max(1, math.floor(fraction * len(members) + 0.5))
        picked += random.Random(f"{seed}/{label}").sample(members, keep)
    return sorted(picked, key=lambda e: str(e.path))
