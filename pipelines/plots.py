"""Plots a person would rather see than read: loss curves and 2-D PCA of embeddings."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curve(history: list[dict], path: Path, title: str = "training loss") -> None:
    """Per-epoch loss (and learning rate on a second axis)."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    ax.plot(epochs, [h.get("loss", np.nan) for h in history], marker="o", label="loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h.get("lr", np.nan) for h in history], color="tab:gray", linestyle="--", label="lr")
    ax2.set_ylabel("lr (epoch mean)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pca_scatter(feats: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, title: str = "embeddings (PCA)") -> None:
    """2-D PCA of features coloured by label."""
    x = feats - feats.mean(0, keepdims=True)
    if len(x) >= 2 and x.shape[1] >= 2:
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T
    else:
        xy = np.zeros((len(x), 2))
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=110)
    for c in np.unique(labels):
        m = labels == c
        name = classes[c] if 0 <= c < len(classes) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=5, alpha=0.6, label=name)
    ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
