"""Pruning strategies on score columns: keep the hardest or easiest, a window past the very hardest, a seeded random
subset, or a stratified coverage-centric coreset (CCS); any of them per class."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from datasets import Dataset

from ..provenance import record_provenance
from ..validation import check_fraction, check_keep

logger = logging.getLogger(__name__)

__all__ = [
    "budget_from_keep",
    "check_prune_options",
    "hardness",
    "list_strategies",
    "prune",
    "register_strategy",
    "score_columns",
    "select_indices",
    "stratified_split",
]

_STRATEGIES: dict[str, Callable] = {}


def register_strategy(name: str) -> Callable:
    """Register `fn(hardness, budget, rng, **options) -> indices` as the pruning strategy `name`. `hardness` is
    oriented so that higher = harder; `budget` is the number of rows to keep."""

    def decorator(fn: Callable) -> Callable:
        _STRATEGIES[name] = fn
        return fn

    return decorator


def list_strategies() -> list[str]:
    """The names of all pruning strategies, sorted."""
    return sorted(_STRATEGIES)


def _hardest(hardness: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` hardest rows (unordered), ties broken by row position (the earlier row wins), in
    linear time: 1M rows take milliseconds where a full sort takes a tenth of a second."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if count >= len(hardness):
        return np.arange(len(hardness))
    threshold = hardness[np.argpartition(-hardness, count - 1)[count - 1]]
    above = np.flatnonzero(hardness > threshold)
    at = np.flatnonzero(hardness == threshold)[: count - len(above)]
    return np.concatenate([above, at])


@register_strategy("hardest")
def _keep_hardest(hardness: np.ndarray, budget: int, rng: np.random.Generator, **_) -> np.ndarray:
    return _hardest(hardness, budget)


@register_strategy("easiest")
def _keep_easiest(hardness: np.ndarray, budget: int, rng: np.random.Generator, **_) -> np.ndarray:
    # Ties between equally easy rows also go to the earlier row.
    return _hardest(-hardness, budget)


@register_strategy("random")
def _keep_random(hardness: np.ndarray, budget: int, rng: np.random.Generator, **_) -> np.ndarray:
    return rng.permutation(len(hardness))[:budget]


def _without_hardest(hardness: np.ndarray, skip: int) -> np.ndarray:
    mask = np.ones(len(hardness), dtype=bool)
    mask[_hardest(hardness, skip)] = False
    return np.flatnonzero(mask)


@register_strategy("window")
def _keep_window(hardness: np.ndarray, budget: int, rng: np.random.Generator, *, offset: float = 0.0, **_):
    # Skip the `offset` fraction of hardest rows (often mislabelled, Paul et al. 2021 sec. 5) and keep the next ones.
    skip = min(int(round(offset * len(hardness))), len(hardness) - budget)
    rest = _without_hardest(hardness, skip)
    return rest[_hardest(hardness[rest], budget)]


@register_strategy("stratified")
def _keep_stratified(
    hardness: np.ndarray, budget: int, rng: np.random.Generator, *, hard_cutoff: float = 0.0, num_bins: int = 50, **_
) -> np.ndarray:
    """Coverage-centric coreset selection (Zheng et al. 2023, Algorithm 1): drop the `hard_cutoff` fraction of the
    hardest rows, split the remaining score range into `num_bins` equal-width bins, and share the budget across bins
    from the smallest up, sampling at random within each bin."""
    cut = min(int(round(hard_cutoff * len(hardness))), len(hardness) - budget)
    pool = _without_hardest(hardness, cut)
    values = hardness[pool]
    low, high = float(values.min()), float(values.max())
    if high == low:
        return rng.choice(pool, size=budget, replace=False)
    bin_of = np.minimum(((values - low) / (high - low) * num_bins).astype(np.int64), num_bins - 1)
    by_bin = pool[np.argsort(bin_of, kind="stable")]
    sizes = np.bincount(bin_of, minlength=num_bins)
    members = [m for m in np.split(by_bin, np.cumsum(sizes)[:-1]) if len(m)]
    members.sort(key=len)  # stable: equal-sized bins stay in score order
    chosen, remaining = [], budget
    for i, rows in enumerate(members):
        take = min(len(rows), remaining // (len(members) - i))
        chosen.append(rng.choice(rows, size=take, replace=False))
        remaining -= take
    return np.concatenate(chosen)


def score_columns(dataset: Dataset) -> list[str]:
    """The columns of `dataset` that can be pruned by: numeric columns other than the label column (registered scores,
    tracked scores, their `_std` columns, or any float column of your own).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.selection.strategies import score_columns
    >>> score_columns(Dataset.from_dict({"image": ["a"], "label": [0], "el2n": [0.5]}))
    ['el2n']

    ```
    """
    from datasets import ClassLabel, Value

    from ..scores.registry import list_scores
    from ..scores.trackers import TRACKED_SCORES

    known = set(list_scores()) | set(TRACKED_SCORES)
    found = []
    for name, feature in dataset.features.items():
        if isinstance(feature, ClassLabel) or name in ("label", "labels") or not isinstance(feature, Value):
            continue
        base = name[: -len("_std")] if name.endswith("_std") else name
        if feature.dtype.startswith("float") or (base in known and feature.dtype.startswith(("int", "uint"))):
            found.append(name)
    return found


def _check_score_column(dataset: Dataset, by: str) -> None:
    """Refuse a `by` that is not a numeric score column, saying which columns are."""
    from datasets import ClassLabel, Value

    present = score_columns(dataset)
    instead = (
        f"prune by a score column: {', '.join(present)}"
        if present
        else "the dataset has no score column yet: score it first (`datadiet score` or datadiet.score_dataset)"
    )
    if by not in dataset.column_names:
        raise ValueError(f"Column {by!r} is not in the dataset (its columns are {dataset.column_names}): {instead}.")
    feature = dataset.features[by]
    if isinstance(feature, ClassLabel) or by in ("label", "labels"):
        raise ValueError(
            f"Column {by!r} holds the class labels, not a score: {instead} (class_balanced=True keeps the classes' "
            "proportions)."
        )
    if not isinstance(feature, Value) or not feature.dtype.startswith(("float", "int", "uint")):
        kind = type(feature).__name__ if not isinstance(feature, Value) else feature.dtype
        raise ValueError(f"Column {by!r} holds {kind} values, not a numeric score: {instead}.")


def hardness(dataset: Dataset, by: str) -> np.ndarray:
    """The column `by` as float64, oriented so that higher = harder (a registered score whose low values are hard,
    such as `margin`, is negated). The label column and non-numeric columns are refused."""
    from ..data import column_values

    _check_score_column(dataset, by)
    values = np.asarray(column_values(dataset, by), dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"Column {by!r} must hold one number per row, not shape {values.shape[1:]}.")
    if not np.isfinite(values).all():
        rows = np.flatnonzero(~np.isfinite(values))[:5].tolist()
        raise ValueError(f"Column {by!r} has NaN or infinite values at rows {rows}: rescore or drop those rows.")
    if by.endswith("_std"):
        return values
    return values if _higher_is_harder(by) else -values


def _higher_is_harder(name: str) -> bool:
    # Registered scores and the trainer's tracked summaries (AUM, confidence, correctness: low is hard) say how they
    # are oriented; any other column is taken as higher = harder.
    from ..scores.registry import get_score_spec, list_scores
    from ..scores.trackers import TRACKED_SCORES_HIGHER_IS_HARDER

    if name in list_scores():
        return get_score_spec(name).higher_is_harder
    return TRACKED_SCORES_HIGHER_IS_HARDER.get(name, True)


def _unknown_strategy(strategy: str) -> ValueError:
    message = f"Unknown pruning strategy {strategy!r}. Valid strategies: {', '.join(list_strategies())}."
    if strategy.lower().replace("-", "") == "hostcp":
        # HOST-CP learns its subset while training a model, from features rather than a score column.
        message += (
            " HOST-CP selects while it trains, from features: use datadiet.prune_hostcp(dataset, keep, features=...)."
        )
    return ValueError(message)


def budget_from_keep(keep: float | int, num_rows: int) -> int:
    """The number of rows to keep out of `num_rows`: `keep` is a fraction in (0, 1] (rounded, at least one row) or
    an integer row count; anything else raises a `ValueError`.

    Example:
    ```python
    >>> from datadiet.selection.strategies import budget_from_keep
    >>> budget_from_keep(0.25, 10), budget_from_keep(4, 10)
    (2, 4)

    ```
    """
    keep = check_keep(keep)
    if isinstance(keep, int):
        if keep > num_rows:
            raise ValueError(f"keep={keep} rows is more than the dataset's {num_rows} rows: give at most {num_rows}.")
        return keep
    return max(1, int(round(keep * num_rows)))


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Positions of a held-out split with each class in proportion (at least one row of every class that has two or
    more, never all of a class), drawn with `rng`; sorted.

    Example:
    ```python
    >>> import numpy as np
    >>> from datadiet.selection import stratified_split
    >>> stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]), 0.5, np.random.default_rng(0)).size
    5

    ```
    """
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = min(len(rows) - 1, max(1, int(round(fraction * len(rows))))) if len(rows) > 1 else 0
        chosen.append(rng.choice(rows, size=take, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def check_prune_options(
    keep: float | int,
    *,
    strategy: str = "hardest",
    offset: float = 0.0,
    hard_cutoff: float = 0.0,
    num_rows: int | None = None,
) -> float | int:
    """The one validation of `prune`'s options, shared by `prune` and `datadiet prune`: a known strategy, `keep` a
    fraction in (0, 1] or a row count (returned normalised, see `datadiet.validation.check_keep`), `offset` and
    `hard_cutoff` in [0, 1), and a window or stratified cut that leaves room for `keep` (`offset + keep <= 1`, never
    silently moved). With `num_rows`, row counts are checked against the dataset too.

    Example:
    ```python
    >>> from datadiet.selection.strategies import check_prune_options
    >>> check_prune_options(0.5, strategy="window", offset=0.8)
    Traceback (most recent call last):
        ...
    ValueError: window: offset=0.8 skips 80% of the rows, leaving 20%, less than keep=0.5. Lower the offset to at most 0.5, or keep at most 0.2.

    ```
    """
    if strategy not in _STRATEGIES:
        raise _unknown_strategy(strategy)
    keep = check_keep(keep)
    check_fraction("offset", offset)
    check_fraction("hard_cutoff", hard_cutoff)
    skipped = {"window": ("offset", offset), "stratified": ("hard_cutoff", hard_cutoff)}.get(strategy)
    if skipped is None or skipped[1] == 0:
        return keep
    name, skip = skipped
    if isinstance(keep, int):
        if num_rows is None:
            return keep
        if keep > num_rows:
            budget_from_keep(keep, num_rows)  # raises, naming the row count
        fraction = keep / num_rows
    else:
        fraction = keep
    if skip + fraction > 1 + 1e-9:
        raise ValueError(
            f"{strategy}: {name}={skip:g} skips {skip:.0%} of the rows, leaving {1 - skip:.0%}, less than "
            f"keep={keep}. Lower the {name} to at most {1 - fraction:g}, or keep at most {1 - skip:g}."
        )
    return keep


def select_indices(
    hardness_values: np.ndarray,
    keep: float | int,
    *,
    strategy: str = "hardest",
    labels: np.ndarray | None = None,
    seed: int = 0,
    **options,
) -> np.ndarray:
    """Sorted positions of the rows to keep, given hardness values (higher = harder). With `labels`, the strategy
    runs per class with each class's budget in proportion to its size (largest remainders get the leftover rows)."""
    if strategy not in _STRATEGIES:
        raise _unknown_strategy(strategy)
    num_rows = len(hardness_values)
    budget = budget_from_keep(keep, num_rows)
    rng = np.random.default_rng(seed)
    fn = _STRATEGIES[strategy]
    if labels is None:
        return np.sort(fn(hardness_values, budget, rng, **options))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * budget / num_rows
    shares = np.floor(exact).astype(np.int64)
    leftover = budget - shares.sum()
    shares[np.lexsort((classes, -(exact - shares)))[:leftover]] += 1
    kept = []
    for label, share in zip(classes, shares):
        if share == 0:
            continue
        rows = np.flatnonzero(labels == label)
        kept.append(rows[fn(hardness_values[rows], int(share), rng, **options)])
    return np.sort(np.concatenate(kept))


def prune(
    dataset: Dataset,
    by: str | None,
    keep: float | int,
    *,
    strategy: str = "hardest",
    offset: float = 0.0,
    class_balanced: bool = False,
    seed: int = 0,
    label_column: str | None = None,
    hard_cutoff: float = 0.0,
    num_bins: int = 50,
) -> Dataset:
    """Keep a subset of `dataset` chosen by the score column `by`; rows stay in their original order.

    Strategies: `hardest` keeps the hardest rows (highest scores; for scores where low means hard, such as
    `margin`, the lowest), `easiest` the opposite, `random` a seeded random subset (`by` may be None), `window`
    skips the `offset` fraction of hardest rows and keeps the next `keep`, `stratified` is coverage-centric coreset
    selection (CCS, Zheng et al. 2023) with `hard_cutoff` and `num_bins`. Ties are broken by row position.

    Args:
        dataset: a dataset with the score column `by`.
        by: the score column, e.g. `"el2n"`.
        keep: a fraction in (0, 1] or an integer number of rows.
        strategy: one of `datadiet.selection.list_strategies()`.
        offset: for `window`, the fraction of all rows skipped at the hard end.
        class_balanced: apply the strategy per class, each class keeping its share of the budget.
        seed: for the random draws of `random` and `stratified`.
        label_column: the class column for `class_balanced` (detected from the features when not given).
        hard_cutoff / num_bins: for `stratified`.

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet import prune
    >>> ds = Dataset.from_dict({"x": [0, 1, 2, 3], "el2n": [0.1, 0.9, 0.5, 0.7]})
    >>> list(prune(ds, "el2n", keep=0.5)["x"])
    [1, 3]

    ```
    """
    num_rows = len(dataset)
    if num_rows == 0:
        raise ValueError("The dataset is empty: there is nothing to prune.")
    keep = check_prune_options(keep, strategy=strategy, offset=offset, hard_cutoff=hard_cutoff, num_rows=num_rows)
    if by is None:
        if strategy != "random":
            raise ValueError(f"strategy={strategy!r} needs a score column: pass by='el2n' (or another column).")
        values = np.zeros(num_rows)
    else:
        values = hardness(dataset, by)
    labels = None
    if class_balanced:
        from ..data import column_values, detect_label_column

        labels = column_values(dataset, detect_label_column(dataset, label_column))
    indices = select_indices(
        values,
        keep,
        strategy=strategy,
        labels=labels,
        seed=seed,
        offset=offset,
        hard_cutoff=hard_cutoff,
        num_bins=num_bins,
    )
    pruned = dataset.select(indices)
    logger.info("Pruned %d -> %d rows (%s by %s).", num_rows, len(pruned), strategy, by)
    return record_provenance(
        pruned,
        pruning={
            "by": by,
            "keep": keep,
            "strategy": strategy,
            "offset": offset,
            "class_balanced": class_balanced,
            "seed": seed,
            "hard_cutoff": hard_cutoff,
            "num_bins": num_bins,
            "rows_before": num_rows,
            "rows_after": len(pruned),
        },
    )
