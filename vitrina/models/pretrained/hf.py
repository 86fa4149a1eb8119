"""Hugging Face ``CLIPModel`` (a saved folder or a hub name) -> our ``CLIP``: same weights, same tokenizer.

The separate q/k/v projections are fused into our one ``qkv``; the tokenizer is the checkpoint's own
BPE. The encoder's digest is the sha256 of the weights file(s) read. transformers is imported lazily.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from vitrina.errors import UserError
from vitrina.models.clip import CLIP, CLIPConfig, CLIPEncoder
from vitrina.models.pretrained.hub import hf_snapshot, read_json, read_weights, weights_digest
from vitrina.models.pretrained.mapping import OPENAI_MEAN, OPENAI_STD
from vitrina.models.text import TextConfig
from vitrina.models.vit import ViTConfig


def hf_folder(name_or_dir: str) -> Path:
    """The local folder of an ``hf:`` reference: the folder itself, or the hub repo's cached snapshot."""
    folder = Path(name_or_dir).expanduser()
    if not folder.is_dir():
        if folder.exists() or name_or_dir.count("/") != 1:
            raise UserError(f"hf:{name_or_dir}: not a Hugging Face repo name (ORG/NAME) nor a model folder")
        folder = hf_snapshot(name_or_dir)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; save the model there with CLIPModel.save_pretrained")
    return folder


def hf_weight_files(folder: Path) -> list[Path]:
    """The weights files of a saved ``CLIPModel``: its safetensors shards, else ``pytorch_model.bin``."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and (folder / "pytorch_model.bin").is_file():
        shards = [folder / "pytorch_model.bin"]
    if not shards:
        raise UserError(f"{folder}: no model.safetensors; save the model there with CLIPModel.save_pretrained")
    return shards


def hf_clip_config(hf_config, *, image_mean=OPENAI_MEAN, image_std=OPENAI_STD, logit_scale: float) -> CLIPConfig:
    """A ``transformers.CLIPConfig`` -> our ``CLIPConfig`` (pre-norm, bias-free patches, EOS pooling)."""
    v, t = hf_config.vision_config, hf_config.text_config
    for name, act in (("vision", v.hidden_act), ("text", t.hidden_act)):
        if act not in ("gelu", "quick_gelu"):
            raise UserError(f"HF CLIP {name} activation {act!r} has no equivalent here (gelu or quick_gelu)")
    vision = ViTConfig(
        image_size=v.image_size,
        patch_size=v.patch_size,
        in_channels=v.num_channels,
        width=v.hidden_size,
        depth=v.num_hidden_layers,
        heads=v.num_attention_heads,
        mlp_ratio=v.intermediate_size / v.hidden_size,
        layer_norm_eps=v.layer_norm_eps,
        pre_norm=True,
        act=v.hidden_act,
        patch_bias=False,
    )
    # transformers pools at argmax(ids) when eos_token_id is the legacy 2, else at the first eos_token_id.
    legacy = t.eos_token_id == 2
    text = TextConfig(
        vocab_size=t.vocab_size,
        context_length=t.max_position_embeddings,
        width=t.hidden_size,
        depth=t.num_hidden_layers,
        heads=t.num_attention_heads,
        mlp_ratio=t.intermediate_size / t.hidden_size,
        layer_norm_eps=t.layer_norm_eps,
        act=t.hidden_act,
        eos_pooling="argmax" if legacy else "token",
        eos_token_id=None if legacy else t.eos_token_id,
    )
    return CLIPConfig(
        vision=vision,
        text=text,
        embed_dim=hf_config.projection_dim,
        init_logit_scale=logit_scale,
        max_logit_scale=max(math.log(100), logit_scale),  # never clamp a trained temperature
        image_mean=tuple(image_mean),
        image_std=tuple(image_std),
    )


def _blocks_from_hf(weights: dict[str, torch.Tensor], src: str, dst: str, depth: int) -> dict[str, torch.Tensor]:
    """HF ``CLIPEncoderLayer`` weights (separate q/k/v) -> our ``Block`` weights (one fused qkv)."""
    out = {}
    for i in range(depth):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for kind in ("weight", "bias"):
            qkv = [weights[f"{s}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{d}.attn.qkv.{kind}"] = torch.cat(qkv, dim=0)  # (3C, ...) in q, k, v order as ours splits it
            out[f"{d}.attn.proj.{kind}"] = weights[f"{s}.self_attn.out_proj.{kind}"]
            out[f"{d}.norm1.{kind}"] = weights[f"{s}.layer_norm1.{kind}"]
            out[f"{d}.norm2.{kind}"] = weights[f"{s}.layer_norm2.{kind}"]
            out[f"{d}.mlp.fc1.{kind}"] = weights[f"{s}.mlp.fc1.{kind}"]
            out[f"{d}.mlp.fc2.{kind}"] = weights[f"{s}.mlp.fc2.{kind}"]
    return out


def clip_state_dict_from_hf(weights: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPModel`` state dict -> our ``CLIP`` state dict (``KeyError`` if a tensor is missing)."""
    w = {k.removeprefix("clip."): v for k, v in weights.items()}
    out = {
        "visual.cls_token": w["vision_model.embeddings.class_embedding"].reshape(1, 1, -1),
        "visual.patch_embed.proj.weight": w["vision_model.embeddings.patch_embedding.weight"],
        "visual.pos_embed": w["vision_model.embeddings.position_embedding.weight"].unsqueeze(0),  # (1, 1+N, C)
        "image_projection.weight": w["visual_projection.weight"],
        "text.token_embedding.weight": w["text_model.embeddings.token_embedding.weight"],
        "text.positional_embedding": w["text_model.embeddings.position_embedding.weight"],
        "text_projection.weight": w["text_projection.weight"],
        "logit_scale": w["logit_scale"].reshape(()),
    }
    for kind in ("weight", "bias"):
        out[f"visual.norm_pre.{kind}"] = w[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.norm.{kind}"] = w[f"vision_model.post_layernorm.{kind}"]  # per token, so = post-pool LN
        out[f"text.ln_final.{kind}"] = w[f"text_model.final_layer_norm.{kind}"]
    out |= _blocks_from_hf(w, "vision_model.encoder.layers", "visual.blocks", config.vision.depth)
    out |= _blocks_from_hf(w, "text_model.encoder.layers", "text.blocks", config.text.depth)
    return out


def hf_tokenizer(folder: Path, context_length: int) -> Tokenizer:
    """The checkpoint's own tokenizer (``tokenizer.json`` or vocab.json + merges.txt), padding as it pads."""
    from transformers import CLIPTokenizer

    try:
        hf = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / TypeError for missing or bad files
        raise UserError(
            f"{folder}: no usable CLIP tokenizer ({type(e).__name__}); save it beside the weights with "
            "`CLIPProcessor.from_pretrained(NAME).save_pretrained(DIR)`"
        ) from None
    tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())  # a clean copy, without transformers' wrappers
    tokenizer.enable_padding(pad_id=hf.pad_token_id, pad_token=hf.pad_token, length=context_length)
    return tokenizer


def load_hf_clip(folder: Path, weight_files: list[Path]) -> CLIP:
    """A saved ``CLIPModel`` folder (weights read from ``weight_files``) -> our ``CLIP``, in eval mode."""
    from transformers import CLIPConfig as HFCLIPConfig

    hf_config = HFCLIPConfig.from_pretrained(str(folder), local_files_only=True)
    if hf_config.model_type != "clip":
        raise UserError(f"{folder / 'config.json'}: model_type {hf_config.model_type!r}, expected 'clip'")
    weights: dict[str, torch.Tensor] = {}
    for path in weight_files:
        weights.update(read_weights(path))
    processor = folder / "preprocessor_config.json"
    pre = read_json(processor) if processor.is_file() else {}
    config = hf_clip_config(
        hf_config,
        image_mean=pre.get("image_mean", OPENAI_MEAN),
        image_std=pre.get("image_std", OPENAI_STD),
        logit_scale=float(weights["logit_scale"]),
    )
    model = CLIP(config, tokenizer=hf_tokenizer(folder, config.text.context_length))
    try:
        model.load_state_dict(clip_state_dict_from_hf(weights, config), strict=True)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{folder}: the weights do not fit a CLIP of its config.json ({e})") from None
    return model.eval()


def load_hf(name_or_dir: str, *, ref: str) -> CLIPEncoder:
    """``hf:`` reference (hub name or folder) -> a ``CLIPEncoder`` over our CLIP, named by its weights files."""
    folder = hf_folder(name_or_dir)
    files = hf_weight_files(folder)
    return CLIPEncoder(load_hf_clip(folder, files), name=ref, digest=weights_digest(files))
