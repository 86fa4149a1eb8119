"""Swin Transformer (Liu et al., 2021), read top to bottom like the paper's figure 3.

image -> patch partition + linear embedding (Conv2d, stride = patch) -> LN            stage 1: H/p x W/p, C
      -> [patch merging (2x2 neighbours -> LN -> Linear 4C -> 2C)] -> Swin blocks    stages 2..n: halve H, W; double C
      -> LN -> average pool -> head

A stage's Swin blocks come in pairs: the first attends within regular M x M windows (W-MSA), the
second within windows shifted by M/2 (SW-MSA). The shift is done as a *cyclic* shift of the whole
map (``torch.roll``), so the shifted windows are again M x M tiles; a window that wraps around the
border then holds tokens that are not neighbours in the image, and an attention mask keeps them
apart. Each window's attention adds a learned relative position bias, one entry per (dy, dx) offset.
Where a stage's map is no larger than the window, the window shrinks to the map and nothing shifts
(one window sees everything; a shift would only wrap the image onto itself).

Features stay channels-last, (B, H, W, C), as in the paper's code and timm. Parameter names are
timm's ``SwinTransformer`` names with ``layers`` -> ``stages``, ``downsample`` -> ``merge`` and
``head.fc`` -> ``head``: ``swin_state_dict_from_timm`` is the whole mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitrina.models.vit import Mlp, init_transformer_weights

# The mask value for token pairs that must not attend to each other. The reference code uses -100, not
# -inf: after softmax it is exactly 0 in float32 next to any real score, and it stays finite in half precision.
MASKED = -100.0

# Below this many (window, head) pairs per call, attention runs as plain matmuls + softmax: the fused SDPA
# kernel splits its work by pair, and with few pairs its setup outweighs what it saves (Swin-T at batch 1,
# stages 2-4: 96 pairs or fewer, ~1.5x slower fused on a 2-core AVX-512 CPU; bench/arch_throughput.py).
FUSED_ATTENTION_MIN_PAIRS = 128


@dataclass
class SwinConfig:
    """Shape of a Swin Transformer. Stage i has ``embed_dim * 2**i`` channels, ``depths[i]`` blocks, ``heads[i]``.

    ``num_classes=0`` means no classifier head (``forward`` returns pooled features). The image side
    divided by the patch size must halve cleanly at every stage and be tiled by the window at each.
    """

    image_size: int = 224
    patch_size: int = 4
    in_channels: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.depths, self.heads = tuple(self.depths), tuple(self.heads)  # JSON gives lists
        if len(self.depths) != len(self.heads) or not self.depths:
            raise ValueError(f"depths {self.depths} and heads {self.heads} must be non-empty and of equal length")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.grid_size % 2 ** (self.num_stages - 1):
            raise ValueError(
                f"the patch grid ({self.grid_size}) cannot halve {self.num_stages - 1} times; "
                "change image_size, patch_size or the number of stages"
            )
        for i, (dim, heads, res) in enumerate(zip(self.stage_dims, self.heads, self.stage_resolutions, strict=True)):
            if dim % heads:
                raise ValueError(f"stage {i}: width {dim} is not divisible by heads {heads}")
            window, _ = self.stage_window(i)
            if res % window:
                raise ValueError(f"stage {i}: its {res}x{res} map is not tiled by {window}x{window} windows")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def grid_size(self) -> int:
        """Patches per side at stage 1."""
        return self.image_size // self.patch_size

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each stage: C, 2C, 4C, ..."""
        return tuple(self.embed_dim * 2**i for i in range(self.num_stages))

    @property
    def stage_resolutions(self) -> tuple[int, ...]:
        """Side of each stage's map: grid, grid/2, grid/4, ..."""
        return tuple(self.grid_size // 2**i for i in range(self.num_stages))

    @property
    def width(self) -> int:
        """Channels of the last stage, i.e. of the pooled features."""
        return self.stage_dims[-1]

    def stage_window(self, stage: int) -> tuple[int, int]:
        """(window side, shift) of a stage: M and M/2, or the whole map and no shift where the map fits in M."""
        resolution = self.stage_resolutions[stage]
        if resolution <= self.window_size:
            return resolution, 0
        return self.window_size, self.window_size // 2


# ---- tensor surgery: small pure functions ------------------------------------------------------


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a map into non-overlapping windows, row-major: ``[B, H, W, C] -> [B*nW, M, M, C]``, nW = (H/M)(W/M)."""
    B, H, W, C = x.shape
    M = window_size
    x = x.view(B, H // M, M, W // M, M, C)  # (B, H/M, M, W/M, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, M, M, C)  # (B*nW, M, M, C)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Undo ``window_partition``: ``[B*nW, M, M, C] -> [B, H, W, C]``."""
    M, C = window_size, windows.shape[-1]
    x = windows.view(-1, height // M, width // M, M, M, C)  # (B, H/M, W/M, M, M, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, C)  # (B, H, W, C)


def cyclic_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Roll a ``[B, H, W, C]`` map up and left by ``shift``: token (shift, shift) lands on (0, 0)."""
    return torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))


def cyclic_unshift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Undo ``cyclic_shift``: roll a ``[B, H, W, C]`` map down and right by ``shift``."""
    return torch.roll(x, shifts=(shift, shift), dims=(1, 2))


def relative_position_index(window_size: int) -> torch.Tensor:
    """``[M*M, M*M]`` long: for query i and key j in a window, the row of (dy, dx) = pos_i - pos_j in the bias table.

    dy and dx each range over 2M-1 values; the table row is ``(dy + M-1) * (2M-1) + (dx + M-1)``.
    """
    M = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)  # (2, M*M)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, M*M, M*M): (dy, dx) of every query-key pair
    dy, dx = offsets + (M - 1)  # each (M*M, M*M), now in [0, 2M-2]
    return dy * (2 * M - 1) + dx


def shifted_window_mask(resolution: int, window_size: int, shift: int) -> torch.Tensor:
    """``[nW, M*M, M*M]``: 0 where two tokens of a shifted window may attend to each other, ``MASKED`` elsewhere.

    After the cyclic shift the last M rows (and columns) of the map hold three bands that were not
    neighbours before it: [.., -M) untouched, [-M, -shift) and the wrapped-around [-shift, ..). Label each
    region of the 3 x 3 band grid; tokens may attend only within their own region.
    """
    M = window_size
    bands = (slice(0, -M), slice(-M, -shift), slice(-shift, None))
    region = torch.zeros(1, resolution, resolution, 1)  # (1, H, W, 1)
    for label, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
        region[:, rows, cols, :] = label
    region = window_partition(region, M).view(-1, M * M)  # (nW, M*M): region label of each token in each window
    different = region[:, None, :] != region[:, :, None]  # (nW, M*M, M*M)
    return torch.zeros(different.shape).masked_fill(different, MASKED)


# ---- the layers -----------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Patch partition + linear embedding: ``(B, C_in, H, W) -> (B, H/p, W/p, C)``, then LayerNorm."""

    def __init__(self, *, patch_size: int, in_channels: int, dim: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        return self.norm(x.permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each M x M window, plus a learned relative position bias.

    The bias table holds one value per head for each of the (2M-1)^2 offsets (dy, dx); the index
    buffer picks, for every query-key pair of a window, the row of its offset.
    """

    def __init__(self, dim: int, heads: int, window_size: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(nh, N, N) with N = M*M: the bias added to every window's attention scores."""
        N = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, nh)
        return bias.view(N, N, self.heads).permute(2, 0, 1).contiguous()  # (nh, N, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B*nW, N, C) windows of tokens -> (B*nW, N, C); ``mask`` (nW, N, N) keeps shifted regions apart."""
        BW, N, C = x.shape
        qkv = self.qkv(x).reshape(BW, N, 3, self.heads, C // self.heads)  # (B*nW, N, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B*nW, nh, N, hs)
        if BW * self.heads < FUSED_ATTENTION_MIN_PAIRS:
            x = self.attention_by_matmul(q, k, v, mask)
            return self.proj(x.transpose(1, 2).reshape(BW, N, C))
        attn_mask = self.relative_position_bias().unsqueeze(0)  # (1, nh, N, N), the same for every window
        if mask is not None:
            nW = mask.shape[0]
            attn_mask = attn_mask + mask.unsqueeze(1)  # (nW, nh, N, N): window position k has its own mask
            attn_mask = attn_mask.repeat(BW // nW, 1, 1, 1)  # (B*nW, nh, N, N), windows ordered image by image
        # A 4-D mask with the batch dimension spelled out (an expand costs nothing) keeps SDPA on its fused
        # CPU kernel; a 3-D or 5-D one falls back to a path ~3x slower (inference, Swin-T stage-1 shapes).
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.expand(BW, -1, -1, -1))  # (B*nW, nh, N, hs)
        x = x.transpose(1, 2).reshape(BW, N, C)  # (B*nW, N, C): heads side by side again
        return self.proj(x)

    def attention_by_matmul(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """What ``forward``'s SDPA call computes, spelled out: (B*nW, nh, N, hs) q, k, v -> (B*nW, nh, N, hs).
        The window mask is broadcast over the images instead of repeated per window."""
        BW, nh, N, hs = q.shape
        scores = (q * hs**-0.5) @ k.transpose(-2, -1) + self.relative_position_bias()  # (B*nW, nh, N, N)
        if mask is not None:
            nW = mask.shape[0]
            scores = (scores.view(BW // nW, nW, nh, N, N) + mask[None, :, None]).view(BW, nh, N, N)
        return scores.softmax(dim=-1) @ v


class SwinBlock(nn.Module):
    """Pre-norm block on a ``(B, H, W, C)`` map: ``x + (S)W-MSA(LN(x))`` then ``x + MLP(LN(x))``.

    ``shift=0`` is W-MSA (regular windows), ``shift=M/2`` is SW-MSA (cyclically shifted windows + mask).
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        resolution: int,
        window_size: int,
        shift: int,
        mlp_ratio: float,
        qkv_bias: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(dim, heads, window_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, window_size, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(S)W-MSA on a ``(B, H, W, C)`` map: shift, cut into windows, attend, stitch back, unshift."""
        B, H, W, C = x.shape
        M = self.window_size
        if self.shift:
            x = cyclic_shift(x, self.shift)
        windows = window_partition(x, M).view(-1, M * M, C)  # (B*nW, M*M, C)
        windows = self.attn(windows, mask=self.attn_mask)  # (B*nW, M*M, C)
        x = window_reverse(windows.view(-1, M, M, C), M, H, W)  # (B, H, W, C)
        return cyclic_unshift(x, self.shift) if self.shift else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.window_attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """``(B, H, W, C) -> (B, H/2, W/2, 2C)``: each 2x2 neighbourhood concatenated (4C), LayerNorm, Linear 4C -> 2C."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference order of the four neighbours: (0,0), (1,0), (0,1), (1,1) as (row, col) offsets.
        neighbours = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]  # 4 x (B, H/2, W/2, C)
        x = torch.cat(neighbours, dim=-1)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))  # (B, H/2, W/2, 2C)


class SwinStage(nn.Module):
    """One stage: patch merging (stages 2..n) then ``depth`` blocks alternating W-MSA and SW-MSA."""

    def __init__(self, config: SwinConfig, stage: int) -> None:
        super().__init__()
        c = config
        dim = c.stage_dims[stage]
        window, shift = c.stage_window(stage)
        self.merge = PatchMerging(dim // 2, eps=c.layer_norm_eps) if stage > 0 else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim=dim,
                heads=c.heads[stage],
                resolution=c.stage_resolutions[stage],
                window_size=window,
                shift=shift if i % 2 else 0,
                mlp_ratio=c.mlp_ratio,
                qkv_bias=c.qkv_bias,
                eps=c.layer_norm_eps,
            )
            for i in range(c.depths[stage])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.merge(x)
        for block in self.blocks:
            x = block(x)
        return x


class Swin(nn.Module):
    """Swin Transformer: ``forward_features`` -> (B, H, W, C) final map, ``forward_head`` -> pooled/logits."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(
            patch_size=c.patch_size, in_channels=c.in_channels, dim=c.embed_dim, eps=c.layer_norm_eps
        )
        self.stages = nn.ModuleList(SwinStage(c, i) for i in range(c.num_stages))
        self.norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.width, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def width(self) -> int:
        """Width of the pooled features (``forward_head(..., pre_logits=True)``)."""
        return self.config.width

    def reset_parameters(self) -> None:
        """timm-style init: truncated-normal (std 0.02) linear layers and relative position bias tables."""
        self.apply(init_transformer_weights)
        for name, p in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay: the relative position bias tables."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}

    def forward_features(
        self, pixels: torch.Tensor, return_stages: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C_in, H, W) -> (B, H', W', C) final map after LayerNorm.

        With ``return_stages``, also the list of every stage's output map (before the final LayerNorm),
        ``(B, H/p / 2**i, W/p / 2**i, C * 2**i)`` for stage i.
        """
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"Swin expects {size}x{size} images, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels)  # (B, H/p, W/p, C)
        stage_maps = []
        for stage in self.stages:
            x = stage(x)
            stage_maps.append(x)
        x = self.norm(x)
        return (x, stage_maps) if return_stages else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, C) -> average-pooled (B, C) if ``pre_logits`` else head output (B, num_classes or C)."""
        x = x.mean(dim=(1, 2))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))


def timm_swin_kwargs(config: SwinConfig) -> dict:
    """Keyword arguments that make timm's ``SwinTransformer`` the same shape as ``Swin(config)`` (parity checks)."""
    c = config
    return {
        "img_size": c.image_size,
        "patch_size": c.patch_size,
        "in_chans": c.in_channels,
        "embed_dim": c.embed_dim,
        "depths": c.depths,
        "num_heads": c.heads,
        "window_size": c.window_size,
        "mlp_ratio": c.mlp_ratio,
        "qkv_bias": c.qkv_bias,
        "num_classes": c.num_classes,
        "drop_path_rate": 0.0,
    }


def swin_state_dict_from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``SwinTransformer`` state dict, renamed for ``Swin``: the tensors themselves are used as they are.

    ``layers.i`` -> ``stages.i``, ``.downsample.`` -> ``.merge.``, ``head.fc.`` -> ``head.``; the buffers
    ``relative_position_index`` and ``attn_mask`` are dropped (``Swin`` computes them from its config).
    """
    renamed = {}
    for name, tensor in state_dict.items():
        if name.endswith(("relative_position_index", "attn_mask")):
            continue
        if name.startswith("layers."):
            name = "stages." + name.removeprefix("layers.").replace(".downsample.", ".merge.", 1)
        elif name.startswith("head.fc."):
            name = "head." + name.removeprefix("head.fc.")
        renamed[name] = tensor
    return renamed


def _swin_224(embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...]) -> SwinConfig:
    return SwinConfig(image_size=224, patch_size=4, embed_dim=embed_dim, depths=depths, heads=heads, window_size=7)


SWIN_PRESETS: dict[str, SwinConfig] = {
    # The paper's table 1, ImageNet 224 x 224, M = 7 (stage maps 56, 28, 14, 7).
    "swin-t": _swin_224(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin-s": _swin_224(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin-b": _swin_224(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin-l": _swin_224(192, (2, 2, 18, 2), (6, 12, 24, 48)),
    # 28 x 28 (Fashion-MNIST): 2 px patches -> 14 x 14 map = 2 x 2 windows of 7 (shifted in stage 1),
    # then one 7 x 7 window in stage 2; 0.93M parameters, 64M MACs per image. RGB like every vitrina image
    # (in_channels=1 for grey tensors).
    "swin-nano-28": SwinConfig(image_size=28, patch_size=2, embed_dim=64, depths=(2, 4), heads=(2, 4), window_size=7),
    # 64 x 64: 4 px patches -> maps 16, 8, 4 with 4 x 4 windows (shifted in stages 1 and 2); 3.8M parameters,
    # 108M MACs per image.
    "swin-micro-64": SwinConfig(
        image_size=64, patch_size=4, embed_dim=64, depths=(2, 2, 4), heads=(2, 4, 8), window_size=4
    ),
}
