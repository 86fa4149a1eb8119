"""Image-embedding throughput: our ViT vs timm's ViT of the same configuration, same weights.

For each configuration, timm's ``VisionTransformer`` is built with random weights, the weights are
copied into ours and the outputs are checked equal (max abs diff <= 1e-5) before anything is
timed. Then, in eval mode under ``inference_mode``, for batch 1 and 32: a warm-up, then several
rounds that time ours and timm's alternately (so both see the same load on a noisy shared
machine); each row reports the median img/s of each and the ratio ours/timm.

``--train`` adds one row: forward+backward img/s of the demo's 64 px image tower at batch 128
(what sizes the demo's training time).

Run from the repository root:  .venv/bin/python bench/embed_throughput.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import record  # noqa: E402
from vitrina.models.pretrained import vit_config_from_timm, vit_state_dict_from_timm  # noqa: E402
from vitrina.models.registry import VIT_DEMO_64, VIT_PRESETS  # noqa: E402
from vitrina.models.vit import ViT, ViTConfig  # noqa: E402

BENCHMARK = "embed_throughput"
CONFIGS: dict[str, ViTConfig] = {"vit-demo-64": VIT_DEMO_64, "vit-s16": VIT_PRESETS["vit-s16"]}


def timm_twin(config: ViTConfig) -> tuple[torch.nn.Module, ViT]:
    """timm's ViT of ``config`` with random weights, and ours with those weights copied in."""
    from timm.models.vision_transformer import VisionTransformer

    theirs = VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.in_channels,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        num_classes=config.num_classes,
        global_pool="token" if config.pool == "cls" else "avg",
        fc_norm=False,
    ).eval()
    ours = ViT(vit_config_from_timm(theirs)).eval()
    ours.load_state_dict(vit_state_dict_from_timm(theirs.state_dict()), strict=True)
    return theirs, ours


def check_parity(theirs: torch.nn.Module, ours: ViT, config: ViTConfig) -> float:
    """Max abs difference of the pooled outputs on random input; raises if above 1e-5."""
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    with torch.inference_mode():
        diff = (ours(x) - theirs(x)).abs().max().item()
    if diff > 1e-5:
        raise SystemExit(f"parity failed: max abs diff {diff:.3g} > 1e-5")
    return diff


def time_calls(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    """img/s of ``iters`` forward passes of ``x``."""
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        elapsed = time.perf_counter() - start
    return iters * x.shape[0] / elapsed


def measure(theirs: torch.nn.Module, ours: ViT, config: ViTConfig, batch: int, rounds: int) -> dict:
    """Warm up, calibrate iterations to ~``0.5 s`` a timing, then alternate ours/timm for ``rounds``."""
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    for model in (ours, theirs):
        time_calls(model, x, 2)
    rate = time_calls(ours, x, 1)
    iters = max(1, round(0.5 * rate / batch))
    ours_rates, timm_rates = [], []
    for r in range(rounds):
        # Alternate who goes first, so neither always runs right after the other's cache footprint.
        order = [(ours, ours_rates), (theirs, timm_rates)]
        for model, rates in order if r % 2 == 0 else order[::-1]:
            rates.append(time_calls(model, x, iters))
    ours_med, timm_med = statistics.median(ours_rates), statistics.median(timm_rates)
    return {
        "batch": batch,
        "ours_img_s": round(ours_med, 1),
        "timm_img_s": round(timm_med, 1),
        "ratio": round(ours_med / timm_med, 3),
        "rounds": rounds,
        "iters_per_round": iters,
    }


def measure_train_step(config: ViTConfig, batch: int = 128, steps: int = 5) -> dict:
    """Forward+backward img/s of our ViT (median of ``steps`` after one warm-up step)."""
    model = ViT(config).train()
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    rates = []
    for step in range(steps + 1):
        start = time.perf_counter()
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)
        if step:
            rates.append(batch / (time.perf_counter() - start))
    return {"batch": batch, "ours_img_s": round(statistics.median(rates), 1), "rounds": steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--train", action="store_true", help="also time a training step of the demo tower")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name in args.configs:
        config = CONFIGS[name]
        theirs, ours = timm_twin(config)
        diff = check_parity(theirs, ours, config)
        for batch in args.batches:
            row = {**measure(theirs, ours, config, batch, args.rounds), "parity_max_abs_diff": float(f"{diff:.3g}")}
            print(f"{name} batch {batch}: {row}", flush=True)
            record(BENCHMARK, f"{name} b{batch}", row)
    if args.train:
        row = measure_train_step(VIT_DEMO_64)
        print(f"vit-demo-64 train step: {row}", flush=True)
        record(BENCHMARK, "vit-demo-64 fwd+bwd b128 (ours only)", row)


if __name__ == "__main__":
    main()
