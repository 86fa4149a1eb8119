"""Model presets by name: each is a config dataclass; ``build_model(name)`` makes a fresh model.

A preset's random weights are drawn from a fixed seed, so one preset name always builds the same
untrained model (an index embedded with ``clip-tiny`` can be searched with ``clip-tiny`` again).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from vitrina.errors import UserError
from vitrina.models.clip import CLIP, CLIPConfig
from vitrina.models.cnn import CNN, CNN_PRESETS, CNNConfig
from vitrina.models.flops import count_macs, count_parameters, on_meta
from vitrina.models.minilm import WIDTH as MINILM_WIDTH
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

# Three stride-2 convs (28 -> 14 -> 7 -> 4; 32, 64, 128 channels) and sequence pooling over 4 x 4 tokens: the
# 49-token transformer of vit-hybrid-fmnist-seqpool is what costs (a training step of that preset runs ~360 img/s
# here, this one ~600 with two more blocks), so a 30-minute budget sees about 1.7x the epochs.
VIT_HYBRID_FMNIST_S8 = ViTConfig(
    image_size=28,
    patch_size=8,
    width=128,
    depth=6,
    heads=4,
    mlp_ratio=2.0,
    stem="conv",
    stem_channels=(32, 64, 128),
    pool="seq",
)

VIT_PRESETS: dict[str, ViTConfig] = {
    "vit-ti16": ViTConfig(image_size=224, patch_size=16, width=192, depth=12, heads=3),
    "vit-s16": ViTConfig(image_size=224, patch_size=16, width=384, depth=12, heads=6),
    "vit-b16": ViTConfig(image_size=224, patch_size=16, width=768, depth=12, heads=12),
    "vit-demo-64": VIT_DEMO_64,
    "vit-demo-48": VIT_DEMO_48,
    "vit-micro-64": ViTConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4),
    "vit-nano-32": ViTConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2),
    # Distillation students of the demo's 48 px tower (vit-demo-48). The first keeps its 6 x 6 tokens at
    # half the width and two thirds of the depth; the second has 12 px patches (4 x 4 tokens), so a wider,
    # deeper tower still runs several times faster than the teacher (bench/clip_distill.py measures it).
    "vit-demo-48-student": ViTConfig(image_size=48, patch_size=8, width=96, depth=4, heads=3),
    "vit-demo-48-student-p12": ViTConfig(image_size=48, patch_size=12, width=128, depth=6, heads=4),
    # A student of the demo's own tower since 2026-12-03 (12 px patches, width 192, depth 6): the same 4 x 4
    # tokens at half the width and two thirds of the depth, ~5x its img/s (the teacher is already 12 px).
    "vit-demo-48-student-p12-w96": ViTConfig(image_size=48, patch_size=12, width=96, depth=4, heads=3),
    # Fashion-MNIST (28 x 28): 4 px patches -> 7 x 7 = 49 tokens; the from-scratch / student ViT.
    "vit-fmnist-28": ViTConfig(image_size=28, patch_size=4, width=192, depth=6, heads=3),
    # A smaller, faster one: 7 px patches -> 4 x 4 = 16 tokens, for smoke runs and quick students.
    "vit-fmnist-28-fast": ViTConfig(image_size=28, patch_size=7, width=128, depth=4, heads=4),
    # Hybrid ViTs for Fashion-MNIST: a conv stem (28 -> 14 -> 7, channels 48, 96, then 1x1 to the width) gives
    # the same 7 x 7 tokens as vit-fmnist-28's 4 px patches. The first drops one block for the stem's cost, as
    # "Early convolutions help transformers see better" does; it keeps [CLS], so it takes a DeiT token.
    "vit-hybrid-fmnist": ViTConfig(image_size=28, patch_size=4, width=192, depth=5, heads=3, stem="conv"),
    # A Compact Convolutional Transformer-like one: sequence pooling, no [CLS], the size of vit-fmnist-28-fast.
    "vit-hybrid-fmnist-seqpool": ViTConfig(
        image_size=28, patch_size=4, width=128, depth=4, heads=4, mlp_ratio=2.0, stem="conv", pool="seq"
    ),
    "vit-hybrid-fmnist-s8": VIT_HYBRID_FMNIST_S8,
    # The s8 hybrid with one residual 3x3 stride-1 conv after each stride-2 conv (14, 7 and 4 px maps):
    # ~0.19M more parameters, ~0.8x its training img/s here (30-minute runs: ~810 against ~990).
    "vit-hybrid-fmnist-s8-r1": dataclasses.replace(VIT_HYBRID_FMNIST_S8, stem_refine=1),
    # The r1 hybrid twice as wide and two blocks shallower: its pooled feature, what a linear probe of a
    # self-supervised backbone reads, is 256-d instead of 128. With 128-d VICReg features that probe fit its
    # 60k training images to only 88.5% (87.4% on test); this one's reach 88.1% on test at 0.6x the img/s
    # (bench/ssl_probe.py, 30 minutes, mean of 2 seeds; its untrained control is 2.9 points above r1's).
    "vit-hybrid-fmnist-s8-r1-w256": dataclasses.replace(
        VIT_HYBRID_FMNIST_S8, stem_refine=1, width=256, depth=4, heads=8
    ),
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
    # The same tower on 12 px patches: 4 x 4 tokens instead of 6 x 6, about twice the images per second, so a
    # fixed training budget sees about twice the samples (bench/retrieval_quality.py weighs the trade).
    "clip-minilm-p12": CLIPConfig(
        vision=dataclasses.replace(VIT_DEMO_48, patch_size=12),
        text=None,
        text_backend="minilm",
        text_locked=True,
        embed_dim=256,
    ),
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


@dataclass
class PresetCost:
    """What a preset costs: parameters of the whole model, and MACs of one image through its image model."""

    parameters: int
    macs: int  # per image at the preset's image size; a CLIP's image tower only (text is per caption)
    image_size: int


def _minilm_parameter_count() -> int:
    """Parameters of the packaged MiniLM, read from its safetensors header (no 90 MB load, no transformers import)."""
    from safetensors import safe_open

    from vitrina.models.minilm import minilm_dir

    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
        names = f.keys()  # a list; the safe_open handle itself is not iterable
        # position_ids is an index buffer that older transformers versions saved beside the weights
        return sum(math.prod(f.get_slice(k).get_shape()) for k in names if not k.endswith("position_ids"))


def preset_cost(config: ModelConfig) -> PresetCost:
    """Parameters and measured MACs per image of a preset's model, built on the meta device (fast at any size)."""
    if isinstance(config, CLIPConfig):
        vision = config.vision
        image_model = on_meta(lambda: ViT(vision))
        if config.text_backend == "minilm":  # the MiniLM tower loads real weights: count it from its file
            projections = (vision.width + MINILM_WIDTH) * config.embed_dim + 1  # + logit_scale
            parameters = count_parameters(image_model) + projections + _minilm_parameter_count()
        else:
            parameters = count_parameters(on_meta(lambda: CLIP(config)))
    else:
        vision = config
        image_model = on_meta(lambda: build_from_config(config))
        parameters = count_parameters(image_model)
    macs = count_macs(image_model, (1, vision.in_channels, vision.image_size, vision.image_size))
    return PresetCost(parameters=parameters, macs=macs, image_size=vision.image_size)


def _shape_summary(config: ModelConfig) -> str:
    if isinstance(config, ViTConfig):
        extra = ", distilled" if config.distilled else ""
        extra += ", seq pool" if config.pool == "seq" else ""
        if config.stem == "conv":
            stem = f"conv stem {'-'.join(map(str, config.conv_stem_channels))} (stride {config.patch_size})"
            stem += f" + {config.stem_refine} res conv/stage" if config.stem_refine else ""
        else:
            stem = f"patch {config.patch_size}"
        return f"{stem}, width {config.width}, depth {config.depth}, heads {config.heads}{extra}"
    if isinstance(config, SwinConfig):
        return f"patch {config.patch_size}, C {config.embed_dim}, depths {config.depths}, window {config.window_size}"
    if isinstance(config, CNNConfig):
        return f"widths {config.widths}, blocks {config.blocks}"
    v = config.vision
    if config.text_backend == "minilm":
        text = f"all-MiniLM-L6-v2 ({'locked' if config.text_locked else 'fine-tuned'})"
    else:
        text = f"text transformer width {config.text.width}, depth {config.text.depth}"
    return f"ViT patch {v.patch_size}, width {v.width}, depth {v.depth} + {text} -> {config.embed_dim}-d"


def describe_presets() -> str:
    """Every preset with kind, image size, parameters, measured GMACs per image and shape (``vitrina models``)."""
    names = max(len(name) for name in ALL_PRESETS)
    lines = [f"{'preset':<{names}} {'kind':<5} {'image':>6} {'params':>8} {'GMACs':>7}  shape"]
    for name, config in ALL_PRESETS.items():
        cost = preset_cost(config)
        kind = kind_of(config)
        gmacs = f"{cost.macs / 1e9:.3f}" + ("*" if kind == "clip" else " ")
        lines.append(
            f"{name:<{names}} {kind:<5} {cost.image_size:>4}px {cost.parameters / 1e6:>7.2f}M {gmacs:>8} "
            f"{_shape_summary(config)}"
        )
    lines.append("GMACs: multiply-accumulates of one image, counted by torch's FlopCounterMode (FLOPs / 2).")
    lines.append("* CLIP: the image tower only, per image; params count both towers and the projections.")
    return "\n".join(lines)
