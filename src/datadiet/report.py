"""Plots a person would rather look at than read: score histograms, grids of the hardest images, data maps and
pruning curves. matplotlib is imported inside each function (Agg backend), so `import datadiet` stays quick."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["plot_score_histogram", "plot_image_grid"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_score_histogram(
    scores: dict[str, Sequence[float]] | Sequence[float], path: str | Path, *, bins: int = 50, title: str | None = None
) -> Path:
    """Write a PNG histogram of one or several score columns (one panel each) and return its path.

    Example:
    ```python
    >>> import tempfile, numpy as np
    >>> from datadiet.report import plot_score_histogram
    >>> path = plot_score_histogram({"el2n": np.random.rand(100)}, tempfile.mkdtemp() + "/hist.png")
    >>> path.name
    'hist.png'
    ```
    """
    plt = _pyplot()
    if not isinstance(scores, dict):
        scores = {"score": scores}
    fig, axes = plt.subplots(1, len(scores), figsize=(4.5 * len(scores), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items()):
        values = np.asarray(values, dtype=np.float64)
        ax.hist(values[np.isfinite(values)], bins=bins, color="#4c72b0")
        ax.set_xlabel(name)
        ax.set_ylabel("examples")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_image_grid(
    images: Sequence,
    path: str | Path,
    *,
    captions: Sequence[str] | None = None,
    columns: int = 8,
    title: str | None = None,
) -> Path:
    """Write a PNG grid of images (PIL images or HWC/CHW arrays), e.g. the 16 hardest examples, and return its path."""
    plt = _pyplot()
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        image = np.asarray(images[i])
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.transpose(1, 2, 0)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        if captions is not None:
            ax.set_title(captions[i], fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
