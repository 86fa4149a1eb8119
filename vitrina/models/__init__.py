"""Our models: ViT, the CLIP text towers, CLIP, and presets by name."""

from vitrina.models.clip import CLIP, CLIPConfig, CLIPEncoder
from vitrina.models.registry import build_model, describe_presets, list_presets, preset_config
from vitrina.models.text import TextConfig, TextTransformer
from vitrina.models.vit import ViT, ViTConfig

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPEncoder",
    "TextConfig",
    "TextTransformer",
    "ViT",
    "ViTConfig",
    "build_model",
    "describe_presets",
    "list_presets",
    "preset_config",
]
