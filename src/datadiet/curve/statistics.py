"""Paired comparisons of curve runs: sample std, paired t-intervals, and verdict words that follow from them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["MIN_PAIRS", "equivalent", "no_verdict_reason", "paired_interval", "sample_std", "verdict_against"]

# Fewer paired seeds than this give no verdict: with two, one unlucky pair decides, and the t-interval of two
# differences reaches 9 of their standard deviations either side (and, with equal differences, has zero width: a
# false certainty).
MIN_PAIRS = 3


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1); NaN for fewer than two values.

    Example:
    ```python
    >>> from datadiet.curve.statistics import sample_std
    >>> round(sample_std([1.0, 2.0, 3.0]), 6)
    1.0

    ```
    """
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of the paired differences `a - b` with its two-sided Student-t interval at `confidence`.

    Returns `{"mean", "std" (sample std of the differences), "n", "low", "high"}`; with one pair the interval is
    unbounded (`-inf`, `inf`): one seed says nothing about the spread.

    Example:
    ```python
    >>> from datadiet.curve.statistics import paired_interval
    >>> interval = paired_interval([0.84, 0.85, 0.83], [0.83, 0.83, 0.82])
    >>> round(interval["mean"], 4), round(interval["low"], 4), round(interval["high"], 4)
    (0.0133, -0.001, 0.0277)

    ```
    """
    from scipy import stats

    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(differences)
    if n == 0:
        raise ValueError("paired_interval needs at least one pair of runs.")
    mean = float(differences.mean())
    if n < 2:
        return {"mean": mean, "std": math.nan, "n": n, "low": -math.inf, "high": math.inf}
    std = float(differences.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "low": mean - half, "high": mean + half}


def no_verdict_reason(interval: dict[str, float]) -> str | None:
    """Why a paired interval supports no verdict, or `None` when it does: fewer than `MIN_PAIRS` pairs ("too few
    seeds to say"), or paired differences that are all equal (a zero-width interval says nothing about the spread).

    Example:
    ```python
    >>> from datadiet.curve.statistics import no_verdict_reason, paired_interval
    >>> no_verdict_reason(paired_interval([0.9, 0.8], [0.8, 0.7]))
    'too few seeds to say (n=2; a verdict needs at least 3)'
    >>> no_verdict_reason(paired_interval([0.9, 0.8, 0.7], [0.8, 0.7, 0.6]))
    'no spread to judge by (every seed differs by the same amount: identical runs?)'

    ```
    """
    if interval["n"] < MIN_PAIRS:
        return f"too few seeds to say (n={interval['n']}; a verdict needs at least {MIN_PAIRS})"
    if not interval["std"] > 1e-12:
        return "no spread to judge by (every seed differs by the same amount: identical runs?)"
    return None


def verdict_against(interval: dict[str, float], name: str, *, lower_is_better: bool = False) -> str:
    """'beats {name}' when the paired interval lies above 0, 'loses to {name}' when below, else 'shows no clear
    difference from {name}'; with too few seeds or zero spread (see `no_verdict_reason`), no verdict. For a metric
    where lower is better (a loss), `lower_is_better=True`: then an interval below 0 beats and one above 0 loses.

    Example:
    ```python
    >>> from datadiet.curve.statistics import paired_interval, verdict_against
    >>> verdict_against(paired_interval([0.84, 0.85, 0.84], [0.82, 0.82, 0.82]), "random")
    'beats random'
    >>> verdict_against(paired_interval([0.9, 0.9], [0.8, 0.8]), "random")
    'gives no verdict against random: too few seeds to say (n=2; a verdict needs at least 3)'
    >>> verdict_against(paired_interval([1.80, 1.79, 1.81], [1.85, 1.86, 1.85]), "random", lower_is_better=True)
    'beats random'

    ```
    """
    reason = no_verdict_reason(interval)
    if reason is not None:
        return f"gives no verdict against {name}: {reason}"
    above, below = interval["low"] > 0, interval["high"] < 0
    if above or below:
        return f"beats {name}" if above != lower_is_better else f"loses to {name}"
    return f"shows no clear difference from {name}"


def equivalent(a: Sequence[float], b: Sequence[float], margin: float, alpha: float = 0.05) -> bool:
    """Two one-sided tests (TOST) at level `alpha`: is the paired mean difference `a - b` shown to lie within
    (-margin, +margin)? Equivalent to the (1 - 2 alpha) paired t-interval lying inside the margin.

    Example:
    ```python
    >>> from datadiet.curve.statistics import equivalent
    >>> equivalent([0.840, 0.845, 0.838, 0.842], [0.841, 0.844, 0.839, 0.842], margin=0.005)
    True

    ```
    """
    interval = paired_interval(a, b, confidence=1 - 2 * alpha)
    if no_verdict_reason(interval) is not None:
        return False
    return -margin < interval["low"] and interval["high"] < margin
