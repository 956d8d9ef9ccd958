"""Weighted k-nearest-neighbour classification on frozen features.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR
2018 (as used by DINO): cosine similarity, the k nearest training features vote for their
label with weight exp(sim / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels of ``query`` rows; features need not be normalised."""
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for q in F.normalize(query.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=sim.dtype)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_top1(train_feats, train_labels, query, query_labels, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of weighted kNN."""
    pred = knn_predict(train_feats, train_labels, query, num_classes, k, temperature)
    return float((pred == query_labels).float().mean() * 100) if len(query_labels) else float("nan")
