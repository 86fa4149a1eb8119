"""The index as a live thing: model identity by weights digest, versions built beside the active one,
kills during a --new-version run, one writer at a time, and export -> import.

Two real checkpoints of the tiny CLIP preset with different seeds play "the old model" and "the new
model"; the collection is the shapes of ``test_index``.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_index import TESTS_DIR, by_path, image_path, write_collection

from vitrina.checkpoint import load_encoder, save_model
from vitrina.cli import main as cli
from vitrina.errors import UserError
from vitrina.index.embed import index_folder
from vitrina.index.export import export_index, import_index
from vitrina.index.lock import WriterLock
from vitrina.index.store import IndexStore
from vitrina.models.registry import build_model


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Two checkpoints of one preset with different weights: A (seed 0) and B (seed 1)."""
    root = tmp_path_factory.mktemp("models")
    save_model(build_model("clip-tiny", seed=0), root / "A")
    save_model(build_model("clip-tiny", seed=1), root / "B")
    return root / "A", root / "B"


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    write_collection(root, captions=True)
    return root


def test_checkpoint_records_the_digest_of_its_weights(models, tmp_path: Path) -> None:
    a, b = models
    config = json.loads((a / "config.json").read_text())
    from vitrina.digest import file_sha256

    assert config["weights_sha256"] == file_sha256(a / "model.safetensors")
    assert load_encoder(a).identity["digest"] == config["weights_sha256"]
    assert load_encoder(a).identity["digest"] != load_encoder(b).identity["digest"]
    # Retrained in place: same folder, same config hash, new weights -> new digest.
    save_model(build_model("clip-tiny", seed=2), tmp_path / "A")
    save_model(build_model("clip-tiny", seed=3), tmp_path / "A")
    assert load_encoder(tmp_path / "A").identity["digest"] == file_sha256(tmp_path / "A" / "model.safetensors")


def test_other_weights_are_refused_and_the_folder_is_unchanged(models, collection, tmp_path: Path, capsys) -> None:
    a, b = models
    index_dir = tmp_path / "idx"
    assert cli(["index", str(collection), "--model", str(a), "--out", str(index_dir)]) == 0
    before = folder_state(index_dir)
    capsys.readouterr()
    assert cli(["index", str(collection), "--model", str(b), "--out", str(index_dir)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--new-version" in error
    assert str(a) in error and str(b) in error  # names both models
    assert folder_state(index_dir) == before  # byte for byte

    # The same happens to a checkpoint retrained in place under the original folder name.
    retrained = tmp_path / "A-copy"
    save_model(build_model("clip-tiny", seed=0), retrained)
    index_dir2 = tmp_path / "idx2"
    assert cli(["index", str(collection), "--model", str(retrained), "--out", str(index_dir2)]) == 0
    save_model(build_model("clip-tiny", seed=5), retrained)
    before = folder_state(index_dir2)
    assert cli(["index", str(collection), "--model", str(retrained), "--out", str(index_dir2)]) == 2
    assert "--new-version" in capsys.readouterr().err
    assert folder_state(index_dir2) == before
    # Searching with the stored reference, whose weights changed, is refused too; an explicit --model is trusted.
    assert cli(["search", str(index_dir2), "a red circle", "--runtime", "torch"]) == 2
    assert "now holds other weights" in capsys.readouterr().err
    # The towers exported when the version was built hold the weights it was built with: they still answer.
    assert cli(["search", str(index_dir2), "a red circle", "--runtime", "onnx"]) == 0


def test_new_version_is_built_beside_the_active_one_and_kept_up_to_date(models, collection, tmp_path) -> None:
    a, b = models
    enc_a, enc_b = load_encoder(a), load_encoder(b)
    index_dir = tmp_path / "idx"
    index_folder(collection, enc_a, index_dir, model_ref=str(a), progress=False)
    report = index_folder(collection, enc_b, index_dir, model_ref=str(b), new_version=True, activate=False)
    assert (report.version, report.ready, report.activated, report.embedded) == ("v2", True, False, 24)
    with IndexStore.open(index_dir) as store:
        assert [(v.name, v.state, v.active) for v in store.versions()] == [
            ("v1", "ready", True),
            ("v2", "ready", False),
        ]
        assert [v.digest for v in store.versions()] == [enc_a.identity["digest"], enc_b.identity["digest"]]

    # Write to both: a new file and a changed file reach every version, each with its own model.
    new_file = collection / "red" / "extra.png"
    image_path(collection, "green", "circle-0").rename(new_file)
    changed = image_path(collection, "blue", "bar-1")
    image_path(collection, "red", "square-0").replace(changed)
    report = index_folder(collection, enc_a, index_dir, model_ref=str(a), progress=False)
    assert report.by_version == {"v1": 2, "v2": 2} and report.deleted == 2
    with IndexStore.open(index_dir) as store:
        assert store.vector_count(1) == store.vector_count(2) == store.count == 23
        ids = {path: i for i, path, _, _ in store.items()}
        for version, encoder in ((1, enc_a), (2, enc_b)):
            assert store.is_published_current(version)
            from vitrina.search import encode_images

            expected = encode_images([new_file, changed], encoder)
            got = store.item_vectors([ids[str(new_file)], ids[str(changed)]], version=version)
            np.testing.assert_allclose(np.stack([got[ids[str(new_file)]], got[ids[str(changed)]]]), expected, atol=1e-5)

    # Activation moves searches; drop removes vectors and files; the active version cannot be dropped.
    with WriterLock(index_dir), IndexStore.open(index_dir) as store:
        store.activate("v2")
        with pytest.raises(UserError, match="active version"):
            store.drop("v2")
        store.drop("v1")
        assert [v.name for v in store.versions()] == ["v2"] and not (index_dir / "versions" / "1").exists()


def test_activate_if_better_swaps_on_evidence(models, collection, tmp_path, capsys) -> None:
    a, b = models
    index_dir = tmp_path / "idx"
    assert cli(["index", str(collection), "--model", str(a), "--out", str(index_dir)]) == 0
    args = ["index", str(collection), "--model", str(b), "--out", str(index_dir), "--new-version"]
    assert cli([*args, "--activate-if-better"]) == 0
    out = capsys.readouterr().out
    with IndexStore.open(index_dir) as store:
        active = store.active_version().name
    from vitrina.eval.retrieval import compare_versions

    old, new = compare_versions(index_dir, "v1", "v2")["headline"]
    assert active == ("v2" if new >= old else "v1")
    assert ("activated" in out) == (new >= old) and "headline" in out
    assert cli(["versions", str(index_dir), "--compare", "v1", "v2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["headline"] == [old, new]


_NEW_VERSION_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_index import PausingEncoder
from vitrina.checkpoint import load_encoder
from vitrina.index.embed import index_folder
encoder = PausingEncoder(load_encoder({model!r}), delay_s=0.1)  # the model runs here: 0.1 s a batch
print("started", flush=True)
index_folder({folder!r}, encoder, {out!r}, model_ref={model!r}, batch_size=2, new_version=True, progress=False,
             workers=0)
print("done", flush=True)
"""


def test_kill_9_at_random_points_of_a_new_version_run(models, tmp_path: Path) -> None:
    a, b = models
    collection = tmp_path / "photos"
    write_collection(collection, variants=3)  # 36 images = 18 batches of 2
    index_dir = tmp_path / "idx"
    index_folder(collection, load_encoder(a), index_dir, model_ref=str(a), progress=False)
    script = _NEW_VERSION_SCRIPT.format(tests=str(TESTS_DIR), model=str(b), folder=str(collection), out=str(index_dir))
    rng = random.Random(0)
    kills, finished = 0, False
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline() == b"started\n", proc.stderr.read()
        time.sleep(rng.uniform(0.0, 2.0))  # 18 batches of 0.1 s, then the publish and the swap
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        with IndexStore.open(index_dir) as store:
            versions = {v.name: v for v in store.versions()}
            active = store.active_version()
            # Never a half-built version in service: v1 serves until v2 has every item.
            served = active.name
            if served == "v2":
                assert versions["v2"].state == "ready" and store.vector_count(2) == store.count == 36
            else:
                assert active.name == "v1" and store.vector_count(1) == 36
            assert len(store.search(store.item_vectors([1], version=active.id)[1], k=3)[0]) == 3
        if proc.returncode == 0:
            finished = True
            break
    assert kills >= 1
    if not finished:
        resumed = index_folder(collection, load_encoder(b), index_dir, model_ref=str(b), new_version=True)
        # A kill after the swap (while the query towers export) leaves v2 already serving: nothing to activate.
        assert resumed.activated or served == "v2"
    clean = tmp_path / "clean"
    index_folder(collection, load_encoder(b), clean, model_ref=str(b), progress=False)
    with IndexStore.open(index_dir) as resumed, IndexStore.open(clean) as reference:
        assert resumed.active_version().name == "v2" and resumed.vector_count(2) == 36
        got, want = by_path(resumed, 2), by_path(reference, 1)
        assert got.keys() == want.keys()
        for path, vector in want.items():
            np.testing.assert_allclose(got[path], vector, atol=1e-5)


_SLOW_INDEX_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_index import PausingEncoder, make_encoder
from vitrina.index.embed import index_folder
encoder = PausingEncoder(make_encoder(), pause_after=2)  # pauses in this process: the model runs here
index_folder({folder!r}, encoder, {out!r}, model_ref="clip-tiny", batch_size=4, progress=False, workers=0)
"""


def test_a_second_indexer_fails_at_once_and_the_first_is_unharmed(collection: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    script = _SLOW_INDEX_SCRIPT.format(tests=str(TESTS_DIR), folder=str(collection), out=str(index_dir))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "paused" not in line:  # the first indexer holds the lock, two batches committed
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"indexer exited early: {proc.stderr.read()}"
        start = time.perf_counter()
        with pytest.raises(UserError, match="another writer"):
            index_folder(collection, load_encoder("clip-tiny"), index_dir, model_ref="clip-tiny", progress=False)
        assert time.perf_counter() - start < 5  # at once, not after the first one finishes
        with IndexStore.open(index_dir) as store:
            assert store.vector_count(1) == 8  # the first indexer's committed work is untouched
    finally:
        proc.kill()
        proc.wait(timeout=30)
    report = index_folder(collection, load_encoder("clip-tiny"), index_dir, model_ref="clip-tiny", progress=False)
    assert (report.unchanged, report.embedded, report.total) == (8, 16, 24)


def test_index_kind_auto_keeps_a_stored_explicit_choice(collection: Path, tmp_path: Path) -> None:
    encoder = load_encoder("clip-tiny")
    index_dir = tmp_path / "idx"
    index_folder(collection, encoder, index_dir, model_ref="clip-tiny", index_kind="hnsw", progress=False)
    index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)  # kind not given
    with IndexStore.open(index_dir) as store:
        assert store.active_version().index_kind == "hnsw"
        assert json.loads((index_dir / "versions" / "1" / "ann.json").read_text())["kind"] == "hnsw"
    index_folder(collection, encoder, index_dir, model_ref="clip-tiny", index_kind="auto", progress=False)
    with IndexStore.open(index_dir) as store:
        assert store.active_version().index_kind == "auto"  # an explicit --index-kind auto does switch


def test_export_then_import_answers_the_same(models, collection: Path, tmp_path: Path) -> None:
    a, _ = models
    encoder = load_encoder(a)
    index_dir = tmp_path / "idx"
    index_folder(collection, encoder, index_dir, model_ref=str(a), progress=False)
    export = tmp_path / "export"
    report = export_index(index_dir, export)
    assert (report.count, report.files, report.version) == (24, 1, "v1")
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["model"]["digest"] == encoder.identity["digest"] and manifest["dimension"] == encoder.embed_dim
    assert manifest["preprocessing"]["size"] == 32 and manifest["preprocessing"]["interpolation"] == "bicubic"
    assert manifest["count"] == 24 and len(manifest["files"][0]["sha256"]) == 64

    moved = tmp_path / "elsewhere"
    collection.rename(moved)  # another machine: the images live somewhere else
    imported = import_index(export, tmp_path / "imported", root=moved, model_ref=str(a))
    assert imported.count == 24 and imported.root_exists
    with IndexStore.open(index_dir) as original, IndexStore.open(tmp_path / "imported") as copy:
        queries = original.all_vectors()[1][:6]
        for mine, theirs in zip(original.search(queries, k=5), copy.search(queries, k=5), strict=True):
            assert [h.id for h in mine] == [h.id for h in theirs]
            np.testing.assert_allclose([h.score for h in mine], [h.score for h in theirs], atol=1e-6)
            assert [Path(h.path).relative_to(moved) for h in theirs] == [
                Path(h.path).relative_to(collection) for h in mine
            ]
        assert copy.active_version().digest == encoder.identity["digest"]
    # The imported index is a working index: an incremental run embeds nothing (same files, same model).
    again = index_folder(moved, encoder, tmp_path / "imported", model_ref=str(a), progress=False)
    assert (again.embedded, again.unchanged) == (0, 24)


@pytest.mark.parametrize("target", ["manifest.json", "items-00000.parquet"])
def test_a_flipped_byte_in_any_exported_file_is_refused(models, collection, tmp_path, target) -> None:
    a, _ = models
    index_dir = tmp_path / "idx"
    index_folder(collection, load_encoder(a), index_dir, model_ref=str(a), progress=False)
    export_index(index_dir, tmp_path / "export")
    path = tmp_path / "export" / target
    data = bytearray(path.read_bytes())
    rng = random.Random(target)
    for position in rng.sample(range(len(data)), 8):  # several positions, each alone
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        with pytest.raises(UserError) as error:
            import_index(tmp_path / "export", tmp_path / "imported")
        assert str(path.parent) in str(error.value) and "\n" not in str(error.value)
        assert not (tmp_path / "imported").exists()  # nothing written
        assert not list(tmp_path.glob(".imported*"))
    path.write_bytes(bytes(data))
    assert import_index(tmp_path / "export", tmp_path / "imported").count == 24


def test_an_inconsistent_export_is_refused_by_name(models, collection, tmp_path) -> None:
    a, b = models
    index_dir = tmp_path / "idx"
    index_folder(collection, load_encoder(a), index_dir, model_ref=str(a), progress=False)
    export = tmp_path / "export"
    export_index(index_dir, export)
    (export / "stray.parquet").write_bytes(b"x")
    with pytest.raises(UserError, match="stray.parquet: is not listed"):
        import_index(export, tmp_path / "imported")
    (export / "stray.parquet").unlink()
    (export / "items-00000.parquet").rename(export / "gone.parquet")
    with pytest.raises(UserError, match="gone.parquet: is not listed"):
        import_index(export, tmp_path / "imported")
    (export / "gone.parquet").rename(export / "items-00000.parquet")
    with pytest.raises(UserError, match="holds other weights"):
        import_index(export, tmp_path / "imported", model_ref=str(b))
    (tmp_path / "imported").mkdir()
    (tmp_path / "imported" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        import_index(export, tmp_path / "imported")
    assert (tmp_path / "imported" / "keep.txt").read_text() == "mine"


_FORMAT_1_SCHEMA = """
CREATE TABLE items(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, content_hash TEXT NOT NULL,
    size INTEGER NOT NULL, mtime REAL NOT NULL, label TEXT, caption TEXT, vector BLOB NOT NULL);
CREATE TABLE ledger(path TEXT PRIMARY KEY, reason TEXT NOT NULL, detail TEXT, seen_at REAL NOT NULL);
CREATE TABLE info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def test_an_index_of_the_previous_format_is_upgraded_without_re_embedding(collection: Path, tmp_path: Path) -> None:
    import sqlite3

    encoder = load_encoder("clip-tiny")
    current = tmp_path / "current"
    index_folder(collection, encoder, current, model_ref="clip-tiny", progress=False)
    old = tmp_path / "old"  # the same content, as the first round of vitrina stored it
    old.mkdir()
    conn = sqlite3.connect(old / "meta.sqlite")
    conn.executescript(_FORMAT_1_SCHEMA)
    with IndexStore.open(current) as store:
        rows = [r for chunk, _ in store.iter_items_with_vectors(1) for r in chunk]
        vectors = store.all_vectors(version=1)[1]
    values = [(i, r.path, r.content_hash, r.size, r.mtime, r.label, r.caption) for i, r in rows]
    conn.executemany(
        "INSERT INTO items VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
        [(*row, v.tobytes()) for row, v in zip(values, vectors, strict=True)],
    )
    identity = {k: v for k, v in encoder.identity.items() if k != "digest"}  # no digest then
    info = {
        "identity": json.dumps(identity),
        "model_ref": "clip-tiny",
        "embed_dim": "64",
        "index_kind": "auto",
        "root": str(collection.resolve()),
        "generation": "1",
    }
    conn.executemany("INSERT INTO info VALUES(?, ?)", list(info.items()))
    conn.commit()
    conn.close()

    with pytest.raises(UserError, match="older vitrina"):
        IndexStore.open(old)
    report = index_folder(collection, encoder, old, model_ref="clip-tiny", progress=False)
    assert (report.embedded, report.unchanged, report.version) == (0, 24, "v1")
    with IndexStore.open(old) as store:
        version = store.active_version()
        assert version.digest == encoder.identity["digest"]  # adopted from the model it was built with
        assert store.is_published_current(1) and store.view.count == 24
        np.testing.assert_array_equal(store.all_vectors()[1], vectors)
