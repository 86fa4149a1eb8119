"""Masked autoencoder (He et al., 2021), its steps named after the paper's figure.

1. ``random_masking``: per image, keep a random ``1 - mask_ratio`` of the patch tokens (argsort of
   uniform noise), remembering ``ids_restore`` to undo the shuffle.
2. ``forward_encoder``: the backbone ViT's own patch embedding, position embedding, [CLS], blocks
   and final norm — on the visible tokens only. The encoder *is* a plain ``ViT``, so after
   pretraining it saves and loads like any other ViT checkpoint.
3. ``forward_decoder``: a narrow transformer (its own width, blocks and position embedding) on the
   visible tokens plus one shared learnt mask token per hidden patch, unshuffled into place; a
   linear layer predicts each patch's pixels.
4. ``forward_loss``: MSE per patch, averaged over the hidden patches only; optionally against
   per-patch normalised pixels (the paper's better target).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from vitrina.errors import UserError
from vitrina.models.vit import Block, ViT, init_transformer_weights, patchify, unpatchify
from vitrina.ssl.common import SSLMethod


def kept_count(n_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: ``round((1 - mask_ratio) * N)``, at least one."""
    return max(1, round((1 - mask_ratio) * n_patches))


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, D) tokens -> (kept (B, K, D), mask (B, N) with 1 = hidden, ids_restore (B, N)).

    ``kept`` holds the visible tokens in shuffled order; ``ids_restore`` is where each original
    position sits in the shuffled sequence (``gather(shuffled, ids_restore)`` restores the order).
    """
    b, n, d = x.shape
    keep = kept_count(n, mask_ratio)
    if noise is None:
        noise = torch.rand(b, n, device=x.device)
    ids_shuffle = noise.argsort(dim=1)  # ascend: small is keep, large is remove
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]  # (B, K)
    kept = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, d))  # (B, K, D)
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, N), back in patch order
    return kept, mask, ids_restore


@dataclass
class MAEConfig:
    """Mask ``mask_ratio`` of the patches; decoder of ``decoder_depth`` blocks, ``decoder_width`` wide."""

    mask_ratio: float = 0.75
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True


class MAE(SSLMethod):
    """ViT encoder on visible patches + light decoder with mask tokens -> pixels of the hidden patches."""

    name = "mae"

    def __init__(self, backbone: ViT, config: MAEConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = c = config or MAEConfig()
        v = backbone.config
        if v.stem != "patch" or v.num_prefix_tokens != 1:
            # a conv stem's tokens see their neighbours' pixels, so hiding a token would not hide its patch
            raise UserError("MAE masks patches of a plain patch-embedding ViT with one [CLS]; pick e.g. vit-fmnist-28")
        self.decoder_embed = nn.Linear(v.width, c.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + v.num_patches, c.decoder_width))
        self.decoder_blocks = nn.ModuleList(
            Block(width=c.decoder_width, heads=c.decoder_heads, mlp_ratio=4.0, qkv_bias=True, eps=v.layer_norm_eps)
            for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_width, eps=v.layer_norm_eps)
        self.decoder_pred = nn.Linear(c.decoder_width, v.patch_size**2 * v.in_channels)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_pred):
            module.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"backbone.pos_embed", "backbone.cls_token", "decoder_pos_embed", "mask_token"}

    def forward_encoder(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (latent (B, 1+K, width), mask (B, N), ids_restore (B, N))."""
        vit = self.backbone
        x = vit.patch_embed(pixels) + vit.pos_embed[:, 1:]  # (B, N, width)
        x, mask, ids_restore = random_masking(x, self.config.mask_ratio)  # (B, K, width)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, 1+K, width)
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1+K, width) latent -> (B, N, p*p*C) predicted pixels of every patch."""
        x = self.decoder_embed(latent)  # (B, 1+K, Dd)
        b, n = ids_restore.shape
        masks = self.mask_token.expand(b, n - (x.shape[1] - 1), -1)  # (B, N-K, Dd)
        patches = torch.cat([x[:, 1:], masks], dim=1)  # (B, N, Dd) in shuffled order
        patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # (B, 1+N, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, p*p*C), [CLS] dropped

    def target(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C) reconstruction target (per-patch normalised if configured)."""
        target = patchify(pixels, self.backbone.config.patch_size)
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward_loss(self, pixels: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over hidden patches of the per-patch MSE."""
        per_patch = (prediction - self.target(pixels)).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum()

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        latent, mask, ids_restore = self.forward_encoder(x)
        return self.forward_loss(x, self.forward_decoder(latent, ids_restore), mask), {}

    @torch.no_grad()
    def reconstruct(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (masked input, reconstruction) images: visible patches are the original's,
        hidden ones the prediction (brought back to pixel scale when the target is normalised)."""
        latent, mask, ids_restore = self.forward_encoder(pixels)
        prediction = self.forward_decoder(latent, ids_restore)  # (B, N, p*p*C)
        original = patchify(pixels, self.backbone.config.patch_size)
        if self.config.norm_pix_loss:
            mean, var = original.mean(dim=-1, keepdim=True), original.var(dim=-1, keepdim=True)
            prediction = prediction * (var + 1e-6).sqrt() + mean
        hidden = mask[:, :, None]  # (B, N, 1)
        p = self.backbone.config.patch_size
        masked = unpatchify(original * (1 - hidden), p)  # hidden patches shown as 0 (mid-grey)
        pasted = unpatchify(original * (1 - hidden) + prediction * hidden, p)
        return masked, pasted


def save_reconstructions(mae: MAE, pixels: torch.Tensor, out_png: str | os.PathLike, *, seed: int = 0) -> None:
    """A PNG of three rows — original, masked, reconstructed — for normalised images (B, C, H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = mae.training
    mae.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        masked, pasted = mae.reconstruct(pixels)
    mae.train(was_training)
    rows = [("original", pixels), ("masked", masked), ("reconstruction", pasted)]
    n = pixels.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.2 * n, 3.8), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for i in range(n):
            image = ((images[i].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
            ax = axes[r][i]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
