"""How good a frozen representation is: linear probe, kNN, k-means agreement with the labels, t-SNE.

* ``linear_probe`` — the standard linear evaluation protocol: features standardised, multinomial
  logistic regression (scikit-learn, L-BFGS) on the training features, accuracy on the test ones.
* ``bn_linear_probe`` — MAE's protocol (He et al., 2022): a ``BatchNorm1d(affine=False)`` in front of
  a linear layer, trained by SGD on the frozen features (batch statistics while training, running
  ones at test). Reported as ``linear_bn`` beside ``linear`` (``--probe-bn``): the BN's
  statistics are learnt from batches, and SGD stops short of the exact optimum that L-BFGS reaches,
  so the two protocols give different numbers for the same features.
* ``multi_block_probe`` — DINO's linear evaluation of a ViT (Caron et al., 2021): the pooled features of
  the last 1 or 4 blocks, concatenated, with or without the mean of the last block's patch tokens; the
  choice of the four is made on a held-out 10% of the training features, then ``linear_probe`` is fit on
  all of them and tested once. Reported as ``linear_multiblock`` beside ``linear`` (``--multi-block``):
  its features are up to 5x wider than the single pooled vector that ``linear`` reads.
* ``knn_accuracy`` — the weighted kNN of Wu et al. (2018), as DINO uses it: cosine similarity to
  the k nearest training features, each neighbour voting for its class with ``exp(sim / T)``.
* ``cluster_scores`` — k-means (scikit-learn) on L2-normalised features with as many clusters as
  classes; NMI and ARI of the clusters against the labels.
* ``tsne_plot`` — a 2-D t-SNE of a seeded subset, coloured by label.

``probe_representation`` runs all of them for a model (or raw pixels) on a train / test pair of
``vitrina.ssl.data.ImageSet`` and writes ``probe.json`` and ``tsne.png``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitrina.errors import UserError
from vitrina.ssl.common import to_input
from vitrina.ssl.data import ImageSet

PIXELS = "pixels"
LINEAR_PROTOCOL = "linear: standardised features, logistic regression (L-BFGS)"
LINEAR_BN_PROTOCOL = "linear-bn: BatchNorm1d(affine=False) + linear layer, SGD (MAE)"
MULTI_BLOCK_PROTOCOL = (
    "linear-multiblock: the pooled features of the last 1 or 4 blocks [+ the last block's mean patch token], "
    "chosen on 10% of the training features; then the linear protocol (DINO)"
)
# DINO's grid (eval_linear.py: n_last_blocks, avgpool_patchtokens): (blocks, with the mean patch token)
MULTI_BLOCK_CHOICES = ((1, False), (1, True), (4, False), (4, True))
MULTI_BLOCK_VAL_FRACTION = 0.1


class NormalisedPixels(Dataset):
    """``(normalised image (in_channels, H, W), label)`` items of an ``ImageSet``."""

    def __init__(self, images: ImageSet, in_channels: int = 3) -> None:
        self.images, self.in_channels = images, in_channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = to_input(self.images.pixels[index : index + 1], self.in_channels)[0]
        return pixels, int(self.images.labels[index])


def extract_features(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, pool: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled pre-logit features (N, D) float32 and labels (N,) int64 of every item of ``dataset``.

    The model runs in eval mode under ``inference_mode``; its training flag is restored afterwards.
    ``pool`` ("cls" or "mean", ViT only) overrides the model's own pooling for this extraction.
    """
    features, labels = [], []
    with pooled_as(model, pool), torch.inference_mode():
        for pixels, label in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            features.append(model.forward_head(model.forward_features(pixels), pre_logits=True).float())
            labels.append(torch.as_tensor(label))
    return torch.cat(features).numpy(), torch.cat(labels).numpy().astype(np.int64)


@contextlib.contextmanager
def pooled_as(model: nn.Module, pool: str | None) -> Iterator[None]:
    """``model`` in eval mode, pooling by ``pool`` ("cls" or "mean", ViT only; None: its own) for a while."""
    was_training = model.training
    saved_pool = getattr(model.config, "pool", None)
    if pool is not None:
        if saved_pool is None:
            raise UserError(f"--pool applies to ViT backbones; a {type(model).__name__} pools its own way")
        if pool == "cls" and getattr(model, "cls_token", None) is None:
            raise UserError("--pool cls: this ViT pools by sequence pooling and has no [CLS] token; use --pool mean")
        model.config.pool = pool
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if pool is not None:
            model.config.pool = saved_pool


def extract_block_features(
    model: nn.Module, dataset: Dataset, *, blocks: int, batch_size: int = 256, pool: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a ViT: (N, blocks, D) its pooled feature (``pool`` as in ``extract_features``) of each of the
    last ``blocks`` blocks, (N, D) the mean patch token of the last block, and (N,) the labels."""
    if not hasattr(model, "forward_intermediates"):
        raise UserError(f"the multi-block probe reads ViT blocks; a {type(model).__name__} has none")
    blocks = min(blocks, len(model.blocks))
    pooled, mean_tokens, labels = [], [], []
    with pooled_as(model, pool), torch.inference_mode():
        for pixels, label in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            outputs = model.forward_intermediates(pixels, blocks)
            pooled.append(torch.stack([model.pool(tokens) for tokens in outputs], dim=1).float())
            mean_tokens.append(outputs[-1][:, model.num_prefix_tokens :].mean(dim=1).float())
            labels.append(torch.as_tensor(label))
    return torch.cat(pooled).numpy(), torch.cat(mean_tokens).numpy(), torch.cat(labels).numpy().astype(np.int64)


def multi_block_name(blocks: int, avgpool: bool) -> str:
    """How a choice is reported: "1 block", "4 blocks + mean token"."""
    return f"{blocks} block{'s' if blocks > 1 else ''}{' + mean token' if avgpool else ''}"


def multi_block_features(pooled: np.ndarray, mean_tokens: np.ndarray, blocks: int, avgpool: bool) -> np.ndarray:
    """The features of one choice: the last ``blocks`` pooled vectors side by side [+ the mean patch token]."""
    parts = [pooled[:, -blocks:].reshape(len(pooled), -1)] + ([mean_tokens] if avgpool else [])
    return np.concatenate(parts, axis=1)


def multi_block_probe(
    model: nn.Module, train: Dataset, test: Dataset, *, seed: int = 0, batch_size: int = 256, pool: str | None = None
) -> dict[str, Any]:
    """DINO's linear evaluation: pick (blocks, mean patch token) from ``MULTI_BLOCK_CHOICES`` on a stratified
    held-out 10% of the training features, fit ``linear_probe`` on all of them with it, test once."""
    from sklearn.model_selection import train_test_split

    deepest = max(blocks for blocks, _ in MULTI_BLOCK_CHOICES)
    options = {"blocks": deepest, "batch_size": batch_size, "pool": pool}
    train_pooled, train_mean, train_y = extract_block_features(model, train, **options)
    test_pooled, test_mean, test_y = extract_block_features(model, test, **options)
    choices = sorted({(min(blocks, train_pooled.shape[1]), avgpool) for blocks, avgpool in MULTI_BLOCK_CHOICES})
    fit, held_out = train_test_split(
        np.arange(len(train_y)), test_size=MULTI_BLOCK_VAL_FRACTION, stratify=train_y, random_state=seed
    )
    val_accuracy = {}
    for blocks, avgpool in choices:
        x = multi_block_features(train_pooled, train_mean, blocks, avgpool)
        val_accuracy[(blocks, avgpool)] = linear_probe(x[fit], train_y[fit], x[held_out], train_y[held_out])["accuracy"]
    blocks, avgpool = max(choices, key=lambda choice: val_accuracy[choice])  # ties: the narrower, listed first
    test_x = multi_block_features(test_pooled, test_mean, blocks, avgpool)
    result = linear_probe(multi_block_features(train_pooled, train_mean, blocks, avgpool), train_y, test_x, test_y)
    return {
        **result,
        "blocks": blocks,
        "avgpool": avgpool,
        "feature_dim": int(test_x.shape[1]),
        "choice": multi_block_name(blocks, avgpool),
        "val_accuracy": {multi_block_name(*choice): accuracy for choice, accuracy in val_accuracy.items()},
        "protocol": MULTI_BLOCK_PROTOCOL,
    }


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Standardise (statistics of the training features), fit logistic regression, score the test set.

    Returns ``accuracy`` (test), ``train_accuracy``, ``n_train`` and ``n_test``.
    """
    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(C=C, max_iter=max_iter)
    classifier.fit(scaler.transform(train_x), train_y)
    return {
        "accuracy": float(classifier.score(scaler.transform(test_x), test_y)),
        "train_accuracy": float(classifier.score(scaler.transform(train_x), train_y)),
        "n_train": len(train_y),
        "n_test": len(test_y),
        "protocol": LINEAR_PROTOCOL,
    }


def bn_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """``BatchNorm1d(affine=False)`` -> ``Linear``, SGD (momentum 0.9, cosine decay) on the training features.

    The linear layer starts as MAE's (truncated normal, std 0.01; zero bias); batches are seeded
    shuffles, and a last batch of one item is skipped (BatchNorm needs two). Returns the keys of
    ``linear_probe``, with ``protocol`` naming this one.
    """
    x = torch.from_numpy(np.asarray(train_x, dtype=np.float32))
    y = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    n_classes = int(max(y.max().item(), int(np.max(test_y)))) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False), nn.Linear(x.shape[1], n_classes))
        nn.init.trunc_normal_(probe[1].weight, std=0.01)
        nn.init.zeros_(probe[1].bias)
        batches = [(start, min(start + batch_size, len(x))) for start in range(0, len(x), batch_size)]
        batches = [b for b in batches if b[1] - b[0] > 1]
        optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(batches))
        probe.train()
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for start, end in batches:
                chosen = order[start:end]
                loss = nn.functional.cross_entropy(probe(x[chosen]), y[chosen])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    probe.eval()

    def accuracy(features: np.ndarray, labels: np.ndarray) -> float:
        with torch.no_grad():
            predicted = probe(torch.from_numpy(np.asarray(features, dtype=np.float32))).argmax(dim=1).numpy()
        return float((predicted == np.asarray(labels)).mean())

    return {
        "accuracy": accuracy(test_x, test_y),
        "train_accuracy": accuracy(train_x, train_y),
        "n_train": len(train_y),
        "n_test": len(test_y),
        "protocol": LINEAR_BN_PROTOCOL,
    }


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted cosine kNN (Wu et al., 2018): the k nearest training items vote ``exp(sim / T)``."""
    train = torch.nn.functional.normalize(torch.from_numpy(np.asarray(train_x, dtype=np.float32)), dim=1)
    test = torch.nn.functional.normalize(torch.from_numpy(np.asarray(test_x, dtype=np.float32)), dim=1)
    labels = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    n_classes = int(max(labels.max().item(), int(np.max(test_y)))) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        similarity = test[start : start + chunk] @ train.T  # (q, N_train)
        top_sim, top_idx = similarity.topk(k, dim=1)  # (q, k)
        votes = torch.zeros(len(top_sim), n_classes)
        votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())  # (q, classes)
        predicted = votes.argmax(dim=1).numpy()
        correct += int((predicted == np.asarray(test_y)[start : start + chunk]).sum())
    return correct / len(test)


def cluster_scores(x: np.ndarray, y: np.ndarray, n_clusters: int, *, seed: int = 0) -> dict[str, float]:
    """k-means on L2-normalised ``x`` -> ``{"nmi", "ari"}`` of the clusters against labels ``y``."""
    unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    assignments = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(unit)
    return {
        "nmi": float(normalized_mutual_info_score(y, assignments)),
        "ari": float(adjusted_rand_score(y, assignments)),
    }


def tsne_plot(
    x: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    out_png: str | os.PathLike,
    *,
    max_points: int = 2000,
    seed: int = 0,
    title: str | None = None,
) -> None:
    """A t-SNE scatter of (at most ``max_points``, seeded) features coloured by label, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(x))[:max_points])
    points, labels = np.asarray(x, dtype=np.float32)[chosen], np.asarray(y)[chosen]
    components = min(50, len(points))  # PCA cannot give more components than points
    if points.shape[1] > components:  # the usual PCA step first: faster, and less noise for t-SNE
        points = PCA(n_components=components, random_state=seed).fit_transform(points)
    perplexity = min(30.0, max(2.0, (len(points) - 1) / 3))
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c in np.unique(labels):
        here = labels == c
        name = class_names[c] if c < len(class_names) else str(c)
        ax.scatter(embedded[here, 0], embedded[here, 1], s=4, color=cmap(int(c) % cmap.N), label=name)
    ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE: {title}" if title else "t-SNE of the features")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def load_probe_model(ref: str, *, seed: int = 0) -> nn.Module:
    """A checkpoint folder, or a preset name (a randomly initialised baseline drawn from ``seed``)."""
    from vitrina.checkpoint import load_model
    from vitrina.models.registry import ALL_PRESETS, build_model

    if ref in ALL_PRESETS and not Path(ref).is_dir():
        model = build_model(ref, seed=seed)
    else:
        model, _ = load_model(ref)
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise UserError(f"{ref}: a {type(model).__name__} has no image backbone to probe; give a ViT/Swin/CNN")
    return model


def pixel_features(images: ImageSet) -> np.ndarray:
    """Raw pixels in [0, 1], flattened: the baseline every representation should beat."""
    return images.pixels.flatten(1).float().numpy() / 255.0


def probe_representation(
    model: nn.Module | None,
    train: ImageSet,
    test: ImageSet,
    out_dir: str | os.PathLike,
    *,
    knn_ks: tuple[int, ...] = (20, 200),
    tsne_points: int = 2000,
    seed: int = 0,
    batch_size: int = 256,
    pool: str | None = None,
    label: str = "",
    probe_bn: bool = False,
    multi_block: bool = False,
) -> dict[str, Any]:
    """Every measure above for ``model`` (None: raw pixels); writes ``probe.json`` and ``tsne.png``.

    ``probe_bn`` adds the BatchNorm linear probe as ``linear_bn`` beside ``linear``; ``multi_block``
    (a ViT) DINO's multi-block one as ``linear_multiblock``.
    """
    if multi_block and model is None:
        raise UserError("the multi-block probe reads a ViT's blocks: raw pixels have none")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if model is None:
        train_x, train_y = pixel_features(train), train.labels
        test_x, test_y = pixel_features(test), test.labels
    else:
        in_channels = getattr(model.config, "in_channels", 3)
        options = {"batch_size": batch_size, "pool": pool}
        train_x, train_y = extract_features(model, NormalisedPixels(train, in_channels), **options)
        test_x, test_y = extract_features(model, NormalisedPixels(test, in_channels), **options)
    seconds["features"] = time.perf_counter() - start
    start = time.perf_counter()
    linear = linear_probe(train_x, train_y, test_x, test_y)
    seconds["linear"] = time.perf_counter() - start
    linear_bn = None
    if probe_bn:
        start = time.perf_counter()
        linear_bn = bn_linear_probe(train_x, train_y, test_x, test_y, seed=seed)
        seconds["linear_bn"] = time.perf_counter() - start
    linear_multiblock = None
    if multi_block:
        start = time.perf_counter()
        in_channels = getattr(model.config, "in_channels", 3)
        train_set, test_set = NormalisedPixels(train, in_channels), NormalisedPixels(test, in_channels)
        options = {"seed": seed, "batch_size": batch_size, "pool": pool}
        linear_multiblock = multi_block_probe(model, train_set, test_set, **options)
        seconds["linear_multiblock"] = time.perf_counter() - start
    start = time.perf_counter()
    knn = {f"k{k}": knn_accuracy(train_x, train_y, test_x, test_y, k=k) for k in knn_ks}
    seconds["knn"] = time.perf_counter() - start
    start = time.perf_counter()
    clusters = cluster_scores(test_x, test_y, len(test.class_names), seed=seed)
    seconds["cluster"] = time.perf_counter() - start
    start = time.perf_counter()
    tsne_plot(test_x, test_y, test.class_names, out / "tsne.png", max_points=tsne_points, seed=seed, title=label)
    seconds["tsne"] = time.perf_counter() - start
    results = {
        "model": label,
        "train_data": train.name,
        "test_data": test.name,
        "feature_dim": int(train_x.shape[1]),
        "pool": "pixels" if model is None else pool or getattr(model.config, "pool", "own"),
        "linear": linear,
        **({"linear_bn": linear_bn} if linear_bn is not None else {}),
        **({"linear_multiblock": linear_multiblock} if linear_multiblock is not None else {}),
        "knn": knn,
        "cluster": clusters,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    (out / "probe.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
