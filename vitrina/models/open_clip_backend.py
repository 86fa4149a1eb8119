"""open_clip models -> our CLIP (ViT image tower + causal text transformer + OpenAI's BPE), or wrapped.

Used by ``vitrina.models.pretrained`` for ``open_clip:`` references (see its docstring for the name
forms). open_clip is imported lazily: without it, a ``UserError`` says ``pip install open_clip_torch``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import nn

from vitrina.errors import UserError
from vitrina.models.clip import CLIP, CLIPConfig, CLIPEncoder
from vitrina.models.pretrained import (
    OPENAI_MEAN,
    OPENAI_STD,
    _activation_name,
    _load_weights_file,
    _offline,
    hub_cache,
)
from vitrina.models.text import EOT, SOT, TextConfig
from vitrina.models.vit import ViTConfig

# --- open_clip -> our CLIP, or wrapped ----------------------------------------------------------


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip models need the open_clip package: pip install open_clip_torch") from None
    return open_clip


def _open_clip_advice(model_name: str, tag: str) -> str:
    return (
        f"download it elsewhere with `open_clip.create_model('{model_name}', pretrained='{tag}', "
        f"cache_dir=DIR)` and copy DIR to the Hugging Face cache at {hub_cache()}, or pass a local weights file "
        f"as open_clip:{model_name}/PATH"
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table, in the order CLIP's vocabulary lists the bytes.

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points 256 and up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def clip_bpe_tokenizer(merges: list[tuple[str, str]], context_length: int) -> Tokenizer:
    """OpenAI CLIP's BPE (as open_clip's ``SimpleTokenizer``) rebuilt with the ``tokenizers`` library.

    Vocabulary: the 256 byte symbols, the same with the end-of-word mark ``</w>``, one token per merge,
    then SOT and EOT. Text is NFC-normalised, whitespace-collapsed and lower-cased, split by CLIP's word
    pattern, then byte-level BPE within each word; SOT/EOT around, EOT padding.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [SOT, EOT]
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOT, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.add_special_tokens([SOT, EOT])
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase(), normalizers.Strip()]
    )
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),  # keep the words, drop the rest
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(pad_id=vocab[EOT], pad_token=EOT, length=context_length)
    return tokenizer


def open_clip_tokenizer(open_clip, model_name: str, context_length: int) -> Tokenizer | None:
    """The ``tokenizers`` twin of ``model_name``'s open_clip tokenizer, or None if it is not the default BPE."""
    import gzip

    theirs = open_clip.get_tokenizer(model_name)
    plain = (
        type(theirs).__name__ == "SimpleTokenizer"
        and theirs.reduction_fn is None
        and getattr(theirs.clean_fn, "__name__", "") == "_clean_lower"
    )
    if not plain:
        return None
    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # the merges SimpleTokenizer uses
    return clip_bpe_tokenizer(merges, context_length)


def _open_clip_mappable(model) -> str | None:
    """Why an open_clip model cannot become our CLIP (None if it can)."""
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.transformer import VisionTransformer

    if type(model) is not OpenCLIP or type(model.visual) is not VisionTransformer:
        return f"{type(model).__name__} with a {type(model.visual).__name__} image tower"
    visual = model.visual
    if visual.attn_pool is not None or visual.pool_type != "tok":
        return f"image pooling {visual.pool_type!r}"
    if getattr(model, "logit_bias", None) is not None:
        return "a logit bias (SigLIP)"
    if model.text_pool_type not in ("argmax", "eos"):
        return f"text pooling {model.text_pool_type!r}"
    if not isinstance(model.text_projection, nn.Parameter):
        return "a text projection that is not a plain matrix"
    if model.attn_mask is None:
        return "a text tower without a causal mask"
    for block in (*visual.transformer.resblocks, *model.transformer.resblocks):
        if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(block.ls_1, nn.Identity):
            return "custom attention blocks or layer scale"
        if not isinstance(block.attn, nn.MultiheadAttention):
            return "custom attention"
    try:
        _activation_name(visual.transformer.resblocks[0].mlp.gelu)
    except ValueError as e:
        return str(e)
    return None


def _blocks_from_open_clip(weights: dict[str, torch.Tensor], src: str, dst: str, depth: int) -> dict:
    """open_clip ``ResidualAttentionBlock`` weights (fused in_proj already in q, k, v order) -> our ``Block``."""
    names = {
        "ln_1": "norm1",
        "attn.in_proj": "attn.qkv",
        "attn.out_proj": "attn.proj",
        "ln_2": "norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    out = {}
    for i in range(depth):
        for theirs, ours in names.items():
            for kind in ("weight", "bias"):
                key = f"{src}.{i}.{theirs}_{kind}" if theirs == "attn.in_proj" else f"{src}.{i}.{theirs}.{kind}"
                out[f"{dst}.{i}.{ours}.{kind}"] = weights[key]
    return out


def clip_from_open_clip(model, tokenizer: Tokenizer, *, mean, std) -> CLIP:
    """An open_clip ``CLIP`` (ViT image tower, causal text transformer) -> our ``CLIP`` with the same weights."""
    visual, w = model.visual, model.state_dict()
    width, text_width = visual.conv1.out_channels, model.token_embedding.embedding_dim
    v_block, t_block = visual.transformer.resblocks[0], model.transformer.resblocks[0]
    vision = ViTConfig(
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        width=width,
        depth=len(visual.transformer.resblocks),
        heads=v_block.attn.num_heads,
        mlp_ratio=v_block.mlp.c_fc.out_features / width,
        layer_norm_eps=visual.ln_post.eps,
        pre_norm=not isinstance(visual.ln_pre, nn.Identity),
        act=_activation_name(v_block.mlp.gelu),
        patch_bias=False,
    )
    text = TextConfig(
        vocab_size=model.vocab_size,
        context_length=model.context_length,
        width=text_width,
        depth=len(model.transformer.resblocks),
        heads=t_block.attn.num_heads,
        mlp_ratio=t_block.mlp.c_fc.out_features / text_width,
        layer_norm_eps=model.ln_final.eps,
        act=_activation_name(t_block.mlp.gelu),
        eos_pooling="argmax" if model.text_pool_type == "argmax" else "token",
        eos_token_id=None if model.text_pool_type == "argmax" else model.text_eos_id,
    )
    scale = float(model.logit_scale.detach().reshape(-1)[0])
    config = CLIPConfig(
        vision=vision,
        text=text,
        embed_dim=visual.proj.shape[1],
        init_logit_scale=scale,
        max_logit_scale=max(math.log(100), scale),
        image_mean=tuple(mean),
        image_std=tuple(std),
    )
    out = {
        "visual.cls_token": w["visual.class_embedding"].reshape(1, 1, -1),
        "visual.pos_embed": w["visual.positional_embedding"].unsqueeze(0),  # (1, 1+N, C)
        "visual.patch_embed.proj.weight": w["visual.conv1.weight"],
        "image_projection.weight": w["visual.proj"].T,  # they multiply x @ proj, nn.Linear does x @ W.T
        "text.token_embedding.weight": w["token_embedding.weight"],
        "text.positional_embedding": w["positional_embedding"],
        "text_projection.weight": w["text_projection"].T,
        "logit_scale": w["logit_scale"].reshape(()),
    }
    for kind in ("weight", "bias"):
        if vision.pre_norm:
            out[f"visual.norm_pre.{kind}"] = w[f"visual.ln_pre.{kind}"]
        out[f"visual.norm.{kind}"] = w[f"visual.ln_post.{kind}"]
        out[f"text.ln_final.{kind}"] = w[f"ln_final.{kind}"]
    out |= _blocks_from_open_clip(w, "visual.transformer.resblocks", "visual.blocks", vision.depth)
    out |= _blocks_from_open_clip(w, "transformer.resblocks", "text.blocks", text.depth)
    ours = CLIP(config, tokenizer=tokenizer)
    ours.load_state_dict(out, strict=True)
    return ours.eval()


class OpenCLIPEncoder:
    """An open_clip model we do not map (other towers, tokenizers, SigLIP...) behind the ``Encoder`` interface."""

    def __init__(self, model, tokenizer, *, name: str, mean, std) -> None:
        from vitrina.data.transforms import eval_transform

        self.model, self.tokenizer = model.eval(), tokenizer
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        with torch.inference_mode():
            self.embed_dim = int(model.encode_image(torch.zeros(1, 3, size, size)).shape[-1])
        self._identity = {"kind": "open_clip", "embed_dim": self.embed_dim, "name": name}
        self._transform = eval_transform(size, tuple(mean), tuple(std))

    @property
    def identity(self) -> dict:
        return dict(self._identity)

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) float32 unit vectors."""
        with torch.inference_mode():
            return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of B strings -> (B, D) float32 unit vectors."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim)
        with torch.inference_mode():
            return F.normalize(self.model.encode_text(self.tokenizer(texts)).float(), dim=-1)


def _open_clip_model(rest: str, ref: str):
    """Build the open_clip model ``rest`` names -> (model, name open_clip knows it by, mean, std)."""
    open_clip = _import_open_clip()
    folder = Path(rest).expanduser()
    if folder.is_dir():
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"{folder}: no open_clip_config.json; give open_clip:MODEL/PATH_TO_WEIGHTS instead")
        name = f"local-dir:{folder}"
        try:
            model = open_clip.create_model(name, load_weights=True)
        except Exception as e:  # open_clip raises RuntimeError / FileNotFoundError / ValueError
            raise UserError(f"{folder}: open_clip cannot load it ({type(e).__name__}: {e})") from None
    else:
        model_name, _, tag = rest.partition("/")
        if not tag:
            raise UserError(f"{ref}: give open_clip:MODEL/TAG (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k)")
        if model_name not in open_clip.list_models():
            raise UserError(f"{ref}: open_clip has no model {model_name!r}; see open_clip.list_models()")
        name, weights = model_name, Path(tag).expanduser()
        try:
            if weights.is_file():
                model = open_clip.create_model(model_name)
                state = _load_weights_file(weights)
                model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
            else:
                pretrained = open_clip.get_pretrained_cfg(model_name, tag)
                if not pretrained:
                    raise UserError(
                        f"{ref}: open_clip has no pretrained tag {tag!r} for {model_name} and no file {weights} "
                        "exists; see open_clip.list_pretrained()"
                    )
                # Fetch (or find in the cache) before building the model, so a missing copy fails fast.
                open_clip.download_pretrained(pretrained, cache_dir=str(hub_cache()))
                model = open_clip.create_model(model_name, pretrained=tag, cache_dir=str(hub_cache()))
        except UserError:
            raise
        except Exception as e:  # download / offline / tag errors all surface as the library's own types
            where = "is not available offline" if _offline() else f"could not be loaded ({type(e).__name__}: {e})"
            raise UserError(f"{ref} {where}; {_open_clip_advice(model_name, tag)}") from None
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    return model, name, pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD)


def load_open_clip(rest: str, *, ref: str):
    """``open_clip:`` reference -> a ``CLIPEncoder`` over our CLIP when the model maps, else ``OpenCLIPEncoder``."""
    open_clip = _import_open_clip()
    model, name, mean, std = _open_clip_model(rest, ref)
    model.eval()
    why = _open_clip_mappable(model)
    tokenizer = open_clip_tokenizer(open_clip, name, model.context_length) if why is None else None
    if why is None and tokenizer is not None:
        return CLIPEncoder(clip_from_open_clip(model, tokenizer, mean=mean, std=std), name=ref)
    print(f"note: {ref} is wrapped as an open_clip model ({why or 'its own tokenizer'})", file=sys.stderr)
    return OpenCLIPEncoder(model, open_clip.get_tokenizer(name), name=ref, mean=mean, std=std)
