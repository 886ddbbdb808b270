"""The checks the command line and the Python API share, so that they can never disagree: keep fractions and row
counts, fractions such as a window's offset, batch sizes, and "did you mean" suggestions for names."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable

__all__ = ["LaunchError", "check_fraction", "check_keep", "check_positive_int", "closest_names"]


class LaunchError(RuntimeError):
    """A process launch that would silently run the wrong number of processes (see `datadiet.engine.process`): the
    `datadiet` command prints its message, which says which launch to use instead, without a traceback."""


def check_keep(keep: float | int) -> float | int:
    """`keep` as `prune` takes it: a fraction in (0, 1] (a float) or a whole number of rows (an int). A float that is
    a whole number above 1 (`--keep 100` on the command line) is that many rows; anything else is refused.

    Example:
    ```python
    >>> from datadiet.validation import check_keep
    >>> check_keep(0.5), check_keep(100.0), check_keep(7)
    (0.5, 100, 7)

    ```
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be a fraction in (0, 1] or a row count, got {keep!r}: e.g. keep=0.5 or keep=100.")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep={keep} rows keeps nothing: give a row count >= 1, or a fraction such as 0.5.")
        return int(keep)
    keep = float(keep)
    if 0.0 < keep <= 1.0:
        return keep
    if keep > 1.0 and keep.is_integer():
        return int(keep)
    whole = max(1, round(keep)) if keep > 1 else None
    instead = f"a fraction such as 0.5, or a whole row count such as {whole}" if whole else "a fraction such as 0.5"
    raise ValueError(f"keep={keep} is outside (0, 1] and not a whole row count: give {instead}.")


def check_fraction(name: str, value: float, *, low: float = 0.0, high: float = 1.0, include_high: bool = False):
    """Refuse `value` outside `[low, high)` (or `[low, high]` with `include_high`), naming the argument."""
    inside = low <= value <= high if include_high else low <= value < high
    if not inside:
        interval = f"[{low:g}, {high:g}{']' if include_high else ')'}"
        raise ValueError(f"{name}={value} is outside {interval}: give a fraction such as 0.1.")


def check_positive_int(name: str, value: int) -> int:
    """Refuse a count (a batch size, a number of steps) below 1, naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}: e.g. {name}=64.")
    return int(value)


def closest_names(name: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The candidates closest to a misspelt `name` (difflib), best first; compared case-insensitively.

    Example:
    ```python
    >>> from datadiet.validation import closest_names
    >>> closest_names("sklearn-digit", ["sklearn-digits", "mnist"])
    ['sklearn-digits']

    ```
    """
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=cutoff)
    return [by_lower[match] for match in matches]
