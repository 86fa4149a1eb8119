"""Pretrained backends: Hugging Face CLIP, open_clip and timm weights, mapped onto our models.

Name forms (``vitrina index/search/classify --model REF``, ``vitrina.checkpoint.load_encoder(REF)``):

* ``hf:openai/clip-vit-base-patch32`` - a Hugging Face ``CLIPModel`` repo, from the Hugging Face
  cache (``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``) or, where one is reachable, the hub;
* ``hf:DIR`` or plain ``DIR`` - a folder written by ``CLIPModel.save_pretrained`` (its ``config.json``
  says ``"model_type": "clip"``) plus the tokenizer (``CLIPProcessor.save_pretrained`` into the same DIR);
* ``open_clip:ViT-B-32/laion2b_s34b_b79k`` - an open_clip model name and pretrained tag (weights in the
  Hugging Face cache); ``open_clip:ViT-B-32/PATH`` - that model with a local checkpoint file;
  ``open_clip:DIR`` or plain ``DIR`` - a folder with ``open_clip_config.json`` and its weights file;
* ``timm:vit_small_patch16_224`` - a timm image model (Hugging Face cache); ``timm:NAME/FILE`` -
  that architecture with a local ``model.safetensors``; ``timm:DIR`` - a folder with ``config.json`` +
  ``model.safetensors`` as ``timm.models.save_for_hf`` writes it. An image-only encoder: it serves
  image -> image search, not text queries.

Where the layout maps cleanly, the weights are copied into OUR classes: a CLIP (HF or open_clip
ViT + causal text transformer) becomes ``vitrina.models.clip.CLIP`` - with the checkpoint's own BPE
tokenizer - so it can be saved with ``vitrina.checkpoint.save_model`` and fine-tuned or distilled
from; a timm ``VisionTransformer`` becomes our ``ViT``. Anything else (another open_clip or timm
architecture) is wrapped behind the same ``Encoder`` interface. The open_clip side lives in
``vitrina.models.open_clip_backend``. Offline (the CLI sets ``HF_HUB_OFFLINE=1``) a name that is not
cached is a ``UserError`` saying where to put a local copy.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from vitrina.errors import UserError
from vitrina.models.clip import CLIP, CLIPConfig, CLIPEncoder
from vitrina.models.text import TextConfig
from vitrina.models.vit import ViT, ViTConfig

PREFIXES = ("hf:", "open_clip:", "timm:")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # what OpenAI's CLIP (and most of its heirs) was trained with
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# --- timm ViT -> our ViT (same parameter names) ---------------------------------------------

# Keys of timm's plain ViT, in our names (identical): anything else is a feature we do not have.
_VIT_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm_pre\.(weight|bias)|norm\.(weight|bias)"
    r"|head\.(weight|bias)|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)


def vit_state_dict_from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict -> ours (same names); ``ValueError`` naming unsupported keys."""
    unsupported = sorted(k for k in state_dict if not _VIT_KEY.match(k))
    if unsupported:
        raise ValueError(
            f"timm ViT weights use features our ViT does not have: {', '.join(unsupported[:5])}"
            + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
        )
    return {k: v for k, v in state_dict.items()}


def _activation_name(act: nn.Module) -> str:
    """``"gelu"`` / ``"quick_gelu"`` for an activation module of any library; ``ValueError`` otherwise."""
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if type(act).__name__ == "QuickGELU":  # timm, open_clip and ours all call it that
        return "quick_gelu"
    raise ValueError(f"activation {type(act).__name__} has no equivalent here (gelu or quick_gelu)")


def vit_config_from_timm(model: nn.Module) -> ViTConfig:
    """Read the ``ViTConfig`` of a timm ``VisionTransformer`` (plain class-token or fc_norm-free avg pool)."""
    pool = {"token": "cls", "avg": "mean"}.get(model.global_pool)
    if pool is None:
        raise ValueError(f"timm global_pool {model.global_pool!r} has no equivalent here (use 'token' or 'avg')")
    if not isinstance(model.fc_norm, nn.Identity):
        raise ValueError("timm ViT with fc_norm (norm after pooling) has no equivalent here; use fc_norm=False")
    block = model.blocks[0]
    width = model.embed_dim
    return ViTConfig(
        image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        in_channels=model.patch_embed.proj.in_channels,
        width=width,
        depth=len(model.blocks),
        heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / width,
        qkv_bias=block.attn.qkv.bias is not None,
        num_classes=model.num_classes,
        layer_norm_eps=model.norm.eps,
        pool=pool,
        pre_norm=not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity),
        act=_activation_name(block.mlp.act),
        patch_bias=model.patch_embed.proj.bias is not None,
    )


# --- references: which backend, and where its files are -----------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (tests and users may move it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e}); re-save the model folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; re-save the model folder")
    return data


def folder_backend(path: Path) -> str | None:
    """``"hf"``, ``"open_clip"`` or ``"timm"`` for a folder of another library's model; None for ours/others."""
    if not path.is_dir():
        return None
    if (path / "open_clip_config.json").is_file():
        return "open_clip"
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # not ours to judge: the vitrina checkpoint reader reports a damaged file
    if not isinstance(config, dict):
        return None
    if config.get("model_type") == "clip":
        return "hf"
    if "architecture" in config and "kind" not in config:
        return "timm"
    return None


def is_pretrained_ref(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names a pretrained backend (a prefix, or a folder of HF / open_clip / timm files)."""
    return str(ref).startswith(PREFIXES) or folder_backend(Path(ref)) is not None


def load_pretrained(ref: str | os.PathLike):
    """The ``Encoder`` for a pretrained reference (see the module docstring for the name forms)."""
    ref = str(ref)
    backend, _, rest = ref.partition(":") if ref.startswith(PREFIXES) else ("", "", ref)
    if not backend:
        backend = folder_backend(Path(ref)) or ""
    if backend == "hf":
        return CLIPEncoder(load_hf_clip(rest), name=ref)
    if backend == "open_clip":
        from vitrina.models.open_clip_backend import load_open_clip

        return load_open_clip(rest, ref=ref)
    if backend == "timm":
        return load_timm(rest, ref=ref)
    raise UserError(f"{ref}: not a pretrained model reference; use hf:NAME, open_clip:NAME/TAG or timm:NAME")


# --- Hugging Face CLIPModel -> our CLIP --------------------------------------------------------


def _hf_advice(name: str) -> str:
    return (
        f"download it elsewhere with `CLIPModel.from_pretrained('{name}').save_pretrained(DIR)` and "
        f"`CLIPProcessor.from_pretrained('{name}').save_pretrained(DIR)` and pass the folder DIR, "
        f"or put it in the Hugging Face cache at {hub_cache()}"
    )


def _hf_snapshot(name: str) -> Path:
    """The local folder of hub repo ``name``: the cached snapshot, downloaded first when online."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors"]
    try:
        folder = Path(
            snapshot_download(name, cache_dir=hub_cache(), allow_patterns=patterns, local_files_only=_offline())
        )
        if not list(folder.glob("*.safetensors")):  # older repos: the weights only as a (weights-only) torch file
            folder = Path(
                snapshot_download(
                    name, cache_dir=hub_cache(), allow_patterns=["pytorch_model.bin"], local_files_only=_offline()
                )
            )
    except Exception as e:  # huggingface_hub raises many types (offline, missing repo, network): all the user's
        if _offline():
            raise UserError(f"hf:{name} is not available offline; {_hf_advice(name)}") from None
        raise UserError(f"hf:{name} could not be loaded ({type(e).__name__}: {e}); {_hf_advice(name)}") from None
    return folder


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file read with ``weights_only`` (tensors only, no code runs)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # both libraries raise their own types for damaged files
        raise UserError(f"{path}: cannot read the weights ({e}); re-download the model") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and (folder / "pytorch_model.bin").is_file():
        shards = [folder / "pytorch_model.bin"]
    if not shards:
        raise UserError(f"{folder}: no model.safetensors; save the model there with CLIPModel.save_pretrained")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(_load_weights_file(shard))
    return weights


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


def load_hf_clip(name_or_dir: str) -> CLIP:
    """``hf:`` reference (hub name or folder) -> our ``CLIP`` with the same weights and tokenizer, in eval mode."""
    from transformers import CLIPConfig as HFCLIPConfig

    folder = Path(name_or_dir).expanduser()
    if not folder.is_dir():
        if folder.exists() or name_or_dir.count("/") != 1:
            raise UserError(f"hf:{name_or_dir}: not a Hugging Face repo name (ORG/NAME) nor a model folder")
        folder = _hf_snapshot(name_or_dir)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; save the model there with CLIPModel.save_pretrained")
    hf_config = HFCLIPConfig.from_pretrained(str(folder), local_files_only=True)
    if hf_config.model_type != "clip":
        raise UserError(f"{folder / 'config.json'}: model_type {hf_config.model_type!r}, expected 'clip'")
    weights = _hf_weights(folder)
    processor = folder / "preprocessor_config.json"
    pre = _read_json(processor) if processor.is_file() else {}
    config = hf_clip_config(
        hf_config,
        image_mean=pre.get("image_mean", OPENAI_MEAN),
        image_std=pre.get("image_std", OPENAI_STD),
        logit_scale=float(weights["logit_scale"]),
    )
    tokenizer = hf_tokenizer(folder, config.text.context_length)
    model = CLIP(config, tokenizer=tokenizer)
    try:
        model.load_state_dict(clip_state_dict_from_hf(weights, config), strict=True)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{folder}: the weights do not fit a CLIP of its config.json ({e})") from None
    return model.eval()


# --- timm image models -> our ViT, or wrapped -------------------------------------------------


class _ResizeCrop:
    """timm's eval crop: shorter side to ``size / crop_pct`` (bicubic), centre ``size`` crop, normalise."""

    def __init__(self, size: int, crop_pct: float, mean, std) -> None:
        from vitrina.data.transforms import eval_transform

        self.size, self.resize_to = size, math.floor(size / crop_pct)
        self.finish = eval_transform(size, tuple(mean), tuple(std))  # normalise (the image is already size x size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from vitrina.data.images import to_rgb

        image = to_rgb(image)
        w, h = image.size
        scale = self.resize_to / min(w, h)
        image = image.resize(
            (max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.Resampling.BICUBIC
        )
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return self.finish(image.crop((left, top, left + self.size, top + self.size)))


class ImageOnlyEncoder:
    """An image model (pixels -> pooled features) as an ``Encoder`` for image -> image search; no text."""

    def __init__(self, features: nn.Module, transform, *, name: str, embed_dim: int) -> None:
        self.model = features.eval()
        self.embed_dim = embed_dim
        self.name = name
        self._transform = transform
        self._identity = {"kind": "image-only", "embed_dim": embed_dim, "name": name}

    @property
    def identity(self) -> dict:
        return dict(self._identity)

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) float32 unit vectors."""
        with torch.inference_mode():
            return F.normalize(self.model(pixels).float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise UserError(
            f"{self.name} is an image-only model: it cannot encode text queries; search with --image PATH, "
            "or use a CLIP (hf:..., open_clip:...) for text"
        )


class _PooledViT(nn.Module):
    """Our ViT's pooled features (``forward_head(..., pre_logits=True)``) as one forward."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(pixels), pre_logits=True)


def _timm_advice(name: str) -> str:
    return (
        f"download it elsewhere with `timm.models.save_for_hf(timm.create_model('{name}', pretrained=True), DIR, "
        f"safe_serialization=True)` and pass timm:DIR, or put it in the Hugging Face cache at {hub_cache()}"
    )


def _timm_model(rest: str, ref: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError("timm models need the timm package: pip install timm") from None
    folder = Path(rest).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: no config.json; save the model with timm.models.save_for_hf(model, DIR)")
        try:
            return timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
        except Exception as e:  # timm raises RuntimeError / FileNotFoundError / ValueError
            raise UserError(f"{folder}: timm cannot load it ({type(e).__name__}: {e})") from None
    name, _, file = rest.partition("/")
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise UserError(f"{ref}: timm has no model {name!r}; see timm.list_models()")
    if file:
        weights = Path(file).expanduser()
        if not weights.is_file():
            raise UserError(f"{weights}: no such weights file; give timm:NAME/PATH_TO/model.safetensors")
        overlay = {"file": str(weights)}
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, cache_dir=str(hub_cache()))
    except Exception as e:  # download / offline errors surface as huggingface_hub's or timm's own types
        where = "is not available offline" if _offline() else f"could not be loaded ({type(e).__name__}: {e})"
        raise UserError(f"{ref} {where}; {_timm_advice(name)}") from None


def load_timm(rest: str, *, ref: str) -> ImageOnlyEncoder:
    """``timm:`` reference -> an image-only encoder: our ``ViT`` when the weights map, else the timm model."""
    import timm.data

    theirs = _timm_model(rest, ref).eval()
    data = timm.data.resolve_data_config(model=theirs)
    transform = _ResizeCrop(data["input_size"][-1], data.get("crop_pct", 1.0), data["mean"], data["std"])
    features: nn.Module = theirs
    try:
        if type(theirs).__name__ != "VisionTransformer":
            raise ValueError(f"a {type(theirs).__name__}, not a VisionTransformer")
        ours = ViT(vit_config_from_timm(theirs))
        ours.load_state_dict(vit_state_dict_from_timm(theirs.state_dict()), strict=True)
        features = _PooledViT(ours.eval())
    except (AttributeError, ValueError, RuntimeError) as e:  # not a plain ViT: keep timm's own model
        print(f"note: {ref} is wrapped as a timm model ({e})", file=sys.stderr)
    size = data["input_size"][-1]
    with torch.inference_mode():
        embed_dim = int(features.eval()(torch.zeros(1, 3, size, size)).shape[-1])
    return ImageOnlyEncoder(features, transform, name=ref, embed_dim=embed_dim)
