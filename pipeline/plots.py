"""PNG plots for the tracker: similarity histograms and a 2-D embedding by class (MLflow draws the curves).

Each function renders to a file path with the non-interactive Agg backend and returns the path.
"""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402


def similarity_histogram_png(samples: Mapping[str, torch.Tensor], path: str, title: str = "") -> str:
    """Histograms of cosine similarities, one outlined curve per group (e.g. {"positive": (n,), ...}), each
    normalised to its own area so small groups (the hardest, the same-class negatives) stay visible."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    groups = {name: v.detach().float().cpu().numpy().ravel() for name, v in samples.items()}
    low = min((float(v.min()) for v in groups.values() if v.size), default=-1.0)
    low = max(-1.0, np.floor(low * 20) / 20 - 0.05)  # zoom in on the occupied range: a collapsed batch is readable
    bins = np.linspace(low, 1.0, 81)
    for name, values in groups.items():
        if values.size:
            ax.hist(
                values,
                bins=bins,
                density=True,
                histtype="step",
                linewidth=1.6,
                label=f"{name} (n={values.size}, mean {values.mean():.2f})",
            )
    ax.set_xlabel("cosine similarity to the anchor")
    ax.set_ylabel("density (each curve integrates to 1)")
    ax.set_xlim(low, 1.0)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def pca_2d(features: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, 2): projection on the two leading principal components."""
    centred = features.float() - features.float().mean(dim=0, keepdim=True)
    _, _, v = torch.pca_lowrank(centred, q=min(2, *centred.shape), center=False)
    return centred @ v[:, :2]


def tsne_2d(features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(n, d) -> (n, 2): scikit-learn's t-SNE (cosine distances, PCA init), which keeps neighbourhoods."""
    from sklearn.manifold import TSNE

    n = features.shape[0]
    tsne = TSNE(
        n_components=2, perplexity=float(min(30, max(2, (n - 1) // 3))), init="pca", metric="cosine", random_state=seed
    )
    return torch.from_numpy(tsne.fit_transform(features.float().numpy()))


def embedding_png(
    features: torch.Tensor, labels: torch.Tensor, path: str, title: str = "", max_points: int = 2000, seed: int = 0
) -> str:
    """Scatter of a 2-D projection of L2-normalised features coloured by class: t-SNE of a random subsample of
    at most ``max_points`` (PCA when there are too few points for t-SNE); the title names the projection."""
    features = torch.nn.functional.normalize(features.float().cpu(), dim=1)
    labels = labels.cpu()
    if features.shape[0] > max_points:
        keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        features, labels = features[keep], labels[keep]
    projection = "t-SNE" if features.shape[0] >= 10 else "PCA"
    coords = (tsne_2d(features, seed) if projection == "t-SNE" else pca_2d(features)).numpy()
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    scatter = ax.scatter(coords[:, 0], coords[:, 1], c=labels.numpy(), cmap="tab10", s=8, alpha=0.8)
    ax.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    ax.set_xlabel(f"{projection} 1")
    ax.set_ylabel(f"{projection} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{projection} of backbone features (L2-normalised, n={features.shape[0]})\n{title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
