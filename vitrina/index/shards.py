"""Embedding shards: what the Ray engine's workers computed, on disk until the store has ingested it.

A pass (one version, the files it must embed) is cut into shards by the files' places in the sorted
collection listing: shard ``k`` holds the pass's files among listing positions ``k*S ... k*S+S-1``. In
``INDEX/versions/<N>/shards/``:

* ``shard-<k>-<tag>.parquet``: one row per file: ``id`` (the item's id when the store already had it:
  a changed file, or a version catching up; null for a new file), ``path`` (as the store keeps it),
  ``file_hash``, ``size``, ``mtime``, ``label``, ``caption``, ``is_new``, ``embedding`` (D float32; null for a
  file that could not be decoded), ``reason`` and ``detail`` (why not: the ledger's entry);
* ``shard-<k>-<tag>.json``: its manifest, written last, so it is the done-marker: rows, good and bad
  counts, bytes and sha256 of the Parquet file, the model digest, the version, and the process ids of
  the workers that decoded and embedded it.

``tag`` is a digest of the model, version, pass kind and every planned row (path, size, mtime, label,
caption, id): a re-run that plans the same files finds the shard done and skips it, and a shard of another
plan (the collection changed meanwhile) is never mistaken for one of this plan. Both files are written
atomically (``vitrina.atomic``), so a kill leaves a shard complete or absent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitrina.atomic import atomic_write, atomic_write_text
from vitrina.digest import file_sha256
from vitrina.index.ann import version_dir
from vitrina.index.decode import Decoded, Job

SHARDS_DIR = "shards"
FORMAT = "vitrina-embedding-shard"
COLUMNS = ("id", "path", "file_hash", "size", "mtime", "label", "caption", "is_new", "embedding", "reason", "detail")


def shards_dir(index_dir: Path, version: int) -> Path:
    """The shards folder of one version."""
    return version_dir(index_dir, version) / SHARDS_DIR


def schema(dim: int):
    """The Parquet schema of a shard of width ``dim``."""
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
            ("is_new", pa.bool_()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("reason", pa.string()),
            ("detail", pa.string()),
        ]
    )


@dataclass(frozen=True)
class ShardPlan:
    """One shard to produce: its number, its tag, its jobs (in listing order)."""

    number: int
    tag: str
    jobs: tuple[Job, ...]

    @property
    def stem(self) -> str:
        return f"shard-{self.number:05d}-{self.tag}"


def plan_shards(
    jobs: Sequence[Job], ranks: dict[str, int], shard_size: int, *, version: int, digest: str | None, upsert: bool
) -> list[ShardPlan]:
    """Cut ``jobs`` into shards by their listing rank (``ranks[job.rel]``) // ``shard_size``, in order."""
    groups: dict[int, list[Job]] = {}
    for job in sorted(jobs, key=lambda j: (ranks.get(j.rel, len(ranks)), j.rel)):
        groups.setdefault(ranks.get(job.rel, len(ranks)) // shard_size, []).append(job)
    plans = []
    for number, members in sorted(groups.items()):
        key = [digest, version, upsert] + [
            [j.rel, j.size, j.mtime, j.label, j.caption, j.item_id, j.is_new] for j in members
        ]
        tag = hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()[:16]
        plans.append(ShardPlan(number, tag, tuple(members)))
    return plans


@dataclass
class ShardRows:
    """A shard's rows as they come back from the workers (any order) until all are in."""

    plan: ShardPlan
    rows: dict[str, dict]  # path -> row (COLUMNS, embedding a (D,) array or None)
    pids: set[int]
    decode_pids: set[int]

    @property
    def complete(self) -> bool:
        return len(self.rows) == len(self.plan.jobs)


def manifest_path(folder: Path, plan: ShardPlan) -> Path:
    return folder / f"{plan.stem}.json"


def is_done(folder: Path, plan: ShardPlan, *, digest: str | None, dim: int) -> bool:
    """Whether the shard was finished by an earlier run: its manifest names this plan and its file checks out."""
    try:
        manifest = json.loads(manifest_path(folder, plan).read_text())
    except (OSError, ValueError):
        return False
    data = folder / f"{plan.stem}.parquet"
    return (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT
        and manifest.get("tag") == plan.tag
        and manifest.get("digest") == digest
        and manifest.get("dimension") == dim
        and manifest.get("rows") == len(plan.jobs)
        and data.is_file()
        and data.stat().st_size == manifest.get("bytes")
        and file_sha256(data) == manifest.get("sha256")
    )


def write_shard(folder: Path, shard: ShardRows, *, version: int, digest: str | None, dim: int) -> dict:
    """Write the shard's Parquet file, then its manifest (the done-marker); returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = [shard.rows[job.rel] for job in shard.plan.jobs]  # listing order
    vectors = [r["embedding"] for r in rows]
    flat = np.concatenate([v if v is not None else np.zeros(dim, np.float32) for v in vectors]) if rows else []
    embedding = pa.FixedSizeListArray.from_arrays(
        pa.array(np.asarray(flat, dtype=np.float32)), dim, mask=pa.array([v is None for v in vectors])
    )
    columns = {c: pa.array([r[c] for r in rows], schema(dim).field(c).type) for c in COLUMNS if c != "embedding"}
    table = pa.table({**columns, "embedding": embedding}).select(list(COLUMNS)).cast(schema(dim))
    data = folder / f"{shard.plan.stem}.parquet"
    atomic_write(data, lambda tmp: pq.write_table(table, tmp))
    manifest = {
        "format": FORMAT,
        "shard": shard.plan.number,
        "tag": shard.plan.tag,
        "version": version,
        "digest": digest,
        "dimension": dim,
        "file": data.name,
        "rows": len(rows),
        "good": sum(v is not None for v in vectors),
        "bad": sum(v is None for v in vectors),
        "bytes": data.stat().st_size,
        "sha256": file_sha256(data),
        "pids": sorted(shard.pids),
        "decode_pids": sorted(shard.decode_pids),
    }
    atomic_write_text(manifest_path(folder, shard.plan), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_shard(folder: Path, plan: ShardPlan, *, dim: int) -> tuple[list[Decoded], np.ndarray]:
    """A finished shard as ([Decoded] in listing order, (G, D) vectors of its good rows, in order).

    Each row is checked against the plan's job (same path, in order): a shard is only ever read for the
    plan it was written for. ``Decoded.job`` is the plan's job; ``content_hash`` the file hash the worker saw.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(folder / f"{plan.stem}.parquet")
    columns = table.to_pydict()
    embedding = table.column("embedding").combine_chunks()
    decoded, good = [], []
    for i, job in enumerate(plan.jobs):
        if columns["path"][i] != job.rel:
            raise ValueError(f"{folder / plan.stem}.parquet: row {i} is {columns['path'][i]!r}, planned {job.rel!r}")
        reason = columns["reason"][i] or ""
        decoded.append(Decoded(job, None, columns["file_hash"][i] or "", reason, columns["detail"][i] or ""))
        if not reason:
            good.append(i)
    # .values keeps the (zero) slots of null rows, where .flatten() would drop them: one row per file.
    values = embedding.values.slice(embedding.offset * dim, len(embedding) * dim)
    values = values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return decoded, np.ascontiguousarray(values[good], dtype=np.float32)


def plan_of(folder: Path, manifest: dict) -> ShardPlan:
    """The plan a finished shard was written for, rebuilt from its file (to inspect it, or ingest it again).

    The jobs' read locations are their stored paths (ingesting needs no file)."""
    import pyarrow.parquet as pq

    columns = pq.read_table(folder / manifest["file"]).to_pydict()
    jobs = tuple(
        Job(path, path, size, mtime, label, caption, bool(is_new), item_id)
        for item_id, path, size, mtime, label, caption, is_new in zip(
            *(columns[c] for c in ("id", "path", "size", "mtime", "label", "caption", "is_new")), strict=True
        )
    )
    return ShardPlan(int(manifest["shard"]), str(manifest["tag"]), jobs)


def manifests(folder: Path) -> list[dict]:
    """Every shard manifest in ``folder``, by shard number (what a run, or a test, finished)."""
    found = []
    for path in sorted(folder.glob("shard-*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda m: m.get("shard", 0))
