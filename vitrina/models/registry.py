"""Model presets by name: each is a config dataclass; ``build_model(name)`` makes a fresh model.

A preset's random weights are drawn from a fixed seed, so one preset name always builds the same
untrained model (an index embedded with ``clip-tiny`` can be searched with ``clip-tiny`` again).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vitrina.errors import UserError
from vitrina.models.clip import CLIP, CLIPConfig
from vitrina.models.cnn import CNN, CNN_PRESETS, CNNConfig
from vitrina.models.swin import SWIN_PRESETS, Swin, SwinConfig
from vitrina.models.text import TextConfig
from vitrina.models.vit import ViT, ViTConfig

ModelConfig = ViTConfig | SwinConfig | CNNConfig | CLIPConfig
# checkpoint kind -> (config class, model class); the kind is what config.json's "kind" says
MODEL_KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "vit": (ViTConfig, ViT),
    "swin": (SwinConfig, Swin),
    "cnn": (CNNConfig, CNN),
    "clip": (CLIPConfig, CLIP),
}

# The image tower of the demo presets: 64 px, 8 px patches (8 x 8 tokens), ViT-Ti width, 6 blocks.
# Sized for 2 CPU cores: forward+backward runs at roughly 80 img/s at batch 128 (see BENCHMARKS.md),
# so a few thousand images x several epochs train in minutes.
VIT_DEMO_64 = ViTConfig(image_size=64, patch_size=8, width=192, depth=6, heads=3)
# The demo's image tower: the same ViT at 48 px (6 x 6 tokens), about twice as fast to train, so the
# demo fits several epochs of ~12k images into its time budget on 2 cores.
VIT_DEMO_48 = ViTConfig(image_size=48, patch_size=8, width=192, depth=6, heads=3)

VIT_PRESETS: dict[str, ViTConfig] = {
    "vit-ti16": ViTConfig(image_size=224, patch_size=16, width=192, depth=12, heads=3),
    "vit-s16": ViTConfig(image_size=224, patch_size=16, width=384, depth=12, heads=6),
    "vit-b16": ViTConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12),
    "vit-demo-64": VIT_DEMO_64,
    "vit-demo-48": VIT_DEMO_48,
    "vit-micro-64": ViTConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4),
    "vit-nano-32": ViTConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2),
    # Fashion-MNIST (28 x 28): 4 px patches -> 7 x 7 = 49 tokens; the from-scratch / student ViT.
    "vit-fmnist-28": ViTConfig(image_size=28, patch_size=4, width=192, depth=6, heads=3),
    # A smaller, faster one: 7 px patches -> 4 x 4 = 16 tokens, for smoke runs and quick students.
    "vit-fmnist-28-fast": ViTConfig(image_size=28, patch_size=7, width=128, depth=4, heads=4),
}

CLIP_PRESETS: dict[str, CLIPConfig] = {
    # For tests and smoke runs: seconds to build and to train a few steps.
    "clip-tiny": CLIPConfig(
        vision=ViTConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2),
        text=TextConfig(vocab_size=512, context_length=32, width=64, depth=2, heads=2),
        embed_dim=64,
    ),
    # 64 px image tower + our text transformer (byte-level tokenizer, or a BPE of <= 4096 tokens).
    "clip-small": CLIPConfig(
        vision=VIT_DEMO_64,
        text=TextConfig(vocab_size=4096, context_length=64, width=256, depth=4, heads=4),
        embed_dim=256,
    ),
    # 48 px image tower + the pretrained all-MiniLM-L6-v2 text tower, frozen (the demo's model).
    "clip-minilm": CLIPConfig(vision=VIT_DEMO_48, text=None, text_backend="minilm", text_locked=True, embed_dim=256),
}


ALL_PRESETS: dict[str, ModelConfig] = {**VIT_PRESETS, **SWIN_PRESETS, **CNN_PRESETS, **CLIP_PRESETS}


def list_presets() -> list[str]:
    """All preset names: ViTs, Swins, CNNs, then CLIPs."""
    return list(ALL_PRESETS)


def preset_config(name: str) -> ModelConfig:
    """A copy of the preset's config; ``UserError`` listing the presets for an unknown name."""
    config = ALL_PRESETS.get(name)
    if config is None:
        raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(list_presets())}")
    return copy.deepcopy(config)


def kind_of(model_or_config: nn.Module | ModelConfig) -> str:
    """The checkpoint kind ("vit", "swin", "cnn", "clip") of a model or a config."""
    for kind, (config_class, model_class) in MODEL_KINDS.items():
        if isinstance(model_or_config, config_class | model_class):
            return kind
    raise TypeError(f"not a vitrina model or config: {type(model_or_config).__name__}")


def build_from_config(config: ModelConfig) -> nn.Module:
    """A fresh model of ``config``'s kind."""
    return MODEL_KINDS[kind_of(config)][1](config)


def build_model(preset: str, *, seed: int = 0) -> nn.Module:
    """A freshly initialised model of the preset (random weights drawn from ``seed``)."""
    config = preset_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_from_config(config)


def describe_presets() -> str:
    """One line per preset: name, kind and size (for ``vitrina models``)."""
    lines = []
    for name, v in VIT_PRESETS.items():
        lines.append(f"{name:<13} vit   {v.image_size}px patch {v.patch_size}, width {v.width}, depth {v.depth}")
    for name, s in SWIN_PRESETS.items():
        lines.append(f"{name:<13} swin  {s.image_size}px patch {s.patch_size}, C {s.embed_dim}, depths {s.depths}")
    for name, r in CNN_PRESETS.items():
        lines.append(f"{name:<13} cnn   {r.image_size}px widths {r.widths}, blocks {r.blocks}")
    for name, c in CLIP_PRESETS.items():
        v = c.vision
        if c.text_backend == "minilm":
            text = f"all-MiniLM-L6-v2 ({'locked' if c.text_locked else 'fine-tuned'})"
        else:
            text = f"text transformer width {c.text.width}, depth {c.text.depth}"
        lines.append(
            f"{name:<13} clip  {v.image_size}px ViT width {v.width}, depth {v.depth} + {text} -> {c.embed_dim}-d"
        )
    return "\n".join(lines)
