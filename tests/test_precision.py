"""Inference precision: bf16 autocast and int8 dynamic quantization stay close to fp32, keep the model's
identity, leave the caller's float model alone, and are recorded per index version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_index import image_path, make_encoder, write_collection

from vitrina.errors import UserError
from vitrina.index.embed import index_folder
from vitrina.index.store import IndexStore
from vitrina.models.precision import PrecisionEncoder, with_precision
from vitrina.runtime import OnnxQueryEncoder
from vitrina.search import Searcher, encode_images


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("precision") / "photos"
    write_collection(root)
    return root


@pytest.mark.parametrize(("precision", "min_cosine"), [("bf16", 0.98), ("int8", 0.98)])
def test_reduced_precision_stays_close_to_fp32(collection: Path, precision: str, min_cosine: float) -> None:
    fp32 = make_encoder()
    fast = with_precision(fp32, precision)
    assert isinstance(fast, PrecisionEncoder) and fast.identity == fp32.identity  # same weights, same digest
    paths = sorted(collection.rglob("*.*"))
    reference, reduced = encode_images(paths, fp32), encode_images(paths, fast)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, atol=1e-5)
    assert (reference * reduced).sum(axis=1).min() > min_cosine
    texts = ["a red circle", "a blue square on a green background", "x"]
    cosines = (fp32.encode_text(texts) * fast.encode_text(texts)).sum(dim=1)
    assert cosines.min().item() > min_cosine
    # The caller's encoder keeps its float Linear layers.
    assert all(type(m) is torch.nn.Linear for m in fp32.model.modules() if "Linear" in type(m).__name__)
    if precision == "int8":
        quantized = [m for m in fast.model.modules() if "quantized" in type(m).__module__]
        assert quantized, "no Linear layer was quantized"


def test_fp32_is_the_encoder_itself_and_unknown_precisions_are_refused() -> None:
    encoder = make_encoder()
    assert with_precision(encoder, "fp32") is encoder
    with pytest.raises(UserError, match="fp16.*fp32, bf16, int8"):
        with_precision(encoder, "fp16")


def test_the_index_records_the_precision_and_answers_fp32_queries(tmp_path: Path) -> None:
    fp32 = make_encoder()
    collection = tmp_path / "photos"
    write_collection(collection)
    index_dir = tmp_path / "idx"
    index_folder(collection, with_precision(fp32, "int8"), index_dir, model_ref="clip-tiny", precision="int8")
    with IndexStore.open(index_dir) as store:
        assert store.active_version().precision == "int8"
    new = tmp_path / "photos-more"
    write_collection(new, variants=1)
    image_path(new, "red", "circle-0").rename(collection / "red" / "extra.png")
    index_folder(collection, fp32, index_dir, model_ref="clip-tiny", progress=False)  # a later run at fp32
    with IndexStore.open(index_dir) as store:
        assert store.active_version().precision == "fp32+int8"
    with Searcher(index_dir, fp32) as searcher:  # queries at another precision still work
        query = image_path(collection, "green", "square-1")
        assert searcher.search_image(query, k=1)[0].path == str(query)


def test_search_and_serve_run_queries_at_the_asked_precision(tmp_path: Path, capsys) -> None:
    from fastapi.testclient import TestClient

    from vitrina.cli import main as cli
    from vitrina.serve.app import create_app

    collection = tmp_path / "photos"
    write_collection(collection)
    index_dir = tmp_path / "idx"
    index_folder(collection, make_encoder(), index_dir, model_ref="clip-tiny", progress=False)
    with Searcher(index_dir, runtime="torch", precision="int8") as searcher:
        assert isinstance(searcher.encoder, PrecisionEncoder) and searcher.encoder.precision == "int8"
        fp32 = Searcher(index_dir, runtime="torch").search_text("a red circle", k=24)
        int8 = searcher.search_text("a red circle", k=24)
        assert {h.id for h in int8} == {h.id for h in fp32}  # the whole ranking: same items, near-same order
    capsys.readouterr()
    assert cli(["search", str(index_dir), "a red circle", "--precision", "int8", "--json", "-k", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert cli(["search", str(index_dir), "a red circle", "--precision", "bf16", "--runtime", "onnx"]) == 2
    assert "--runtime auto or torch" in capsys.readouterr().err
    with TestClient(create_app(index_dir, precision="bf16")) as client:
        assert len(client.get("/api/search", params={"q": "a red circle", "k": 5}).json()["hits"]) == 5


def test_int8_towers_rank_as_fp32_and_answer_an_index_built_at_another_precision(tmp_path: Path) -> None:
    collection = tmp_path / "photos"
    write_collection(collection)
    index_dir = tmp_path / "idx"
    fp32 = make_encoder()
    index_folder(
        collection, with_precision(fp32, "int8"), index_dir, model_ref="clip-tiny", progress=False, precision="int8"
    )
    version_towers = next(index_dir.glob("versions/*/towers"))
    manifest = json.loads((version_towers / "towers.json").read_text())
    for tower in ("text", "image"):  # both int8 twins exported, checked and published beside the float32 graphs
        assert manifest[tower]["int8"]["status"] == "ok" and manifest[tower]["int8"]["min_cosine"] >= 0.95
        assert (version_towers / manifest[tower]["int8"]["file"]).is_file()
    # the text tower's weights alone are 8-bit (its activations' outliers stay float), the image tower's
    # activations are quantized per call too: each graph holds its method's ops, and the manifest says which
    ops = {
        tower: {node.op_type for node in onnx.load(str(version_towers / manifest[tower]["int8"]["file"])).graph.node}
        for tower in ("text", "image")
    }
    assert "MatMulNBits" in ops["text"] and not {"DynamicQuantizeLinear", "MatMulInteger"} & ops["text"]
    assert "MatMulInteger" in ops["image"] and "MatMulNBits" not in ops["image"]
    assert manifest["text"]["int8"]["quantization"].startswith("MatMulNBits")
    with Searcher(index_dir, runtime="onnx", precision="int8") as int8, Searcher(index_dir, runtime="torch") as ref:
        assert isinstance(int8.encoder, OnnxQueryEncoder) and int8.encoder.precision == "int8"
        overlaps = []
        for query in ["a red circle", "a blue square on a green background", "green", "x"]:
            ours, theirs = int8.search_text(query, k=10), ref.search_text(query, k=10)
            overlaps.append(len({h.id for h in ours} & {h.id for h in theirs}) / 10)
        assert np.mean(overlaps) >= 0.9  # the int8 text tower's top 10 on the int8-built index: fp32's
        image = image_path(collection, "green", "square-1")  # an image query through the int8 image tower
        assert int8.search_image(image, k=1)[0].path == str(image)
