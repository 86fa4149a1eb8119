"""Inference precision of an encoder: fp32 (the reference), bf16 autocast, or int8 dynamic quantization.

Both speed-ups are opt-in per run and measured for what they cost (``bench/precision.py``):

* ``bf16``: every forward under ``torch.autocast("cpu", torch.bfloat16)``; the weights stay float32.
  It pays on CPUs with native bf16 arithmetic (AVX-512 BF16 or AMX); elsewhere the casts cost more
  than they save, and the CLI says so.
* ``int8``: ``torch.ao.quantization.quantize_dynamic`` on the ``nn.Linear`` layers (weights stored as
  int8, activations quantized per batch on the fly); attention's matmuls, norms and convolutions
  stay float32. The model is quantized once, when the encoder is wrapped.

The vectors stay unit float32 whatever the precision, so an index built at one precision is
searched by queries at another; a version records the precision it was embedded with.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vitrina.encoder import Encoder
from vitrina.errors import UserError

PRECISIONS = ("fp32", "bf16", "int8")


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def warn_without_native_bf16(what: str) -> None:
    """One line on stderr when ``what`` asks for bf16 on a CPU without bf16 arithmetic, where it runs slower."""
    if not native_bf16():
        print(
            f"warning: this CPU has no native bf16 (AVX-512 BF16 / AMX): {what} will be slower than fp32",
            file=sys.stderr,
        )


def check_precision(precision: str) -> str:
    """``precision`` if known, else a ``UserError`` naming the choices."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    return precision


def quantize_linear(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers are int8 dynamically quantized (eval mode)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's eager quantization warns that it moves to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


class PrecisionEncoder:
    """An ``Encoder`` that runs another one at ``precision``; identity, transform and width unchanged."""

    def __init__(self, inner: Encoder, precision: str) -> None:
        self.inner, self.precision = inner, check_precision(precision)
        self.embed_dim = inner.embed_dim
        if precision == "int8":
            model = getattr(inner, "model", None)
            if not isinstance(model, nn.Module):
                raise UserError(f"--precision int8 needs a PyTorch model; {type(inner).__name__} has none")
            self.inner = copy.copy(inner)  # the caller's encoder keeps its float model
            self.inner.model = quantize_linear(model)
        elif precision == "bf16":
            warn_without_native_bf16("--precision bf16")

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # model, tokenizer... of the wrapped encoder

    @property
    def identity(self) -> dict:
        return self.inner.identity  # the same weights: the same digest, whatever the arithmetic

    @property
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self.inner.image_transform

    def _context(self):
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) float32 unit vectors."""
        with self._context():
            return torch.nn.functional.normalize(self.inner.encode_image(pixels).float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of B strings -> (B, D) float32 unit vectors."""
        with self._context():
            return torch.nn.functional.normalize(self.inner.encode_text(texts).float(), dim=-1)


def with_precision(encoder: Encoder, precision: str) -> Encoder:
    """``encoder`` itself for fp32, else wrapped to run at ``precision``."""
    return encoder if check_precision(precision) == "fp32" else PrecisionEncoder(encoder, precision)
