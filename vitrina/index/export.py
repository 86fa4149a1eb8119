"""Export one version of an index as Parquet + a manifest, and import such an export, verified first.

An export folder holds:

* ``items-00000.parquet``, ...: one row per item: ``id``, ``path`` (relative to the collection root),
  ``file_hash``, ``size``, ``mtime``, ``label``, ``caption``, ``embedding`` (fixed-size list of float32);
* ``manifest.json``: the model (reference, weights digest, identity), its preprocessing (size, mean,
  std, interpolation), the vector dimension, the item count, each data file's name, rows, bytes and
  sha256, the vitrina version, and ``manifest_sha256`` over the rest of the manifest. It is written
  in one canonical form, so any edit to it (a flipped byte included) is caught.

``import_index`` checks everything (manifest, file digests, schemas, counts, ids, paths, vectors)
before it writes anything, then builds the index in a temporary folder beside ``--out`` and renames
it into place: an import either yields a complete, searchable index or leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path, PurePosixPath

import numpy as np

from vitrina.atomic import atomic_write_text, fsync_dir
from vitrina.digest import file_sha256
from vitrina.errors import UserError
from vitrina.index.lock import WriterLock
from vitrina.index.store import META_FILE, IndexStore, ItemRow

MANIFEST = "manifest.json"
FORMAT = "vitrina-export"
FORMAT_VERSION = 1
ROWS_PER_FILE = 100_000
COLUMNS = ("id", "path", "file_hash", "size", "mtime", "label", "caption", "embedding")
UNIT_TOLERANCE = 1e-3  # an exported embedding's norm may differ from 1 by at most this


def _vitrina_version() -> str:
    try:
        return package_version("vitrina")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


def _canonical(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def _manifest_digest(manifest: dict) -> str:
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _schema(dim: int):
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.int64()),
            ("path", pa.string()),
            ("file_hash", pa.string()),
            ("size", pa.int64()),
            ("mtime", pa.float64()),
            ("label", pa.string()),
            ("caption", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


@dataclass(frozen=True)
class ExportReport:
    """What ``export_index`` wrote."""

    out: str
    version: str
    count: int
    files: int
    seconds: float


def export_index(index_dir: Path, out: Path, *, version: str | int | None = None) -> ExportReport:
    """Write ``version`` (default: the active one) of the index at ``index_dir`` as an export folder ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    index_dir, out = Path(index_dir), Path(out)
    _check_new_folder(out, "give a new folder to export into")
    with _staged(out, "exporting") as staging:
        with IndexStore.open(index_dir) as store, store.snapshot():
            chosen = store.active_version() if version is None else store.version(version)
            if chosen.state != "ready":
                raise UserError(f"{index_dir}: {chosen.name} is still being built; export a complete version")
            root = str(store.root)
            schema = _schema(chosen.embed_dim)
            files, count = [], 0
            for items, vectors in store.iter_items_with_vectors(chosen.id, chunk=ROWS_PER_FILE):
                name = f"items-{len(files):05d}.parquet"
                table = pa.table(
                    [
                        pa.array([i for i, _ in items], pa.int64()),
                        pa.array([r.path for _, r in items], pa.string()),
                        pa.array([r.content_hash for _, r in items], pa.string()),
                        pa.array([r.size for _, r in items], pa.int64()),
                        pa.array([r.mtime for _, r in items], pa.float64()),
                        pa.array([r.label for _, r in items], pa.string()),
                        pa.array([r.caption for _, r in items], pa.string()),
                        pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), chosen.embed_dim),
                    ],
                    schema=schema,
                )
                pq.write_table(table, staging / name)
                files.append(
                    {
                        "name": name,
                        "rows": len(items),
                        "bytes": (staging / name).stat().st_size,
                        "sha256": file_sha256(staging / name),
                    }
                )
                count += len(items)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vitrina_version": _vitrina_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"index": str(index_dir.resolve()), "version": chosen.name, "collection_root": root},
            "model": {"ref": chosen.model_ref, "digest": chosen.digest, "identity": chosen.identity},
            "preprocessing": chosen.preprocess,
            "index_kind": chosen.index_kind,
            "dimension": chosen.embed_dim,
            "count": count,
            "columns": list(COLUMNS),
            "files": files,
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        atomic_write_text(staging / MANIFEST, _canonical(manifest))
    return ExportReport(str(out), chosen.name, count, len(files), time.perf_counter() - start)


def _check_new_folder(out: Path, advice: str) -> None:
    """``UserError`` unless ``out`` is missing or an empty folder (an export or import never overwrites)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; {advice}")


@contextmanager
def _staged(out: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill: renamed into place as ``out`` when the block succeeds (an
    empty ``out`` is replaced), removed when it fails, so ``out`` is complete or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{what}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty (``_check_new_folder``)
        staging.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- import -----------------------------------------------------------------------------------


def _refuse(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; the export is damaged or was edited: export it again")


def read_manifest(folder: Path) -> dict:
    """The export's manifest, checked for form, canonical bytes and its own digest."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: missing; {folder} is not a vitrina export (make one with `vitrina export`)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _refuse(path, f"not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _refuse(path, f"not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: export format_version {manifest.get('format_version')!r}; this vitrina reads {FORMAT_VERSION}"
        )
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise _refuse(path, "manifest_sha256 does not match the manifest's content")
    if raw != _canonical(manifest).encode():
        raise _refuse(path, "not in the canonical form vitrina writes")
    wanted = {
        "model": dict,
        "preprocessing": dict,
        "dimension": int,
        "count": int,
        "files": list,
        "index_kind": str,
        "source": dict,
    }
    for key, kind in wanted.items():
        if not isinstance(manifest.get(key), kind):
            raise _refuse(path, f"field {key!r} is missing or not a {kind.__name__}")
    identity = manifest["model"].get("identity")
    if not isinstance(identity, dict) or identity.get("embed_dim") != manifest["dimension"]:
        raise _refuse(path, "model.identity does not match the dimension")
    if manifest["model"].get("digest") != identity.get("digest"):
        raise _refuse(path, "model.digest does not match model.identity")
    if manifest["columns"] != list(COLUMNS):
        raise _refuse(path, f"columns {manifest['columns']} are not {list(COLUMNS)}")
    return manifest


def _safe_relative(rel: str) -> bool:
    """A path that stays inside the collection root: relative, no '..', no empty parts."""
    path = PurePosixPath(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts and "\\" not in rel and "\0" not in rel


def verify_export(folder: Path) -> tuple[dict, list[tuple[int, ItemRow]], np.ndarray]:
    """Check an export completely; return (manifest, [(id, ItemRow)], (N, D) vectors). Writes nothing."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest = read_manifest(folder)
    dim, files = manifest["dimension"], manifest["files"]
    listed = {entry.get("name") for entry in files if isinstance(entry, dict)}
    if len(listed) != len(files) or not all(isinstance(n, str) and n == Path(n).name for n in listed):
        raise _refuse(folder / MANIFEST, "its file list is malformed")
    for stray in sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in listed):
        raise _refuse(folder / stray, "is not listed in manifest.json")
    schema = _schema(dim)
    rows: list[tuple[int, ItemRow]] = []
    chunks = []
    for entry in files:
        path = folder / entry["name"]
        if not path.is_file():
            raise _refuse(path, "is listed in manifest.json but missing")
        if path.stat().st_size != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
            raise _refuse(path, "its size or sha256 differs from manifest.json")
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for damaged files
            raise _refuse(path, f"not a readable Parquet file ({error})") from None
        if not table.schema.equals(schema, check_metadata=False):
            raise _refuse(path, f"schema differs from the expected {dim}-d export schema")
        if table.num_rows != entry.get("rows"):
            raise _refuse(path, f"holds {table.num_rows} rows, manifest.json says {entry.get('rows')}")
        columns = table.to_pydict()
        embedding = table.column("embedding").combine_chunks()
        if embedding.null_count or table.column("id").null_count or table.column("path").null_count:
            raise _refuse(path, "has empty ids, paths or embeddings")
        chunks.append(embedding.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim))
        for i, rel, file_hash, size, mtime, label, caption in zip(*(columns[c] for c in COLUMNS[:-1]), strict=True):
            if not _safe_relative(rel):
                raise _refuse(path, f"item {i} has path {rel!r}, which leaves the collection folder")
            if not file_hash or size is None or mtime is None or not math.isfinite(mtime):
                raise _refuse(path, f"item {i} ({rel}) has no file hash, size or mtime")
            rows.append((int(i), ItemRow(rel, file_hash, int(size), float(mtime), label, caption)))
    if len(rows) != manifest["count"]:
        raise _refuse(folder / MANIFEST, f"count {manifest['count']} but the data files hold {len(rows)} rows")
    ids = [i for i, _ in rows]
    if len(set(ids)) != len(ids) or min(ids, default=1) < 1:
        raise _refuse(folder, "item ids are not unique positive integers")
    if len({r.path for _, r in rows}) != len(rows):
        raise _refuse(folder, "two items share a path")
    vectors = np.concatenate(chunks) if chunks else np.empty((0, dim), dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(vectors)) or np.any(np.abs(norms - 1) > UNIT_TOLERANCE):
        raise _refuse(folder, "embeddings are not finite unit vectors")
    return manifest, rows, vectors


@dataclass(frozen=True)
class ImportReport:
    """What ``import_index`` built."""

    out: str
    count: int
    root: str
    root_exists: bool
    seconds: float


def import_index(
    folder: Path, out: Path, *, root: Path | None = None, model_ref: str | None = None, check_model: bool = True
) -> ImportReport:
    """Verify the export in ``folder``, then build a searchable index at ``out`` without re-embedding.

    ``root``: where the collection's images are on this machine (default: where they were exported
    from). ``model_ref``: the model's reference here (default: the exported one); with
    ``check_model`` it is loaded and must have the exported weights digest.
    """
    start = time.perf_counter()
    folder, out = Path(folder), Path(out)
    if (out / META_FILE).exists():
        raise UserError(f"{out}: already holds an index; import into a new folder")
    _check_new_folder(out, "import into a new folder")
    manifest, rows, vectors = verify_export(folder)
    model = manifest["model"]
    ref = model_ref or model.get("ref") or "unknown"
    if model_ref is not None and check_model:
        from vitrina.checkpoint import load_encoder

        digest = load_encoder(model_ref).identity.get("digest")
        if digest != model.get("digest"):
            raise UserError(
                f"{model_ref}: holds other weights (digest {str(digest)[:12]}) than the export was made with "
                f"({str(model.get('digest'))[:12]}); give the model the export names"
            )
    collection = Path(root).resolve() if root is not None else Path(manifest["source"].get("collection_root", "."))
    # Exits in reverse: the store closes, the lock drops, then the staged folder is renamed into place.
    with (
        _staged(out, "importing") as staging,
        WriterLock(staging),
        IndexStore.create(staging, root=collection) as store,
    ):
        version = store.add_version(
            identity=model["identity"],
            model_ref=ref,
            index_kind=manifest["index_kind"],
            preprocess=manifest["preprocessing"],
        )
        for begin in range(0, len(rows), 10_000):
            store.insert_items(version.id, rows[begin : begin + 10_000], vectors[begin : begin + 10_000])
        store.mark_ready(version.id)
        store.publish_ann(version.id)
        store.activate(version.id)
    return ImportReport(str(out), len(rows), str(collection), collection.is_dir(), time.perf_counter() - start)
