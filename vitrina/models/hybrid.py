"""The hybrid ViT's two parts: a convolutional stem in place of the patch embedding, and sequence pooling.

Convolutional stem (Xiao et al., 2021, "Early convolutions help transformers see better"): a stack
of 3x3 stride-2 convolutions, each followed by BatchNorm and an activation, then one 1x1
convolution to the transformer's width. ``log2(patch)`` stride-2 convs shrink the image by the
patch size, so the stem's output grid is the same token grid as the patch embedding's, and the rest
of the ViT (position embedding, blocks) is unchanged. The paper's stem uses ReLU and doubles the
channels per conv up to the width; we use GELU (the transformer's activation) and the same doubling.
Optionally each halving is followed by ``refine`` residual 3x3 stride-1 conv-BN-GELU layers at the
same resolution, as the original ViT's hybrid put ResNet stages before its transformer: more
convolution per token (on Fashion-MNIST in a 30-minute budget, one per stage: +0.7 points at ~0.8x
the training img/s; BENCHMARKS.md, fmnist_classify).

Sequence pooling (Hassani et al., 2021, "Escaping the Big Data Paradigm with Compact
Transformers"): the pooled feature is an attention-weighted mean of the output tokens,
``softmax(x W) ^T x`` with one learned scoring vector W, instead of a [CLS] token.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn


def stem_strides(patch_size: int) -> int:
    """How many stride-2 convs reach ``patch_size``: log2 of it; ``ValueError`` when it is not a power of 2."""
    n = int(math.log2(patch_size)) if patch_size > 1 else 0
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(
            f"a convolutional stem halves the image per conv: patch_size must be 2, 4, 8, ..., got {patch_size}"
        )
    return n


def default_stem_channels(patch_size: int, width: int) -> tuple[int, ...]:
    """Channels of each stride-2 conv: doubling up to half the width, as the paper's stems (e.g. 48, 96 for 192)."""
    n = stem_strides(patch_size)
    return tuple(max(16, width // 2 ** (n - i)) for i in range(n))


class ConvStem(nn.Module):
    """``(B, C_in, H, W) -> (B, N, width)``, N = (H/p)(W/p): stride-2 3x3 conv-BN-GELU per halving, 1x1 conv to width.

    Module names (``convs.i.{conv,bn}``, ``proj``) are this stem's own: a patch-embedding checkpoint
    does not load into it, nor it into one.
    """

    # Run the convs under bf16 autocast (``stems_in_bf16``), returning float32 tokens: a runtime
    # switch, not part of the checkpoint.
    bf16: bool = False

    def __init__(self, *, channels: tuple[int, ...], in_channels: int, width: int, refine: int = 0) -> None:
        super().__init__()
        ins = (in_channels, *channels[:-1])
        self.convs = nn.ModuleList(ConvBNAct(cin, cout) for cin, cout in zip(ins, channels, strict=True))
        # stage i's residual stride-1 convs; absent (not empty) when refine is 0, so that the
        # checkpoints of plain stems keep their exact tensor names
        if refine:
            self.refine = nn.ModuleList(nn.Sequential(*(ResidualConv(c) for _ in range(refine))) for c in channels)
        else:
            self.refine = None
        self.proj = nn.Conv2d(channels[-1], width, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bf16:
            return self._forward(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self._forward(x).float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last maps: faster CPU convs, as in vitrina.models.cnn (a training step of
        # vit-hybrid-fmnist-s8 at batch 128: 994 -> 1209 img/s)
        x = x.to(memory_format=torch.channels_last)  # .contiguous() would keep a 1-channel input as it is
        for i, conv in enumerate(self.convs):
            x = conv(x)  # (B, c_i, H/2^(i+1), W/2^(i+1))
            if self.refine is not None:
                x = self.refine[i](x)  # same shape
        x = self.proj(x)  # (B, width, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, width), row-major like PatchEmbed


@contextlib.contextmanager
def stems_in_bf16(model: nn.Module) -> Iterator[None]:
    """Every ``ConvStem`` of ``model`` under bf16 autocast for a while, the rest of it as it runs.

    Why only the stem: on a CPU with AMX, a training step of ``vit-hybrid-fmnist-s8-r1`` (batch 128)
    ran ~1.1x faster with its stem in bf16 but ~0.6x with the whole model under autocast, most of
    that loss in the fused attention kernel's bf16 backward. Since ``vitrina.models.vit.attend``
    skips that kernel the whole model under autocast (``precision="bf16"``) is the faster of the two
    (BENCHMARKS.md, train_step); this stays for the recipes recorded with it.
    """
    stems = [m for m in model.modules() if isinstance(m, ConvStem)]
    saved = [stem.bf16 for stem in stems]
    for stem in stems:
        stem.bf16 = True
    try:
        yield
    finally:
        for stem, was in zip(stems, saved, strict=True):
            stem.bf16 = was


class ConvBNAct(nn.Module):
    """``(B, C_in, H, W) -> (B, C_out, H/2, W/2)``: 3x3 stride-2 conv (no bias: BN follows), BatchNorm, GELU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ResidualConv(nn.Module):
    """``(B, C, H, W) -> (B, C, H, W)``: ``x + GELU(BN(conv3x3(x)))``, a stride-1 conv that refines a stage."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layer = ConvBNAct(channels, channels, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(x)


class SequencePool(nn.Module):
    """``(B, N, C) -> (B, C)``: the tokens' mean weighted by ``softmax`` of one learned score per token."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.score = nn.Linear(width, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N): each token's share of the pooled feature; every row sums to 1."""
        return self.score(x).squeeze(-1).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weights(x).unsqueeze(1) @ x).squeeze(1)  # (B, 1, N) @ (B, N, C) -> (B, C)
