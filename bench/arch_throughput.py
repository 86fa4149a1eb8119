"""Architecture throughput at 224 x 224: our ViT-Ti/16, ViT-S/16 and Swin-T vs timm's, same weights.

For each architecture, timm's model is built with random weights, the weights are copied into
ours and the pooled outputs are checked equal (max abs diff <= 1e-5) before anything is timed.
Then, in eval mode under ``inference_mode`` with 2 torch threads, for batch 1 and 32: a warm-up,
then several rounds that time ours and timm's alternately (so both see the same load on a noisy
machine); each row reports the median img/s of each and the ratio ours/timm.

``--profile`` prints torch.profiler's top operators of ours and timm's at batch 32 instead.

Run from the repository root:  .venv/bin/python bench/arch_throughput.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import record  # noqa: E402
from bench.embed_throughput import measure, timm_twin  # noqa: E402
from vitrina.models.registry import SWIN_PRESETS, VIT_PRESETS  # noqa: E402
from vitrina.models.swin import Swin, SwinConfig, swin_state_dict_from_timm, timm_swin_kwargs  # noqa: E402

BENCHMARK = "arch_throughput"
ARCHITECTURES = ("vit-ti16", "vit-s16", "swin-t")


def swin_twin(config: SwinConfig) -> tuple[torch.nn.Module, Swin]:
    """timm's SwinTransformer of ``config`` with random weights, and ours with those weights copied in."""
    from timm.models.swin_transformer import SwinTransformer

    theirs = SwinTransformer(**timm_swin_kwargs(config)).eval()
    ours = Swin(config).eval()
    ours.load_state_dict(swin_state_dict_from_timm(theirs.state_dict()), strict=True)
    return theirs, ours


def twins(name: str) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(timm's model, ours, image size) of architecture ``name``."""
    if name in VIT_PRESETS:
        config = VIT_PRESETS[name]
        theirs, ours = timm_twin(config)
    else:
        config = SWIN_PRESETS[name]
        theirs, ours = swin_twin(config)
    return theirs, ours, config.image_size


def check_parity(theirs: torch.nn.Module, ours: torch.nn.Module, size: int) -> float:
    """Max abs difference of the pooled outputs on random input; raises if above 1e-5."""
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        diff = (ours(x) - theirs(x)).abs().max().item()
    if diff > 1e-5:
        raise SystemExit(f"parity failed: max abs diff {diff:.3g} > 1e-5")
    return diff


def profile(theirs: torch.nn.Module, ours: torch.nn.Module, size: int, batch: int, rows: int) -> None:
    """Print the operators that take the most CPU time in two forwards of each model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = torch.randn(batch, 3, size, size)
    for label, model in (("ours", ours), ("timm", theirs)):
        with torch.inference_mode():
            model(x)  # warm-up outside the profile
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    model(x)
        print(f"--- {label}, batch {batch} ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=7, help="alternating ours/timm timings per row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print profiles at batch 32; record nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name in args.archs:
        theirs, ours, size = twins(name)
        diff = check_parity(theirs, ours, size)
        if args.profile:
            profile(theirs, ours, size, batch=32, rows=15)
            continue
        for batch in args.batches:
            config = ours.config
            row = {**measure(theirs, ours, config, batch, args.rounds), "parity_max_abs_diff": float(f"{diff:.3g}")}
            print(f"{name} batch {batch}: {row}", flush=True)
            record(BENCHMARK, f"{name} b{batch}", row)


if __name__ == "__main__":
    main()
