"""timm image models -> an image-only encoder (image -> image search): a plain ``VisionTransformer``
becomes our ``ViT`` (``mapping``), anything else runs as timm built it. The encoder's digest is the
sha256 of the weights file when there is one (``timm:NAME/FILE``, ``timm:DIR``), else of the tensors.
timm is imported lazily: without it, a ``UserError`` says ``pip install timm``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vitrina.digest import tensors_sha256
from vitrina.errors import UserError
from vitrina.models.pretrained.encoders import ImageOnlyEncoder
from vitrina.models.pretrained.hub import first_file, hub_cache, offline, timm_advice, weights_digest
from vitrina.models.pretrained.mapping import vit_config_from_timm, vit_state_dict_from_timm
from vitrina.models.vit import ViT

# The files timm's ``local-dir:`` loader prefers, in its order (the first two of timm's own list).
TIMM_DIR_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class _ResizeCrop:
    """timm's eval crop: shorter side to ``size / crop_pct`` (bicubic), centre ``size`` crop, normalise."""

    def __init__(self, size: int, crop_pct: float, mean, std) -> None:
        from vitrina.data.transforms import eval_transform

        self.size, self.resize_to = size, math.floor(size / crop_pct)
        self.finish = eval_transform(size, tuple(mean), tuple(std))  # normalise (the image is already size x size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from vitrina.data.images import to_rgb

        image = to_rgb(image)
        w, h = image.size
        scale = self.resize_to / min(w, h)
        image = image.resize(
            (max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.Resampling.BICUBIC
        )
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return self.finish(image.crop((left, top, left + self.size, top + self.size)))


class _PooledViT(nn.Module):
    """Our ViT's pooled features (``forward_head(..., pre_logits=True)``) as one forward."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(pixels), pre_logits=True)


def _timm_model(rest: str, ref: str) -> tuple[nn.Module, Path | None]:
    """Build the timm model ``rest`` names (headless) -> (model, the weights file it read, if known)."""
    try:
        import timm
    except ImportError:
        raise UserError("timm models need the timm package: pip install timm") from None
    folder = Path(rest).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: no config.json; save the model with timm.models.save_for_hf(model, DIR)")
        try:
            model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
        except Exception as e:  # timm raises RuntimeError / FileNotFoundError / ValueError
            raise UserError(f"{folder}: timm cannot load it ({type(e).__name__}: {e})") from None
        return model, first_file(folder, TIMM_DIR_WEIGHTS)
    name, _, file = rest.partition("/")
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise UserError(f"{ref}: timm has no model {name!r}; see timm.list_models()")
    if file:
        weights = Path(file).expanduser()
        if not weights.is_file():
            raise UserError(f"{weights}: no such weights file; give timm:NAME/PATH_TO/model.safetensors")
        overlay = {"file": str(weights)}
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0), weights
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, cache_dir=str(hub_cache())), None
    except Exception as e:  # download / offline errors surface as huggingface_hub's or timm's own types
        where = "is not available offline" if offline() else f"could not be loaded ({type(e).__name__}: {e})"
        raise UserError(f"{ref} {where}; {timm_advice(name)}") from None


def load_timm(rest: str, *, ref: str) -> ImageOnlyEncoder:
    """``timm:`` reference -> an image-only encoder: our ``ViT`` when the weights map, else the timm model."""
    import timm.data

    theirs, weights_file = _timm_model(rest, ref)
    theirs.eval()
    digest = weights_digest([weights_file]) if weights_file else tensors_sha256(theirs.state_dict())
    data = timm.data.resolve_data_config(model=theirs)
    size = data["input_size"][-1]
    transform = _ResizeCrop(size, data.get("crop_pct", 1.0), data["mean"], data["std"])
    features: nn.Module = theirs
    try:
        if type(theirs).__name__ != "VisionTransformer":
            raise ValueError(f"a {type(theirs).__name__}, not a VisionTransformer")
        ours = ViT(vit_config_from_timm(theirs))
        ours.load_state_dict(vit_state_dict_from_timm(theirs.state_dict()), strict=True)
        features = _PooledViT(ours.eval())
    except (AttributeError, ValueError, RuntimeError) as e:  # not a plain ViT: keep timm's own model
        print(f"note: {ref} is wrapped as a timm model ({e})", file=sys.stderr)
    return ImageOnlyEncoder(features, transform, name=ref, image_size=size, digest=digest)
