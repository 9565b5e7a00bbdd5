"""Plots logged as MLflow artifacts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import torch  # noqa: E402


def expert_load_heatmap(tokens: torch.Tensor, path: Path) -> Path:
    """Layers x experts heatmap of the share of each layer's routed tokens per expert."""
    share = (tokens / tokens.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    layers, experts = share.shape
    fig, ax = plt.subplots(figsize=(max(4, experts * 0.3), max(2.5, layers * 0.35)))
    image = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"share of routed tokens per expert (uniform = {1 / experts:.3f})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def needle_heatmap(
    accuracy, lengths: tuple[int, ...], depths: tuple[float, ...], path: Path
) -> Path:
    """Needle-in-a-haystack retrieval accuracy: context length (x) by needle depth (y)."""
    fig, ax = plt.subplots(figsize=(max(4, len(lengths) * 0.9), max(3, len(depths) * 0.5)))
    image = ax.imshow(accuracy.T, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title("needle in a haystack: retrieval accuracy")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(i, j, f"{accuracy[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
