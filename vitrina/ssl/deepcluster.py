"""DeepCluster (Caron et al., 2018): alternate clustering the features and learning to predict
the clusters.

Each round (one epoch):
1. embed every training image with the backbone (eval mode); PCA-whiten and L2-normalise, as in
   the paper;
2. k-means (scikit-learn) -> one pseudo-label per image; an empty cluster takes half of the
   largest one (its centroid split in two by a small perturbation, the paper's fix);
3. re-initialise the classifier head (old cluster ids mean nothing now) and train backbone + head
   to predict the pseudo-labels, each cluster weighted by the inverse of its size (the paper
   samples uniformly over clusters instead; both stop big clusters from swallowing the rest).

Tracked per round (logged with the loop's metrics): NMI of the assignments against the true labels
(when given: never used for training) and against the previous round's assignments.

The pseudo-labels and weights are buffers, so they live in the checkpoint and a resumed run
continues with them. The head's AdamW moments are not reset at a new round (the loop owns the
optimizer); after a re-initialisation they fade within a few dozen steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

from vitrina.errors import UserError
from vitrina.models.vit import ViT
from vitrina.ssl.common import SSLMethod, to_input


def fill_empty_clusters(
    features: np.ndarray, assignments: np.ndarray, centroids: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Give every empty cluster half of the largest one: copy its centroid with a small random
    offset (the original moves the other way) and split its members by the nearer of the two.

    Returns new (assignments, centroids); inputs are not changed. Needs k <= number of points.
    """
    assignments, centroids = assignments.copy(), centroids.copy()
    k = len(centroids)
    for empty in range(k):
        counts = np.bincount(assignments, minlength=k)
        if counts[empty] > 0:
            continue
        largest = int(counts.argmax())
        members = np.flatnonzero(assignments == largest)
        offset = 1e-4 * rng.standard_normal(centroids.shape[1])
        centroids[empty], centroids[largest] = centroids[largest] + offset, centroids[largest] - offset
        to_empty = ((features[members] - centroids[empty]) ** 2).sum(1) < (
            (features[members] - centroids[largest]) ** 2
        ).sum(1)
        if to_empty.all() or not to_empty.any():  # identical points: split them in half at random
            to_empty = np.zeros(len(members), dtype=bool)
            to_empty[rng.permutation(len(members))[: len(members) // 2]] = True
        assignments[members[to_empty]] = empty
    return assignments, centroids


def cluster_features(features: np.ndarray, n_clusters: int, *, pca_dim: int, seed: int) -> np.ndarray:
    """(N, D) features -> (N,) cluster ids in [0, n_clusters), none empty."""
    if n_clusters > len(features):
        raise UserError(f"DeepCluster: {n_clusters} clusters but only {len(features)} images; lower n_clusters")
    dim = max(1, min(pca_dim, features.shape[1], len(features) - 1))
    reduced = PCA(n_components=dim, whiten=True, random_state=seed).fit_transform(features)
    reduced /= np.linalg.norm(reduced, axis=1, keepdims=True) + 1e-12
    kmeans = KMeans(n_clusters=n_clusters, n_init=1, max_iter=50, random_state=seed).fit(reduced)
    assignments, _ = fill_empty_clusters(
        reduced, kmeans.labels_.astype(np.int64), kmeans.cluster_centers_, np.random.default_rng(seed)
    )
    return assignments


@dataclass
class DeepClusterConfig:
    """k-means with ``n_clusters`` on PCA-whitened ``pca_dim``-d features; ``embed_batch`` for embedding."""

    n_clusters: int = 100
    pca_dim: int = 64
    embed_batch: int = 512
    seed: int = 0


class DeepCluster(SSLMethod):
    """Backbone -> pooled features -> linear head over the current round's clusters."""

    name = "deepcluster"

    def __init__(
        self, backbone: ViT, config: DeepClusterConfig | None = None, *, reference_labels: np.ndarray | None = None
    ) -> None:
        super().__init__(backbone)
        self.config = config or DeepClusterConfig()
        self.reference_labels = reference_labels  # only for the logged NMI
        self.head = nn.Linear(backbone.width, self.config.n_clusters)
        self.register_buffer("pseudo_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("cluster_weights", torch.ones(self.config.n_clusters))
        self.register_buffer("round", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # the pseudo-label buffer's length is the data's: take the saved one's shape on resume
        key = prefix + "pseudo_labels"
        if key in state_dict:
            self.pseudo_labels = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 (N, C, H, W) -> (N, width) pooled features, in eval mode."""
        was_training = self.training
        self.eval()
        chunks = [self.features(to_input(p, self.in_channels)) for p in pixels.split(self.config.embed_batch)]
        self.train(was_training)
        return torch.cat(chunks).numpy()

    @torch.no_grad()
    def new_round(self, pixels: torch.Tensor) -> dict[str, float]:
        """Cluster, install the pseudo-labels and weights, re-initialise the head; returns the round's NMIs."""
        seed = self.config.seed + int(self.round)
        assignments = cluster_features(
            self.embed(pixels), self.config.n_clusters, pca_dim=self.config.pca_dim, seed=seed
        )
        metrics: dict[str, float] = {"round": float(self.round) + 1}
        if len(self.pseudo_labels) == len(assignments):
            metrics["nmi_previous_round"] = normalized_mutual_info_score(self.pseudo_labels.numpy(), assignments)
        if self.reference_labels is not None and len(self.reference_labels) == len(assignments):
            metrics["nmi_labels"] = normalized_mutual_info_score(self.reference_labels, assignments)
        counts = np.bincount(assignments, minlength=self.config.n_clusters)
        metrics["largest_cluster_share"] = float(counts.max() / counts.sum())
        self.pseudo_labels = torch.from_numpy(assignments)
        weights = 1.0 / np.maximum(counts, 1)
        self.cluster_weights.copy_(torch.from_numpy(weights / (weights * counts).sum() * counts.sum()).float())
        self.head.reset_parameters()
        self.round += 1
        return metrics

    def prepare(self, pixels: torch.Tensor) -> None:
        self.new_round(pixels)

    def end_of_epoch(self, pixels: torch.Tensor) -> dict[str, float]:
        return self.new_round(pixels)

    def loss(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        targets = self.pseudo_labels[indices]
        logits = self.head(self.features(x))  # (B, n_clusters)
        accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
        return F.cross_entropy(logits, targets, weight=self.cluster_weights), {"cluster_acc": accuracy}
