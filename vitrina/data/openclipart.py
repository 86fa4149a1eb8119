"""Open Clip Art (Debian ``openclipart-png`` + ``openclipart-svg``): PNGs with web-style captions
built from each SVG's RDF metadata (title, keywords, description) and its category folders.

The metadata are noisy alt text: titles such as "gramastar" or "Part of the Flat Icon Collection …"
name an author or a batch, not the picture. Such titles are dropped (a title shared by many files
says nothing about any one of them) and the file name stands in; the folders add context.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from vitrina.data.captions import normalise_text
from vitrina.data.folder import CollectionEntry, clean_class_name
from vitrina.errors import UserError

DEFAULT_ROOT = Path("/usr/share/openclipart")
INSTALL_HINT = "install it with: sudo apt-get install openclipart-png openclipart-svg (or run make setup)"
MAX_SHARED_TITLE = 20  # a title on more files than this names a batch or an author, not a picture
MAX_DESCRIPTION = 200
NOISE_KEYWORDS = frozenset({"hash", "unsorted", "clip art", "clipart", "svg", "png", "image", "media", "public domain"})
_JUNK_TITLES = (
    re.compile(r"part of the .* collection", re.I),
    re.compile(r"\bsvg theme\b", re.I),
    re.compile(r"^(untitled|image|drawing|clipart|clip art)\s*\d*$", re.I),
)

DC = "{http://purl.org/dc/elements/1.1/}"
RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"


@dataclass(frozen=True)
class SvgMetadata:
    title: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()


def _text(element) -> str:
    return normalise_text("".join(element.itertext())) if element is not None else ""


def read_svg_metadata(path: str | os.PathLike) -> SvgMetadata:
    """Title, description and keywords of the work described in an SVG's RDF block.

    Parsed with defusedxml: entity declarations (billion-laughs shapes) and external references
    are refused, and such a file, like an unparsable one, gives empty metadata.
    """
    try:
        root = fromstring(Path(path).read_bytes())
    except (OSError, DefusedXmlException, SyntaxError, ValueError):
        return SvgMetadata()
    work = next((e for e in root.iter() if isinstance(e.tag, str) and e.tag.endswith("}Work")), None)
    if work is None:
        return SvgMetadata()
    subject = work.find(f"{DC}subject")
    keywords = () if subject is None else tuple(k for k in (_text(li) for li in subject.iter(f"{RDF}li")) if k)
    return SvgMetadata(_text(work.find(f"{DC}title")), _text(work.find(f"{DC}description")), keywords)


def clean_title(title: str, shared_by: int = 1) -> str:
    """A title fit for a caption, or "" when it names a batch, a theme or an author."""
    if shared_by > MAX_SHARED_TITLE:
        return ""
    title = re.sub(r"^clip\s*art by .*? - ", "", title.strip(), flags=re.I)
    if any(pattern.search(title) for pattern in _JUNK_TITLES):
        return ""
    return normalise_text(title.replace("_", " "))


def title_from_filename(path: Path) -> str:
    """``floppy_frederic_moser_01.png`` -> "floppy frederic moser"."""
    stem = re.sub(r"[_\-\s]*\d+$", "", path.stem)
    return normalise_text(re.sub(r"[_\-]+", " ", stem))


def _context(rels: list[Path]) -> list[str]:
    # The category, plus the subfolder when a file sits directly in one (food/desserts/x.png);
    # deeper trees are icon themes (computer/icons/flat-theme/action/…): structure, not meaning.
    folders = [rels[0].parts[0]] + [rel.parts[1] for rel in rels if len(rel.parts) == 3]
    return list(dict.fromkeys(clean_class_name(f) for f in folders))


def _caption(title: str, context: list[str], keywords: list[str], description: str) -> str:
    caption = f"clip art of {title}, {', '.join(context)}"
    if keywords:
        caption += ": " + ", ".join(keywords)
    if description:
        caption += ". " + description[:MAX_DESCRIPTION].rstrip(" .")
    return caption


def load_openclipart(root: str | os.PathLike | None = None) -> list[CollectionEntry]:
    """One entry per unique picture (file name), labelled by its top category, sorted by path.

    The same picture often sits in several category folders: the first path is kept and the
    folders and keywords of every copy are pooled into its caption.
    """
    root = Path(root) if root is not None else DEFAULT_ROOT
    png, svg = root / "png", root / "svg"
    if not png.is_dir():
        raise UserError(f"{png}: Open Clip Art not found; {INSTALL_HINT}")
    copies: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(png.rglob("*.png")):
        rel = path.relative_to(png)
        if len(rel.parts) > 1 and not any(part.startswith(".") for part in rel.parts):
            copies[path.name].append(rel)
    metadata = {
        name: [read_svg_metadata((svg / rel).with_suffix(".svg")) for rel in rels] for name, rels in copies.items()
    }
    title_counts = Counter(m[0].title for m in metadata.values() if m[0].title)
    entries = []
    for name, rels in copies.items():
        metas = metadata[name]
        raw_title = next((m.title for m in metas if m.title), "")
        title = clean_title(raw_title, title_counts[raw_title]) or title_from_filename(rels[0])
        context = _context(rels)
        known = {part.lower() for rel in rels for part in rel.parts[:-1]} | {c.lower() for c in context}
        known |= set(title.lower().split()) | NOISE_KEYWORDS
        keywords = list(dict.fromkeys(k for m in metas for k in m.keywords if k.lower() not in known))
        description = next((m.description for m in metas if m.description), "")
        caption = _caption(title, context, keywords, description)
        entries.append(CollectionEntry(png / rels[0], clean_class_name(rels[0].parts[0]), caption))
    return sorted(entries, key=lambda e: str(e.path))
