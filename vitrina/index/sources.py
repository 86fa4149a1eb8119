"""What ``vitrina index SOURCE`` reads: a folder of images, or a list of image URIs.

A list is a Parquet, CSV or JSON-lines file with one image per row: a column ``path`` (or ``uri``,
``url``, ``image``) holding a local path (relative to the list's folder, or absolute), a ``file://`` URL,
or a URL of any fsspec protocol whose package is installed (``s3://`` with s3fs, ``gs://`` with gcsfs...);
optional ``label`` and ``caption`` columns. The index records the list's folder as the collection root:
items under it are stored relative to it (as a folder's are), others by absolute path or URL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from vitrina.data.folder import CollectionEntry, scan_collection, stratified_fraction
from vitrina.errors import UserError
from vitrina.index.decode import is_url

LIST_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json"}
URI_COLUMNS = ("path", "uri", "url", "image")


@dataclass(frozen=True)
class Source:
    """A collection to index: its root (recorded in the index) and how to list its images."""

    root: Path
    list_entries: Callable[[], list[CollectionEntry]]
    empty_message: str


def open_source(source: str | Path, *, fraction: float | None = None, seed: int = 0) -> Source:
    """A folder (scanned as ``vitrina index`` always has) or a list file (``LIST_FORMATS``); ``UserError`` else."""
    text = str(source)
    if is_url(text):
        raise UserError(f"{text}: give a local folder or list file; the images a list names may be URLs")
    path = Path(text)

    def sampled(entries: list[CollectionEntry]) -> list[CollectionEntry]:
        return stratified_fraction(entries, fraction, seed) if fraction is not None else entries

    if path.is_dir():
        root = path.resolve()
        message = f"{path}: no images found (looked for image files, also in sub-folders); empty index"
        return Source(root, lambda: sampled(scan_collection(root)), message)
    if not path.is_file():
        raise UserError(f"{path}: no such folder or list file; give a folder of images or a {_formats()} list")
    if path.suffix.lower() not in LIST_FORMATS:
        raise UserError(f"{path}: not a folder, nor a list of images ({_formats()}); give one of those")
    root = path.resolve().parent
    return Source(root, lambda: sampled(read_list(path)), f"{path}: the list names no images; empty index")


def _formats() -> str:
    return "/".join(sorted({s.lstrip(".") for s in LIST_FORMATS}))


def read_list(path: Path) -> list[CollectionEntry]:
    """The rows of a list file as entries (local ``Path`` or URL ``str``), first of each repeat kept, sorted."""
    table = _read_table(path)
    column = next((c for c in URI_COLUMNS if c in table.column_names), None)
    if column is None:
        raise UserError(
            f"{path}: no column named {', '.join(URI_COLUMNS[:-1])} or {URI_COLUMNS[-1]} "
            f"(found: {', '.join(table.column_names) or 'none'}); name the column of image paths or URLs 'path'"
        )
    uris = table.column(column).to_pylist()
    labels = _optional(table, "label", path)
    captions = _optional(table, "caption", path)
    root = path.resolve().parent
    entries: dict[str, CollectionEntry] = {}
    checked: set[str] = set()
    for row, (uri, label, caption) in enumerate(zip(uris, labels, captions, strict=True), start=1):
        if not isinstance(uri, str) or not uri.strip():
            raise UserError(f"{path}: row {row} has no {column}; every row needs an image path or URL")
        location = _location(uri.strip(), root, path, row, checked)
        entries.setdefault(str(location), CollectionEntry(location, label or None, caption or None))
    return sorted(entries.values(), key=lambda e: str(e.path))


def _read_table(path: Path):
    import pyarrow as pa

    kind = LIST_FORMATS[path.suffix.lower()]
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind == "csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        import pyarrow.json as pjson

        return pjson.read_json(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"{path}: not a readable {kind} list ({error}); fix or re-write the file") from None


def _optional(table, name: str, path: Path) -> list:
    if name not in table.column_names:
        return [None] * table.num_rows
    values = table.column(name).to_pylist()
    for row, value in enumerate(values, start=1):
        if value is not None and not isinstance(value, str):
            raise UserError(f"{path}: row {row} has a {name} that is not text ({value!r}); write it as a string")
    return values


def _location(uri: str, root: Path, listed_in: Path, row: int, checked: set[str]) -> Path | str:
    """A local ``Path`` (``file://`` URLs too) or a URL whose fsspec protocol is installed."""
    if not is_url(uri):
        local = Path(uri)
        return local if local.is_absolute() else root / local
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme not in checked:
        import fsspec

        try:
            fsspec.get_filesystem_class(parsed.scheme)
        except (ImportError, ValueError) as error:
            raise UserError(
                f"{listed_in}: row {row}: cannot read {parsed.scheme}:// URLs here ({error}); install the fsspec "
                "package for that protocol, or list local paths"
            ) from None
        checked.add(parsed.scheme)
    return uri
