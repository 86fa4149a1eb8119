"""Looking inside a ViT: attention rollout and position-embedding similarity, as numbers and as PNGs.

Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers"): the
residual connection carries each token on, so a layer's effective mixing is ``0.5 A + 0.5 I``
(A the head-fused attention, rows renormalised); multiplying these through the layers gives how
much each input token flows into each output token. The [CLS] row over the patch tokens is a
heat map of what the pooled feature looks at. A ViT with sequence pooling (``pool="seq"``) has no
[CLS]: its pooled feature is ``sum_i w_i x_i`` over the last tokens, so its map is the same mix of
rollout rows, ``sum_i w_i R[i, :]`` with the pooling weights ``w`` of that image
(``sequence_pool_rollout``): again how much each input patch flows into the pooled feature.

Position-embedding similarity (Dosovitskiy et al., 2020, fig. 7): the cosine similarity of each
patch's learned position embedding with every other patch's, drawn as one tile per patch; a
trained ViT shows each tile bright around its own row and column.

Query heat map ("why this match"): the image tower's patch tokens after the final LayerNorm go
through the same projection as the pooled token into the joint space, are normalised, and are
dotted with the query's unit text vector: a (grid, grid) map of cosines that says which patches
resemble the query. With mean pooling the pooled vector is the mean of the projected patches, so
(before per-patch normalisation) the map's mean is the image's own score times its pooled norm.

Figures are written with matplotlib's Agg backend (no display needed), imported only when drawing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitrina.errors import UserError
from vitrina.models.vit import ViT, token_grid

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")


def vision_transformer(model: nn.Module, *, where: str = "model") -> ViT:
    """The ViT to explain: the model itself, or a CLIP's image tower; ``UserError`` for Swin, CNN and the rest."""
    if isinstance(model, ViT):
        return model
    visual = getattr(model, "visual", None)
    if isinstance(visual, ViT):
        return visual
    raise UserError(
        f"{where}: a {type(model).__name__} has no [CLS] attention; attention rollout needs a ViT "
        "(a ViT or CLIP checkpoint or preset)"
    )


def clip_image_tower(model: nn.Module, *, where: str = "model") -> tuple[ViT, nn.Module]:
    """A CLIP's ViT image tower and the projection its pooled feature takes into the joint space."""
    visual, projection = getattr(model, "visual", None), getattr(model, "image_projection", None)
    if isinstance(visual, ViT) and projection is not None:
        return visual, projection
    raise UserError(
        f"{where}: a {type(model).__name__} has no ViT image tower with a joint-space projection; "
        "the query heat map needs a CLIP checkpoint whose image tower is a ViT"
    )


# ---- attention rollout ------------------------------------------------------------------------------


def fuse_heads(attention: torch.Tensor, head_fusion: HeadFusion = "mean") -> torch.Tensor:
    """(B, heads, T, T) -> (B, T, T): the heads' mean, or their element-wise max or min."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")


def discard_lowest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, T, T) -> the same with the ``ratio`` smallest weights of each map set to 0, [CLS]->[CLS] always kept.

    Dropping the faint weights sharpens the rollout (jacobgil's vit-explain); rows are renormalised later.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    B, T, _ = attention.shape
    k = int(T * T * ratio)
    if k == 0:
        return attention
    flat = attention.reshape(B, T * T).clone()  # (B, T*T)
    lowest = flat.topk(k, dim=-1, largest=False).indices  # (B, k)
    kept = flat[:, 0].clone()  # [CLS] -> [CLS]
    flat.scatter_(1, lowest, 0.0)
    flat[:, 0] = kept
    return flat.view(B, T, T)


def rollout_matrix(
    attentions: list[torch.Tensor], *, discard_ratio: float = 0.0, head_fusion: HeadFusion = "mean"
) -> torch.Tensor:
    """Per-block (B, heads, T, T) weights, first to last -> (B, T, T) rollout, every row a distribution.

    Each layer becomes ``(A + I)`` with its rows renormalised -- ``0.5 A + 0.5 I`` when A's rows sum
    to 1 -- and the layers are multiplied from the first: ``R = A_L' ... A_2' A_1'``.
    """
    if not attentions:
        raise ValueError("no attention maps: the model has no blocks")
    B, _, T, _ = attentions[0].shape
    eye = torch.eye(T, dtype=attentions[0].dtype, device=attentions[0].device)
    rollout = eye.expand(B, T, T)
    for attention in attentions:
        mixing = discard_lowest(fuse_heads(attention.float(), head_fusion), discard_ratio) + eye  # (B, T, T)
        mixing = mixing / mixing.sum(dim=-1, keepdim=True)
        rollout = mixing @ rollout  # later layers act on what earlier ones already mixed
    return rollout


def attention_rollout(
    attentions: list[torch.Tensor],
    *,
    discard_ratio: float = 0.0,
    head_fusion: HeadFusion = "mean",
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Per-block (B, heads, T, T) weights -> (B, grid, grid): how much each patch flows into [CLS] (sums to <= 1).

    T = ``num_prefix_tokens`` + grid * grid; the prefix tokens' own share is left out of the map.
    """
    rollout = rollout_matrix(attentions, discard_ratio=discard_ratio, head_fusion=head_fusion)
    cls_to_patches = rollout[:, 0, num_prefix_tokens:]  # (B, N)
    grid = math.isqrt(cls_to_patches.shape[-1])
    if grid * grid != cls_to_patches.shape[-1]:
        raise ValueError(f"{cls_to_patches.shape[-1]} patch tokens do not form a square grid")
    return cls_to_patches.reshape(-1, grid, grid)


def sequence_pool_rollout(rollout: torch.Tensor, pool_weights: torch.Tensor) -> torch.Tensor:
    """(B, N, N) rollout and (B, N) sequence-pooling weights -> (B, grid, grid): ``w^T R``, how much
    each patch flows into the pooled feature (sums to 1 when the weights and the rows do)."""
    pooled = (pool_weights.float().unsqueeze(1) @ rollout).squeeze(1)  # (B, 1, N) @ (B, N, N) -> (B, N)
    grid = math.isqrt(pooled.shape[-1])
    if grid * grid != pooled.shape[-1]:
        raise ValueError(f"{pooled.shape[-1]} patch tokens do not form a square grid")
    return pooled.reshape(-1, grid, grid)


def model_rollout(
    model: ViT, pixels: torch.Tensor, *, discard_ratio: float = 0.0, head_fusion: HeadFusion = "mean"
) -> torch.Tensor:
    """(B, C, H, W) normalised pixels -> (B, grid, grid) rollout map of what ``model``'s pooled feature draws from.

    [CLS] pooling (and mean pooling, which keeps a [CLS]): the [CLS] row; sequence pooling: the rows
    mixed by the image's pooling weights. Call under ``inference_mode`` with the model in eval mode.
    """
    attentions = model.forward_attention(pixels)
    if model.config.pool == "seq":
        first = model.num_prefix_tokens  # a distilled model's [DIST]: its share is left out, as [CLS]'s is
        weights = model.seq_pool.weights(model.forward_features(pixels)[:, first:])  # (B, N)
        rollout = rollout_matrix(attentions, discard_ratio=discard_ratio, head_fusion=head_fusion)
        return sequence_pool_rollout(rollout[:, first:, first:], weights)
    return attention_rollout(
        attentions, discard_ratio=discard_ratio, head_fusion=head_fusion, num_prefix_tokens=model.num_prefix_tokens
    )


# ---- position embedding ------------------------------------------------------------------------------


def pos_embed_similarity(model: ViT) -> torch.Tensor:
    """(N, grid, grid): tile n is the cosine similarity of patch n's position embedding with every patch's."""
    grid = model.config.grid_size
    patches = model.pos_embed[0, model.num_prefix_tokens :].detach().float()  # (N, C)
    unit = F.normalize(patches, dim=-1)
    return (unit @ unit.T).reshape(-1, grid, grid)  # (N, grid, grid)


def tile_mosaic(tiles: np.ndarray, gap: float = np.nan) -> np.ndarray:
    """(N, g, g) tiles, N = rows * rows -> one (rows*(g+1)-1, ...) image, tiles row-major, separated by ``gap``."""
    N, g, _ = tiles.shape
    rows = math.isqrt(N)
    side = rows * (g + 1) - 1
    mosaic = np.full((side, side), gap, dtype=np.float32)
    for n in range(N):
        r, c = divmod(n, rows)
        mosaic[r * (g + 1) : r * (g + 1) + g, c * (g + 1) : c * (g + 1) + g] = tiles[n]
    return mosaic


def _figure(width_in: float, height_in: float):
    # A bare Figure renders through Agg without pyplot's global state (no display, safe in threads).
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=100)


def save_pos_embed_similarity(similarity: torch.Tensor, path: str | os.PathLike, *, title: str = "") -> Path:
    """Draw (N, grid, grid) similarities as a grid x grid mosaic of tiles (ViT paper, fig. 7); write a PNG."""
    grid = similarity.shape[-1]
    fig = _figure(6.4, 5.6)
    ax = fig.add_subplot()
    image = ax.imshow(tile_mosaic(similarity.numpy()), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    centres = [r * (grid + 1) + (grid - 1) / 2 for r in range(grid)]
    ax.set_xticks(centres, [str(i + 1) for i in range(grid)], fontsize=6)
    ax.set_yticks(centres, [str(i + 1) for i in range(grid)], fontsize=6)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(title or "position embedding similarity")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    out = Path(path)
    fig.savefig(out, bbox_inches="tight")
    return out


# ---- rollout on an image ----------------------------------------------------------------------------


def save_rollout_overlay(
    image: np.ndarray, heat: torch.Tensor, path: str | os.PathLike, *, title: str = "", alpha: float = 0.55
) -> Path:
    """Side by side: ``image`` (H, W, 3) floats in [0, 1], and it under the (grid, grid) ``heat`` map; write a PNG."""
    from matplotlib import colormaps

    H, W = image.shape[:2]
    heat = heat.detach().float()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)  # [0, 1] for the colour map
    heat = F.interpolate(heat[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]  # (H, W)
    colours = colormaps["inferno"](heat.clamp(0, 1).numpy())[..., :3]  # (H, W, 3)
    blended = (1 - alpha) * image + alpha * colours
    fig = _figure(6.4, 3.4)
    for i, (picture, label) in enumerate([(image, "input"), (blended, "attention rollout")]):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(np.clip(picture, 0, 1))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    out = Path(path)
    fig.savefig(out, bbox_inches="tight")
    return out


def explain_images(
    model: ViT,
    image_paths: list[Path],
    out_dir: Path,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    discard_ratio: float = 0.0,
    head_fusion: HeadFusion = "mean",
) -> list[Path]:
    """Write ``<stem>-rollout.png`` for each image and ``pos-embed-similarity.png`` into ``out_dir``; the paths.

    Images go through the model's eval transform (``mean``/``std`` its normalisation); the left panel
    shows exactly the crop the model saw.
    """
    from vitrina.data.images import load_image
    from vitrina.data.transforms import EvalTransform

    out_dir.mkdir(parents=True, exist_ok=True)
    transform = EvalTransform(model.config.image_size, mean, std)
    model = model.eval()
    written = []
    stems = [p.stem for p in image_paths]
    for path in image_paths:
        pixels = transform(load_image(path))  # (3, S, S), normalised
        with torch.inference_mode():
            heat = model_rollout(model, pixels[None], discard_ratio=discard_ratio, head_fusion=head_fusion)[0]
        shown = (pixels * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).permute(1, 2, 0)
        # two inputs with one stem (a/cat.png, b/cat.png) must not overwrite each other
        name = path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}-{path.stem}"
        written.append(save_rollout_overlay(shown.numpy(), heat, out_dir / f"{name}-rollout.png", title=path.name))
    similarity = pos_embed_similarity(model)
    written.append(save_pos_embed_similarity(similarity, out_dir / "pos-embed-similarity.png"))
    return written


def rollout_heatmap(
    model: ViT,
    image: Image.Image,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    size: int = 256,
    alpha: float = 0.55,
) -> Image.Image:
    """The model's crop of ``image`` under its attention-rollout map, ``size`` px square (for the web page).

    The map says where the pooled feature ([CLS], or the sequence pool) draws from, for this image
    alone: it is the same whatever the query, so it shows what the model looked at, not why a
    particular query matched.
    """
    from vitrina.data.transforms import EvalTransform

    pixels = EvalTransform(model.config.image_size, mean, std)(image)  # (3, S, S), normalised
    with torch.inference_mode():
        heat = model_rollout(model.eval(), pixels[None])[0].float()
    return _overlay(pixels, heat, mean, std, size, alpha)


# ---- query heat map: which patches resemble the query -------------------------------------------------


def projected_patches(vit: ViT, projection: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, h, w, D): each patch token after the final norm, through the pooled token's projection.

    Not normalised; (h, w) is the patch grid of this image size.
    """
    c = vit.config
    h, w = (token_grid(side, c.patch_size, c.stem) for side in pixels.shape[-2:])
    tokens = vit.forward_features(pixels)[:, vit.num_prefix_tokens :]  # (B, N, C), N = h * w
    projected = projection(tokens)  # (B, N, D)
    return projected.reshape(pixels.shape[0], h, w, -1)  # (B, h, w, D)


def query_similarity(
    vit: ViT, projection: nn.Module, pixels: torch.Tensor, text_vector: torch.Tensor, *, normalize: bool = True
) -> torch.Tensor:
    """(B, 3, H, W) and a (D,) text vector -> (B, h, w): each patch's cosine with the unit text vector.

    ``normalize=False`` leaves the patches at their projected length (a dot product, not a cosine).
    """
    patches = projected_patches(vit, projection, pixels).float()  # (B, h, w, D)
    if normalize:
        patches = F.normalize(patches, dim=-1)
    text = F.normalize(torch.as_tensor(text_vector, dtype=torch.float32).reshape(-1), dim=0)  # (D,)
    return patches @ text.to(patches.device)  # (B, h, w)


def _overlay(pixels: torch.Tensor, heat: torch.Tensor, mean, std, size: int, alpha: float) -> Image.Image:
    """A normalised (3, S, S) crop under a (h, w) heat map (scaled to [0, 1]), ``size`` px square, as RGB."""
    from matplotlib import colormaps

    heat = heat.detach().float().cpu()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
    heat = F.interpolate(heat[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    shown = (pixels * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    shown = F.interpolate(shown[None], size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    colours = colormaps["inferno"](heat.clamp(0, 1).numpy())[..., :3]  # (size, size, 3)
    blended = (1 - alpha) * shown.numpy() + alpha * colours
    return Image.fromarray((np.clip(blended, 0, 1) * 255).round().astype(np.uint8), "RGB")


def query_heatmap(
    model: nn.Module,
    image: Image.Image,
    text_vector,
    *,
    size: int = 256,
    alpha: float = 0.55,
) -> Image.Image:
    """A CLIP's crop of ``image`` under the query's patch-similarity map, ``size`` px square (for the web page).

    Unlike the rollout, the map depends on the query: bright patches are those most like the text.
    """
    from vitrina.data.transforms import EvalTransform

    vit, projection = clip_image_tower(model)
    mean, std = model.config.image_mean, model.config.image_std
    pixels = EvalTransform(vit.config.image_size, mean, std)(image)  # (3, S, S), normalised
    with torch.inference_mode():
        heat = query_similarity(vit.eval(), projection, pixels[None], text_vector)[0]  # (h, w)
    return _overlay(pixels, heat, mean, std, size, alpha)


def save_query_overlay(
    image: np.ndarray, heat: torch.Tensor, path: str | os.PathLike, *, query: str, title: str = "", alpha: float = 0.55
) -> Path:
    """Side by side: ``image`` (H, W, 3) in [0, 1], and it under the (h, w) cosine map of ``query``; write a PNG."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    H, W = image.shape[:2]
    heat = heat.detach().float()
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / max(high - low, 1e-12)
    scaled = F.interpolate(scaled[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    blended = (1 - alpha) * image + alpha * colormaps["inferno"](scaled.clamp(0, 1).numpy())[..., :3]
    fig = _figure(7.0, 3.4)
    for i, (picture, label) in enumerate([(image, "input"), (blended, f"similarity to “{query}”")]):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(np.clip(picture, 0, 1))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    # the colour bar gives the real cosines the colours stand for (the map is stretched per image)
    bar = ScalarMappable(norm=Normalize(low, high), cmap="inferno")
    fig.colorbar(bar, ax=fig.axes[-1], label="patch cosine", fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=9)
    out = Path(path)
    fig.savefig(out, bbox_inches="tight")
    return out


def explain_query(
    model: nn.Module,
    image_paths: list[Path],
    out_dir: Path,
    *,
    query: str,
    text_vector,
) -> list[Path]:
    """Write ``<stem>-query.png`` (the image beside its patch-similarity map to ``query``) per image; the paths."""
    from vitrina.data.images import load_image
    from vitrina.data.transforms import EvalTransform

    vit, projection = clip_image_tower(model)
    mean, std = model.config.image_mean, model.config.image_std
    transform = EvalTransform(vit.config.image_size, mean, std)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in image_paths]
    written = []
    for path in image_paths:
        pixels = transform(load_image(path))  # (3, S, S), normalised
        with torch.inference_mode():
            heat = query_similarity(vit.eval(), projection, pixels[None], text_vector)[0]  # (h, w)
        shown = (pixels * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).permute(1, 2, 0)
        name = path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}-{path.stem}"
        out = out_dir / f"{name}-query.png"
        written.append(save_query_overlay(shown.numpy(), heat, out, query=query, title=path.name))
    return written
