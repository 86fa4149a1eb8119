"""A cross-attention re-ranker: text tokens attend to image tokens, an ITM head scores the pair.

The dual encoder (``vitrina.models.clip``) compares one vector per side; this model lets every word
look at every image patch (ALBEF/BLIP's image-text matching head, made small):

    text token states (B, L, Ct) -> Linear -> (B, L, W)            image tokens (B, M, Cv) -> Linear -> LN -> (B, M, W)
          depth x [ x + SelfAttn(LN(x)) ; x + CrossAttn(LN(x), image) ; x + MLP(LN(x)) ]
          LN -> masked mean over the real text tokens (B, W) -> Linear -> (B,) matching logit

Both inputs come from the *frozen* towers of one CLIP (``CLIP.text_token_states``,
``CLIP.image_tokens``); only this model is trained (``vitrina.train.rerank``: a softmax over each
caption's positive and the dual encoder's hard negatives, the candidates a query re-ranks).

The logit is a *correction* to the dual encoder (``dual_scale`` > 0, how ``vitrina train rerank`` makes
them): a pair scores ``dual_scale * cosine + logit``, with ``dual_scale`` the CLIP's own logit scale and
the ITM head starting at zero, so an untrained re-ranker ranks exactly as the dual encoder does and
training only has to learn where it is wrong. (A re-ranker trained alone from scratch, ``dual_scale`` 0,
threw that ranking away: held-out R@1 0.0175 -> 0.005 in ``bench/rerank.py``.)

The image tokens get no position embedding here: the image tower already wrote where each patch sits
into its token, so the re-ranker reads them as a set, and its score does not depend on their order.

``Reranker`` joins the two for queries: one text against N candidate images -> N scores. A trained
re-ranker is a folder (``CKPT/reranker/`` by default) of ``model.safetensors`` + ``config.json``;
the config names the CLIP it was trained on and that CLIP's weights digest, checked at load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from vitrina.atomic import atomic_write, atomic_write_text
from vitrina.config import from_dict, to_dict
from vitrina.digest import file_sha256
from vitrina.errors import UserError
from vitrina.models.clip import CLIP
from vitrina.models.vit import Mlp, init_transformer_weights

KIND = "reranker"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
FOLDER = "reranker"  # a CLIP checkpoint's re-ranker lives in CKPT/reranker/


@dataclass
class RerankConfig:
    """Shape of a re-ranker. ``text_width`` / ``image_width``: the widths of the CLIP towers it reads."""

    text_width: int = 384
    image_width: int = 192
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    dual_scale: float = 0.0  # > 0: the logit corrects dual_scale x the dual encoder's cosine (0: it ranks alone)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"re-ranker width {self.width} is not divisible by heads {self.heads}")
        if min(self.text_width, self.image_width, self.width, self.depth) < 1:
            raise ValueError("re-ranker widths and depth must be positive")
        if self.dual_scale < 0:
            raise ValueError(f"re-ranker dual_scale must be 0 or more, got {self.dual_scale}")


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, nh, N, C // nh)."""
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)  # (B, nh, N, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, nh, N, hs) -> (B, N, nh * hs)."""
    B, nh, N, hs = x.shape
    return x.transpose(1, 2).reshape(B, N, nh * hs)  # (B, N, C)


class MultiHeadAttention(nn.Module):
    """Queries from ``x``, keys and values from ``context`` (self-attention when they are the same)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, W) queries, (B, M, W) context, optional (B, M) bool mask of real keys -> (B, L, W)."""
        q = split_heads(self.q(x), self.heads)  # (B, nh, L, hs)
        k, v = (split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))  # 2 x (B, nh, M, hs)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M): True = attend
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, L, hs)
        return self.proj(merge_heads(x))


class FusionBlock(nn.Module):
    """Pre-norm: text self-attention, then cross-attention from text to image tokens, then an MLP."""

    def __init__(self, config: RerankConfig) -> None:
        super().__init__()
        c = config
        self.norm_self = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.self_attn = MultiHeadAttention(c.width, c.heads)
        self.norm_cross = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.cross_attn = MultiHeadAttention(c.width, c.heads)
        self.norm_mlp = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.mlp = Mlp(c.width, int(c.width * c.mlp_ratio))

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, L, W) text, (B, L) bool mask, (B, M, W) image tokens -> (B, L, W) text."""
        h = self.norm_self(text)
        text = text + self.self_attn(h, h, key_mask=text_mask)
        text = text + self.cross_attn(self.norm_cross(text), image)  # every image token is real
        return text + self.mlp(self.norm_mlp(text))


class CrossAttentionReranker(nn.Module):
    """(text token states, mask, image tokens) -> (B,) image-text matching logits."""

    def __init__(self, config: RerankConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.text_in = nn.Linear(c.text_width, c.width)
        self.image_in = nn.Linear(c.image_width, c.width)
        self.image_norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.blocks = nn.ModuleList(FusionBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.itm_head = nn.Linear(c.width, 1)
        self.apply(init_transformer_weights)
        if c.dual_scale:  # a correction starts at zero: untrained, the dual encoder's ranking is kept as it is
            nn.init.zeros_(self.itm_head.weight)
            nn.init.zeros_(self.itm_head.bias)

    def embed_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, M, Cv) image-tower tokens -> (B, M, W): what the fusion blocks read, text-independent
        (so an index can store it once per item: ``vitrina.index.rerank_tokens``)."""
        return self.image_norm(self.image_in(image_tokens))

    def forward_features(
        self, text_states: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """(B, L, Ct), (B, L) mask (1 = real), (B, M, Cv) -> (B, W) pooled fused text features."""
        return self.fuse(text_states, text_mask, self.embed_image(image_tokens))

    def fuse(self, text_states: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, L, Ct) or (1, L, Ct) text states, their (B, L) or (1, L) mask, (B, M, W) embedded images
        -> (B, W) pooled fused text features. One text against B images: give it once (batch 1); its
        input projection runs once and is broadcast to the B images."""
        n = image.shape[0]
        mask = text_mask.bool().expand(n, -1)  # (B, L)
        text = self.text_in(text_states).expand(n, -1, -1)  # (B, L, W)
        for block in self.blocks:
            text = block(text, mask, image)
        text = self.norm(text)
        weights = mask.unsqueeze(-1).to(text.dtype)  # (B, L, 1)
        return (text * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, W): mean of real tokens

    def forward(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        dual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> (B,) scores of pair b (higher: image b shows text b better): the ITM logit, plus
        ``dual_scale * dual`` when ``dual`` (the (B,) dual-encoder cosines of the pairs) is given."""
        return self.with_dual(self.itm_head(self.forward_features(text_states, text_mask, image_tokens)), dual)

    def score_embedded(
        self, text_states: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor, dual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``forward`` from embedded images (B, M, W) (``embed_image``) -> (B,) scores."""
        return self.with_dual(self.itm_head(self.fuse(text_states, text_mask, image)), dual)

    def with_dual(self, logits: torch.Tensor, dual: torch.Tensor | None) -> torch.Tensor:
        """(B, 1) ITM logits -> (B,) scores: + dual_scale x the dual encoder's cosines when given."""
        logits = logits.squeeze(-1)
        return logits if dual is None else logits + self.config.dual_scale * dual.to(logits.dtype)


def config_for(clip: CLIP, **shape: Any) -> RerankConfig:
    """A re-ranker config that reads ``clip``'s towers (their widths), with ``shape`` overrides."""
    return RerankConfig(text_width=clip.text.width, image_width=clip.visual.width, **shape)


# --- folders ------------------------------------------------------------------------------------


def save_reranker(
    model: CrossAttentionReranker, out_dir: str | os.PathLike, *, clip_ref: str, clip_digest: str, extra: dict
) -> Path:
    """Write ``model`` to ``out_dir`` (model.safetensors, then config.json naming the CLIP it reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    atomic_write(out / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "model": to_dict(model.config),
        "clip": {"ref": clip_ref, "digest": clip_digest},
        "weights_sha256": file_sha256(out / WEIGHTS),
        **extra,
    }
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def read_reranker_config(folder: Path) -> dict:
    """The checked config.json of a re-ranker folder; ``UserError`` naming the file otherwise."""
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"{path}: missing; {folder} is not a re-ranker folder (see `vitrina train rerank`)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); retrain the re-ranker") from None
    if not isinstance(config, dict) or config.get("kind") != KIND:
        raise UserError(f"{path}: not a re-ranker (kind {config.get('kind') if isinstance(config, dict) else None!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {config.get('format_version')!r} is not supported")
    clip = config.get("clip")
    if not isinstance(clip, dict) or not isinstance(clip.get("ref"), str) or not isinstance(clip.get("digest"), str):
        raise UserError(f"{path}: no 'clip' section (ref, digest); retrain the re-ranker")
    return config


def load_cross_model(folder: str | os.PathLike) -> tuple[CrossAttentionReranker, dict]:
    """(the re-ranker in eval mode, its config.json) from a re-ranker folder."""
    folder = Path(folder)
    config = read_reranker_config(folder)
    model = CrossAttentionReranker(from_dict(RerankConfig, config["model"], where=f"{folder / CONFIG}: model"))
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights}: missing; the re-ranker folder is incomplete")
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # safetensors' own errors, or a shape that does not fit the config
        raise UserError(f"{weights}: cannot load ({str(e).splitlines()[0]}); retrain the re-ranker") from None
    return model.eval(), config


# --- scoring candidates -------------------------------------------------------------------------


class Reranker:
    """A frozen CLIP's towers + a trained ``CrossAttentionReranker``: one text, N images -> N logits.

    ``digest``: the sha256 of the re-ranker's weights file ("" for a model built in memory), and
    ``clip_digest`` the weights digest of the CLIP it was trained on: the keys a stored token file
    (``vitrina.index.rerank_tokens``) must carry to be used with it.
    """

    def __init__(
        self, clip: CLIP, model: CrossAttentionReranker, *, source: str = "", digest: str = "", clip_digest: str = ""
    ) -> None:
        from vitrina.data.transforms import eval_transform

        c = clip.config
        if (model.config.text_width, model.config.image_width) != (clip.text.width, clip.visual.width):
            raise UserError(
                f"{source or 'the re-ranker'}: reads {model.config.text_width}/{model.config.image_width}"
                f"-wide towers, the CLIP has {clip.text.width}/{clip.visual.width}; retrain it for this CLIP"
            )
        self.clip, self.model, self.source = clip.eval(), model.eval(), source
        self.digest, self.clip_digest = digest, clip_digest
        self.transform = eval_transform(c.vision.image_size, c.image_mean, c.image_std)

    def text_states(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One text -> ((1, L, Ct) token states, (1, L) mask)."""
        with torch.inference_mode():
            return self.clip.text_token_states(self.clip.tokenize([text]))

    def image_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """N RGB images -> (N, P+M, Cv) image-tower tokens."""
        with torch.inference_mode():
            return self.clip.image_tokens(torch.stack([self.transform(img) for img in images]))

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """N RGB images -> (N, M, W) float16: the re-ranker's image-side input, as a token file stores it.

        Every candidate is scored from float16 embeddings, stored or made now, so a query scores an item
        the same whether or not the index's token file holds it.
        """
        with torch.inference_mode():
            return self.model.embed_image(self.image_tokens(images)).to(torch.float16)

    @property
    def dual_scale(self) -> float:
        """What a pair's dual-encoder cosine is multiplied by in its score (0: the logit ranks alone)."""
        return self.model.config.dual_scale

    def score_embedded(
        self, states: tuple[torch.Tensor, torch.Tensor], images: torch.Tensor, dual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One text's ``text_states`` against (N, M, W) embedded images (any float dtype) -> (N,) scores,
        all N in one forward pass; ``dual``: the (N,) dual-encoder cosines (without them: the logit alone)."""
        with torch.inference_mode():
            return self.model.score_embedded(states[0], states[1], images.float(), dual).float()

    def score(self, text: str, images: list[Image.Image]) -> torch.Tensor:
        """One text against N images -> (N,) scores (higher: a better match), the dual encoder's cosines
        computed here by the CLIP's towers."""
        if not images:
            return torch.empty(0)
        with torch.inference_mode():
            tokens = self.image_tokens(images)  # (N, P+M, Cv)
            image_vectors = self.clip.encode_image_tokens(tokens)
            text_vector = self.clip.encode_text(self.clip.tokenize([text]))  # (1, D)
            embedded = self.model.embed_image(tokens).to(torch.float16)
        return self.score_embedded(self.text_states(text), embedded, (image_vectors @ text_vector.T).squeeze(-1))


def reranker_folder(model_ref: str) -> Path:
    """Where a CLIP checkpoint keeps its re-ranker: ``CKPT/reranker``."""
    return Path(model_ref) / FOLDER


def load_reranker(folder: str | os.PathLike, *, clip: CLIP | None = None, clip_digest: str | None = None) -> Reranker:
    """A ``Reranker`` from a re-ranker folder (its ``best/`` when training kept one).

    Its CLIP is ``clip`` when given with a matching ``clip_digest`` (the model a searcher has loaded
    already), else the folder's parent when that is the recorded CLIP (a re-ranker moved with its
    checkpoint), else the recorded reference; its weights must match the recorded digest.
    """
    from vitrina.checkpoint import best_checkpoint  # (vitrina.checkpoint imports the models)

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such re-ranker folder; train one with `vitrina train rerank --model CKPT`")
    chosen = best_checkpoint(folder)  # the epoch training kept by validation, when it kept one
    model, config = load_cross_model(chosen)
    wanted = config["clip"]["digest"]
    if clip is None or clip_digest != wanted:
        clip = _recorded_clip(folder, config["clip"]["ref"], wanted)
    return Reranker(clip, model, source=str(chosen), digest=file_sha256(chosen / WEIGHTS), clip_digest=wanted)


def _recorded_clip(folder: Path, ref: str, digest: str) -> CLIP:
    """The CLIP with weights ``digest``: the re-ranker folder's parent checkpoint, else ``ref``."""
    from vitrina.checkpoint import load_model, read_config, weights_digest

    for candidate in dict.fromkeys([folder.resolve().parent, Path(ref)]):
        try:
            config = read_config(candidate)
        except UserError:
            continue  # not a checkpoint folder
        if config["kind"] == "clip" and weights_digest(candidate, config) == digest:
            return load_model(candidate)[0]
    raise UserError(
        f"{folder}: trained on the CLIP {ref} (digest {digest[:12]}), which is not there or holds other "
        "weights now; retrain it with `vitrina train rerank --model CKPT`"
    )
