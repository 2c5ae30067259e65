"""PNG plots for the tracker: training curves, similarity histograms, a 2-D embedding by class.

Each function renders to a file path with the non-interactive Agg backend and returns the path.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402


def curves_png(histories: Mapping[str, Sequence[tuple[int, float]]], path: str, title: str = "") -> str:
    """One panel per metric: value against global step, e.g. {"loss": [(step, v), ...], "knn_top1": ...}."""
    names = [k for k, v in histories.items() if len(v)]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps, values = zip(*sorted(histories[name]))
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def similarity_histogram_png(samples: Mapping[str, torch.Tensor], path: str, title: str = "") -> str:
    """Overlaid histograms of cosine similarities, e.g. {"positive": (n,), "real negative": (m,), ...}."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bins = np.linspace(-1.0, 1.0, 81)
    for name, values in samples.items():
        values = values.detach().float().cpu().numpy().ravel()
        if values.size:
            ax.hist(values, bins=bins, density=True, alpha=0.5, label=f"{name} (n={values.size})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, 2): projection on the two leading principal components."""
    centred = features.float() - features.float().mean(dim=0, keepdim=True)
    _, _, v = torch.pca_lowrank(centred, q=min(2, *centred.shape), center=False)
    return centred @ v[:, :2]


def embedding_png(features: torch.Tensor, labels: torch.Tensor, path: str, title: str = "") -> str:
    """Scatter of the PCA 2-D embedding of L2-normalised features, coloured by class."""
    coords = pca_2d(torch.nn.functional.normalize(features.float(), dim=1)).numpy()
    labels = labels.cpu().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    scatter = ax.scatter(coords[:, 0], coords[:, 1], c=labels, cmap="tab10", s=8, alpha=0.8)
    ax.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "embedding of the evaluation split (PCA)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
