"""clip_loss against a naive, obviously-correct loop over a grid of batch sizes and scales."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitrina.losses import caption_set_loss, clip_loss, clip_loss_rows


def naive_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: float) -> float:
    """Cross-entropy written out with Python loops: image->text rows, text->image columns."""
    n = image_emb.shape[0]
    logits = [[scale * float(image_emb[i] @ text_emb[j]) for j in range(n)] for i in range(n)]
    image_to_text = 0.0
    text_to_image = 0.0
    for i in range(n):
        row = logits[i]
        image_to_text += -row[i] + math.log(sum(math.exp(v) for v in row))
        column = [logits[j][i] for j in range(n)]
        text_to_image += -column[i] + math.log(sum(math.exp(v) for v in column))
    return (image_to_text / n + text_to_image / n) / 2


@pytest.mark.parametrize("batch", [1, 2, 5, 16])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_matches_naive_loop(batch: int, scale: float) -> None:
    g = torch.Generator().manual_seed(batch)
    image = F.normalize(torch.randn(batch, 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, 8, generator=g, dtype=torch.float64), dim=-1)
    got = clip_loss(image, text, torch.tensor(scale, dtype=torch.float64))
    assert got.item() == pytest.approx(naive_clip_loss(image, text, scale), rel=1e-9, abs=1e-9)


def test_clip_loss_is_symmetric_and_rewards_matching_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    text = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    assert clip_loss(image, text, scale).item() == pytest.approx(clip_loss(text, image, scale).item(), rel=1e-6)
    # Perfectly aligned pairs at a high temperature scale: the loss tends to zero.
    assert clip_loss(image, image, torch.tensor(100.0)).item() < clip_loss(image, text, torch.tensor(100.0)).item()
    assert clip_loss(image, image, torch.tensor(100.0)).item() < 0.05


def test_clip_loss_gradient_reaches_scale_and_embeddings() -> None:
    image = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    clip_loss(image, text, log_scale.exp()).backward()
    assert image.grad is not None and text.grad is not None and log_scale.grad is not None
    assert torch.isfinite(log_scale.grad)


def test_clip_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(torch.randn(4, 8), torch.randn(3, 8), torch.tensor(1.0))


def naive_duplicate_aware_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: float, concepts: list[int]):
    """Soft targets written out: row i's mass spread evenly over the columns j of i's concept."""
    n = image_emb.shape[0]
    logits = [[scale * float(image_emb[i] @ text_emb[j]) for j in range(n)] for i in range(n)]

    def row_loss(values: list[float], i: int) -> float:
        log_z = math.log(sum(math.exp(v) for v in values))
        same = [j for j in range(n) if concepts[j] == concepts[i]]
        return sum(-(values[j] - log_z) / len(same) for j in same)

    image_to_text = sum(row_loss(logits[i], i) for i in range(n)) / n
    text_to_image = sum(row_loss([logits[j][i] for j in range(n)], i) for i in range(n)) / n
    return (image_to_text + text_to_image) / 2


@pytest.mark.parametrize("concepts", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 2], [7, 7, 7, 7, 7, 7], [3, 1, 3, 1, 0, 9]])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07])
def test_duplicate_aware_clip_loss_matches_naive_loop(concepts: list[int], scale: float) -> None:
    g = torch.Generator().manual_seed(len(set(concepts)))
    image = F.normalize(torch.randn(len(concepts), 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(len(concepts), 8, generator=g, dtype=torch.float64), dim=-1)
    ids = torch.tensor(concepts)
    got = clip_loss(image, text, torch.tensor(scale, dtype=torch.float64), concepts=ids)
    assert got.item() == pytest.approx(naive_duplicate_aware_loss(image, text, scale, concepts), rel=1e-9, abs=1e-9)
    if len(set(concepts)) == len(concepts):  # all distinct: exactly the plain loss
        assert got.item() == pytest.approx(naive_clip_loss(image, text, scale), rel=1e-9)


def test_duplicate_aware_rows_average_to_the_global_loss() -> None:
    """The DDP form: the mean over equal shares of ``clip_loss_rows`` is the global duplicate-aware loss."""
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(8, 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(8, 8, generator=g, dtype=torch.float64), dim=-1)
    ids, scale = torch.tensor([0, 1, 0, 2, 1, 3, 3, 0]), torch.tensor(5.0, dtype=torch.float64)
    shares = [
        clip_loss_rows(
            image[o : o + 2], text[o : o + 2], image, text, scale, offset=o, row_concepts=ids[o : o + 2], concepts=ids
        )
        for o in range(0, 8, 2)
    ]
    assert torch.stack(shares).mean().item() == pytest.approx(clip_loss(image, text, scale, concepts=ids).item())
    with pytest.raises(ValueError, match="both"):
        clip_loss_rows(image[:2], text[:2], image, text, scale, offset=0, row_concepts=ids[:2])


def naive_caption_set_loss(image, text, caption_set, scale, concepts, caption_set_concepts) -> float:
    """Image i against every caption c (target spread over the captions of i's concept), text i against the batch."""
    b, c = image.shape[0], caption_set.shape[0]
    image_to_text = 0.0
    for i in range(b):
        row = [scale * float(image[i] @ caption_set[j]) for j in range(c)]
        log_z = math.log(sum(math.exp(v) for v in row))
        positives = [j for j in range(c) if caption_set_concepts[j] == concepts[i]]
        image_to_text += sum(-(row[j] - log_z) / len(positives) for j in positives)
    text_to_image = 0.0
    for i in range(b):
        row = [scale * float(text[i] @ image[j]) for j in range(b)]
        log_z = math.log(sum(math.exp(v) for v in row))
        positives = [j for j in range(b) if concepts[j] == concepts[i]]
        text_to_image += sum(-(row[j] - log_z) / len(positives) for j in positives)
    return (image_to_text / b + text_to_image / b) / 2


@pytest.mark.parametrize("concepts", [[0, 1, 2, 3], [0, 0, 1, 2], [2, 2, 2, 2]])
def test_caption_set_loss_matches_naive_loop(concepts: list[int]) -> None:
    g = torch.Generator().manual_seed(len(set(concepts)))
    image = F.normalize(torch.randn(len(concepts), 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(len(concepts), 8, generator=g, dtype=torch.float64), dim=-1)
    # seven captions over four concepts: concept 0 has three phrasings, 3 one (and is absent from some batches)
    caption_set = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    caption_set_concepts = [0, 1, 0, 2, 3, 0, 1]
    scale = 1 / 0.07
    got = caption_set_loss(
        image,
        text,
        caption_set,
        torch.tensor(scale, dtype=torch.float64),
        concepts=torch.tensor(concepts),
        caption_set_concepts=torch.tensor(caption_set_concepts),
    )
    want = naive_caption_set_loss(image, text, caption_set, scale, concepts, caption_set_concepts)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_caption_set_loss_with_the_batch_as_the_set_is_clip_loss() -> None:
    """When the set is exactly the batch's captions, one per concept, it is CLIP's own loss."""
    g = torch.Generator().manual_seed(5)
    image = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    ids, scale = torch.arange(6), torch.tensor(7.0, dtype=torch.float64)
    got = caption_set_loss(image, text, text, scale, concepts=ids, caption_set_concepts=ids)
    assert got.item() == pytest.approx(clip_loss(image, text, scale).item(), rel=1e-9)
