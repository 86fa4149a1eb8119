"""Pretrained backends: tiny HF CLIP / open_clip / timm models, saved locally, loaded through our code path,
compared with the library's own forward (max abs diff <= 1e-5, float32). No download anywhere."""

from __future__ import annotations

import ast
import graphlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitrina.checkpoint import load_encoder, load_model, save_model
from vitrina.digest import file_sha256, files_sha256
from vitrina.errors import UserError
from vitrina.models.clip import CLIPEncoder
from vitrina.models.pretrained import ImageOnlyEncoder
from vitrina.models.pretrained.openclip import bytes_to_unicode

transformers = pytest.importorskip("transformers")

TOL = 1e-5
TEXTS = ["the cat", "A dog and THE cat!", "cat", "the  the the cat dog"]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (LayerNorms included: their init of 1 / 0 would hide a mix-up)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(3.3)
            else:
                p.add_(torch.randn_like(p) * 0.1)


def _tensor(out) -> torch.Tensor:
    """transformers returns the projected features as a tensor or inside a ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --- Hugging Face CLIPModel ------------------------------------------------------------------


def _tiny_clip_tokenizer():
    """A CLIP-format BPE written here: the 512 byte symbols, four merges, SOT/EOT last (518 tokens)."""
    symbols = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>")]
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _tiny_hf_clip(folder, *, legacy_eos: bool, seed: int = 0):
    """Save a random tiny ``CLIPModel`` + its tokenizer + image statistics in ``folder``; return model, tokenizer."""
    tokenizer = _tiny_clip_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=eot - 1,
            eos_token_id=2 if legacy_eos else eot,  # 2: transformers pools at argmax(ids), as old checkpoints do
            pad_token_id=eot,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=32,
    )
    model = transformers.CLIPModel(config).eval()
    _perturb(model, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    stats = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]}
    (folder / "preprocessor_config.json").write_text(json.dumps(stats))
    return model, tokenizer


def _random_ids(batch: int, length: int, vocab: int, eot: int, sot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids: SOT, random tokens, EOT at a random place, EOT padding; and the attention mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, sot, (batch, length), generator=g)
    ends = torch.randint(2, length, (batch,), generator=g)
    mask = (torch.arange(length) <= ends[:, None]).long()
    ids[:, 0] = sot
    ids[torch.arange(batch), ends] = eot
    ids[mask == 0] = eot
    return ids, mask


@pytest.mark.parametrize("legacy_eos", [False, True], ids=["eos-token", "eos-argmax"])
def test_hf_clip_folder_matches_transformers(tmp_path, legacy_eos: bool) -> None:
    theirs, hf_tok = _tiny_hf_clip(tmp_path, legacy_eos=legacy_eos)
    encoder = load_encoder(str(tmp_path))  # a plain folder: recognised by its config.json's model_type
    assert isinstance(encoder, CLIPEncoder)
    ours = encoder.model
    assert ours.config.image_mean == (0.4, 0.5, 0.6)

    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image_theirs = _tensor(theirs.get_image_features(pixel_values=pixels))
        image_ours = ours.project_image(ours.image_features(pixels))
        assert (image_ours - image_theirs).abs().max() <= TOL

        # The checkpoint's tokenizer gives the same ids and mask as transformers' own.
        tokens = ours.tokenize(TEXTS)
        hf_tokens = hf_tok(TEXTS, padding="max_length", max_length=16, return_tensors="pt")
        assert torch.equal(tokens["input_ids"], hf_tokens["input_ids"])
        assert torch.equal(tokens["attention_mask"], hf_tokens["attention_mask"])
        text_theirs = _tensor(theirs.get_text_features(**hf_tokens))
        assert (ours.project_text(ours.text_features(tokens)) - text_theirs).abs().max() <= TOL

        eot = hf_tok.convert_tokens_to_ids("<|endoftext|>")
        ids, mask = _random_ids(5, 16, len(hf_tok), eot=eot, sot=eot - 1)
        random_theirs = _tensor(theirs.get_text_features(input_ids=ids, attention_mask=mask))
        random_ours = ours.project_text(ours.text_features({"input_ids": ids, "attention_mask": mask}))
        assert (random_ours - random_theirs).abs().max() <= TOL

        # The Encoder interface: unit vectors and logits as CLIPModel computes them.
        out = theirs(input_ids=hf_tokens["input_ids"], attention_mask=hf_tokens["attention_mask"], pixel_values=pixels)
        image_emb, text_emb = encoder.encode_image(pixels), encoder.encode_text(TEXTS)
        assert (image_emb - F.normalize(image_theirs, dim=-1)).abs().max() <= TOL
        assert (text_emb - F.normalize(text_theirs, dim=-1)).abs().max() <= TOL
        assert (ours.scale() * image_emb @ text_emb.T - out.logits_per_image).abs().max() <= 1e-4  # scale ~27


def test_hf_name_from_the_hub_cache(tmp_path, monkeypatch) -> None:
    """``hf:ORG/NAME`` finds a copy laid out as the Hugging Face cache keeps it, offline."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    theirs, _ = _tiny_hf_clip(snapshot, legacy_eos=False, seed=3)
    (tmp_path / "hub" / "models--tiny-org--tiny-clip" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-clip" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    encoder = load_encoder("hf:tiny-org/tiny-clip")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(_tensor(theirs.get_image_features(pixel_values=pixels)), dim=-1)
    assert (encoder.encode_image(pixels) - expected).abs().max() <= TOL
    assert encoder.identity["name"].startswith("hf:tiny-org/tiny-clip-")


def test_loaded_hf_clip_saves_as_a_vitrina_checkpoint(tmp_path) -> None:
    _tiny_hf_clip(tmp_path / "hf", legacy_eos=False)
    encoder = load_encoder(f"hf:{tmp_path / 'hf'}")
    save_model(encoder.model, tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    again, config = load_model(tmp_path / "ours")
    assert config["model"]["vision"]["pre_norm"] and config["model"]["text"]["eos_pooling"] == "token"
    reloaded = load_encoder(tmp_path / "ours")
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(reloaded.encode_image(pixels), encoder.encode_image(pixels))
    assert torch.equal(reloaded.encode_text(TEXTS), encoder.encode_text(TEXTS))
    assert torch.equal(again.tokenize(TEXTS)["input_ids"], encoder.model.tokenize(TEXTS)["input_ids"])


# --- open_clip ----------------------------------------------------------------------------------

OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_open_clip_folder_matches_open_clip(tmp_path, quick_gelu: bool) -> None:
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP as OpenCLIP

    cfg = {**OPEN_CLIP_CFG, "quick_gelu": quick_gelu}
    theirs = OpenCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=quick_gelu).eval()
    _perturb(theirs, seed=5)
    preprocess = {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    save_file(
        {k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors")
    )

    encoder = load_encoder(f"open_clip:{tmp_path}")
    assert isinstance(encoder, CLIPEncoder), "a plain open_clip ViT CLIP maps onto ours"
    ours = encoder.model
    pixels = torch.randn(3, 3, 32, 32)
    their_tokens = open_clip.get_tokenizer("ViT-B-32")(TEXTS)  # the default CLIP BPE
    with torch.no_grad():
        assert (ours.project_image(ours.image_features(pixels)) - theirs.encode_image(pixels)).abs().max() <= TOL
        tokens = ours.tokenize(TEXTS)
        # open_clip pads with 0, we pad with end-of-text: compare the real tokens.
        assert torch.equal(tokens["input_ids"] * tokens["attention_mask"], their_tokens)
        text_theirs = theirs.encode_text(their_tokens)
        assert (ours.project_text(ours.text_features(tokens)) - text_theirs).abs().max() <= TOL
        assert (encoder.encode_text(TEXTS) - F.normalize(text_theirs, dim=-1)).abs().max() <= TOL
        assert (encoder.encode_image(pixels) - theirs.encode_image(pixels, normalize=True)).abs().max() <= TOL
    assert ours.config.image_mean == tuple(preprocess["mean"])


def test_open_clip_bpe_twin_tokenizes_like_open_clip() -> None:
    open_clip = pytest.importorskip("open_clip")
    from vitrina.models.pretrained.openclip import open_clip_tokenizer
    from vitrina.models.text import tokenize

    texts = [*TEXTS, "a photo of a diagram, 3 cats & 12 dogs", "Don't  stop:\tit's naïve café", "x" * 300]
    ours = tokenize(open_clip_tokenizer(open_clip, "ViT-B-32", 77), texts)
    theirs = open_clip.get_tokenizer("ViT-B-32")(texts)
    # open_clip pads with 0, we pad with end-of-text: compare the real tokens.
    assert torch.equal(ours["input_ids"] * ours["attention_mask"], theirs)


# --- timm --------------------------------------------------------------------------------------


def test_timm_folder_maps_onto_our_vit(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    theirs = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0, pretrained=False
    ).eval()
    _perturb(theirs, seed=7)
    save_for_hf(theirs, str(tmp_path), safe_serialization=True)
    encoder = load_encoder(f"timm:{tmp_path}")
    assert isinstance(encoder, ImageOnlyEncoder) and encoder.embed_dim == 192
    assert type(encoder.model).__name__ == "_PooledViT", "a plain timm ViT maps onto ours"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (encoder.encode_image(pixels) - F.normalize(theirs(pixels), dim=-1)).abs().max() <= TOL
    with pytest.raises(UserError, match="image-only model: it cannot encode text"):
        encoder.encode_text(["a cat"])


def test_timm_name_with_a_local_weights_file(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    full = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()  # 5.5 M parameters
    _perturb(full, seed=9)
    save_file(full.state_dict(), str(tmp_path / "model.safetensors"))
    encoder = load_encoder(f"timm:vit_tiny_patch16_224/{tmp_path / 'model.safetensors'}")
    assert encoder.identity["digest"] == file_sha256(tmp_path / "model.safetensors")
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (encoder.encode_image(pixels) - F.normalize(full(pixels), dim=-1)).abs().max() <= TOL


# --- offline errors -----------------------------------------------------------------------------


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def test_offline_hf_name_says_where_to_put_a_copy(empty_hf_cache) -> None:
    with pytest.raises(UserError) as info:
        load_encoder("hf:openai/clip-vit-base-patch32")
    message = str(info.value)
    assert message.startswith("hf:openai/clip-vit-base-patch32 is not available offline; download it elsewhere with")
    assert "`CLIPModel.from_pretrained('openai/clip-vit-base-patch32').save_pretrained(DIR)`" in message
    assert "pass the folder DIR" in message and f"Hugging Face cache at {empty_hf_cache}" in message


def test_offline_open_clip_name_says_where_to_put_a_copy(empty_hf_cache) -> None:
    pytest.importorskip("open_clip")
    with pytest.raises(UserError) as info:
        load_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    message = str(info.value)
    assert message.startswith("open_clip:ViT-B-32/laion2b_s34b_b79k is not available offline")
    assert "open_clip.create_model('ViT-B-32', pretrained='laion2b_s34b_b79k'" in message
    assert str(empty_hf_cache) in message and "open_clip:ViT-B-32/PATH" in message
    with pytest.raises(UserError, match="no pretrained tag 'nonsense'"):
        load_encoder("open_clip:ViT-B-32/nonsense")


def test_offline_timm_name_says_where_to_put_a_copy(empty_hf_cache) -> None:
    pytest.importorskip("timm")
    with pytest.raises(UserError) as info:
        load_encoder("timm:vit_tiny_patch16_224")
    message = str(info.value)
    assert message.startswith("timm:vit_tiny_patch16_224 is not available offline")
    assert "timm.models.save_for_hf(timm.create_model('vit_tiny_patch16_224', pretrained=True), DIR" in message
    assert "pass timm:DIR" in message and str(empty_hf_cache) in message
    with pytest.raises(UserError, match="timm has no model 'no_such_net'"):
        load_encoder("timm:no_such_net")


def test_unmapped_models_are_wrapped(tmp_path) -> None:
    """An open_clip tower we do not map (average-pooled image tokens) and a timm CNN still give encoders."""
    open_clip = pytest.importorskip("open_clip")
    timm = pytest.importorskip("timm")
    from open_clip.model import CLIP as OpenCLIP
    from timm.models import save_for_hf

    from vitrina.models.pretrained import OpenCLIPEncoder

    cfg = {**OPEN_CLIP_CFG, "vision_cfg": {**OPEN_CLIP_CFG["vision_cfg"], "pool_type": "avg"}}
    theirs = OpenCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "oc" / "model.safetensors"))
    encoder = load_encoder(str(tmp_path / "oc"))  # a plain folder: recognised by open_clip_config.json
    assert isinstance(encoder, OpenCLIPEncoder) and encoder.embed_dim == 32
    assert encoder.identity["digest"] == file_sha256(tmp_path / "oc" / "model.safetensors")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (encoder.encode_image(pixels) - theirs.encode_image(pixels, normalize=True)).abs().max() <= TOL
        expected = theirs.encode_text(open_clip.get_tokenizer("ViT-B-32")(TEXTS), normalize=True)
    assert (encoder.encode_text(TEXTS) - expected).abs().max() <= TOL

    cnn = timm.create_model("resnet10t", num_classes=0).eval()
    save_for_hf(cnn, str(tmp_path / "cnn"), safe_serialization=True)
    image_only = load_encoder(f"timm:{tmp_path / 'cnn'}")
    assert image_only.embed_dim == 512 and image_only.image_transform.size == cnn.pretrained_cfg["input_size"][-1]
    assert image_only.identity["digest"] == file_sha256(tmp_path / "cnn" / "model.safetensors")
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (image_only.encode_image(pixels) - F.normalize(cnn(pixels), dim=-1)).abs().max() <= TOL


# --- weights digests ----------------------------------------------------------------------------


def _saved_hf(folder: Path, seed: int) -> tuple[str, Path]:
    _tiny_hf_clip(folder, legacy_eos=False, seed=seed)
    return str(folder), folder / "model.safetensors"


def _saved_open_clip(folder: Path, seed: int) -> tuple[str, Path]:
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP as OpenCLIP

    model = OpenCLIP(OPEN_CLIP_CFG["embed_dim"], OPEN_CLIP_CFG["vision_cfg"], OPEN_CLIP_CFG["text_cfg"])
    _perturb(model, seed)
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"open_clip:{folder}", folder / "open_clip_model.safetensors"


def _saved_timm(folder: Path, seed: int) -> tuple[str, Path]:
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0)
    _perturb(model, seed)
    save_for_hf(model, str(folder), safe_serialization=True)
    return f"timm:{folder}", folder / "model.safetensors"


@pytest.mark.parametrize("save", [_saved_hf, _saved_open_clip, _saved_timm], ids=["hf", "open_clip", "timm"])
def test_digest_is_the_sha256_of_the_weights_file(tmp_path, save) -> None:
    """Same file -> same digest, the file's own sha256; other weights -> another digest."""
    ref, weights = save(tmp_path / "a", seed=0)
    other, _ = save(tmp_path / "b", seed=1)
    first, again, different = (load_encoder(r).identity for r in (ref, ref, other))
    assert set(first) == {"kind", "embed_dim", "name", "digest"}
    assert first["digest"] == file_sha256(weights) == again["digest"]
    assert different["digest"] != first["digest"]


def test_open_clip_architecture_with_a_weights_file_is_named_by_the_file(tmp_path) -> None:
    """``open_clip:ARCH/FILE`` (here a tiny architecture registered for the test) names the file's bytes."""
    open_clip = pytest.importorskip("open_clip")
    (tmp_path / "vitrina-tiny-test.json").write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(tmp_path / "vitrina-tiny-test.json")
    _, weights = _saved_open_clip(tmp_path / "oc", seed=4)
    encoder = load_encoder(f"open_clip:vitrina-tiny-test/{weights}")
    assert isinstance(encoder, CLIPEncoder)
    assert encoder.identity["digest"] == file_sha256(weights)


def test_sharded_hf_weights_are_named_by_all_their_files(tmp_path) -> None:
    theirs, _ = _tiny_hf_clip(tmp_path / "one", legacy_eos=False, seed=2)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        if (tmp_path / "one" / name).is_file():
            (tmp_path / "sharded" / name).write_bytes((tmp_path / "one" / name).read_bytes())
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    one, sharded = load_encoder(str(tmp_path / "one")), load_encoder(str(tmp_path / "sharded"))
    assert sharded.identity["digest"] == files_sha256(shards) != one.identity["digest"]
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(sharded.encode_image(pixels), one.encode_image(pixels))


# --- the package's structure --------------------------------------------------------------------


def _package_imports(source: str, siblings: set[str]) -> set[str]:
    """The modules of ``vitrina.models.pretrained`` that ``source`` imports ("__init__": the package itself)."""
    package = "vitrina.models.pretrained"
    targets = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: inside the package
                base = f"{package}.{node.module}" if node.module else package
            if base == package:  # ``from PACKAGE import NAME``: a sibling module, or a name of its __init__
                targets += [f"{package}.{a.name}" if a.name in siblings else package for a in node.names]
            else:
                targets.append(base)
    found = set()
    for target in targets:
        if target == package:
            found.add("__init__")
        elif target.startswith(package + "."):
            found.add(target.removeprefix(package + ".").split(".")[0])
    return found


def test_pretrained_package_imports_form_no_cycle() -> None:
    """hub and mapping import no sibling; no module imports the package itself; the rest is acyclic."""
    import vitrina.models.pretrained as package

    folder = Path(package.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    assert {"hub", "mapping", "encoders", "hf", "timm", "openclip"} <= set(modules)
    graph = {m: _package_imports((folder / f"{m}.py").read_text(), set(modules)) - {m} for m in modules}
    for module, imports in graph.items():
        # a submodule that imported the package (its __init__) would import itself in a circle
        assert "__init__" not in imports, f"{module}.py imports vitrina.models.pretrained itself"
        assert imports <= set(modules), f"{module}.py imports {imports - set(modules)}: no such module"
    assert graph["hub"] == set() and graph["mapping"] == set()
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    assert order.index("hub") < order.index("openclip")
