"""Past one machine: the Ray engine gives the local engine's index, and the sharded IVF the one-shot IVF.

Ray runs in local mode on this machine (``ray.init(num_cpus=2)``), once for the module: the sameness test has
one embedding actor and one decoding actor of one CPU each, the others one actor that decodes its own batches.
The collection is ``test_index``'s PIL-drawn images, the encoder the real ``clip-tiny``; the IVF tests use
synthetic unit vectors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vitrina.cli import main as cli_main
from vitrina.errors import UserError
from vitrina.index import ann, ivf, shards
from vitrina.index.embed import IndexReport, _Run, index_folder
from vitrina.index.export import export_index
from vitrina.index.lock import WriterLock
from vitrina.index.sources import open_source, read_list
from vitrina.index.store import IndexStore, ItemRow

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
from test_index import make_encoder, write_collection  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray cluster of 2 CPUs for the module; its address lets a subprocess join it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """24 images in 3 class folders, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    write_collection(root)
    (root / "red" / "broken.png").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def local_index(photos: Path, encoder, tmp_path_factory) -> Path:
    """The local engine's index of ``photos``: the reference."""
    out = tmp_path_factory.mktemp("local") / "ix"
    index_folder(photos, encoder, out, model_ref="clip-tiny", batch_size=5, progress=False, export_towers=False)
    return out


def by_path(index_dir: Path) -> dict[str, tuple[int, np.ndarray]]:
    """Stored path -> (item id, vector) of the active version, asserting every id and path once."""
    with IndexStore.open(index_dir) as store:
        ids, vectors = store.all_vectors()
        rows = store.item_rows()
    assert len(set(ids.tolist())) == len(ids) == len(rows), "an item id twice, or an item without its vector"
    assert len({r[1] for r in rows}) == len(rows), "a path twice"
    path_of = {r[0]: r[1] for r in rows}
    return {path_of[int(i)]: (int(i), v) for i, v in zip(ids, vectors, strict=True)}


def assert_same_index(index_dir: Path, reference: Path) -> None:
    """Same paths, same item ids, vectors to 1e-5, same ledger."""
    got, want = by_path(index_dir), by_path(reference)
    assert got.keys() == want.keys()
    for path, (item_id, vector) in want.items():
        assert got[path][0] == item_id, f"{path}: id {got[path][0]}, the local engine gave {item_id}"
        np.testing.assert_allclose(got[path][1], vector, atol=1e-5, err_msg=path)
    with IndexStore.open(index_dir) as a, IndexStore.open(reference) as b:
        assert [r[:2] for r in a.ledger()] == [r[:2] for r in b.ledger()] == [("red/broken.png", "not-an-image")]


def run_ray(source, encoder, out: Path, **options):
    from vitrina.index.ray_engine import index_with_ray

    settings = dict(model_ref="clip-tiny", shard_size=6, batch_size=4, decoders=0, progress=False)
    return index_with_ray(source, encoder, out, **{**settings, "export_towers": False, **options})


# --- the Ray engine ---------------------------------------------------------------------------


def test_ray_shards_agree_with_the_local_engine(photos, local_index, encoder, ray_address, tmp_path) -> None:
    out = tmp_path / "ray"
    report = run_ray(photos, encoder, out, keep_shards=True, decoders=1)  # 1 CPU embeds, 1 CPU reads and decodes
    assert (report.seen, report.new, report.embedded, report.total) == (25, 24, 24, 24)
    assert report.bad == {"not-an-image": 1} and report.activated and report.from_shards == 0

    folder = shards.shards_dir(out, 1)
    done = shards.manifests(folder)
    assert len(done) >= 4 and [m["shard"] for m in done] == sorted({m["shard"] for m in done})
    test_pid = os.getpid()
    for manifest in done:  # decoded and embedded in other processes: Ray's actors, one of each
        assert manifest["pids"] and test_pid not in manifest["pids"]
        assert manifest["decode_pids"] and test_pid not in manifest["decode_pids"]
        assert not set(manifest["pids"]) & set(manifest["decode_pids"])
    # Every file in exactly one shard; each shard's embeddings equal the local engine's for that path.
    reference = by_path(local_index)
    seen: list[str] = []
    for manifest in done:
        table = pq.read_table(folder / manifest["file"])
        assert table.schema.equals(shards.schema(encoder.embed_dim))
        for row in table.to_pylist():
            seen.append(row["path"])
            if row["reason"]:
                assert row["embedding"] is None and row["path"] == "red/broken.png"
            else:
                np.testing.assert_allclose(row["embedding"], reference[row["path"]][1], atol=1e-5)
    assert sorted(seen) == sorted([*reference, "red/broken.png"])
    assert_same_index(out, local_index)  # ingested: same ids (store-assigned in listing order), same vectors

    # A shard ingested again adds nothing.
    with WriterLock(out), IndexStore.open_for_writing(out) as store:
        run = _Run(store, encoder, model_ref="clip-tiny", report=IndexReport(str(out)), load_encoder=None)
        run.choose_version(photos.resolve(), new_version=False, index_kind=None)
        from vitrina.index.ray_engine import ingest_shard

        plan = shards.plan_of(folder, done[1])
        before = store.item_rows()
        for _ in range(2):
            assert ingest_shard(run, run.target, folder, plan, dim=encoder.embed_dim, upsert=True) == len(plan.jobs)
        assert store.item_rows() == before and store.vector_count(1) == 24
    assert_same_index(out, local_index)


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import ray
from test_index import make_encoder
from vitrina.index.ray_engine import index_with_ray


def pausing_loader(ref):  # runs in the embedding actor: sleeps for good after 10 batches of <= 2 files
    import sys
    sys.path.insert(0, {tests!r})
    from test_index import PausingEncoder
    from vitrina.checkpoint import load_encoder
    return PausingEncoder(load_encoder(ref), pause_after=10)


ray.init(address={address!r}, logging_level="WARNING")
index_with_ray({folder!r}, make_encoder(), {out!r}, model_ref="clip-tiny", shard_size=4, batch_size=2, decoders=0,
               progress=False, export_towers=False, load_encoder=pausing_loader)
"""


def test_a_killed_ray_job_resumes_from_its_shards(photos, local_index, encoder, ray_address, tmp_path) -> None:
    out = tmp_path / "ray"
    script = _KILL_SCRIPT.format(tests=str(TESTS_DIR), address=ray_address, folder=str(photos), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = shards.shards_dir(out, 1)
    try:
        deadline = time.monotonic() + 120
        # 25 files in 7 shards (4 each, the last 1), in any order: 20 embedded files complete 2 shards at least
        while len(shards.manifests(folder)) < 2:
            assert proc.poll() is None, f"the Ray job exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no shard finished in 2 minutes"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = shards.manifests(folder)
    assert 2 <= len(finished) < 7
    with IndexStore.open(out) as store:  # the shards are ingested after the last one: nothing yet
        assert store.count == 0 and [v.state for v in store.versions()] == ["building"]

    report = run_ray(photos, encoder, out, shard_size=4)  # this session's Ray; shards of the same size
    assert report.from_shards == sum(m["good"] for m in finished) > 0
    assert f"{report.from_shards} of them from shards an earlier run had finished" in report.summary()
    assert report.total == report.embedded == 24 and report.activated
    assert_same_index(out, local_index)
    assert not folder.exists()  # ingested shards are removed


def test_a_list_of_uris_through_the_cli(photos, local_index, ray_address, tmp_path, capsys) -> None:
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    rows = [
        {
            "path": f"file://{p}" if i % 3 == 0 else str(p.relative_to(photos)) if i % 3 == 1 else str(p),
            "label": p.parent.name,
        }
        for i, p in enumerate(files)
    ]
    listing = photos / "list.parquet"  # beside the images: they are stored relative to its folder
    pq.write_table(pa.Table.from_pylist(rows + rows[:2]), listing)  # repeats are kept once
    try:
        assert [str(e.path) for e in read_list(listing)] == [str(p) for p in files]
        code = cli_main(
            ["index", str(listing), "--model", "clip-tiny", "--out", str(tmp_path / "ray"), "--engine", "ray",
             "--address", ray_address, "--actors", "1", "--workers", "0", "--shard-size", "8", "--batch-size", "4"]
        )  # fmt: skip
    finally:
        listing.unlink()
    assert code == 0, capsys.readouterr().err
    assert "24 in index" in capsys.readouterr().out
    assert_same_index(tmp_path / "ray", local_index)


def test_source_and_flag_errors_name_what_to_fix(photos, tmp_path, capsys) -> None:
    bad = tmp_path / "list.csv"
    bad.write_text("file,caption\na.png,x\n")
    with pytest.raises(UserError, match=r"list\.csv: no column named path, uri, url or image \(found: file, caption\)"):
        open_source(bad).list_entries()
    bad.write_text('path\n""\n')
    with pytest.raises(UserError, match=r"list\.csv: row 1 has no path"):
        open_source(bad).list_entries()
    remote = tmp_path / "list.jsonl"
    remote.write_text(json.dumps({"path": "nosuchproto://bucket/a.jpg"}) + "\n")
    with pytest.raises(UserError, match=r"list\.jsonl: row 1: cannot read nosuchproto:// URLs"):
        open_source(remote).list_entries()
    with pytest.raises(UserError, match="not a folder, nor a list of images"):
        open_source(photos / "red" / "circle-0.jpg")
    from vitrina.index.ray_engine import check_address

    with pytest.raises(UserError, match=r"--address 127\.0\.0\.1:9: no Ray cluster answers there"):
        check_address("127.0.0.1:9")  # refused at once, before anything is written (Ray would retry for minutes)
    assert cli_main(["index", str(photos), "--model", "clip-tiny", "--out", str(tmp_path / "x"), "--actors", "2"]) == 2
    assert "--actors: only for --engine ray" in capsys.readouterr().err
    assert cli_main(["index", str(bad), "--model", "clip-tiny", "--out", str(tmp_path / "x")]) == 2
    assert "a list of images is read by --engine ray" in capsys.readouterr().err
    ray_decoder = ["index", str(photos), "--model", "clip-tiny", "--out", str(tmp_path / "x"), "--engine", "ray"]
    assert cli_main([*ray_decoder, "--decoder", "replica"]) == 2
    assert "--decoder: only for --engine local" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_local_engine_does_not_import_ray() -> None:
    code = "import sys, vitrina.cli, vitrina.index.embed, vitrina.index.store; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# --- the IVF at scale ---------------------------------------------------------------------------


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim))
    vectors = centres[rng.integers(0, 32, n)] + 0.5 * rng.standard_normal((n, dim))  # clustered, as embeddings are
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """20,000 vectors of width 32 under shuffled, non-contiguous item ids, as 4 parts of unequal size."""
    folder = tmp_path_factory.mktemp("parts")
    vectors = unit_vectors(20_000, 32, seed=1)
    ids = np.random.default_rng(2).permutation(np.arange(1, 60_001, 3))[:20_000].astype(np.int64)
    bounds = [0, 7_000, 10_000, 16_000, 20_000]
    parts = [
        ivf.write_npy_part(folder / f"p{k}", ids[a:b], vectors[a:b])
        for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))
    ]
    return folder, ids, vectors, parts


def same_lists(a: faiss.Index, b: faiss.Index) -> bool:
    """Whether two IVFs hold the same item ids in every inverted list."""
    lists_a, lists_b = ivf.list_ids(a), ivf.list_ids(b)
    return len(lists_a) == len(lists_b) and all(np.array_equal(x, y) for x, y in zip(lists_a, lists_b, strict=True))


def same_answers(a: faiss.Index, b: faiss.Index, queries: np.ndarray, k: int = 10) -> bool:
    """Whether two IVFs return the same ids (and scores to 1e-5) for every query, visiting every list."""
    for index in (a, b):
        faiss.extract_index_ivf(index).nprobe = faiss.extract_index_ivf(index).nlist
    scores_a, ids_a = a.search(queries, k)
    scores_b, ids_b = b.search(queries, k)
    return bool(np.array_equal(ids_a, ids_b) and np.allclose(scores_a, scores_b, atol=1e-5))


@pytest.mark.parametrize("pq_codes", [False, True], ids=["ivf-flat", "ivf-pq"])
def test_the_merged_ivf_equals_a_one_shot_build(synthetic, tmp_path, pq_codes) -> None:
    _, ids, vectors, parts = synthetic
    layout = ivf.ivf_layout(len(ids), 32, pq=pq_codes)
    trained = ivf.train_ivf(ivf.training_sample(parts, layout, seed=0), layout)
    assert trained.is_trained and trained.ntotal == 0 and layout.pq_m == (4 if pq_codes else 0)

    filled = ivf.fill_parts(trained, parts, tmp_path / "filled", workers=2)
    assert [n for _, n, _ in filled] == [p.rows for p in parts]
    assert all(pid != os.getpid() for _, _, pid in filled)  # each part filled in its own process
    merged = ivf.merge_on_disk(trained, [path for path, _, _ in filled], tmp_path / "lists.ivfdata")
    faiss.write_index(merged, str(tmp_path / "merged.faiss"))
    del merged
    on_disk = ann.read_ivf_on_disk(tmp_path / "merged.faiss", tmp_path / "lists.ivfdata")  # as a reader opens it
    one_shot = ivf.fill(trained, ids, vectors)  # the local build: every vector at once, same trained quantizer
    assert on_disk.ntotal == one_shot.ntotal == len(ids)
    assert same_lists(on_disk, one_shot)
    queries = unit_vectors(50, 32, seed=3)
    assert same_answers(on_disk, one_shot, queries)

    # The negative control: one part left out is caught by both comparisons.
    dropped = ivf.merge_on_disk(trained, [path for path, _, _ in filled[:2] + filled[3:]], tmp_path / "short.ivfdata")
    assert dropped.ntotal == len(ids) - parts[2].rows
    assert not same_lists(dropped, one_shot)
    assert not same_answers(dropped, one_shot, np.concatenate([queries, vectors[10_000:10_050]]))


def test_an_on_disk_ivf_is_published_and_read_like_any_ann(synthetic, tmp_path, monkeypatch) -> None:
    _, ids, vectors, _ = synthetic
    monkeypatch.setattr(ann, "ONDISK_MIN", 1_000)  # past it, kind "ivf" is built in parts, merged on disk
    monkeypatch.setattr(ivf, "PART_ROWS", 6_000)
    out = tmp_path / "ix"
    identity = {"kind": "synthetic", "embed_dim": 32, "name": "random", "digest": "0" * 64}
    with IndexStore.create(out, root=tmp_path) as store:
        version = store.add_version(identity=identity, model_ref="random", index_kind="ivf", preprocess={})
        rows = [(int(i), ItemRow(f"img/{i}.png", f"h{i}", 1, 0.0, "l", None)) for i in ids]
        store.insert_items(version.id, rows, vectors)
        store.mark_ready(version.id)
        assert [len(p.load()[0]) for p in store.vector_parts(version.id, ivf.PART_ROWS)] == [6_000] * 3 + [2_000]
        store.publish_ann(version.id)
        store.activate(version.id)
    folder = ann.version_dir(out, 1)
    pointer = json.loads((folder / ann.POINTER).read_text())
    assert pointer["kind"] == "ivf" and pointer["data"] == f"ann-g{pointer['generation']}.ivfdata"
    assert pointer["layout"] == ivf.ivf_layout(20_000, 32).describe() and pointer["count"] == 20_000
    assert sorted(p.name for p in folder.iterdir()) == sorted([pointer["file"], pointer["data"], ann.POINTER])

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    moved = tmp_path / "moved"  # an index folder may move: the data file is found beside its index file
    out.rename(moved)
    with IndexStore.open(moved) as store:
        view = store.view
        assert view.published and isinstance(faiss.downcast_index(view.index), faiss.IndexIVFFlat)
        trained = ivf.empty_from_file(ann.version_dir(moved, 1) / pointer["file"])  # the quantizer it was built with
        exact = ivf.fill(trained, ids, vectors)  # every vector at once, lists in memory
        assert same_lists(view.index, exact) and same_answers(view.index, exact, vectors[:20])
        hits = store.search(vectors[:5], k=1)
        assert [h[0].id for h in hits] == [int(i) for i in ids[:5]]
        assert [v.name for v in store.versions()] == ["v1"] and store.vector_count(1) == 20_000
    after = {p.relative_to(moved): p.stat().st_mtime_ns for p in moved.rglob("*") if p.is_file()}
    assert after == {p.relative_to(out): t for p, t in before.items()}  # readers wrote nothing
    assert export_index(moved, tmp_path / "export").count == 20_000

    # A new generation replaces both files; a view loaded before keeps answering (its lists stay mapped).
    with WriterLock(moved), IndexStore.open_for_writing(moved) as store:
        reader = store.load_view()
        store.delete_paths([f"img/{ids[0]}.png"])
        store.publish_ann(1)
        assert store.refresh_view() and store.view.count == 19_999 and store.view.generation > reader.generation
        assert reader.search(vectors[:3], 1)[1][:, 0].tolist() == ids[:3].tolist()
    names = sorted(p.name for p in ann.version_dir(moved, 1).iterdir())
    assert len(names) == 3 and not any(f"g{pointer['generation']}." in n for n in names)


def test_the_memory_arithmetic_of_the_layouts() -> None:
    billion = ivf.ivf_layout(1_000_000_000, 512)
    assert billion.describe() == "IVF65536,PQ64" and billion.list_bytes_per_vector == 72
    memory = billion.memory()
    assert memory["lists"] == 72 * 10**9 + 24 * 65_536  # 72 GB on disk, memory-mapped
    assert memory["quantizer"] == 65_536 * 512 * 4 + 256 * 512 * 4  # 128 MiB + the PQ codebooks
    assert billion.sample == 39 * 65_536 and memory["training"] == 39 * 65_536 * 2048  # 5.2 GB, once
    ten_million = ivf.ivf_layout(9_999_999, 512)
    assert ten_million.pq_m == 0 and ten_million.list_bytes_per_vector == 2056
    assert ann.choose_index_kind(ivf.IVF_PQ_MIN) == "ivf" and ann.choose_index_kind(ivf.IVF_PQ_MIN - 1) == "pq"
