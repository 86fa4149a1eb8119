"""The re-ranker's image-side input of every item, computed once per index version, not once per query.

A re-ranked query scores N candidates with the cross-attention re-ranker (``vitrina.models.rerank``).
Its image side does not depend on the text: ``embed_image(image tower tokens)``. Decoding N images and
running the image tower on them for every query costs about a second at N = 50; reading N rows of a
memory-mapped file costs microseconds. So a writer stores, per version, in ``INDEX/versions/<N>/rerank/``:

* ``tokens-g<G>.npy``: (I, M, W) float16, the embedded image tokens of I items, one row per item;
* ``items-g<G>.npy``: (I,) rows of (item id, content hash), ids ascending: the row map, and which
  pixels each row was made from (a file changed since keeps its id, and must not keep its old row);
* ``tokens.json``: the manifest, written last: the generation's file names, and the two digests the
  rows were made with (the version's CLIP weights, the re-ranker's weights).

**What is stored**: the tokens *after* the re-ranker's own input projection and LayerNorm (width W, 128
by default), not the image tower's raw tokens (width Cv): W is below Cv for every tower we use (192 for
ViT-Ti, 768 for ViT-B), so the file is smaller (Cv / W = 1.5x at ViT-Ti, 6x at ViT-B) and a query skips
the projection. The price: the file belongs to one re-ranker's weights, and retraining the re-ranker
means preparing the file again (``vitrina rerank-prepare``, or ``vitrina train rerank --index``).

**Memory**: tokens x width x 2 bytes per item. The demo CLIP (48 px, 8 px patches: 36 patches + [CLS]
= 37 tokens) with a W = 128 re-ranker: 37 x 128 x 2 = 9,472 bytes per item, 9.5 GB per million items,
of which a query touches N rows (N x 9.5 KB: 474 KB at N = 50); the page cache keeps the hot ones.
A ViT-B/16 at 224 px (197 tokens): 50 KB per item.

Readers (``vitrina.search``) only memory-map what a manifest names, read-only, and use it only when
both digests match the ones they score with; an item the file does not hold (added later, or changed
since) is decoded and embedded at query time, so the query stays correct. Writers hold the index's
writer lock, write the two data files, then the manifest (each atomically), then remove the older
generation's files (a reader that has them mapped keeps its copy: POSIX).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitrina.atomic import atomic_write, atomic_write_text
from vitrina.errors import UserError
from vitrina.index.ann import version_dir
from vitrina.index.lock import WriterLock
from vitrina.index.store import IndexStore, Version, item_location

FOLDER = "rerank"
MANIFEST = "tokens.json"
FORMAT = 1
ITEM_DTYPE_ID = "<i8"


@dataclass(frozen=True)
class TokenFile:
    """One published token file, memory-mapped: (I, M, W) float16 ``tokens`` and their (I,) ``items``
    (fields ``id`` ascending, ``hash``: the content hash the row was made from)."""

    tokens: np.ndarray = field(repr=False)
    items: np.ndarray = field(repr=False)
    manifest: dict

    def rows(self, ids: list[int], hashes: dict[int, str]) -> dict[int, int]:
        """Item id -> its row, for those of ``ids`` stored from the content they hold now (``hashes``)."""
        known = self.items["id"]  # (I,) ascending
        wanted = np.asarray(ids, dtype=np.int64)  # (N,)
        at = np.minimum(np.searchsorted(known, wanted), max(len(known) - 1, 0))  # (N,)
        found: dict[int, int] = {}
        for item_id, row in zip(ids, at.tolist(), strict=True):
            current = hashes.get(item_id)
            stored = len(known) and known[row] == item_id and current is not None
            if stored and self.items["hash"][row] == current.encode("ascii"):  # made from the pixels it has now
                found[item_id] = row
        return found

    def gather(self, rows: list[int]) -> np.ndarray:
        """(len(rows), M, W) float16 copied out of the mapped file."""
        return np.ascontiguousarray(self.tokens[np.asarray(rows, dtype=np.int64)])


@dataclass(frozen=True)
class TokensReport:
    """What ``prepare_tokens`` wrote: the version, how many rows (reused from the last file, embedded
    now), items it could not read, and the file's size."""

    version: str
    rows: int
    reused: int
    embedded: int
    unreadable: int
    bytes_per_item: int
    path: Path

    def summary(self) -> str:
        """One line for the CLI."""
        size = self.rows * self.bytes_per_item
        return (
            f"re-ranker tokens of {self.version}: {self.rows} items ({self.reused} reused, {self.embedded} embedded, "
            f"{self.unreadable} unreadable), {self.bytes_per_item} bytes each, {size / 2**20:.1f} MiB in {self.path}"
        )


def tokens_dir(index_dir: Path, version: int) -> Path:
    """``INDEX/versions/<N>/rerank``."""
    return version_dir(index_dir, version) / FOLDER


def manifest_stamp(index_dir: Path, version: int) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of the version's manifest, or None: a reader reloads when it changes."""
    try:
        st = os.stat(tokens_dir(index_dir, version) / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def open_tokens(index_dir: Path, version: Version, reranker_digest: str) -> TokenFile | None:
    """The published token file of ``version`` if it was made with these weights (the version's CLIP and
    ``reranker_digest``) and is whole; else None (the query embeds its candidates itself). Reads only."""
    folder = tokens_dir(index_dir, version.id)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if not version.digest or not reranker_digest:
        return None  # weights we cannot name: nothing to match
    if manifest.get("clip_digest") != version.digest or manifest.get("reranker_digest") != reranker_digest:
        return None  # made with other weights: never used
    try:
        tokens = np.load(folder / str(manifest["tokens"]), mmap_mode="r", allow_pickle=False)
        items = np.load(folder / str(manifest["items"]), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None  # removed by a newer generation meanwhile, or damaged: the next query looks again
    if tokens.ndim != 3 or tokens.dtype != np.float16 or items.shape != (tokens.shape[0],):
        return None
    if items.dtype.names != ("id", "hash"):
        return None
    return TokenFile(tokens, items, manifest)


def prepare_tokens(
    index_dir: Path,
    reranker,
    *,
    version: str | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> TokensReport:
    """Writer: store ``reranker``'s embedded image tokens of every item of ``version`` (default: the active one).

    ``reranker`` is a loaded ``vitrina.models.rerank.Reranker`` (its weights' ``digest``, and its CLIP's
    ``clip_digest``, which must be the version's). Rows of the current
    file made with the same weights from the same content are copied, not recomputed. The new file is
    filled in batches straight into its memory map (memory: one batch, whatever the collection's size);
    an item that cannot be read keeps a zero row with no content hash, which no query ever uses.
    """
    index_dir = Path(index_dir)
    if not reranker.digest:
        raise UserError("the re-ranker has no weights file to name it by; save it first (`vitrina train rerank`)")
    with WriterLock(index_dir, what="vitrina rerank-prepare"), IndexStore.open(index_dir) as store:
        v = store.version(version) if version is not None else store.active_version()
        clip_digest = reranker.clip_digest
        if not v.digest or v.digest != clip_digest:
            raise UserError(
                f"{reranker.source or 'the re-ranker'}: trained on the CLIP with digest {clip_digest[:12]}, but "
                f"{index_dir} {v.describe()} holds another model's vectors; prepare it for the matching version"
            )
        root = store.root
        rows = [(item_id, item_location(root, path), content) for item_id, path, content, *_ in store.item_rows()]
        if not rows:
            raise UserError(f"{index_dir}: holds no items yet; index a collection first")
        last = open_tokens(index_dir, v, reranker.digest)
        reuse = last.rows([item_id for item_id, _, _ in rows], {i: h for i, _, h in rows}) if last else {}
        writer = _TokenWriter(reranker, rows, reuse, last, batch_size, progress)
        path = _publish(index_dir, v, reranker, clip_digest, writer)
        return TokensReport(
            version=v.name,
            rows=len(rows),
            reused=len(reuse),
            embedded=len(rows) - len(reuse) - writer.unreadable,
            unreadable=writer.unreadable,
            bytes_per_item=writer.width * writer.tokens * 2,
            path=path,
        )


class _TokenWriter:
    """Fills a token file's rows in item order: copied from the last file, or decoded and embedded now."""

    def __init__(self, reranker, rows: list[tuple[int, str, str]], reuse: dict[int, int], last, batch_size, progress):
        from PIL import Image

        self.reranker, self.rows, self.reuse, self.last = reranker, rows, reuse, last
        self.batch_size, self.progress = batch_size, progress
        # tokens per image, whatever the tower (ViT, Swin): what one blank image gives
        probe = reranker.embed_images([Image.new("RGB", (8, 8))])  # (1, M, W)
        self.tokens, self.width = int(probe.shape[1]), int(probe.shape[2])
        self.hashes = [""] * len(rows)  # "" : no row (unreadable)
        self.unreadable = 0

    def write(self, tmp: Path) -> None:
        """Write the (I, M, W) float16 .npy to ``tmp``, batch by batch through its memory map."""
        from tqdm import tqdm

        from vitrina.data.images import load_image

        shape = (len(self.rows), self.tokens, self.width)  # (I, M, W)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        bar = tqdm(
            total=len(self.rows), unit="img", desc="re-ranker tokens", file=sys.stderr, disable=not self.progress
        )
        for start in range(0, len(self.rows), self.batch_size):
            images, at = [], []
            for row in range(start, min(start + self.batch_size, len(self.rows))):
                item_id, path, content = self.rows[row]
                if item_id in self.reuse:
                    out[row] = self.last.tokens[self.reuse[item_id]]
                    self.hashes[row] = content
                    continue
                try:
                    images.append(load_image(path))
                    at.append(row)
                except UserError:  # gone or damaged since it was indexed: a query scores it last anyway
                    self.unreadable += 1
            if images:
                out[at] = self.reranker.embed_images(images).numpy()
                for row in at:
                    self.hashes[row] = self.rows[row][2]
            bar.update(min(self.batch_size, len(self.rows) - start))
        bar.close()
        out.flush()
        del out

    def items(self) -> np.ndarray:
        """(I,) (id, content hash) rows, ids ascending (``item_rows`` order)."""
        width = max(1, *(len(h) for h in self.hashes))
        pairs = [(item_id, h) for (item_id, _, _), h in zip(self.rows, self.hashes, strict=True)]
        return np.array(pairs, dtype=[("id", ITEM_DTYPE_ID), ("hash", f"S{width}")])


def _publish(index_dir: Path, v: Version, reranker, clip_digest: str, writer: _TokenWriter) -> Path:
    """Write the generation's two data files, then the manifest, then drop older generations' files."""
    folder = tokens_dir(index_dir, v.id)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        previous = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("generation", 0)
    except (OSError, ValueError, AttributeError):
        previous = 0
    generation = (previous if isinstance(previous, int) else 0) + 1
    tokens_name, items_name = f"tokens-g{generation}.npy", f"items-g{generation}.npy"
    atomic_write(folder / tokens_name, writer.write)
    items = writer.items()

    def write_items(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
            np.save(f, items, allow_pickle=False)

    atomic_write(folder / items_name, write_items)
    manifest = {
        "format": FORMAT,
        "generation": generation,
        "tokens": tokens_name,
        "items": items_name,
        "count": len(items),
        "shape": [len(items), writer.tokens, writer.width],
        "dtype": "float16",
        "bytes_per_item": writer.tokens * writer.width * 2,
        "clip_digest": clip_digest,
        "reranker_digest": reranker.digest,
        "reranker": reranker.source,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    for old in [*folder.glob("tokens-g*.npy"), *folder.glob("items-g*.npy")]:
        if old.name not in (tokens_name, items_name):
            old.unlink(missing_ok=True)  # a reader that has it mapped keeps its copy (POSIX)
    return folder / tokens_name
