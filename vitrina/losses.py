"""Training losses, one section per family. Every loss has a naive reference in its test.

Conventions: embeddings are L2-normalised (B, D) tensors; a loss returns a scalar mean over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --- contrastive image-text (CLIP) -----------------------------------------------------------


def clip_logits(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D), scalar -> (B, B) logits_per_image = scale * image_emb @ text_emb.T."""
    return logit_scale * image_emb @ text_emb.T


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss of CLIP (Radford et al., 2021, Figure 3).

    The paper's pseudocode::

        logits = np.dot(I_e, T_e.T) * np.exp(t)
        labels = np.arange(n)
        loss_i = cross_entropy_loss(logits, labels, axis=0)
        loss_t = cross_entropy_loss(logits, labels, axis=1)
        loss   = (loss_i + loss_t) / 2

    i.e. the mean of image->text and text->image cross-entropy where the i-th image and i-th text
    are the positive pair and every other item of the batch is a negative. ``logit_scale`` is the
    already exponentiated temperature ``exp(t)``, as ``CLIP.forward`` returns it.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        shapes = f"{tuple(image_emb.shape)}, {tuple(text_emb.shape)}"
        raise ValueError(f"expected two (B, D) tensors of one shape, got {shapes}")
    logits = clip_logits(image_emb, text_emb, logit_scale)  # (B, B): rows images, columns texts
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
