"""Plots a person would rather look at than read: score histograms, grids of the hardest images, data maps and
pruning curves. matplotlib is imported inside each function (Agg backend), so `import datadiet` stays quick."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["histogram_count_scale", "plot_data_map", "plot_image_grid", "plot_pruning_curve", "plot_score_histogram"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, title: str | None = None) -> Path:
    """Title, lay out and write `fig` as a PNG at `path` (folders created), close it, and return the path."""
    plt = _pyplot()
    if title:
        fig.suptitle(textwrap.fill(title, 90))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def histogram_count_scale(values: Sequence[float], *, bins: int = 50, crowded: float = 0.25) -> str:
    """`"log"` when a histogram of the finite `values` in `bins` equal bins would put more than `crowded` of them in
    one bin (a skewed score such as EL2N after training, where most examples are easy and the informative tail would
    be a row of invisible bars on a linear axis), else `"linear"`.

    Example:
    ```python
    >>> import numpy as np
    >>> from datadiet.report import histogram_count_scale
    >>> rng = np.random.default_rng(0)
    >>> histogram_count_scale(rng.random(1000)), histogram_count_scale(rng.exponential(size=1000) ** 4)
    ('linear', 'log')

    ```
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return "linear"
    counts, _ = np.histogram(values, bins=bins)
    return "log" if counts.max() > crowded * values.size else "linear"


def plot_score_histogram(
    scores: dict[str, Sequence[float]] | Sequence[float], path: str | Path, *, bins: int = 50, title: str | None = None
) -> Path:
    """Write a PNG histogram of one or several score columns (one panel each) and return its path. A skewed score
    (more than a quarter of the rows in one bin, see [`histogram_count_scale`]) gets a log-scaled count axis, and its
    axis label says so.

    Example:
    ```python
    >>> import tempfile, numpy as np
    >>> from datadiet.report import plot_score_histogram
    >>> scores = {"el2n": np.random.default_rng(0).random(100)}
    >>> path = plot_score_histogram(scores, tempfile.mkdtemp() + "/hist.png")
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
        values = values[np.isfinite(values)]
        scale = histogram_count_scale(values, bins=bins)
        # log=True draws each bar from 1 and puts a count of 1 visibly above an empty bin.
        ax.hist(values, bins=bins, color="#4c72b0", log=scale == "log")
        ax.set_xlabel(name)
        ax.set_ylabel("examples (log scale)" if scale == "log" else "examples")
    return _save(fig, path, title)


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
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 2.1 * rows), squeeze=False)
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
    return _save(fig, path, title)


# ---- pruning curves ---------------------------------------------------------------------------------------------------

_STRATEGY_STYLES = {"hardest": "-", "window": "--", "stratified": ":", "easiest": "-."}


def plot_pruning_curve(
    points: Sequence[dict],
    path: str | Path,
    *,
    title: str | None = None,
    metric: str = "test accuracy",
    unit: str = "%",
    lower_is_better: bool = False,
) -> Path:
    """Write a PNG of test accuracy (or another `metric`) against the fraction of training data kept: one line per
    score × strategy (colour = score, line style = strategy), random subsets in black and the full data as a grey band
    (mean ± std), error bars = std over seeds. `points` are a pruning-curve summary's points (see
    `datadiet.curve.summarize_runs`). With `unit="%"` the means (fractions) are drawn as percentages; any other unit
    (e.g. `"nats"` for a held-out loss) draws them as they are. With a single keep fraction, one row per cell, the
    best at the top (the lowest when `lower_is_better`).

    Example:
    ```python
    >>> import tempfile
    >>> from datadiet.report import plot_pruning_curve
    >>> points = [{"score": "full", "strategy": "full", "keep": 1.0, "mean": 0.9, "std": 0.01},
    ...           {"score": "random", "strategy": "random", "keep": 0.5, "mean": 0.85, "std": 0.01},
    ...           {"score": "el2n", "strategy": "hardest", "keep": 0.5, "mean": 0.86, "std": 0.02}]
    >>> plot_pruning_curve(points, tempfile.mkdtemp() + "/curve.png").name
    'curve.png'

    ```
    """
    plt = _pyplot()
    full = next((p for p in points if p["score"] == "full"), None)
    scale = 100.0 if unit == "%" else 1.0
    label = f"{metric} ({unit})"
    if len({p["keep"] for p in points if p["score"] != "full"}) == 1:
        return _plot_one_fraction(plt, points, full, Path(path), title, unit=unit, label=label, lower=lower_is_better)
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    lines: dict[tuple[str, str], list[dict]] = {}
    for point in points:
        if point["score"] != "full":
            lines.setdefault((point["score"], point["strategy"]), []).append(point)
    scores = sorted({score for score, _ in lines if score != "random"})
    colours = {score: plt.get_cmap("tab10")(i % 10) for i, score in enumerate(scores)}
    for (score, strategy), group in sorted(lines.items()):
        group = sorted(group, key=lambda p: p["keep"])
        keeps = [100 * p["keep"] for p in group]
        means = [scale * p["mean"] for p in group]
        stds = [scale * (p["std"] or 0.0) for p in group]  # no bar for one seed (std None)
        if score == "random":
            style = {"color": "black", "linestyle": "-", "linewidth": 2.2, "marker": "s", "label": "random"}
        else:
            style = {
                "color": colours[score],
                "linestyle": _STRATEGY_STYLES.get(strategy, "-"),
                "marker": "o",
                "label": f"{score} / {strategy}",
            }
        ax.errorbar(keeps, means, yerr=stds, capsize=3, markersize=4, **style)
    if full is not None:
        low, high = scale * (full["mean"] - (full["std"] or 0.0)), scale * (full["mean"] + (full["std"] or 0.0))
        ax.axhspan(low, high, color="grey", alpha=0.25)
        ax.axhline(scale * full["mean"], color="grey", linewidth=1.5, label=f"full data {_value(full, scale, unit)}")
    ax.set_xlabel("training data kept (%)")
    ax.set_ylabel(label + ("; lower is better" if lower_is_better else ""))
    ax.grid(alpha=0.3)
    return _save_figure(plt, fig, ax, Path(path), title, legend_columns=2)


def _save_figure(
    plt, fig, ax, path: Path, title: str | None, *, legend_columns: int = 1, legend_location: str = "lower right"
) -> Path:
    if ax.get_legend_handles_labels()[0]:  # an empty curve (no finished run yet) has nothing to label
        ax.legend(fontsize=7, ncol=legend_columns, loc=legend_location)
    if title:
        ax.set_title(textwrap.fill(title, 90), fontsize=9)  # a long title would run off the figure
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _value(point: dict, scale: float, unit: str) -> str:
    return f"{scale * point['mean']:.1f}%" if unit == "%" else f"{point['mean']:.4f} {unit}"


def _plot_one_fraction(
    plt,
    points: Sequence[dict],
    full: dict | None,
    path: Path,
    title: str | None,
    *,
    unit: str,
    label: str,
    lower: bool,
) -> Path:
    # With a single keep fraction a curve has no x extent (every method stacks on one x): draw one row per
    # score x strategy instead, best at the top, with random (black) and the full data (grey band) as references.
    rows = sorted((p for p in points if p["score"] != "full"), key=lambda p: p["mean"], reverse=lower)
    keep = rows[0]["keep"]
    fig, ax = plt.subplots(figsize=(8.5, 1.6 + 0.42 * len(rows)))
    scale, digits = (100.0, 2) if unit == "%" else (1.0, 4)
    for y, point in enumerate(rows):
        colour = "black" if point["score"] == "random" else "tab:blue"
        ax.errorbar(
            scale * point["mean"],
            y,
            xerr=scale * (point["std"] or 0.0),
            fmt="s" if colour == "black" else "o",
            color=colour,
            capsize=3,
            markersize=5,
        )
        ax.annotate(
            f"{scale * point['mean']:.{digits}f}",
            (scale * point["mean"], y),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=7,
        )
    random = next((p for p in rows if p["score"] == "random"), None)
    if random is not None:
        ax.axvline(scale * random["mean"], color="black", linewidth=1, linestyle="--", label="random")
    if full is not None:
        low, high = scale * (full["mean"] - (full["std"] or 0.0)), scale * (full["mean"] + (full["std"] or 0.0))
        ax.axvspan(low, high, color="grey", alpha=0.25)
        ax.axvline(scale * full["mean"], color="grey", linewidth=1.5, label=f"full data {_value(full, scale, unit)}")
    ax.set_yticks(
        range(len(rows)),
        [f"{p['score']} / {p['strategy']}" if p["score"] != "random" else "random" for p in rows],
        fontsize=8,
    )
    better = "; lower is better" if lower else ""
    ax.set_xlabel(
        textwrap.fill(f"{label}, keeping {100 * keep:g}% of the training data (mean ± std over seeds{better})", 90)
    )
    ax.grid(alpha=0.3, axis="x")
    return _save_figure(plt, fig, ax, path, title, legend_location="best")


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
