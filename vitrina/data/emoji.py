"""Emoji from npm ``emoji-datasource-<style>`` (64 px PNGs + ``emoji.json``) and ``emojibase-data``
(CLDR labels and keywords), as unpacked by scripts/setup_data.sh into ``<data>/emoji``:

    emoji/emoji.json   emoji/img/<style>/64/<image>.png   emoji/emojibase/data.json

The four drawing styles show the same ~1.9k concepts, which makes a held-out-style test natural.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from vitrina.atomic import atomic_write, atomic_write_text
from vitrina.data.paths import data_root
from vitrina.data.prompts import article
from vitrina.errors import UserError

EMOJI_STYLES = ("apple", "google", "twitter", "facebook")
SETUP_HINT = "run make setup (or bash scripts/setup_data.sh)"
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}


@dataclass(frozen=True)
class EmojiItem:
    """One emoji image: ``name`` from emoji.json (lower case), ``label`` and ``keywords`` from emojibase."""

    unified: str
    name: str
    category: str
    subcategory: str
    path: Path
    label: str | None = None
    keywords: tuple[str, ...] = ()


def default_root() -> Path:
    return data_root() / "emoji"


def _base_key(hexcode: str) -> str:
    # emoji-datasource writes fully-qualified sequences (with FE0F), emojibase often does not
    return "-".join(part for part in hexcode.upper().split("-") if part != "FE0F")


def _emojibase(root: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    path = root / "emojibase" / "data.json"
    if not path.is_file():
        return {}
    records = json.loads(path.read_text(encoding="utf-8"))
    return {_base_key(r["hexcode"]): (r.get("label") or "", tuple(r.get("tags") or ())) for r in records}


def _entry_name(entry: dict) -> str:
    name = entry.get("name") or entry.get("short_name") or entry["unified"]
    return " ".join(name.replace("-", " ").replace("_", " ").lower().split())


def _tones(code: str) -> str:
    return ", ".join(SKIN_TONES.get(part, part.lower()) for part in code.upper().split("-"))


def load_emoji(
    style: str, root: str | os.PathLike | None = None, *, include_skin_variations: bool = False
) -> list[EmojiItem]:
    """Every emoji drawn in ``style`` whose image file is present, in emoji.json order."""
    if style not in EMOJI_STYLES:
        raise UserError(f"unknown emoji style {style!r}; choose from {', '.join(EMOJI_STYLES)}")
    root = Path(root) if root is not None else default_root()
    meta = root / "emoji.json"
    if not meta.is_file():
        raise UserError(f"{meta}: emoji data not found; {SETUP_HINT}")
    images = root / "img" / style / "64"
    if not images.is_dir():
        raise UserError(f"{images}: emoji style {style!r} not fetched; {SETUP_HINT}")
    try:
        entries = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{meta}: not valid JSON ({error.msg}); delete it and {SETUP_HINT}") from None
    base = _emojibase(root)
    flag = f"has_img_{style}"
    items = []
    for entry in entries:
        name = _entry_name(entry)
        label, keywords = base.get(_base_key(entry["unified"]), (None, ()))
        common = {"category": entry.get("category") or "", "subcategory": entry.get("subcategory") or ""}
        if entry.get(flag) and (images / entry["image"]).is_file():
            path = images / entry["image"]
            items.append(EmojiItem(entry["unified"], name, path=path, label=label or None, keywords=keywords, **common))
        if not include_skin_variations:
            continue
        for code, variation in (entry.get("skin_variations") or {}).items():
            if variation.get(flag) and (images / variation["image"]).is_file():
                tones, path = _tones(code), images / variation["image"]
                tone_label = f"{label}: {tones}" if label else None
                items.append(
                    EmojiItem(
                        variation["unified"],
                        f"{name}, {tones}",
                        path=path,
                        label=tone_label,
                        keywords=keywords,
                        **common,
                    )
                )
    return items


def _with_article(words: str) -> str:
    chosen = article(words)
    return f"{chosen} {words}" if chosen else words


def emoji_caption(item: EmojiItem) -> str:
    """The training / index caption: "an emoji of a grinning face, smileys & emotion"."""
    return f"an emoji of {_with_article(item.label or item.name)}, {item.category.lower()}"


def emoji_captions(item: EmojiItem) -> list[str]:
    """Several phrasings (for training with caption variety); the last lists keywords the name lacks.

    The bare name and label are phrasings too: what a search box gets ("grinning face") is a short name,
    and the frozen text tower places "an emoji of a ..." captions close to each other (they share most
    words), so a model that never saw a bare name has to extrapolate to it.
    """
    what = item.label or item.name
    variants = [emoji_caption(item), item.name, what, f"{item.name} emoji", f"an emoji of {_with_article(item.name)}"]
    if item.subcategory:
        variants.append(f"{what}, an emoji from {item.subcategory.replace('-', ' ')}")
    named = set(f"{item.name} {what}".lower().split())
    extra = [k for k in item.keywords if k.lower() not in named]
    if extra:
        variants.append(f"an emoji of {_with_article(what)}: {', '.join(extra)}")
    return list(dict.fromkeys(variants))


def category_folder(category: str) -> str:
    """ "People & Body" -> "people_and_body" (scans back as the label "people and body")."""
    return "_".join(category.lower().replace("&", "and").split()) or "uncategorised"


def export_emoji(style: str, out: str | os.PathLike, *, root: str | os.PathLike | None = None) -> int:
    """Copy one style into ``out/<category>/<image>.png`` with a ``captions.jsonl``; returns the count.

    Files already there with the same size are kept; the captions file is written whole and renamed.
    """
    items = load_emoji(style, root)
    out = Path(out)
    records = []
    for item in items:
        rel = f"{category_folder(item.category)}/{item.path.name}"
        target = out / rel
        if not target.is_file() or target.stat().st_size != item.path.stat().st_size:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp, source=item.path: shutil.copyfile(source, tmp), durable=False)
        label = " ".join(item.category.lower().replace("&", "and").split())
        records.append({"image": rel, "caption": emoji_caption(item), "label": label})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "captions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(items)
