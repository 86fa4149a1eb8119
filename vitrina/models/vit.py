"""Vision Transformer (Dosovitskiy et al., 2020), read top to bottom like the paper's figure.

image -> patches (Conv2d, stride = patch) -> prepend [CLS] (+ [DIST]) -> + position embedding
      -> depth x pre-norm block (x + MSA(LN(x)); x + MLP(LN(x))) -> LN -> pool ([CLS] or mean) -> head

Parameter names and shapes are those of timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``head``), so timm weights load 1:1 (see ``vitrina.models.pretrained``). ``Block`` and
``Attention`` take an ``is_causal`` flag so the text transformer reuses them.

DeiT distillation token (Touvron et al., 2021), ``ViTConfig(distilled=True)``: a second learned
prefix token ``dist_token`` follows [CLS] (so ``num_prefix_tokens`` is 2 and ``pos_embed`` has a
row for it), read out by its own head ``head_dist``. In **training** mode ``forward`` returns the
pair ``(cls_logits, dist_logits)`` (the first for the labels, the second for the teacher); in
**eval** mode it returns their average, as DeiT does at inference. ``forward_head(x,
pre_logits=True)`` is the average of the two tokens in both modes. (timm returns the pair only
after ``set_distilled_training(True)``; here training mode alone decides.)

Position embeddings follow the image size: ``resize_pos_embed`` resamples the patch rows bicubically
(prefix rows kept), as timm's ``resample_abs_pos_embed``. It runs when a state dict saved at
another image size is loaded (``load_state_dict`` resizes ``pos_embed`` to this model's grid) and
when ``forward`` gets images of another size than the config's (any multiple of the patch size).

Hybrid ViT (``vitrina.models.hybrid``): ``ViTConfig(stem="conv")`` puts a convolutional stem
(stride-2 3x3 conv-BN-GELU per halving, then a 1x1 conv to the width) where the patch embedding was;
its output grid is the token grid (``image_size / patch_size`` per side, the patch size being the
stem's total stride). ``ViTConfig(pool="seq")`` pools by sequence pooling (an attention-weighted
mean of the output tokens, as the Compact Convolutional Transformer) and has no [CLS] token, so
``num_prefix_tokens`` is 0. Both are config fields at defaults that leave a plain ViT as it was:
same parameters, same names, same outputs. A distilled ViT with sequence pooling has [DIST] as its
one prefix token: the class head reads the sequence pooling of the patch tokens, the distillation
head reads [DIST] (so a CCT-like student learns from a teacher the DeiT way).

``patchify``/``unpatchify`` cut images into flat patches in MAE's layout, and
``ViT.forward_attention`` returns every block's attention weights (for rollout, see
``vitrina.models.explain``) while ``forward`` keeps the fused attention kernel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitrina.models.hybrid import ConvStem, SequencePool, default_stem_channels, stem_strides


@dataclass
class ViTConfig:
    """Shape of a ViT. ``num_classes=0`` means no classifier head (``forward`` returns pooled features)."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 0
    layer_norm_eps: float = 1e-6
    pool: Literal["cls", "mean", "seq"] = "cls"  # seq: sequence pooling (CCT), no [CLS] token
    distilled: bool = False  # DeiT: a distillation token and head beside [CLS] (see the module docstring)
    # Options of pretrained CLIP image towers (vitrina.models.pretrained); the defaults are timm's plain ViT.
    pre_norm: bool = False  # LayerNorm on the embedded tokens before the blocks (CLIP's ln_pre, timm's norm_pre)
    act: Literal["gelu", "quick_gelu"] = "gelu"  # MLP activation; OpenAI's CLIP uses quick_gelu
    patch_bias: bool = True  # CLIP's patch projection has no bias
    # Hybrid ViT: "conv" puts a convolutional stem (log2(patch_size) stride-2 convs) where the patch embedding was
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: tuple[int, ...] = ()  # channels of each stride-2 conv of a conv stem; () doubles up to width/2
    stem_refine: int = 0  # residual 3x3 stride-1 convs after each stride-2 conv of a conv stem

    def __post_init__(self) -> None:
        # A conv stem's stride-2 convs (3x3, padding 1) round each halving up, so its grid is
        # ceil(image_size / patch_size): 28 px through three of them gives 4 x 4 tokens.
        if self.stem == "patch" and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pool not in ("cls", "mean", "seq"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'seq', got {self.pool!r}")
        if self.distilled and self.pool == "mean":
            raise ValueError(
                "a distilled ViT's class head reads [CLS] or a sequence pooling: pool must be 'cls' or 'seq'"
            )
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        self.stem_channels = tuple(self.stem_channels)  # JSON gives a list
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv":
            halvings = stem_strides(self.patch_size)
            if self.stem_channels and len(self.stem_channels) != halvings:
                raise ValueError(
                    f"stem_channels {self.stem_channels}: a conv stem for patch_size {self.patch_size} "
                    f"has {halvings} stride-2 convs, one channel count each"
                )
        elif self.stem_channels or self.stem_refine:
            raise ValueError("stem_channels and stem_refine apply to stem='conv' only")
        if self.stem_refine < 0:
            raise ValueError(f"stem_refine must be >= 0, got {self.stem_refine}")

    @property
    def grid_size(self) -> int:
        """Tokens per side: patches, or a conv stem's output grid (each halving rounds up)."""
        return token_grid(self.image_size, self.patch_size, self.stem)

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [CLS] (none with sequence pooling), then DeiT's [DIST] when ``distilled``."""
        return int(self.pool != "seq") + int(self.distilled)

    @property
    def conv_stem_channels(self) -> tuple[int, ...]:
        """Channels of the conv stem's stride-2 convs (the configured ones, or the default doubling)."""
        return self.stem_channels or default_stem_channels(self.patch_size, self.width)


# ---- tensor surgery: small pure functions ------------------------------------------------------


def token_grid(side: int, patch_size: int, stem: str) -> int:
    """Tokens along a side of ``side`` px: whole patches, or ceil(side / patch) for a conv stem."""
    return -(-side // patch_size) if stem == "conv" else side // patch_size


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, p*p*C]``, N = (H/p)(W/p) patches row-major; in a patch, pixels row-major, channel last.

    The layout of MAE's ``patchify`` (its reconstruction targets), so per-patch statistics are taken
    over the last dimension.
    """
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image {H}x{W} is not a multiple of the patch size {patch}")
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)  # (B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, patch * patch * C)  # (B, N, p*p*C)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Undo ``patchify``: ``[B, N, p*p*C] -> [B, C, H, W]``; ``grid`` (h, w) patches, square if not given."""
    B, N, D = patches.shape
    if D % (patch * patch):
        raise ValueError(f"patch vectors of size {D} are not p*p*C for patch size {patch}")
    C = D // (patch * patch)
    if grid is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"{N} patches do not form a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    x = patches.reshape(B, h, w, patch, patch, C)  # (B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * patch, w * patch)  # (B, C, H, W)


def resize_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: int | tuple[int, int],
    new_grid: int | tuple[int, int],
    num_prefix_tokens: int,
) -> torch.Tensor:
    """``[1, P + h*w, C] -> [1, P + h'*w', C]``: patch rows resampled bicubically on the grid, P prefix rows kept.

    Same arithmetic as timm's ``resample_abs_pos_embed`` (bicubic, antialiased when shrinking,
    float32 inside), so weights resized here equal weights resized there.
    """
    old = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(old_grid)
    new = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    if pos_embed.shape[1] != num_prefix_tokens + old[0] * old[1]:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} rows, not {num_prefix_tokens} prefix + {old[0]}x{old[1]} patches"
        )
    if old == new:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    C = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old[0], old[1], C).permute(0, 3, 1, 2)  # (1, C, h, w)
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)  # (1, C, h', w')
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], C).to(pos_embed.dtype)  # (1, h'*w', C)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) -> (B, N, C): one non-overlapping patch per token, linearly projected."""

    def __init__(self, *, patch_size: int, in_channels: int, width: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C), N = (H/p) * (W/p), row-major


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, through ``scaled_dot_product_attention``.

    ``return_attention=True`` also returns the weights ``softmax(q k^T / sqrt(d))``, (B, nh, N, N),
    computed explicitly (slower, more memory): only explanation tools ask for them.
    """

    def __init__(self, width: int, heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, *, is_causal: bool = False, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, N, hs)
        if return_attention:
            weights = attention_weights(q, k, is_causal=is_causal)  # (B, nh, N, N)
            x = weights @ v  # (B, nh, N, hs)
        else:
            x = attend(q, k, v, is_causal=is_causal)  # (B, nh, N, hs)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C): heads side by side again
        return (self.proj(x), weights) if return_attention else self.proj(x)

    def forward_queries(self, x: torch.Tensor, n_queries: int) -> torch.Tensor:
        """(B, N, C) -> (B, n_queries, C): the output of the first ``n_queries`` tokens only (all N as keys)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)  # (B, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, N, hs)
        x = attend(q[:, :, :n_queries], k, v)  # (B, nh, n, hs)
        return self.proj(x.transpose(1, 2).reshape(B, n_queries, C))


# Up to this many keys, a bfloat16 attention that will be differentiated runs as the explicit product below
# rather than through ``scaled_dot_product_attention``, whose fused CPU kernel differentiates bfloat16 slowly at
# short lengths. Forward + backward on the 2-core Xeon of 2026-12-06 (torch 2.14): 17 tokens 4.9-9.7x faster
# explicit, 50 2.4x, 100 1.9-2.7x, 145 1.3-1.5x, 197 0.7-0.8x (the fused kernel wins from there, and in float32
# at every length, so those keep it). What whole training steps gain: BENCHMARKS.md, train_step.
EXPLICIT_BF16_MAX_KEYS = 160


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for (B, nh, N, d) queries and (B, nh, M, d) keys and values.

    ``scaled_dot_product_attention``, except for a bfloat16 training pass on the CPU over at most
    ``EXPLICIT_BF16_MAX_KEYS`` keys, which takes the explicit product: the same function, faster there.
    """
    explicit = (
        q.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
        and k.shape[-2] <= EXPLICIT_BF16_MAX_KEYS
    )
    if explicit:
        return attention_weights(q, k, is_causal=is_causal) @ v
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, is_causal: bool = False) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d))``: (B, nh, N, d) twice -> (B, nh, N, N), each row summing to 1.

    What ``scaled_dot_product_attention`` computes inside; ``is_causal`` masks keys after the query.
    """
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, N, N)
    if is_causal:
        N = q.shape[-2]
        future = torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1)  # key after query
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Mlp(nn.Module):
    """Linear -> GELU (or ``act``) -> Linear, hidden width ``mlp_ratio * width``."""

    def __init__(self, width: int, hidden: int, *, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + MSA(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(
        self, *, width: int, heads: int, mlp_ratio: float, qkv_bias: bool, eps: float, act: str = "gelu"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), act=act)

    def forward(
        self, x: torch.Tensor, *, is_causal: bool = False, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) -> (B, N, C); with ``return_attention`` also the attention weights (B, nh, N, N)."""
        attended = self.attn(self.norm1(x), is_causal=is_causal, return_attention=return_attention)
        if return_attention:
            attended, weights = attended
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        return (x, weights) if return_attention else x

    def forward_prefix(self, x: torch.Tensor, n_prefix: int) -> torch.Tensor:
        """(B, N, C) -> (B, n_prefix, C): the block's output for the first ``n_prefix`` tokens only."""
        x_prefix = x[:, :n_prefix] + self.attn.forward_queries(self.norm1(x), n_prefix)
        return x_prefix + self.mlp(self.norm2(x_prefix))


def init_transformer_weights(module: nn.Module) -> None:
    """timm's ViT init for linear layers: truncated normal (std 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ViT(nn.Module):
    """Vision Transformer: ``forward_features`` -> (B, P+N, C) tokens, ``forward_head`` -> pooled/logits.

    P = ``num_prefix_tokens``: 1 ([CLS]), or 2 ([CLS], [DIST]) for a distilled (DeiT) ViT, whose
    ``forward`` returns ``(cls_logits, dist_logits)`` in training mode and their average in eval mode;
    0 with sequence pooling. ``patch_embed`` is the patch embedding or, for a hybrid, the conv stem.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        config.__post_init__()  # fields set after construction (e.g. build_classifier's overrides) are checked too
        self.config = config
        c = config
        self.num_prefix_tokens = c.num_prefix_tokens
        if c.stem == "conv":
            self.patch_embed = ConvStem(
                channels=c.conv_stem_channels, in_channels=c.in_channels, width=c.width, refine=c.stem_refine
            )
        else:
            self.patch_embed = PatchEmbed(
                patch_size=c.patch_size, in_channels=c.in_channels, width=c.width, bias=c.patch_bias
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width)) if c.pool != "seq" else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.width)) if c.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + c.num_patches, c.width))
        self.blocks = nn.ModuleList(
            Block(
                width=c.width,
                heads=c.heads,
                mlp_ratio=c.mlp_ratio,
                qkv_bias=c.qkv_bias,
                eps=c.layer_norm_eps,
                act=c.act,
            )
            for _ in range(c.depth)
        )
        self.norm_pre = nn.LayerNorm(c.width, eps=c.layer_norm_eps) if c.pre_norm else nn.Identity()
        self.norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.width, c.num_classes) if c.num_classes > 0 else nn.Identity()
        if c.distilled:
            self.head_dist = nn.Linear(c.width, c.num_classes) if c.num_classes > 0 else nn.Identity()
        if c.pool == "seq":
            self.seq_pool = SequencePool(c.width)
        self.reset_parameters()

    @property
    def width(self) -> int:
        """Width of the pooled features (``forward_head(..., pre_logits=True)``)."""
        return self.config.width

    def reset_parameters(self) -> None:
        """timm-style init: small position embedding and [CLS], truncated-normal linear layers."""
        if self.pos_embed.is_meta:  # shapes only (e.g. counting parameters): nothing to fill
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)  # DeiT's init
        self.apply(init_transformer_weights)

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay."""
        tokens = {name for name in ("cls_token", "dist_token") if getattr(self, name) is not None}
        return {"pos_embed"} | tokens

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Weights saved at another image size: resample their position embedding to this grid, so
        # e.g. a 224 px checkpoint loads into a 384 px model (prefix count and width must agree).
        key = prefix + "pos_embed"
        saved = state_dict.get(key)
        if isinstance(saved, torch.Tensor) and saved.dim() == 3 and saved.shape != self.pos_embed.shape:
            patches = saved.shape[1] - self.num_prefix_tokens
            side = math.isqrt(max(patches, 0))
            if side * side == patches and saved.shape[-1] == self.pos_embed.shape[-1]:
                state_dict[key] = resize_pos_embed(saved, side, self.config.grid_size, self.num_prefix_tokens)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, P+N, C): patch tokens with the prefix tokens prepended, plus position embedding.

        Images of another size than the config's (a multiple of the patch size) get the position
        embedding resampled to their grid.
        """
        c = self.config
        H, W = pixels.shape[-2:]
        if c.stem == "patch" and (H % c.patch_size or W % c.patch_size):
            raise ValueError(f"image {H}x{W} is not a multiple of the patch size {c.patch_size}")
        grid = (token_grid(H, c.patch_size, c.stem), token_grid(W, c.patch_size, c.stem))
        x = self.patch_embed(pixels)  # (B, N, C), N = grid[0] * grid[1]
        prefix = [token for token in (self.cls_token, self.dist_token) if token is not None]
        prefix = [token.expand(x.shape[0], -1, -1) for token in prefix]  # P x (B, 1, C)
        x = torch.cat([*prefix, x], dim=1)  # (B, P+N, C)
        pos_embed = self.pos_embed
        if grid != (c.grid_size, c.grid_size):
            pos_embed = resize_pos_embed(pos_embed, c.grid_size, grid, self.num_prefix_tokens)
        return self.norm_pre(x + pos_embed)  # identity unless pre_norm (CLIP's ln_pre)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, P+N, C) token features after the final LayerNorm."""
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_intermediates(self, pixels: torch.Tensor, last: int) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> the tokens (B, P+N, C) after each of the last ``last`` blocks, first to last,
        each through the final LayerNorm (as DINO reads intermediate blocks for its linear evaluation)."""
        if not 1 <= last <= len(self.blocks):
            raise ValueError(f"last={last}: this ViT has {len(self.blocks)} blocks")
        x = self.embed(pixels)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - last:
                outputs.append(self.norm(x))
        return outputs

    def forward_for_head(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> the tokens ``forward_head`` reads, after the final LayerNorm.

        With [CLS] pooling that is the prefix tokens alone, (B, P, C): the last block then computes
        only their outputs, as the patch tokens' outputs would be dropped (the same numbers for about
        1/depth less work). With mean or sequence pooling, every token (B, P+N, C).
        """
        if self.config.pool != "cls" or not self.blocks:
            return self.forward_features(pixels)
        x = self.embed(pixels)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.norm(self.blocks[-1].forward_prefix(x, self.num_prefix_tokens))

    def forward_attention(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> one (B, heads, P+N, P+N) tensor of attention weights per block, first to last."""
        x = self.embed(pixels)
        attentions = []
        for block in self.blocks:
            x, weights = block(x, return_attention=True)
            attentions.append(weights)
        return attentions

    def class_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P+N, C) -> (B, C) the class head reads: [CLS], the mean of the patch tokens, or their
        sequence pooling (weights from ``seq_pool``)."""
        if self.config.pool == "mean":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        if self.config.pool == "seq":
            return self.seq_pool(x[:, self.num_prefix_tokens :])
        if self.cls_token is None:
            raise ValueError("this ViT pools by sequence pooling and has no [CLS] token to read")
        return x[:, 0]

    def dist_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P+N, C) -> (B, C): the [DIST] token, the last prefix token (after [CLS] if there is one)."""
        return x[:, self.num_prefix_tokens - 1]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P+N, C) -> (B, C): ``class_features``, averaged with [DIST] if distilled."""
        if self.dist_token is not None:
            return (self.class_features(x) + self.dist_features(x)) / 2
        return self.class_features(x)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, P+N, C) -> pooled (B, C) if ``pre_logits`` else head output (B, num_classes or C).

        A distilled ViT in training mode returns ``(cls_logits, dist_logits)``, each (B, num_classes or C).
        """
        if self.dist_token is not None and not pre_logits:
            logits, dist_logits = self.head(self.class_features(x)), self.head_dist(self.dist_features(x))
            return (logits, dist_logits) if self.training else (logits + dist_logits) / 2
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_for_head(pixels))


def with_image_size(model: ViT, image_size: int) -> ViT:
    """A copy of ``model`` for ``image_size`` px images: same weights, position embedding resampled to the new grid."""
    config = dataclasses.replace(model.config, image_size=image_size)
    resized = ViT(config).to(next(model.parameters()).device)
    resized.load_state_dict(model.state_dict())
    return resized.train(model.training)
