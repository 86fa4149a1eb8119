"""The ``--data`` spec: which offline sources make up a training set of image-caption pairs.

    emoji:STYLE[,STYLE...][:variants|:names]  emoji drawings (variants: one pair per caption phrasing;
                                         names: the bare emoji name as the caption)
    fashion-mnist:SPLIT[:N]              Fashion-MNIST, a stratified N images, prompt captions
    openclipart                          Open Clip Art with its metadata captions
    PATH/TO/FOLDER                       a collection (captions file, else prompts from folder labels)
    PATH/TO/PAIRS.jsonl | .csv           explicit image-caption pairs

Several sources join with ``+``: ``emoji:apple,google+fashion-mnist:train:6000``.

Every pair also has a *concept key* (``load_training_items``): what stays the same thing across
drawings and phrasings. ``emoji:<code point>`` (one emoji in every style), ``fashion-mnist:<class>``,
``label:<folder label>`` for a labelled folder, else the caption itself.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from vitrina.data import emoji as emoji_data
from vitrina.data import fashion_mnist as fm
from vitrina.data.captions import read_pairs
from vitrina.data.datasets import Caption, ImageSource
from vitrina.data.folder import scan_collection, stratified_fraction
from vitrina.data.openclipart import load_openclipart
from vitrina.data.paths import data_root as default_data_root
from vitrina.data.prompts import caption_from_label
from vitrina.data.splits import stratified_indices
from vitrina.errors import UserError

Pair = tuple[ImageSource, Caption]
VALID_FORMS = (
    "Valid forms: emoji:STYLE[,STYLE...][:variants|:names], fashion-mnist:train|test[:N], openclipart, "
    "a folder of images, or a .jsonl/.csv pairs file; join several with +"
)


Concept = str
# emoji:STYLES:<phrasing>: every phrasing of ``emoji_captions`` (one pair each), or the bare name alone
EMOJI_PHRASINGS = ("variants", "names")
EMOJI_CONCEPT, FASHION_CONCEPT, LABEL_CONCEPT = "emoji:", "fashion-mnist:", "label:"


def _emoji(options: list[str], root: Path) -> list[tuple[Pair, Concept]]:
    phrasing = options[-1] if options and options[-1] in EMOJI_PHRASINGS else "caption"
    styles_field = options[:-1] if phrasing != "caption" else options
    if len(styles_field) != 1 or not styles_field[0]:
        raise UserError(f"emoji needs at least one style: emoji:{','.join(emoji_data.EMOJI_STYLES[:2])}")
    pairs: list[tuple[Pair, Concept]] = []
    for style in styles_field[0].split(","):
        if style not in emoji_data.EMOJI_STYLES:
            raise UserError(f"unknown emoji style {style!r}; choose from {', '.join(emoji_data.EMOJI_STYLES)}")
        for item in emoji_data.load_emoji(style, root / "emoji"):
            if phrasing == "variants":
                captions = emoji_data.emoji_captions(item)
            elif phrasing == "names":
                captions = [item.name]
            else:
                captions = [emoji_data.emoji_caption(item)]
            pairs += [((item.path, caption), EMOJI_CONCEPT + item.unified) for caption in captions]
    return pairs


def _fashion(options: list[str], root: Path, seed: int) -> list[tuple[Pair, Concept]]:
    if not options or options[0] not in ("train", "test") or len(options) > 2:
        raise UserError(
            "fashion-mnist needs a split and an optional count: fashion-mnist:train[:N] or fashion-mnist:test[:N]"
        )
    folder = root / "fashion-mnist" if (root / "fashion-mnist").is_dir() else fm.DEFAULT_ROOT
    images, labels = fm.load_fashion_mnist(options[0], folder)  # type: ignore[arg-type]
    indices = np.arange(len(labels))
    if len(options) == 2:
        if not options[1].isdigit() or int(options[1]) < 1:
            raise UserError(f"fashion-mnist:{options[0]}:{options[1]}: N must be a positive whole number")
        if int(options[1]) < len(labels):
            indices = stratified_indices(labels, int(options[1]), seed)
    rng = random.Random(seed)
    names = fm.FASHION_MNIST_PROMPT_NAMES
    pairs = []
    for i in indices:
        name = names[labels[i]]
        pairs.append(((images[i], caption_from_label(name, rng)), FASHION_CONCEPT + name))
    return pairs


def _folder(path: Path, seed: int, fraction: float | None) -> list[tuple[Pair, Concept]]:
    entries = scan_collection(path)
    if fraction is not None:
        entries = stratified_fraction(entries, fraction, seed)
    rng = random.Random(seed)
    pairs = [
        ((e.path, e.caption or caption_from_label(e.label, rng)), LABEL_CONCEPT + e.label if e.label else e.caption)
        for e in entries
        if e.caption or e.label
    ]
    if not pairs:
        raise UserError(
            f"{path}: no image has a caption or a class folder; add a captions.jsonl or sort images into folders"
        )
    return pairs


def load_training_pairs(
    spec: str, *, data_root: str | os.PathLike | None = None, seed: int = 0, fraction: float | None = None
) -> list[Pair]:
    """The image-caption pairs ``spec`` names, in spec order; seeded wherever something is drawn.

    ``fraction``: a stratified share of each folder source (the course's 20-50% of Caltech-256).
    """
    return load_training_items(spec, data_root=data_root, seed=seed, fraction=fraction)[0]


def load_training_items(
    spec: str, *, data_root: str | os.PathLike | None = None, seed: int = 0, fraction: float | None = None
) -> tuple[list[Pair], list[Concept]]:
    """``load_training_pairs`` and the concept key of every pair (module docstring)."""
    root = Path(data_root) if data_root is not None else default_data_root()
    pairs: list[tuple[Pair, Concept]] = []
    for part in spec.split("+"):
        name, *options = part.strip().split(":")
        if name == "emoji":
            pairs += _emoji(options, root)
        elif name == "fashion-mnist":
            pairs += _fashion(options, root, seed)
        elif name == "openclipart":
            if options:
                raise UserError(f"{part!r}: openclipart takes no options; write just openclipart")
            pairs += [((e.path, e.caption), e.caption) for e in load_openclipart() if e.caption]
        elif Path(part).suffix.lower() in (".jsonl", ".csv"):
            if not Path(part).is_file():
                raise UserError(f"{part}: no such file; give the path of an existing .jsonl or .csv pairs file")
            for p in read_pairs(part):
                pairs.append(((p.path, p.caption), LABEL_CONCEPT + p.label if p.label else p.caption))
        elif Path(part).is_dir():
            pairs += _folder(Path(part), seed, fraction)
        else:
            raise UserError(f"--data {part!r}: not a known source, folder or pairs file. {VALID_FORMS}")
    return [pair for pair, _ in pairs], [concept for _, concept in pairs]
