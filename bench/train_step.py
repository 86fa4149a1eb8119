"""Training-step img/s of our models per precision, and what short bf16 attention gains by skipping the fused kernel.

The step is what a trainer repeats, without its data loading and augmentation: forward under the
precision (``vitrina.train.loop.forward_precision``), the loss in float32, backward, gradient clipping
at 1.0 and AdamW (``param_groups_for``), on a fixed random batch of 128. Models:

- ``clip-minilm-p12``: the demo's image tower (48 px, 12 px patches: 17 tokens) and projection against
  fixed unit text vectors (the demo's locked MiniLM tower is not trained; its outputs are cached), the
  image-to-text InfoNCE;
- ``vit-hybrid-fmnist-s8-r1``: the r1 hybrid classifier of ``bench/fmnist_classify.py`` (16 tokens);
- ``vit-fmnist-28-fast``: the plain-patch Fashion-MNIST ViT (7 px patches: 17 tokens).

Each row times, in alternating rounds on one warm process (so all see the same load on a noisy
machine), every precision of the model, and for bf16 both attention paths: ``fused`` (every attention
through ``scaled_dot_product_attention``, as before 2026-12-06: ``EXPLICIT_BF16_MAX_KEYS`` set to 0)
and the default (``vitrina.models.vit.attend``: a bf16 attention that will be differentiated over at
most that many keys runs as the explicit product). It reports the median img/s of each and the ratios.

Run from the repository root:  .venv/bin/python bench/train_step.py
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import record  # noqa: E402
from vitrina.models import vit  # noqa: E402
from vitrina.train.loop import forward_precision, param_groups_for  # noqa: E402

BENCHMARK = "train_step"
BATCH = 128
# model -> the precisions its trainer offers (bf16-stem needs a convolutional stem)
MODELS = {
    "clip-minilm-p12": ("fp32", "bf16"),
    "vit-hybrid-fmnist-s8-r1": ("fp32", "bf16-stem", "bf16"),
    "vit-fmnist-28-fast": ("fp32", "bf16"),
}


def model_and_loss(name: str) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """The trainable model and a closure computing its loss on one fixed batch (inside the caller's precision)."""
    torch.manual_seed(0)
    if name.startswith("clip"):
        from vitrina.models.registry import build_model

        model = build_model(name)
        model.text.requires_grad_(False)  # the demo locks the pretrained text tower
        size = model.visual.config.image_size
        pixels = torch.rand(BATCH, 3, size, size)
        texts = F.normalize(torch.randn(BATCH, model.config.embed_dim), dim=-1)  # (B, D)

        def clip_loss() -> torch.Tensor:
            images = model.encode_image(pixels).float()  # (B, D)
            return F.cross_entropy(model.scale() * images @ texts.T, torch.arange(BATCH))

        return model, clip_loss
    from vitrina.train.classify import build_classifier

    model = build_classifier(name, 10, seed=0)
    pixels, labels = torch.rand(BATCH, 3, 28, 28), torch.randint(0, 10, (BATCH,))
    return model, lambda: F.cross_entropy(model(pixels).float(), labels, label_smoothing=0.1)


@contextlib.contextmanager
def fused_attention(on: bool):
    """Every attention through the fused kernel while ``on`` (the behaviour before ``attend``)."""
    saved = vit.EXPLICIT_BF16_MAX_KEYS
    vit.EXPLICIT_BF16_MAX_KEYS = 0 if on else saved
    try:
        yield
    finally:
        vit.EXPLICIT_BF16_MAX_KEYS = saved


def measure(name: str, precisions: tuple[str, ...], rounds: int, steps: int) -> dict:
    model, loss_of = model_and_loss(name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups_for(model, 0.05), lr=1e-4)
    model.train()

    def step(precision: str, fused: bool) -> None:
        with fused_attention(fused), forward_precision(model, precision):
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    settings = [(p, False) for p in precisions] + [(p, True) for p in precisions if p == "bf16"]
    for setting in settings:  # warm-up: allocator, kernels, autocast caches
        for _ in range(3):
            step(*setting)
    seconds: dict[tuple[str, bool], list[float]] = {s: [] for s in settings}
    for _ in range(rounds):
        for setting in settings:
            start = time.perf_counter()
            for _ in range(steps):
                step(*setting)
            seconds[setting].append((time.perf_counter() - start) / steps)
    rate = {s: BATCH / sorted(v)[len(v) // 2] for s, v in seconds.items()}
    row: dict = {"batch": BATCH, "rounds": rounds, "steps per round": steps, "torch threads": torch.get_num_threads()}
    for (precision, fused), value in rate.items():
        row[f"{precision}{' fused' if fused else ''} img/s"] = round(value, 1)
    for precision in precisions[1:]:
        row[f"{precision} / fp32"] = round(rate[(precision, False)] / rate[("fp32", False)], 3)
    if "bf16" in precisions:
        row["bf16 fused / fp32"] = round(rate[("bf16", True)] / rate[("fp32", False)], 3)
        row["bf16 explicit / fused"] = round(rate[("bf16", False)] / rate[("bf16", True)], 3)
    row["explicit bf16 max keys"] = vit.EXPLICIT_BF16_MAX_KEYS
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=7, help="alternating timings of every setting per row")
    parser.add_argument("--steps", type=int, default=4, help="training steps per timing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        row = measure(name, MODELS[name], args.rounds, args.steps)
        print(f"{name}: {row}", flush=True)
        record(BENCHMARK, name, row)


if __name__ == "__main__":
    main()
