"""Transfer learning: start a classifier from a trained checkpoint, then fine-tune or linearly probe it.

* ``load_backbone``: a CLIP checkpoint gives its image tower (a ViT); a ViT / Swin / CNN checkpoint
  gives itself (an SSL-pretrained ViT is a ViT checkpoint). ``with_new_head`` sizes its head.
* Freeze policies (``FreezePolicy``): ``none``; ``all-but-head``; ``first-N`` (the patch embedding /
  stem and the first N blocks). Frozen parameters get ``requires_grad=False`` and are left out of
  the optimizer; frozen BatchNorm layers are kept in eval mode, so their running statistics freeze too.
* Layer-wise lr decay (BEiT / MAE fine-tuning): layer ``l`` of ``L`` (embedding = 0, blocks 1..L-1,
  final norm + head = L) gets ``lr x decay**(L - l)``: early, general layers move least.
* Linear probe: the frozen backbone's pooled features are extracted once, then only the head is
  trained (by the shared loop, on the cached features); the saved checkpoint is the whole classifier.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vitrina.checkpoint import load_model, read_config
from vitrina.errors import UserError
from vitrina.models.clip import CLIP
from vitrina.models.vit import init_transformer_weights
from vitrina.train.classify_data import ClassificationData, Preprocess
from vitrina.train.loop import StepOutput, param_groups_for

FREEZE_FORMS = "none, all-but-head or first-N (e.g. first-4)"
HEAD_NAMES = ("head", "head_dist")


# --- the backbone -------------------------------------------------------------------------------


def load_backbone(ref: str | os.PathLike) -> tuple[nn.Module, Preprocess, str]:
    """Checkpoint folder -> (image model, the preprocessing it was trained with, a description)."""
    path = Path(ref)
    if not path.exists():
        raise UserError(
            f"--init {ref}: no such checkpoint folder; give the --out folder of a vitrina training run "
            "(a CLIP checkpoint gives its image tower)"
        )
    config = read_config(path)
    model, config = load_model(path)
    if isinstance(model, CLIP):
        c = model.config
        preprocess = Preprocess(c.vision.image_size, tuple(c.image_mean), tuple(c.image_std))
        return model.visual, preprocess, f"image tower of CLIP {path}"
    from vitrina.train.classify import preprocess_of

    return model, preprocess_of(config, model), f"{config['kind']} {path}"


def with_new_head(model: nn.Module, num_classes: int, *, seed: int = 0) -> nn.Module:
    """Replace the classifier head(s) by fresh ``num_classes``-way linear layers (truncated normal, std 0.02)."""
    model.config.num_classes = num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in HEAD_NAMES:
            if isinstance(getattr(model, name, None), nn.Module):
                head = nn.Linear(model.width, num_classes)
                init_transformer_weights(head)
                setattr(model, name, head)
    return model


# --- layers, freezing, layer-wise lr decay ------------------------------------------------------


def block_prefixes(model: nn.Module) -> list[str]:
    """Names of the model's blocks in forward order (ViT blocks, Swin/CNN blocks of every stage)."""
    names = [name for name, _ in model.named_modules()]
    return [n for n in names if re.fullmatch(r"blocks\.\d+|stages\.\d+\.blocks\.\d+", n)]


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> layer: 0 for the embedding / stem, i+1 for block i, last for final norm + head."""
    blocks = block_prefixes(model)
    last = len(blocks) + 1
    ids = {}
    for name, _ in model.named_parameters():
        layer = 0
        if name.split(".")[0] in (*HEAD_NAMES, "norm"):
            layer = last
        else:
            merge = re.match(r"stages\.(\d+)\.merge\.", name)
            if merge:  # a Swin patch merging belongs with the first block of its stage
                first = next(i for i, b in enumerate(blocks) if b.startswith(f"stages.{merge.group(1)}.blocks."))
                layer = first + 1
            for i, block in enumerate(blocks):
                if name.startswith(block + "."):
                    layer = i + 1
        ids[name] = layer
    return ids


@dataclass(frozen=True)
class FreezePolicy:
    """Which layers train: ``frozen_through`` = -1 trains all, N freezes layers 0..N, None all but the head."""

    frozen_through: int | None

    @classmethod
    def parse(cls, text: str) -> FreezePolicy:
        """``none`` | ``all-but-head`` | ``first-N``."""
        if text == "none":
            return cls(-1)
        if text == "all-but-head":
            return cls(None)
        match = re.fullmatch(r"first-(\d+)", text)
        if match:
            return cls(int(match.group(1)))
        raise UserError(f"--freeze {text!r}: use {FREEZE_FORMS}")


def freeze(model: nn.Module, policy: FreezePolicy) -> list[str]:
    """Apply ``policy`` (sets ``requires_grad``); returns the frozen parameter names."""
    ids = layer_ids(model)
    n_blocks = len(block_prefixes(model))
    through = policy.frozen_through
    if through is not None and through > n_blocks:
        raise UserError(f"--freeze first-{through}: the model has only {n_blocks} blocks")
    frozen = []
    for name, p in model.named_parameters():
        is_head = name.split(".")[0] in HEAD_NAMES
        freeze_it = (not is_head) if through is None else ids[name] <= through
        p.requires_grad_(not freeze_it)
        if freeze_it:
            frozen.append(name)
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            # train mode would still update the running statistics: keep this layer in eval mode
            module.register_forward_pre_hook(_stay_in_eval)
    return frozen


def _stay_in_eval(module: nn.Module, _: Any) -> None:
    module.eval()


def layer_decay_groups(model: nn.Module, *, lr: float, decay: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with lr ``lr * decay**(L - layer)`` (L = head's layer); weight-decay split as the loop's."""
    if not 0 < decay <= 1:
        raise UserError(f"--layer-decay {decay}: must be in (0, 1]")
    ids = layer_ids(model)
    last = max(ids.values())
    no_decay = {id(p) for g in param_groups_for(model, weight_decay) if g["weight_decay"] == 0.0 for p in g["params"]}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decays = ids[name], id(p) not in no_decay
        group = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "lr": lr * decay ** (last - layer),
                "weight_decay": weight_decay if decays else 0.0,
                "layer": layer,
            },
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# --- linear probe -------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    backbone: nn.Module, pixels: torch.Tensor, preprocess: Preprocess, batch_size: int = 500
) -> torch.Tensor:
    """(N, C, H, W) pixels -> (N, width) pooled features of the backbone in eval mode."""
    backbone.eval()
    out = [
        backbone.forward_head(backbone.forward_features(preprocess(x)), pre_logits=True)
        for x in pixels.split(batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, backbone.width)


class FeatureDataset(Dataset):
    """``(features, label, index)`` items over cached features: the linear probe's training set."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.features[index], int(self.labels[index]), index


def probe_loss(head: nn.Module, label_smoothing: float):
    """Cross-entropy of a linear head on cached features."""

    def loss_fn(features: torch.Tensor, labels: torch.Tensor, _: torch.Tensor) -> StepOutput:
        logits = head(features)
        with torch.no_grad():
            acc = float((logits.argmax(dim=1) == labels).float().mean())
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return StepOutput(loss, len(labels), {"train_acc": acc})

    return loss_fn


def linear_probe_data(
    backbone: nn.Module, data: ClassificationData, preprocess: Preprocess, batch_size: int = 500
) -> FeatureDataset:
    """The training split's features, extracted once (no augmentation: the backbone never changes)."""
    from vitrina.train.classify_data import unit_pixels

    pixels = unit_pixels(data.train, preprocess.image_size)
    return FeatureDataset(extract_features(backbone, pixels, preprocess, batch_size), data.train.labels)


def probe_eval_fn(head: nn.Module, features: torch.Tensor, labels: torch.Tensor):
    """Validation accuracy and loss of the head on cached validation features."""

    def evaluate(_: nn.Module) -> dict[str, float]:
        logits = head(features)
        return {
            "val/acc": float((logits.argmax(dim=1) == labels).float().mean()),
            "val/loss": float(F.cross_entropy(logits, labels)),
        }

    return evaluate


# --- the entry point ----------------------------------------------------------------------------


@dataclass
class TransferSettings:
    """``mode``: ``finetune`` or ``linear-probe``; ``freeze``: a ``FreezePolicy`` text (fine-tuning);
    ``layer_decay``: layer-wise lr decay factor (None: one lr for all)."""

    mode: str = "finetune"
    freeze: str = "none"
    layer_decay: float | None = None

    def validate(self) -> None:
        if self.mode not in ("finetune", "linear-probe"):
            raise UserError(f"--mode {self.mode!r}: use finetune or linear-probe")
        FreezePolicy.parse(self.freeze)
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UserError(f"--layer-decay {self.layer_decay}: must be in (0, 1]")


def transfer_classifier(
    *,
    init: str | os.PathLike,
    data: ClassificationData,
    out_dir: str | os.PathLike,
    train_config,
    settings,
    transfer: TransferSettings,
    progress: bool = True,
    log=print,
):
    """Classifier from checkpoint ``init`` trained on ``data`` by ``transfer.mode``; returns ``ClassifyOutcome``.

    The input pipeline resizes every image to the backbone's own size and normalises it as the
    backbone was trained (a 48 px CLIP tower sees Fashion-MNIST upsampled to 48 px).
    """
    from vitrina.train.classify import count_parameters, cross_entropy_loss, fit_classifier, unit_pixels

    transfer.validate()
    backbone, preprocess, described = load_backbone(init)
    model = with_new_head(backbone, len(data.class_names), seed=train_config.seed)
    identity = {"init": os.fspath(init), "transfer": {"mode": transfer.mode, "freeze": transfer.freeze}}
    identity["transfer"]["layer_decay"] = transfer.layer_decay
    extra = {"init": os.fspath(init), "transfer": identity["transfer"]}
    if transfer.mode == "linear-probe":
        freeze(model, FreezePolicy(None))
        total, trainable = count_parameters(model)
        log(f"{described}: {total:,} parameters, {trainable:,} trainable (linear probe on frozen features)")
        features = linear_probe_data(model, data, preprocess, settings.eval_batch_size)
        val_features = extract_features(
            model, unit_pixels(data.val, preprocess.image_size), preprocess, settings.eval_batch_size
        )
        return fit_classifier(
            trainable=model.head,
            classifier=model,
            loss_fn=probe_loss(model.head, settings.label_smoothing),
            data=data,
            preprocess=preprocess,
            out_dir=out_dir,
            train_config=train_config,
            settings=settings,
            train_dataset=features,
            prepare_batch=lambda x: x,
            eval_fn=probe_eval_fn(model.head, val_features, data.val.labels),
            identity=identity,
            extra_config=extra,
            progress=progress,
        )
    freeze(model, FreezePolicy.parse(transfer.freeze))
    total, trainable = count_parameters(model)
    log(f"{described}: {total:,} parameters, {trainable:,} trainable (fine-tune, freeze {transfer.freeze})")
    groups = None
    if transfer.layer_decay is not None:
        groups = layer_decay_groups(
            model, lr=train_config.lr, decay=transfer.layer_decay, weight_decay=train_config.weight_decay
        )
    return fit_classifier(
        trainable=model,
        classifier=model,
        loss_fn=cross_entropy_loss(model, preprocess, settings.label_smoothing),
        data=data,
        preprocess=preprocess,
        out_dir=out_dir,
        train_config=train_config,
        settings=settings,
        param_groups=groups,
        identity=identity,
        extra_config=extra,
        progress=progress,
    )
