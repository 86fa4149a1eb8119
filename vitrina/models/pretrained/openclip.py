"""open_clip models -> our ``CLIP`` (ViT image tower, causal text transformer, OpenAI's BPE), or wrapped.

A plain open_clip ``CLIP`` is copied into ours with a ``tokenizers`` twin of its BPE; any other model
(another tower, tokenizer or pooling, SigLIP) becomes an ``OpenCLIPEncoder``. The encoder's digest is
the sha256 of the weights file read (``open_clip:MODEL/FILE``, a folder's file, a tag's cached file).
open_clip is imported lazily: without it, a ``UserError`` says ``pip install open_clip_torch``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import nn

from vitrina.digest import tensors_sha256
from vitrina.errors import UserError
from vitrina.models.clip import CLIP, CLIPConfig, CLIPEncoder
from vitrina.models.pretrained.encoders import OpenCLIPEncoder
from vitrina.models.pretrained.hub import first_file, hub_cache, offline, open_clip_advice, weights_digest
from vitrina.models.pretrained.mapping import OPENAI_MEAN, OPENAI_STD, activation_name
from vitrina.models.text import EOT, SOT, TextConfig
from vitrina.models.vit import ViTConfig

# The weights files of a folder with open_clip_config.json, in open_clip's order of preference (then any
# *.safetensors, *.bin, *.pth, as open_clip falls back).
OPEN_CLIP_DIR_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip models need the open_clip package: pip install open_clip_torch") from None
    return open_clip


# --- OpenAI's CLIP BPE, rebuilt with the tokenizers library ---------------------------------------


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


# --- open_clip weights -> our CLIP ------------------------------------------------------------------


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
        activation_name(visual.transformer.resblocks[0].mlp.gelu)
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
        act=activation_name(v_block.mlp.gelu),
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
        act=activation_name(t_block.mlp.gelu),
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


# --- references -> models -----------------------------------------------------------------------


def _load_checkpoint(open_clip, model, path: Path, where: str) -> None:
    """Read ``path`` into ``model`` as open_clip does (its format conversions included), strictly."""
    try:
        open_clip.load_checkpoint(model, str(path), strict=True)
    except Exception as e:  # damaged file or weights of another shape: torch / safetensors / open_clip types
        raise UserError(f"{where}: open_clip cannot load {path} ({type(e).__name__}: {e})") from None


def _open_clip_model(open_clip, rest: str, ref: str):
    """Build the open_clip model ``rest`` names -> (model, name open_clip knows it by, weights file or None)."""
    folder = Path(rest).expanduser()
    if folder.is_dir():
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"{folder}: no open_clip_config.json; give open_clip:MODEL/PATH_TO_WEIGHTS instead")
        others = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth"))
        weights = first_file(folder, OPEN_CLIP_DIR_WEIGHTS) or next(iter(others), None)
        if weights is None:
            raise UserError(f"{folder}: no weights file ({', '.join(OPEN_CLIP_DIR_WEIGHTS[:2])}, ...)")
        name = f"local-dir:{folder}"
        try:
            model = open_clip.create_model(name, load_weights=False)  # config and image statistics of the folder
        except Exception as e:  # open_clip raises RuntimeError / FileNotFoundError / ValueError
            raise UserError(f"{folder}: open_clip cannot load it ({type(e).__name__}: {e})") from None
        _load_checkpoint(open_clip, model, weights, str(folder))
        return model, name, weights
    model_name, _, tag = rest.partition("/")
    if not tag:
        raise UserError(f"{ref}: give open_clip:MODEL/TAG (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k)")
    if model_name not in open_clip.list_models():
        raise UserError(f"{ref}: open_clip has no model {model_name!r}; see open_clip.list_models()")
    weights = Path(tag).expanduser()
    if weights.is_file():
        model = open_clip.create_model(model_name)
        _load_checkpoint(open_clip, model, weights, ref)
        return model, model_name, weights
    pretrained = open_clip.get_pretrained_cfg(model_name, tag)
    if not pretrained:
        raise UserError(
            f"{ref}: open_clip has no pretrained tag {tag!r} for {model_name} and no file {weights} exists; "
            "see open_clip.list_pretrained()"
        )
    try:
        # Fetch (or find in the cache) before building the model, so a missing copy fails fast.
        cached = open_clip.download_pretrained(pretrained, cache_dir=str(hub_cache()))
        model = open_clip.create_model(model_name, pretrained=tag, cache_dir=str(hub_cache()))
    except Exception as e:  # download / offline / tag errors all surface as the library's own types
        where = "is not available offline" if offline() else f"could not be loaded ({type(e).__name__}: {e})"
        raise UserError(f"{ref} {where}; {open_clip_advice(model_name, tag)}") from None
    return model, model_name, Path(cached) if cached and Path(cached).is_file() else None


def load_open_clip(rest: str, *, ref: str) -> CLIPEncoder | OpenCLIPEncoder:
    """``open_clip:`` reference -> a ``CLIPEncoder`` over our CLIP when the model maps, else ``OpenCLIPEncoder``."""
    open_clip = _import_open_clip()
    model, name, weights_file = _open_clip_model(open_clip, rest, ref)
    model.eval()
    digest = weights_digest([weights_file]) if weights_file else tensors_sha256(model.state_dict())
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean, std = pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD)
    why = _open_clip_mappable(model)
    tokenizer = open_clip_tokenizer(open_clip, name, model.context_length) if why is None else None
    if why is None and tokenizer is not None:
        return CLIPEncoder(clip_from_open_clip(model, tokenizer, mean=mean, std=std), name=ref, digest=digest)
    print(f"note: {ref} is wrapped as an open_clip model ({why or 'its own tokenizer'})", file=sys.stderr)
    return OpenCLIPEncoder(model, open_clip.get_tokenizer(name), name=ref, mean=mean, std=std, digest=digest)
