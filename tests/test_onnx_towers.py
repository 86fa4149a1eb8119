"""Exported query towers: ONNX Runtime answers as PyTorch does (1e-4), tokens and pixels are the same, a
rejected export falls back, the writer exports and a reader never writes, and the query path runs without torch.

Models: ``clip-tiny`` (our text transformer and BPE) and ``clip-minilm`` untrained (the packaged MiniLM
text tower behind transformers' tokenizer), both with random image towers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitrina.data.transforms import EvalTransform
from vitrina.index.ann import version_dir
from vitrina.index.embed import index_folder
from vitrina.index.store import IndexStore
from vitrina.models.clip import CLIPEncoder
from vitrina.models.export import TOLERANCE, export_towers, probe_images, query_towers
from vitrina.models.registry import build_model
from vitrina.models.text import train_bpe
from vitrina.runtime import ImagePreprocess, OnnxQueryEncoder, QueryTokenizer, TowersUnavailable
from vitrina.runtime.towers import MANIFEST, read_manifest, towers_dir, towers_summary

TEXTS = [
    "",
    " ",
    "\t\n",
    "a",
    "A Photo Of A CAT",
    "a photo of a cat",
    "two  spaces   and\ttabs\nand newlines",
    "émoji ✨ 猫 — naïve café",
    "Ünïcödé ÀÉÎ ÕÜ ß ﬁ ﬂ ẞ",
    "e\u0301 (combining accent) vs é",
    "👍🏽👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "עברית ו-العربية mixed with English",
    "日本語のテキストと中文文本",
    "Ελληνικά και кириллица",
    "<|endoftext|> and [CLS] [SEP] [PAD] written by the user",
    "punctuation!!! ??? ... --- ''' \"quoted\" (parens) [brackets] {braces}",
    "numbers 123 4.56 7,890 1e-4",
    "zero\u200bwidth\u200dspace and control \x00 \x07 chars",
    "a red double-decker bus crossing a stone bridge at dusk",
    "word " * 40,  # past clip-tiny's 32 tokens
    "supercalifragilisticexpialidocious " * 80,  # past MiniLM's 256 tokens
    "x" * 2000,
]


def tiny_encoder(tokenizer=None) -> CLIPEncoder:
    model = build_model("clip-tiny")
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
    return CLIPEncoder(model, name="clip-tiny")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[CLIPEncoder, Path]:
    """clip-tiny with a trained BPE (merges, not only bytes), its towers exported."""
    bpe = train_bpe([t for t in TEXTS if t.strip()] * 3 + ["a photo of a dog", "a red circle"], vocab_size=400)
    encoder = tiny_encoder(bpe)
    folder = tmp_path_factory.mktemp("tiny") / "towers"
    export_towers(encoder, folder)
    return encoder, folder


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> tuple[CLIPEncoder, Path]:
    """clip-minilm, untrained (random image tower and projections, the packaged MiniLM), towers exported."""
    encoder = CLIPEncoder(build_model("clip-minilm"), name="clip-minilm")
    folder = tmp_path_factory.mktemp("minilm") / "towers"
    export_towers(encoder, folder)
    return encoder, folder


def numpy_of(vectors) -> np.ndarray:
    return vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)


def images() -> list[Image.Image]:
    """Images beyond the exporter's probes: a photo-like gradient, a palette image, a huge-aspect strip."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:120, 0:90]
    photo = np.stack([xx * 2.5, yy * 2, (xx + yy) % 256], axis=-1).astype(np.uint8)
    palette = Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).convert("P")
    strip = Image.fromarray(rng.integers(0, 256, (12, 300, 3), dtype=np.uint8))
    return [Image.fromarray(photo), palette, strip, *probe_images()]


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_towers_match_pytorch(which: str, request) -> None:
    encoder, folder = request.getfixturevalue(which)
    manifest = read_manifest(folder)
    assert manifest["digest"] == encoder.identity["digest"] and manifest["embed_dim"] == encoder.embed_dim
    for tower in ("text", "image"):
        assert manifest[tower]["status"] == "ok", manifest[tower]
        assert 0 <= manifest[tower]["max_abs_diff"] <= TOLERANCE
    assert manifest["image"]["preprocess"] == encoder.image_transform.describe()
    assert manifest["text"]["tokenizer"]["lowercase"] is True and manifest["opset"] >= 17
    assert {p.name for p in folder.iterdir()} >= {"text.onnx", "image.onnx", "tokenizer.json", MANIFEST}

    runtime = OnnxQueryEncoder.load(folder, digest=encoder.identity["digest"])
    assert runtime.identity == encoder.identity and runtime.has_text and runtime.has_image
    for batch in (TEXTS, TEXTS[3:6], ["a photo of a cat"]):
        got = runtime.encode_text(batch)
        assert got.dtype == np.float32 and got.shape == (len(batch), encoder.embed_dim)
        np.testing.assert_allclose(got, numpy_of(encoder.encode_text(batch)), atol=1e-4, rtol=0)
    assert runtime.encode_text([]).shape == (0, encoder.embed_dim)
    pictures = images()
    ours = torch.stack([encoder.image_transform(p) for p in pictures])
    theirs = np.stack([runtime.image_transform(p) for p in pictures])
    np.testing.assert_allclose(runtime.encode_image(theirs), numpy_of(encoder.encode_image(ours)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_tokenizer_gives_the_pytorch_ids(which: str, request) -> None:
    encoder, folder = request.getfixturevalue(which)
    tokenizer = QueryTokenizer.from_file(folder / "tokenizer.json")
    for batch in [TEXTS, *([t] for t in TEXTS), TEXTS[::-1][:5]]:
        expected = encoder.model.tokenize(batch)
        ids, mask = tokenizer.encode(batch)
        np.testing.assert_array_equal(ids, expected["input_ids"].numpy())
        np.testing.assert_array_equal(mask, expected["attention_mask"].numpy())
        trimmed = tokenizer(batch)  # what the tower gets: the padding columns past the longest text cut
        length = int(mask.sum(axis=1).max())
        assert trimmed["input_ids"].shape == (len(batch), length) and (mask[:, length:] == 0).all()
    context = read_manifest(folder)["text"]["tokenizer"]["context_length"]
    assert context == (32 if which == "tiny" else 256)
    assert tokenizer.encode([TEXTS[-2]])[0].shape[1] == context  # truncated to the context length


@pytest.mark.parametrize("size", [32, 48, 224])
def test_numpy_preprocessing_equals_eval_transform(size: int) -> None:
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ours = EvalTransform(size, mean, std)
    theirs = ImagePreprocess.from_describe(ours.describe())
    rng = np.random.default_rng(size)
    pictures = [
        *images(),
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),  # already the size: no resize
        Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)),  # 16-bit grey
        Image.fromarray(rng.integers(0, 256, (size * 3, size, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 256, (5, 600), dtype=np.uint8), "L"),
    ]
    for picture in pictures:
        expected = ours(picture).numpy()
        got = theirs(picture)
        assert got.dtype == np.float32 and got.shape == expected.shape == (3, size, size)
        assert np.abs(got - expected).max() <= 1e-6
    assert EvalTransform(size).describe()["interpolation"] == "bicubic"
    with pytest.raises(ValueError, match="no numpy twin"):
        ImagePreprocess.from_describe({**ours.describe(), "resize": "squash"})


def test_a_mismatching_export_is_rejected_and_not_used(tmp_path: Path, monkeypatch) -> None:
    import vitrina.models.export as export

    encoder = tiny_encoder()
    monkeypatch.setattr(export, "_check", lambda encoder, runtime, tower: 3e-4 if tower == "text" else 0.0)
    folder = tmp_path / "towers"
    report = export_towers(encoder, folder)
    manifest = read_manifest(folder)
    assert manifest["text"]["status"] == "rejected" and manifest["text"]["max_abs_diff"] == 3e-4
    assert "3.00e-04" in manifest["text"]["reason"] and "exceeds 0.0001" in manifest["text"]["reason"]
    assert manifest["image"]["status"] == "ok" and "text rejected" in report.summary()
    assert not (folder / "text.onnx").exists() and not (folder / "tokenizer.json").exists()  # never published
    assert towers_summary(folder, encoder.identity["digest"]) == "image (text rejected)"
    runtime = OnnxQueryEncoder.load(folder, digest=encoder.identity["digest"])
    assert not runtime.has_text and runtime.has_image and "rejected" in runtime.why_not("text")
    with pytest.raises(TowersUnavailable, match="text tower rejected"):
        runtime.encode_text(["a cat"])
    # The real tolerance check: nothing is that close.
    monkeypatch.undo()
    export_towers(encoder, folder, tolerance=0.0)
    assert {read_manifest(folder)[t]["status"] for t in ("text", "image")} == {"rejected"}
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST]  # the image tower published before is gone
    with pytest.raises(TowersUnavailable, match="other weights"):
        OnnxQueryEncoder.load(folder, digest="0" * 64)


def test_a_model_without_exportable_towers_is_recorded_not_fatal(tmp_path: Path) -> None:
    class Fake:
        embed_dim = 4
        identity = {"kind": "fake", "embed_dim": 4, "name": "fake", "digest": "f" * 64}
        image_transform = staticmethod(lambda image: torch.zeros(3, 8, 8))

    towers = query_towers(Fake())
    assert towers.text is None and towers.image is None and "Fake offers no towers" in towers.text_reason
    export_towers(Fake(), tmp_path / "towers")
    manifest = read_manifest(tmp_path / "towers")
    assert manifest["text"]["status"] == manifest["image"]["status"] == "unavailable"
    assert towers_summary(tmp_path / "towers", "f" * 64) == "none"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (size, mtime_ns)."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_pictures(root: Path, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("warm" if i % 2 else "cold")
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([200, 60, 30] if i % 2 else [30, 80, 210], dtype=np.int16)
        pixels = np.clip(base + rng.integers(-40, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def test_the_writer_exports_once_per_version_and_readers_never_write(tmp_path: Path) -> None:
    collection, index_dir = tmp_path / "photos", tmp_path / "ix"
    write_pictures(collection)
    encoder = tiny_encoder()
    report = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    assert set(report.towers) == {"v1"} and report.towers["v1"].startswith("text ok")
    assert report.towers_seconds > 0 and "query towers of v1: text ok" in report.summary()
    folder = towers_dir(version_dir(index_dir, 1))
    with IndexStore.open(index_dir) as store:
        version = store.active_version()
    assert towers_summary(folder, version.digest) == "text+image"
    assert not (folder.parent / ".towers-staging").exists()

    again = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    assert again.towers == {} and again.towers_seconds < 1.0  # current towers: nothing exported

    # A reader (the runtime encoder and a search with it) writes nothing.
    before = snapshot(index_dir)
    runtime = OnnxQueryEncoder.load(folder, digest=version.digest)
    with IndexStore.open(index_dir) as store:
        hits = store.search(runtime.encode_text(["a warm picture", "cold"]), k=3)
        expected = store.search(numpy_of(encoder.encode_text(["a warm picture", "cold"])), k=3)
    assert [[h.id for h in row] for row in hits] == [[h.id for h in row] for row in expected]
    assert snapshot(index_dir) == before

    # Towers of other weights (a version whose digest was adopted) are exported again.
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "digest": "0" * 64}))
    assert towers_summary(folder, version.digest) == "stale"
    third = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False, export_towers=False)
    assert third.towers == {} and towers_summary(folder, version.digest) == "stale"
    fourth = index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False)
    assert set(fourth.towers) == {"v1"} and towers_summary(folder, version.digest) == "text+image"


def test_dropping_a_version_removes_its_towers(tmp_path: Path) -> None:
    collection, index_dir = tmp_path / "photos", tmp_path / "ix"
    write_pictures(collection, n=6)
    index_folder(collection, tiny_encoder(), index_dir, model_ref="clip-tiny", progress=False)
    other = CLIPEncoder(build_model("clip-tiny", seed=1), name="clip-tiny-b")
    report = index_folder(
        collection, other, index_dir, model_ref="clip-tiny-b", progress=False, new_version=True, activate=False
    )
    assert set(report.towers) == {"v2"} and towers_dir(version_dir(index_dir, 2)).is_dir()
    with IndexStore.open(index_dir) as store:
        store.drop("v2")
    assert not version_dir(index_dir, 2).exists()


# --- the CLI's query path ----------------------------------------------------------------------------

REPORT_MODULES = (
    "import json, sys\n"
    "from vitrina.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
    "print(json.dumps({'rc': rc, 'heavy': heavy}), file=sys.stderr)\n"
)


def cli_search(*args: str) -> tuple[list[dict], list[str], str]:
    """``vitrina search ... --json`` in a fresh interpreter -> (hits, heavy modules loaded at exit, stderr)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", REPORT_MODULES, "search", *args, "--json"], capture_output=True, text=True, timeout=120
    )
    status = json.loads(done.stderr.strip().splitlines()[-1])
    assert status["rc"] == 0, done.stderr
    return json.loads(done.stdout), status["heavy"], done.stderr


def assert_same_hits(got: list[dict], expected) -> None:
    assert [h["id"] for h in got] == [h.id for h in expected]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in expected], atol=1e-4, rtol=0)


def test_search_with_minilm_towers_imports_neither_torch_nor_transformers(minilm, tmp_path: Path) -> None:
    import shutil

    from vitrina.search import encode_images

    encoder, exported = minilm
    collection, index_dir = tmp_path / "photos", tmp_path / "ix"
    write_pictures(collection)
    # The module's encoder and its towers (exported above from the same weights), not a second export.
    index_folder(collection, encoder, index_dir, model_ref="clip-minilm", progress=False, export_towers=False)
    shutil.copytree(exported, towers_dir(version_dir(index_dir, 1)))
    before = snapshot(index_dir)
    query_image = sorted(collection.rglob("*.png"))[3]
    with IndexStore.open(index_dir) as store:
        by_text = store.search(numpy_of(encoder.encode_text(["a warm red picture"])), k=5)[0]
        by_image = store.search(encode_images([query_image], encoder), k=5)[0]

    hits, heavy, _ = cli_search(str(index_dir), "a warm red picture", "-k", "5")
    assert heavy == [] and len(hits) == 5
    assert_same_hits(hits, by_text)
    hits, heavy, _ = cli_search(str(index_dir), "--image", str(query_image), "-k", "5", "--runtime", "onnx")
    assert heavy == []
    assert_same_hits(hits, by_image)
    assert snapshot(index_dir) == before  # readers never write


def test_cli_runtimes_agree_and_a_rejected_tower_falls_back(tmp_path: Path) -> None:
    collection, index_dir = tmp_path / "photos", tmp_path / "ix"
    write_pictures(collection)
    index_folder(collection, tiny_encoder(), index_dir, model_ref="clip-tiny", progress=False)
    query = [str(index_dir), "a cold blue picture -warm", "-k", "6"]
    onnx_hits, heavy, _ = cli_search(*query)
    assert heavy == []
    torch_hits, heavy, _ = cli_search(*query, "--runtime", "torch")
    assert "torch" in heavy
    assert [h["id"] for h in onnx_hits] == [h["id"] for h in torch_hits]
    np.testing.assert_allclose([h["score"] for h in onnx_hits], [h["score"] for h in torch_hits], atol=1e-4)

    # A text tower whose export was rejected: auto answers with PyTorch, onnx refuses and says why.
    folder = towers_dir(version_dir(index_dir, 1))
    manifest = read_manifest(folder)
    manifest["text"] = {"status": "rejected", "reason": "max abs diff 3.00e-04 exceeds 0.0001", "max_abs_diff": 3e-4}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    fallback_hits, heavy, _ = cli_search(*query)
    assert "torch" in heavy and fallback_hits == torch_hits
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "vitrina.cli", "search", *query, "--runtime", "onnx"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "text tower rejected: max abs diff 3.00e-04" in done.stderr
    assert "use --runtime auto or torch" in done.stderr


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_towers_of_a_run_at_lower_precision_are_the_float32_reference(precision: str, tmp_path: Path) -> None:
    from vitrina.models.precision import with_precision

    collection, index_dir = tmp_path / "photos", tmp_path / "ix"
    write_pictures(collection, n=4)
    reference = tiny_encoder()  # what load_encoder("clip-tiny") loads again for an int8 run
    report = index_folder(
        collection, with_precision(tiny_encoder(), precision), index_dir, model_ref="clip-tiny", progress=False
    )
    manifest = read_manifest(towers_dir(version_dir(index_dir, 1)))
    assert report.towers["v1"].startswith("text ok") and manifest["digest"] == reference.identity["digest"]
    assert manifest["text"]["max_abs_diff"] <= TOLERANCE and manifest["image"]["max_abs_diff"] <= TOLERANCE
    runtime = OnnxQueryEncoder.load(towers_dir(version_dir(index_dir, 1)), digest=reference.identity["digest"])
    np.testing.assert_allclose(runtime.encode_text(TEXTS[:6]), numpy_of(reference.encode_text(TEXTS[:6])), atol=1e-4)
