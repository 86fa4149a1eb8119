"""The index: add / change / delete / resume-after-kill, the bad-file ledger, identity checks, FAISS upkeep.

Every test writes a small real collection (PIL-drawn coloured shapes, PNG and JPEG) and embeds it
with the real ``clip-tiny`` encoder (random weights, 32 px).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vitrina.errors import UserError
from vitrina.index.embed import index_folder
from vitrina.index.store import (
    FLAT_MAX,
    IndexStore,
    ItemRow,
    build_faiss_index,
    choose_index_kind,
)
from vitrina.search import Searcher, encode_images

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHAPES = ("circle", "square", "triangle", "bar")
TESTS_DIR = Path(__file__).resolve().parent


def make_encoder():
    """The real tiny encoder every index test uses (a seeded random-weight preset: same weights every call)."""
    from vitrina.checkpoint import load_encoder

    return load_encoder("clip-tiny")


def draw(colour: tuple[int, int, int], shape: str, variant: int, size: int = 48) -> Image.Image:
    """One picture: a coloured shape on a background whose shade depends on ``variant``."""
    shade = 235 - 25 * variant
    image = Image.new("RGB", (size, size), (shade, 255 - shade, (shade * 7) % 256))
    pen = ImageDraw.Draw(image)
    lo, hi = 6 + 2 * variant, size - 6 - variant
    if shape == "circle":
        pen.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "square":
        pen.rectangle((lo, lo, hi, hi), fill=colour)
    elif shape == "triangle":
        pen.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=colour)
    else:
        pen.rectangle((lo, size // 2 - 4, hi, size // 2 + 4), fill=colour)
    return image


def write_collection(root: Path, variants: int = 2, captions: bool = False) -> list[Path]:
    """Class folders red/green/blue, each with len(SHAPES) * ``variants`` images, PNG and JPEG mixed."""
    paths, lines = [], []
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for shape in SHAPES:
            for variant in range(variants):
                suffix = ".png" if (variant + len(shape)) % 2 else ".jpg"
                path = root / name / f"{shape}-{variant}{suffix}"
                draw(colour, shape, variant).save(path, quality=95)
                paths.append(path)
                lines.append(f'{{"image": "{name}/{path.name}", "caption": "a {name} {shape}, variant {variant}"}}')
    if captions:
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def image_path(root: Path, colour: str, stem: str) -> Path:
    """The file ``root/colour/stem.*`` that ``write_collection`` wrote (PNG or JPEG)."""
    (path,) = (root / colour).glob(f"{stem}.*")
    return path


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    write_collection(root)
    return root


def by_path(store: IndexStore, version: int) -> dict[str, np.ndarray]:
    """A version's vectors keyed by image path (also of a version not complete or not active)."""
    paths = {i: p for i, p, _, _ in store.items()}
    ids, vectors = store.all_vectors(version=version)
    return {paths[int(i)]: v for i, v in zip(ids, vectors, strict=True)}


def vectors_by_path(index_dir: Path) -> dict[str, np.ndarray]:
    with IndexStore.open(index_dir) as store:
        ids, vectors = store.all_vectors()
        paths = [path for _, path, _, _ in store.items()]
    return dict(zip(paths, vectors, strict=True))


def test_add_then_image_query_finds_itself(collection: Path, tmp_path: Path, encoder) -> None:
    report = index_folder(collection, encoder, tmp_path / "idx", model_ref="clip-tiny", batch_size=5, progress=False)
    assert (report.seen, report.new, report.embedded, report.total) == (24, 24, 24, 24)
    assert report.bad == {} and "24 files seen" in report.summary()
    with IndexStore.open(tmp_path / "idx") as store:
        version = store.active_version()
        assert store.is_published_current(version.id) and version.state == "ready" and version.name == "v1"
        assert version.model_ref == "clip-tiny" and version.embed_dim == encoder.embed_dim
        assert version.digest == encoder.identity["digest"] and len(version.digest) == 64
        paths = sorted(collection.rglob("*.*"))
        hits = store.search(encode_images(paths, encoder), k=3)
        for path, ranked in zip(paths, hits, strict=True):
            assert ranked[0].path == str(path) and ranked[0].score == pytest.approx(1.0, abs=1e-4)
            assert ranked[0].label == path.parent.name
        assert [h.score for h in hits[0]] == sorted((h.score for h in hits[0]), reverse=True)
        first = hits[0][0]
        assert store.get(first.id).path == first.path and store.get(first.id).label == first.label
        assert store.get(10_000) is None


def test_rerun_embeds_only_changed_files(collection: Path, tmp_path: Path, encoder) -> None:
    index_dir = tmp_path / "idx"
    index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    before = vectors_by_path(index_dir)
    with IndexStore.open(index_dir) as store:
        id_before = {p: i for i, p, _, _ in store.items()}
        generation = store.generation(1)

    again = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    assert (again.unchanged, again.embedded, again.new, again.changed) == (24, 0, 0, 0)

    changed = image_path(collection, "red", "circle-0")
    draw((250, 250, 0), "triangle", 3).save(changed, quality=95)  # new pixels under the old name
    touched = image_path(collection, "blue", "bar-1")
    os.utime(touched, (time.time() + 60, time.time() + 60))  # new mtime, same bytes: hash says unchanged
    report = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    assert (report.changed, report.new, report.embedded, report.unchanged) == (1, 0, 1, 23)

    after = vectors_by_path(index_dir)
    with IndexStore.open(index_dir) as store:
        assert {p: i for i, p, _, _ in store.items()} == id_before  # FAISS ids stay stable
        assert store.generation(1) == generation + 1
        states = store.file_states()
        assert states[f"blue/{touched.name}"].mtime == touched.stat().st_mtime
        hit = store.search(encode_images([changed], encoder), k=1)[0][0]
        assert hit.path == str(changed)
    assert not np.allclose(after[str(changed)], before[str(changed)])
    for path, vector in before.items():
        if path != str(changed):
            np.testing.assert_array_equal(after[path], vector)


def test_deleted_file_is_dropped(collection: Path, tmp_path: Path, encoder) -> None:
    index_dir = tmp_path / "idx"
    index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    gone = image_path(collection, "green", "square-1")
    query = encode_images([gone], encoder)
    gone.unlink()
    report = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    assert (report.deleted, report.total, report.embedded) == (1, 23, 0)
    with Searcher(index_dir, encoder) as searcher:
        hits = searcher.search_vector(query[0], k=30)
    assert len(hits) == 23 and str(gone) not in {h.path for h in hits}


class PausingEncoder:
    """A test stand-in for a slow model: the real tiny encoder that, after ``pause_after`` image batches,
    says so on stderr and sleeps, so a test can SIGKILL the indexer at a known point."""

    def __init__(self, inner, *, pause_after: int = 0, delay_s: float = 0.0) -> None:
        self.inner, self.embed_dim = inner, inner.embed_dim
        self.pause_after, self.delay_s, self.batches = pause_after, delay_s, 0

    @property
    def identity(self) -> dict:
        return self.inner.identity

    @property
    def image_transform(self):
        return self.inner.image_transform

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.pause_after and self.batches >= self.pause_after:
            print(f"paused after {self.batches} batches", file=sys.stderr, flush=True)
            time.sleep(3600)
        self.batches += 1
        time.sleep(self.delay_s)
        return self.inner.encode_image(pixels)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.inner.encode_text(texts)


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_index import PausingEncoder, make_encoder
from vitrina.index.embed import index_folder
encoder = PausingEncoder(make_encoder(), pause_after=3)  # pauses in this process: the model runs here
index_folder({folder!r}, encoder, {out!r}, model_ref="clip-tiny", batch_size=4, progress=False, workers=0)
"""


def test_resume_after_sigkill_keeps_committed_batches(tmp_path: Path, encoder) -> None:
    collection = tmp_path / "photos"
    write_collection(collection, variants=3)  # 36 images = 9 batches of 4
    index_dir = tmp_path / "idx"
    script = _KILL_SCRIPT.format(tests=str(TESTS_DIR), folder=str(collection), out=str(index_dir))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "paused" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"indexer exited early: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with IndexStore.open(index_dir) as store:  # killed before the first publish: nothing active yet
        assert [(v.name, v.state, v.active) for v in store.versions()] == [("v1", "building", False)]
        committed = by_path(store, 1)
    assert len(committed) == 12 and not (index_dir / "versions").exists()
    with pytest.raises(UserError, match="no active version yet"):
        Searcher(index_dir, encoder)

    report = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", batch_size=4, progress=False)
    assert (report.unchanged, report.new, report.embedded, report.total) == (12, 24, 24, 36)
    resumed = vectors_by_path(index_dir)
    for path, vector in committed.items():
        np.testing.assert_array_equal(resumed[path], vector)  # committed rows were not re-embedded

    clean = index_folder(collection, encoder, tmp_path / "clean", model_ref="clip-tiny", progress=False)
    assert clean.total == 36
    reference = vectors_by_path(tmp_path / "clean")
    assert reference.keys() == resumed.keys()
    for path, vector in reference.items():
        np.testing.assert_allclose(resumed[path], vector, atol=1e-5)
    with IndexStore.open(index_dir) as store:
        assert store.is_published_current(1) and store.active_version().name == "v1"
        assert store.view.index.ntotal == 36


_REPLICA_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_index import PausingEncoder, make_encoder
from vitrina.index.embed import index_folder
encoder = PausingEncoder(make_encoder(), delay_s=0.3)  # each replica's copy sleeps 0.3 s a batch
print("started", flush=True)
index_folder({folder!r}, encoder, {out!r}, model_ref="clip-tiny", batch_size=4, progress=False, decoder="replica")
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # an unreaped zombie has exited
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="model replicas fork: Linux only")
def test_killed_indexer_leaves_no_replica_running_and_resumes(tmp_path: Path, encoder) -> None:
    collection = tmp_path / "photos"
    write_collection(collection, variants=3)  # 36 images = 9 batches of 4, 0.3 s each
    index_dir = tmp_path / "idx"
    script = _REPLICA_KILL_SCRIPT.format(tests=str(TESTS_DIR), folder=str(collection), out=str(index_dir))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "started\n"
        replicas: list[int] = []
        deadline = time.monotonic() + 60
        while len(replicas) < 2 and time.monotonic() < deadline:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            replicas = [int(pid) for pid in children]
            time.sleep(0.05)
        assert len(replicas) == 2, "the indexer started no model replicas"
        time.sleep(1.0)  # some batches committed, others in flight in the replicas
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30  # a replica notices its parent is gone once its batch is done
    while any(map(_alive, replicas)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, replicas)), "model replicas outlived the killed indexer"
    with IndexStore.open(index_dir) as store:
        committed = by_path(store, 1)
    assert 0 < len(committed) < 36 and len(committed) % 4 == 0  # whole batches only

    report = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", batch_size=4, progress=False)
    assert report.embedded == 36 - len(committed) and report.total == 36
    with IndexStore.open(index_dir) as store:
        resumed = by_path(store, 1)
    for path, vector in committed.items():  # what was committed before the kill is kept as it was
        np.testing.assert_array_equal(resumed[path], vector)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose valid header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")
    )


def test_each_bad_file_lands_in_the_ledger(collection: Path, tmp_path: Path, encoder) -> None:
    bad = collection / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("not a picture at all\n")
    whole = image_path(collection, "red", "circle-0").read_bytes()
    (bad / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (bad / "bomb.png").write_bytes(_png_claiming(20_000, 20_000))
    (bad / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")

    # Model replicas decode (a batch of bad files only, too), the ledger is written here.
    report = index_folder(
        collection, encoder, tmp_path / "idx", model_ref="clip-tiny", batch_size=4, decoder="replica", workers=2,
        progress=False,
    )  # fmt: skip
    assert report.total == 24 and report.embedded == 24
    assert report.bad == {"empty": 1, "not-an-image": 1, "truncated": 1, "too-large": 1, "unreadable": 1}
    assert "5 bad" in report.summary() and "too-large: 1" in report.summary()
    with IndexStore.open(tmp_path / "idx") as store:
        ledger = {path: reason for path, reason, _ in store.ledger()}
    assert ledger == {
        "bad/empty.jpg": "empty",
        "bad/text.png": "not-an-image",
        "bad/cut.jpg": "truncated",
        "bad/bomb.png": "too-large",
        "bad/dangling.jpg": "unreadable",
    }

    # Fixing a file clears its ledger row; removing one drops its row too.
    draw((10, 10, 10), "circle", 0).save(bad / "cut.jpg")
    (bad / "empty.jpg").unlink()
    report = index_folder(collection, encoder, tmp_path / "idx", model_ref="clip-tiny", progress=False)
    assert report.new == 1 and sum(report.bad.values()) == 3
    with IndexStore.open(tmp_path / "idx") as store:
        assert {path for path, _, _ in store.ledger()} == {"bad/text.png", "bad/bomb.png", "bad/dangling.jpg"}


def test_changed_file_turned_bad_loses_its_vector(collection: Path, tmp_path: Path, encoder) -> None:
    index_folder(collection, encoder, tmp_path / "idx", model_ref="clip-tiny", progress=False)
    victim = image_path(collection, "blue", "circle-0")
    victim.write_bytes(b"garbage")
    report = index_folder(collection, encoder, tmp_path / "idx", model_ref="clip-tiny", progress=False)
    assert report.bad == {"not-an-image": 1} and report.total == 23
    assert f"blue/{victim.name}" not in IndexStore.open(tmp_path / "idx").file_states()


class _Narrow:
    """The tiny encoder with its vectors cut to 16 dims: same kind, another width."""

    def __init__(self, inner) -> None:
        self.inner, self.embed_dim = inner, 16

    @property
    def identity(self) -> dict:
        return {**self.inner.identity, "embed_dim": 16}

    @property
    def image_transform(self):
        return self.inner.image_transform

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.inner.encode_image(pixels)[:, :16], dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(self.inner.encode_text(texts)[:, :16], dim=-1)


def test_encoder_of_another_width_is_refused(collection: Path, tmp_path: Path, encoder) -> None:
    index_folder(collection, encoder, tmp_path / "idx", model_ref="clip-tiny", progress=False)
    narrow = _Narrow(encoder)
    with pytest.raises(UserError, match=f"{encoder.embed_dim}-d vectors .* the given model is a 16-d"):
        Searcher(tmp_path / "idx", narrow)
    with pytest.raises(UserError, match="--new-version"):  # another width is another model
        index_folder(collection, narrow, tmp_path / "idx", model_ref="clip-tiny", progress=False)


def test_readers_use_the_published_ann_and_never_write(collection: Path, tmp_path: Path, encoder) -> None:
    index_dir = tmp_path / "idx"
    index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    published = index_dir / "versions" / "1"
    old_pointer, old_files = (published / "ann.json").read_bytes(), sorted(published.glob("*.faiss"))
    old_faiss = {p.name: p.read_bytes() for p in old_files}
    gone = image_path(collection, "red", "bar-0")
    query = encode_images([gone], encoder)
    gone.unlink()
    index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    assert sorted(p.name for p in published.glob("*.faiss")) == ["ann-g2.faiss"]  # the older file was cleaned up

    # An older published generation (a writer that has not published yet): the reader searches it as it is,
    # leaving out items deleted since, and writes nothing.
    for name, data in old_faiss.items():
        (published / name).write_bytes(data)
    (published / "ann.json").write_bytes(old_pointer)
    snapshot = {p: p.read_bytes() for p in sorted(index_dir.rglob("*")) if p.is_file()}
    with IndexStore.open(index_dir) as store:
        assert not store.is_published_current(1)
        hits = store.search(query, k=30)[0]
        assert store.view.generation == 1 and store.view.count == 24
        assert len(hits) == 23 and str(gone) not in {h.path for h in hits}
    assert {p: p.read_bytes() for p in sorted(index_dir.rglob("*")) if p.is_file()} == snapshot
    # Nothing published (a first run killed before it published), or a damaged file: an exact view is
    # built in memory, and still nothing is written.
    for damage in ("missing", "corrupt"):
        if damage == "missing":
            (published / "ann.json").unlink()
        else:
            (published / "ann.json").write_bytes(old_pointer)
            (published / "ann-g1.faiss").write_bytes(b"garbage")
        snapshot = {p: p.read_bytes() for p in sorted(index_dir.rglob("*")) if p.is_file()}
        with IndexStore.open(index_dir) as store:
            assert len(store.search(query, k=5)[0]) == 5 and not store.view.published and store.view.count == 23
        assert {p: p.read_bytes() for p in sorted(index_dir.rglob("*")) if p.is_file()} == snapshot
    # The writer publishes again on its next run, with nothing to embed.
    report = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    assert report.embedded == 0
    with IndexStore.open(index_dir) as store:
        assert store.is_published_current(1) and store.view.published and store.view.count == 23
    assert not list(index_dir.rglob("*.tmp"))  # no temp files left behind


def test_empty_folder_gives_empty_index(tmp_path: Path, encoder) -> None:
    (tmp_path / "empty").mkdir()
    report = index_folder(tmp_path / "empty", encoder, tmp_path / "idx", model_ref="clip-tiny", progress=False)
    assert report.total == 0 and "no images found" in report.summary()
    with Searcher(tmp_path / "idx", encoder) as searcher:
        assert searcher.search_text("a red circle", k=5) == []


def test_index_kinds_and_decoders_agree(collection: Path, tmp_path: Path, encoder) -> None:
    # The thread pool, processes, the main thread and model replicas (the default for a small tower on 2 CPUs,
    # so most other tests run it on a 2-core machine) write the same vectors.
    flat = index_folder(
        collection, encoder, tmp_path / "flat", model_ref="clip-tiny", decoder="thread", workers=2, progress=False
    )
    procs = index_folder(
        collection,
        encoder,
        tmp_path / "hnsw",
        model_ref="clip-tiny",
        index_kind="hnsw",
        decoder="process",
        workers=2,
        progress=False,
    )
    here = index_folder(collection, encoder, tmp_path / "here", model_ref="clip-tiny", workers=0, progress=False)
    replicas = index_folder(
        collection, encoder, tmp_path / "replicas", model_ref="clip-tiny", decoder="replica", workers=2,
        batch_size=5, progress=False,
    )  # fmt: skip
    assert flat.total == procs.total == here.total == replicas.embedded == 24
    assert "img/s, 2 model replicas)" in replicas.summary() and "img/s, 2 decoder processes)" in procs.summary()
    assert "img/s, decoded in the main thread)" in here.summary() and "img/s, 2 decoder threads)" in flat.summary()
    a, b = vectors_by_path(tmp_path / "flat"), vectors_by_path(tmp_path / "hnsw")
    for other in (b, vectors_by_path(tmp_path / "here"), vectors_by_path(tmp_path / "replicas")):
        assert sorted(other) == sorted(a)
        for path in a:  # a replica multiplies on one thread: the same vectors up to float rounding
            np.testing.assert_allclose(a[path], other[path], atol=1e-5)
    with IndexStore.open(tmp_path / "hnsw") as store:
        inner = faiss.downcast_index(faiss.downcast_index(store.view.index).index)
        assert isinstance(inner, faiss.IndexHNSWFlat)
        query = np.stack([a[p] for p in sorted(a)])
        assert [hits[0].path for hits in store.search(query, k=1)] == sorted(a)
    # Switching kind on an existing index rebuilds FAISS without re-embedding.
    for kind, cls in (("ivf", faiss.IndexIVFFlat), ("pq", faiss.IndexRefineFlat)):
        report = index_folder(
            collection, encoder, tmp_path / "hnsw", model_ref="clip-tiny", index_kind=kind, progress=False
        )
        assert report.embedded == 0
        with IndexStore.open(tmp_path / "hnsw") as store:
            assert isinstance(faiss.downcast_index(faiss.downcast_index(store.view.index).index), cls)
            assert [hits[0].path for hits in store.search(query, k=1)] == sorted(a)


def test_choose_index_kind_and_bad_kind() -> None:
    assert choose_index_kind(10) == "flat"
    assert choose_index_kind(FLAT_MAX) == "pq"
    assert choose_index_kind(10, "hnsw") == "hnsw"
    with pytest.raises(UserError, match="unknown"):
        choose_index_kind(10, "annoy")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1000, 1500)
    exact = build_faiss_index(vectors, ids, "flat")
    _, top = exact.search(vectors[:5], 1)
    assert top.ravel().tolist() == [1000, 1001, 1002, 1003, 1004]  # FAISS ids are the given ids


def test_opening_a_missing_or_corrupt_index_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no index here"):
        IndexStore.open(tmp_path)
    (tmp_path / "meta.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a readable index"):
        IndexStore.open(tmp_path)


def test_a_failed_batch_is_rolled_back_whole(tmp_path: Path, encoder) -> None:
    with IndexStore.create(tmp_path / "idx", root=tmp_path) as store:
        v = store.add_version(identity=encoder.identity, model_ref="clip-tiny", index_kind="auto", preprocess={}).id
        rows = [ItemRow("a.png", "h1", 1, 1.0), ItemRow("b.png", None, 1, 1.0)]  # NOT NULL fails on row 2
        vectors = np.full((2, encoder.embed_dim), encoder.embed_dim**-0.5, dtype=np.float32)
        with pytest.raises(sqlite3.IntegrityError):
            store.upsert_batch(rows, vectors, version=v)
        assert store.count == 0 and store.generation(v) == 0 and store.vector_count(v) == 0
        with pytest.raises(ValueError, match="shape"):
            store.upsert_batch(rows[:1], vectors, version=v)
        assert store.upsert_batch(rows[:1], vectors[:1], version=v) == [1] and store.generation(v) == 1
    conn = sqlite3.connect(tmp_path / "idx" / "meta.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_per_batch_normalisation_equals_the_per_image_transform(tmp_path: Path) -> None:
    from vitrina.data.transforms import eval_transform
    from vitrina.index.decode import Job, collate, decode

    transform = eval_transform(32, (0.48, 0.45, 0.40), (0.27, 0.26, 0.28))
    jobs = []
    for i, (w, h) in enumerate([(48, 48), (97, 40), (33, 120), (200, 150)]):
        path = tmp_path / f"{i}.png"
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        jobs.append(Job(path.name, path, 0, 0.0, None, None, True))
    whole = torch.stack([decode(job, transform).pixels for job in jobs])
    split = collate([decode(job, transform.to_uint8) for job in jobs], transform.normalize).pixels
    assert split.dtype == torch.float32 and torch.equal(whole, split)


def test_each_file_is_read_once_and_hashed_as_decoded(tmp_path: Path, monkeypatch) -> None:
    import builtins

    import vitrina.index.decode as decode_module
    from vitrina.data.images import load_image
    from vitrina.data.transforms import eval_transform
    from vitrina.index.decode import Job, content_hash, decode

    paths = write_collection(tmp_path / "photos", variants=1)[:4]  # PNG and JPEG
    transform = eval_transform(16)
    expected = {path: (content_hash(path), transform(load_image(path, draft_size=16))) for path in paths}
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def no_second_read(path):
        raise AssertionError(f"{path} read a second time to hash it")

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(decode_module, "content_hash", no_second_read)
    for path in paths:
        decoded = decode(Job(path.name, path, 0, 0.0, None, None, True), transform, draft_size=16)
        assert decoded.reason == "" and decoded.content_hash == expected[path][0]
        assert torch.equal(decoded.pixels, expected[path][1])
    assert sorted(opened) == sorted(map(str, paths))


def test_replicas_are_refused_where_forking_the_model_is_unsafe(
    collection: Path, tmp_path: Path, encoder, monkeypatch
) -> None:
    import vitrina.index.replicas as replicas

    monkeypatch.setattr(replicas.torch.cuda, "is_initialized", lambda: True)  # a process that started CUDA
    with pytest.raises(UserError, match="--decoder replica forks the model.*use --decoder thread"):
        index_folder(collection, encoder, tmp_path / "idx", model_ref="clip-tiny", decoder="replica", progress=False)
    assert not (tmp_path / "idx").exists()  # refused before anything was written
    report = index_folder(collection, encoder, tmp_path / "idx", model_ref="clip-tiny", progress=False)
    assert report.embedded == 24  # the default turns to decoder threads


def test_default_decoding_gives_a_small_tower_on_two_cores_model_replicas() -> None:
    from vitrina.index.decode import default_decoding

    # the demo's 48 px and a 64 px tower on 2 CPUs: two processes that each decode and embed whole batches
    assert default_decoding(48, cpus=1) == default_decoding(64, cpus=2) == ("replica", 2)
    assert default_decoding(224, cpus=2) == default_decoding(None, cpus=2) == ("thread", 2)  # long products
    assert default_decoding(48, cpus=4) == ("thread", 2)  # not measured on more cores: decoders beside
    assert default_decoding(48, cpus=2, can_fork=False) == ("thread", 2)  # CUDA started, or not Linux
