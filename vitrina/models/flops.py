"""Model cost, measured rather than written down: parameters, and multiply-accumulates per forward.

MACs are counted by running the model once under ``torch.utils.flop_counter.FlopCounterMode``,
which counts the matrix products and convolutions (2 FLOPs per multiply-accumulate; normalisation,
activations and additions are not counted -- the usual convention of papers' "FLOPs" tables).
Models are built on the ``meta`` device: parameters and activations have shapes but no storage,
so even a ViT-B or Swin-L is counted in a fraction of a second without allocating its weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` run with the meta device as default: a model with shapes and no weights, in eval mode."""
    with torch.device("meta"):
        return build().eval()


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (buffers not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward of ``model`` on an input of ``input_shape`` (FLOPs / 2).

    The input is made on the model's device (``meta`` for a model from ``on_meta``).
    """
    device = next(model.parameters()).device
    inputs = torch.zeros(input_shape, device=device)
    counter = FlopCounterMode(display=False)
    # The counter has no formula for the fused CPU attention kernel (it would count attention as 0 MACs):
    # the math backend spells attention out as the two batched matrix products it is, which are counted.
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        model(inputs)
    return counter.get_total_flops() // 2
