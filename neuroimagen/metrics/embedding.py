"""How well embeddings separate classes: k-NN top-1 accuracy and k-means clustering accuracy.

Used to validate stage 1 (the triplet-trained EEG encoder) on held-out data.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans


def knn_accuracy(train_emb: torch.Tensor, train_labels: torch.Tensor, query_emb: torch.Tensor,
                 query_labels: torch.Tensor, k: int = 5) -> float:
    """Top-1 accuracy of a k-NN majority vote (Euclidean; ties -> the nearest neighbour's class).

    train_emb (N, D), train_labels (N,), query_emb (M, D), query_labels (M,) -> accuracy in [0, 1].
    """
    k = min(k, train_emb.shape[0])
    d = torch.cdist(query_emb.double(), train_emb.double())  # (M, N)
    nn_idx = d.topk(k, dim=1, largest=False).indices  # (M, k), nearest first
    votes = train_labels[nn_idx]  # (M, k)
    n_cls = int(max(train_labels.max(), query_labels.max())) + 1
    counts = torch.zeros(votes.shape[0], n_cls, dtype=torch.float64)
    counts.scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.float64))
    # tie-break towards nearer neighbours: add a tiny bonus decreasing with rank
    bonus = torch.zeros_like(counts)
    bonus.scatter_add_(1, votes, (1e-3 / (1 + torch.arange(k, dtype=torch.float64))).expand_as(votes).contiguous())
    pred = (counts + bonus).argmax(1)
    return float((pred == query_labels).double().mean())


def clustering_accuracy(emb: torch.Tensor, labels: torch.Tensor, n_clusters: int, seed: int = 0) -> float:
    """k-means on ``emb`` (N, D), clusters matched to classes by the Hungarian algorithm; accuracy in [0, 1]."""
    x = emb.double().numpy()
    y = labels.numpy()
    pred = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)
    classes = np.unique(y)
    cost = np.zeros((n_clusters, len(classes)))
    for i in range(n_clusters):
        for j, c in enumerate(classes):
            cost[i, j] = -np.sum((pred == i) & (y == c))
    rows, cols = linear_sum_assignment(cost)
    return float(-cost[rows, cols].sum() / len(y))
