"""``vitrina pretrain``: build the backbone and the method, load the data, size the run to its time
cap, pretrain, and (MAE) draw reconstructions. Shared by the CLI and ``bench/ssl_probe.py``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitrina.config import TrainConfig
from vitrina.errors import UserError
from vitrina.models.registry import build_model
from vitrina.models.vit import ViT
from vitrina.ssl import build_method
from vitrina.ssl.augment import MultiCrop, SimCLRAugment
from vitrina.ssl.byol import BYOLConfig
from vitrina.ssl.common import SSLMethod, measure_images_per_second, plan_budget, pretrain, to_input
from vitrina.ssl.data import load_image_set
from vitrina.ssl.deepcluster import DeepCluster
from vitrina.ssl.dino import DINOConfig
from vitrina.ssl.mae import MAE, save_reconstructions
from vitrina.ssl.vicreg import VICRegConfig
from vitrina.train.checkpointing import find_checkpoint, read_train_meta
from vitrina.train.loop import TrainSummary

DEFAULT_EPOCHS = 10


@dataclass
class PretrainResult:
    """What a pretraining run did: the loop's summary, the method, and the sizing it chose."""

    summary: TrainSummary
    method: SSLMethod
    epochs: int
    n_items: int
    images_per_second: float | None


def _saved_plan(out_dir: Path) -> tuple[int, int] | None:
    """(epochs, items) of the checkpoint in ``out_dir``: a resumed run keeps its first run's sizing."""
    checkpoint = find_checkpoint(out_dir)
    if checkpoint is None:
        return None
    meta = read_train_meta(checkpoint)
    return meta["config"]["epochs"], meta["identity"]["items"]


MULTI_CROP_CONFIGS = {"vicreg": VICRegConfig, "byol": BYOLConfig, "dino": DINOConfig}


def multi_crop_config(
    method_name: str,
    local_views: int,
    *,
    expander_dims: tuple[int, ...] | None = None,
    blur_p: float | None = None,
) -> VICRegConfig | BYOLConfig | DINOConfig:
    """The default config of a joint-embedding method with ``local_views`` small crops (and, for VICReg,
    ``expander_dims`` in place of its default expander; ``blur_p``: the views' blur probability in place of
    ``SimCLRAugment``'s); ``UserError`` for other methods or bad values."""
    if expander_dims is not None and method_name != "vicreg":
        raise UserError(f"--expander: only vicreg has an expander, not {method_name}")
    if method_name not in MULTI_CROP_CONFIGS:
        flag = "--local-crops" if local_views or blur_p is None else "--blur"
        raise UserError(f"{flag}: multi-crop applies to {', '.join(MULTI_CROP_CONFIGS)}, not {method_name}")
    if local_views < 0:
        raise UserError(f"--local-crops {local_views}: give a count >= 0")
    if blur_p is not None and not 0.0 <= blur_p <= 1.0:
        raise UserError(f"--blur {blur_p}: give a probability in [0, 1]")
    view = SimCLRAugment() if blur_p is None else SimCLRAugment(blur_p=blur_p)
    crops = MultiCrop(local_views=local_views, view=view)
    if expander_dims is None:
        return MULTI_CROP_CONFIGS[method_name](crops=crops)
    if not expander_dims or min(expander_dims) < 1:
        raise UserError(f"--expander {expander_dims}: give one or more layer widths >= 1, e.g. 2048x2048x2048")
    return VICRegConfig(expander_dims=tuple(expander_dims), crops=crops)


def parse_expander(text: str) -> tuple[int, ...]:
    """``"2048x2048x2048"`` -> (2048, 2048, 2048); ``UserError`` naming the flag for anything else."""
    try:
        dims = tuple(int(width) for width in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--expander {text!r}: give layer widths joined by x, e.g. 2048x2048x2048") from None
    if min(dims) < 1:
        raise UserError(f"--expander {text!r}: every layer width must be >= 1")
    return dims


def run_pretraining(
    method_name: str,
    *,
    backbone: str,
    data: str,
    out_dir: str | os.PathLike,
    minutes: float | None = None,
    epochs: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    max_items: int | None = None,
    method_options: dict | None = None,
    train_settings: dict | None = None,
    local_crops: int = 0,
    expander_dims: tuple[int, ...] | None = None,
    blur_p: float | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain ``method_name`` on ``data`` with a fresh ``backbone`` preset into ``out_dir``.

    With ``minutes`` and no ``epochs`` the run is sized to the cap from a measured step rate (whole
    epochs, or one pass over a seeded subset when not even one epoch fits), so the learning-rate
    schedule completes; ``minutes`` also stops the loop as a safety net. ``max_items``: pretrain on a
    seeded random subset of at most this many images (chosen without labels), e.g. so that
    DeepCluster fits several clustering rounds into the cap. ``train_settings``: more ``TrainConfig``
    fields (e.g. ``budget_minutes``, a time budget that ends the schedule and the run whatever the
    step rate: then give ``epochs`` as an upper bound, not ``minutes``; ``ema_decay``). ``local_crops``:
    small multi-crop views beside the two global ones (joint-embedding methods: vicreg, byol, dino);
    ``expander_dims``: VICReg's expander widths instead of its default; ``blur_p``: the joint-embedding
    views' blur probability instead of ``SimCLRAugment``'s.
    """
    out = Path(out_dir)
    model = build_model(backbone, seed=seed)
    if not isinstance(model, ViT):
        raise UserError(f"--backbone {backbone}: self-supervised pretraining takes a ViT preset (e.g. vit-fmnist-28)")
    method_options = dict(method_options or {})
    if local_crops or expander_dims is not None or blur_p is not None:  # checked before the data is read
        method_options["config"] = multi_crop_config(
            method_name, local_crops, expander_dims=expander_dims, blur_p=blur_p
        )
    images = load_image_set(data, model.config.image_size, seed=seed)
    method = build_method(method_name, model, **method_options)

    pixels, reference = images.pixels, images.labels
    if max_items is not None and max_items < len(pixels):
        keep = np.sort(np.random.default_rng(seed).permutation(len(pixels))[:max_items])
        pixels, reference = pixels[torch.from_numpy(keep)], reference[keep]
    rate = None
    saved = _saved_plan(out)
    if saved is not None:
        epochs, n_items = saved
    elif epochs is None and minutes is not None:
        if isinstance(method, DeepCluster):  # timing only needs targets of the right shape; prepare() clusters
            method.pseudo_labels = torch.zeros(len(pixels), dtype=torch.long)
        rate = measure_images_per_second(method, pixels, batch_size=batch_size)
        # DeepCluster embeds the whole set once per epoch: about a third of a training pass
        # (forward only, no backward), so a quarter of its time goes to that
        effective = rate * 0.75 if isinstance(method, DeepCluster) else rate
        budget = plan_budget(effective, len(pixels), minutes)
        epochs, n_items = budget.epochs, budget.n_items
    else:
        epochs, n_items = epochs or DEFAULT_EPOCHS, len(pixels)
    n_items = max(batch_size, min(n_items, len(pixels)))
    if n_items < len(pixels):
        keep = np.sort(np.random.default_rng(seed + 1).permutation(len(pixels))[:n_items])
        pixels, reference = pixels[torch.from_numpy(keep)], reference[keep]
    if isinstance(method, DeepCluster):
        method.reference_labels = reference  # only for the logged NMI

    settings = {"max_minutes": minutes, "warmup_fraction": 0.05, **(train_settings or {})}
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, val_fraction=0.0, **settings
    )
    summary = pretrain(method, pixels, out, config, data_name=data, progress=progress)
    if isinstance(method, MAE):
        sample = to_input(pixels[:8], method.in_channels)
        save_reconstructions(method, sample, out / "reconstructions.png", seed=seed)
    return PretrainResult(summary, method, epochs, n_items, rate)
