"""Plots a person would rather look at than read: score histograms, grids of the hardest images, data maps and
pruning curves. matplotlib is imported inside each function (Agg backend), so `import datadiet` stays quick."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["plot_data_map", "plot_score_histogram", "plot_image_grid"]


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


def plot_data_map(
    confidence: Sequence[float],
    variability: Sequence[float],
    path: str | Path,
    *,
    correctness: Sequence[float] | None = None,
    title: str | None = None,
    max_points: int = 25_000,
    seed: int = 0,
) -> Path:
    """Write a PNG data map (Swayamdipta et al. 2020, fig. 1): each training example at (variability, confidence),
    coloured by correctness, with the easy-to-learn (top left), ambiguous (right) and hard-to-learn (bottom left)
    regions marked, and return its path. The columns come from `DataDietTrainer` / `ScoreCallback`
    (`confidence`, `variability`, `correctness`); at most `max_points` examples are drawn (a seeded sample).

    Example:
    ```python
    >>> import tempfile, numpy as np
    >>> from datadiet.report import plot_data_map
    >>> rng = np.random.default_rng(0)
    >>> path = plot_data_map(rng.random(200), rng.random(200) / 2, tempfile.mkdtemp() + "/map.png",
    ...                      correctness=rng.integers(0, 6, 200) / 5)
    >>> path.name
    'map.png'
    ```
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    variability = np.asarray(variability, dtype=np.float64)
    if confidence.shape != variability.shape or confidence.ndim != 1:
        raise ValueError(
            f"confidence and variability must be 1-D and of the same length; got shapes {confidence.shape} and "
            f"{variability.shape}."
        )
    colour = None if correctness is None else np.asarray(correctness, dtype=np.float64)
    if colour is not None and colour.shape != confidence.shape:
        raise ValueError(
            f"correctness has shape {colour.shape}, confidence {confidence.shape}: one value per example."
        )
    keep = np.isfinite(confidence) & np.isfinite(variability)
    if colour is not None:
        keep &= np.isfinite(colour)
    index = np.flatnonzero(keep)
    if len(index) > max_points:
        index = np.sort(np.random.default_rng(seed).choice(index, size=max_points, replace=False))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    points = ax.scatter(
        variability[index],
        confidence[index],
        c=None if colour is None else colour[index],
        cmap="coolwarm_r" if colour is not None else None,
        vmin=0.0,
        vmax=1.0,
        s=6,
        alpha=0.6,
        linewidths=0,
    )
    if colour is not None:
        fig.colorbar(points, ax=ax, label="correctness (fraction of epochs)")
    ax.set_xlabel("variability (std of p(true class) over epochs)")
    ax.set_ylabel("confidence (mean p(true class) over epochs)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0.0)
    style = {"fontsize": 8, "bbox": {"boxstyle": "round", "facecolor": "white", "alpha": 0.8}}
    ax.text(0.03, 0.96, "easy-to-learn", transform=ax.transAxes, va="top", **style)
    ax.text(0.97, 0.5, "ambiguous", transform=ax.transAxes, ha="right", va="center", **style)
    ax.text(0.03, 0.04, "hard-to-learn", transform=ax.transAxes, va="bottom", **style)
    ax.set_title(title or f"data map ({len(index):,} examples)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
