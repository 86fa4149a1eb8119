"""Training losses, one section per family. Every loss has a naive reference in its test.

Conventions: embeddings are L2-normalised (B, D) tensors; a loss returns a scalar mean over the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (b, D) rows of this process -> the global batch (N, D) and the index of this process's first row in it
FeatureGather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]

# --- contrastive image-text (CLIP) -----------------------------------------------------------


def clip_logits(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D), scalar -> (B, B) logits_per_image = scale * image_emb @ text_emb.T."""
    return logit_scale * image_emb @ text_emb.T


def same_concept_targets(
    row_concepts: torch.Tensor, column_concepts: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(b,), (N,) concept ids -> (b, N) soft targets: row i spread evenly over the columns of its concept.

    One concept drawn in several styles (or captioned twice) is not a negative of itself: its
    columns share the target mass instead of being pushed apart.
    """
    same = (row_concepts[:, None] == column_concepts[None, :]).to(dtype)  # (b, N)
    return same / same.sum(dim=1, keepdim=True)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy of (b, N) logits: against hard ``labels`` (b,), or soft ``targets`` (b, N) when given."""
    if targets is None:
        return F.cross_entropy(logits, labels)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: FeatureGather | None = None,
    concepts: torch.Tensor | None = None,
) -> torch.Tensor:
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

    With ``gather`` (data-parallel training: ``vitrina.train.distributed.gather_with_grad``) the
    negatives are the global batch of every process, and the loss is this process's rows of the
    global loss (``clip_loss_rows``); the mean over processes is the loss of the global batch.

    With ``concepts`` ((B,) integer ids, duplicate-aware targets) pair i's target is spread evenly
    over every pair of its concept (``same_concept_targets``) in both directions; with all ids
    distinct this is the plain loss.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        shapes = f"{tuple(image_emb.shape)}, {tuple(text_emb.shape)}"
        raise ValueError(f"expected two (B, D) tensors of one shape, got {shapes}")
    if gather is not None:
        images, offset = gather(image_emb)  # (N, D)
        texts, _ = gather(text_emb)  # (N, D)
        all_concepts = None if concepts is None else gather(concepts)[0]  # (N,)
        return clip_loss_rows(
            image_emb, text_emb, images, texts, logit_scale, offset=offset, row_concepts=concepts, concepts=all_concepts
        )
    logits = clip_logits(image_emb, text_emb, logit_scale)  # (B, B): rows images, columns texts
    labels = torch.arange(logits.shape[0], device=logits.device)
    targets = None if concepts is None else same_concept_targets(concepts, concepts, logits.dtype)  # (B, B), symmetric
    return (_cross_entropy(logits, labels, targets) + _cross_entropy(logits.T, labels, targets)) / 2


def caption_set_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    caption_set_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    concepts: torch.Tensor,
    caption_set_concepts: torch.Tensor,
) -> torch.Tensor:
    """CLIP's loss with every training caption as an image's negative, not only the batch's.

    Image -> text: image i against all C captions of the training set (``caption_set_emb`` (C, D),
    ``caption_set_concepts`` (C,)); its target is spread evenly over every caption of its concept
    (every phrasing of it). Text -> image: as ``clip_loss``, text i against the batch's B images
    (duplicate-aware). The mean of both directions.

    With a locked text tower the C caption features are cached, so scoring the whole set costs one
    (C, Ct) x (Ct, D) projection per step: the image side meets ~C negatives for the price of B.
    """
    logits_per_image = clip_logits(image_emb, caption_set_emb, logit_scale)  # (B, C)
    image_targets = same_concept_targets(concepts, caption_set_concepts, logits_per_image.dtype)  # (B, C)
    logits_per_text = clip_logits(text_emb, image_emb, logit_scale)  # (B, B)
    text_targets = same_concept_targets(concepts, concepts, logits_per_text.dtype)  # (B, B)
    labels = torch.arange(image_emb.shape[0], device=image_emb.device)
    return (
        _cross_entropy(logits_per_image, labels, image_targets) + _cross_entropy(logits_per_text, labels, text_targets)
    ) / 2


def clip_loss_rows(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    images: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    offset: int,
    row_concepts: torch.Tensor | None = None,
    concepts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``offset .. offset + b`` of the symmetric CLIP loss of a global batch of N pairs.

    ``image_rows``/``text_rows`` (b, D) are the pairs ``offset + i`` of ``images``/``texts`` (N, D),
    and carry the gradient of this process's share. Image row i is scored against all N texts
    and text row i against all N images (as open_clip's ``ClipLoss(local_loss=True)``); the
    positive of both is column ``offset + i``. The mean over b rows of each direction, averaged:
    the mean of this over a partition of the N rows into equal shares is ``clip_loss(images, texts)``.
    ``row_concepts`` (b,) and ``concepts`` (N,) (both or neither) make the targets duplicate-aware
    as in ``clip_loss``.
    """
    if (row_concepts is None) != (concepts is None):
        raise ValueError("give both row_concepts (b,) and concepts (N,) for duplicate-aware targets, or neither")
    logits_per_image = clip_logits(image_rows, texts, logit_scale)  # (b, N)
    logits_per_text = clip_logits(text_rows, images, logit_scale)  # (b, N)
    labels = offset + torch.arange(image_rows.shape[0], device=image_rows.device)  # (b,)
    targets = None  # (b, N) soft targets when duplicate-aware
    if concepts is not None:
        targets = same_concept_targets(row_concepts, concepts, logits_per_image.dtype)
    return (_cross_entropy(logits_per_image, labels, targets) + _cross_entropy(logits_per_text, labels, targets)) / 2
