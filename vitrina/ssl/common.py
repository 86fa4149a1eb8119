"""What every self-supervised method shares: the data as a uint8 tensor, the method interface, and
the one pretraining driver on top of ``vitrina.train.loop.train``.

Data. Images are decoded once into a uint8 tensor (N, C, H, W) at the backbone's size (C = 1 for
grey data such as Fashion-MNIST, 3 for colour); each step turns its batch into the backbone's
normalised input (``to_input``: [-1, 1], the same scale as ``vitrina.data.transforms``) and draws its
augmentations on the whole batch at once. Per-image PIL work at 28 px costs more than the model's
forward on 2 cores, so batched tensor ops keep the CPU on the network.

Method. An ``SSLMethod`` is an ``nn.Module`` holding ``backbone`` (a plain ``ViT``) and its heads;
``loss(pixels)`` returns the loss and metrics of one batch. The artefact of pretraining is the
backbone alone as a ViT checkpoint (``save_model``), which probes and the transfer trainer load like
any other; the heads go beside it in ``ssl_heads.safetensors`` (not needed downstream).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from vitrina.checkpoint import save_model
from vitrina.config import TrainConfig, to_dict
from vitrina.errors import UserError
from vitrina.models.vit import ViT
from vitrina.train.loop import StepOutput, TrainSummary, train

HEADS_FILE = "ssl_heads.safetensors"


def to_input(pixels: torch.Tensor, in_channels: int = 3) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, in_channels, H, W) in [-1, 1]; grey is repeated to RGB."""
    x = pixels.float() / 127.5 - 1.0
    if x.shape[1] == 1 and in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != in_channels:
        raise UserError(f"images have {x.shape[1]} channels but the backbone takes {in_channels}")
    return x


class PixelDataset(Dataset):
    """``(uint8 image (C, H, W), index)`` items; the index lets DeepCluster look up its pseudo-labels."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pixels[index], index


def pooled_features(backbone: ViT, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised pixels -> (B, width) pooled features of ``backbone`` (a student's, or an EMA copy's)."""
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)


class SSLMethod(nn.Module):
    """A pretext / contrastive / clustering / masked-modelling method around a ViT ``backbone``.

    Subclasses set ``name`` and implement ``loss``; ``prepare`` and ``end_of_epoch`` are hooks
    (DeepCluster clusters there). Every module other than ``backbone`` is a method head.
    """

    name = "ssl"

    def __init__(self, backbone: ViT) -> None:
        super().__init__()
        if not isinstance(backbone, ViT):
            raise UserError(f"self-supervised pretraining needs a ViT backbone, got {type(backbone).__name__}")
        self.backbone = backbone

    @property
    def in_channels(self) -> int:
        return self.backbone.config.in_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised pixels -> (B, width) pooled backbone features."""
        return pooled_features(self.backbone, x)

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """One batch of normalised pixels (B, C, H, W) and their dataset indices -> (loss, metrics)."""
        raise NotImplementedError

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutput:
        pixels, indices = batch
        loss, metrics = self.loss(to_input(pixels, self.in_channels), indices)
        return StepOutput(loss, len(pixels), metrics)

    def prepare(self, pixels: torch.Tensor) -> None:
        """Called once before training with the whole training set (uint8)."""

    def end_of_epoch(self, pixels: torch.Tensor) -> dict[str, float] | None:
        """Called after every epoch in eval mode without gradients; returns metrics to log, or None."""
        return None

    def settings(self) -> dict[str, Any]:
        """The method's hyper-parameters (saved in config.json and checked on resume)."""
        config = getattr(self, "config", None)
        return to_dict(config) if config is not None else {}


def head_tensors(method: SSLMethod) -> dict[str, torch.Tensor]:
    """Every tensor of the method outside its backbone (heads, decoders, pseudo-labels)."""
    return {
        name: t.detach().clone().contiguous()
        for name, t in method.state_dict().items()
        if not name.startswith("backbone.")
    }


def measure_images_per_second(method: SSLMethod, pixels: torch.Tensor, *, batch_size: int, steps: int = 3) -> float:
    """Training-step throughput (forward + backward) on the first images, after one warm-up step.

    The method's weights and the global RNG are left as they were.
    """
    batch = (pixels[:batch_size], torch.arange(min(batch_size, len(pixels))))
    saved = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    method.train()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = method.step(batch)
        out.loss.backward()
        method.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    method.load_state_dict(saved)
    torch.set_rng_state(rng)
    return len(batch[0]) / float(np.median(times[1:]))


@dataclass
class Budget:
    """How much data fits a time cap: ``epochs`` over the first ``n_items`` of a seeded shuffle."""

    epochs: int
    n_items: int
    images_per_second: float


def plan_budget(images_per_second: float, n_total: int, minutes: float, *, overhead: float = 0.9) -> Budget:
    """Epochs (and, below one epoch, a subset) so the cosine schedule ends at the time cap.

    ``overhead``: the share of the cap left for training steps (the rest goes to logging, checkpoints
    and per-epoch work). A schedule sized to the cap decays fully; one cut by the cap never does.
    """
    images = images_per_second * minutes * 60 * overhead
    if images >= n_total:
        return Budget(int(images // n_total), n_total, images_per_second)
    return Budget(1, int(images), images_per_second)


def pretrain(
    method: SSLMethod,
    pixels: torch.Tensor,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    data_name: str,
    resume: bool = True,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> TrainSummary:
    """Pretrain ``method`` on uint8 ``pixels`` (N, C, H, W) into ``out_dir`` with the shared loop.

    Every checkpoint folder holds the backbone as a ViT checkpoint plus ``ssl_heads.safetensors``.
    """
    if len(pixels) < config.batch_size:
        raise UserError(f"{data_name}: {len(pixels)} images, fewer than one batch of {config.batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        method.prepare(pixels)
    described = {"method": method.name, "settings": method.settings(), "data": data_name, **(extra_config or {})}

    def save(model: SSLMethod, folder: Path) -> None:
        save_model(model.backbone, folder, extra_config={"pretrain": described, "train": to_dict(config)})
        save_file(head_tensors(model), str(folder / HEADS_FILE))

    def end_of_epoch(model: SSLMethod) -> dict[str, float]:
        return model.end_of_epoch(pixels) or {}

    has_epoch_work = type(method).end_of_epoch is not SSLMethod.end_of_epoch

    step: Callable[[SSLMethod, Any], StepOutput] = lambda model, batch: model.step(batch)  # noqa: E731
    return train(
        model=method,
        step_fn=step,
        train_data=PixelDataset(pixels),
        out_dir=out_dir,
        config=config,
        save_fn=save,
        eval_fn=end_of_epoch if has_epoch_work else None,
        run_identity={"pretrain": described, "backbone": to_dict(method.backbone.config)},
        resume=resume,
        progress=progress,
    )
