"""The checks the command line and the Python API share, so that they can never disagree: keep fractions and row
counts, fractions such as a window's offset, batch sizes, "did you mean" suggestions for names, and whether the Hub
answers at all (one line within seconds instead of half a minute of retries)."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable

__all__ = [
    "HubUnreachableError",
    "LaunchError",
    "check_fraction",
    "check_hub_reachable",
    "check_keep",
    "check_positive_int",
    "closest_names",
    "is_network_error",
]


class LaunchError(RuntimeError):
    """A process launch that would silently run the wrong number of processes (see `datadiet.engine.process`): the
    `datadiet` command prints its message, which says which launch to use instead, without a traceback."""


class HubUnreachableError(ConnectionError):
    """The Hugging Face Hub (the `HF_ENDPOINT`) did not answer: the `datadiet` command prints the one-line message,
    which says what to do instead, without a traceback."""


# Exception classes (by name, anywhere in an exception's class hierarchy) that mean the network failed, from httpx,
# requests, urllib3 and the standard library, so that no networking library needs importing to recognise them.
_NETWORK_ERROR_NAMES = {
    "ConnectionError",
    "TimeoutError",
    "TransportError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "TimeoutException",
    "NewConnectionError",
    "MaxRetryError",
    "NetworkError",
}


def is_network_error(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from, is a failed connection or a timeout.

    Example:
    ```python
    >>> from datadiet.validation import is_network_error
    >>> is_network_error(ConnectionRefusedError(111, "Connection refused")), is_network_error(ValueError("x"))
    (True, False)

    ```
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(cls.__name__ in _NETWORK_ERROR_NAMES for cls in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


def check_hub_reachable(instead: str, *, timeout: float = 5.0) -> None:
    """Raise `HubUnreachableError` at once when the Hub endpoint (`HF_ENDPOINT`, by default https://huggingface.co)
    does not answer one request within `timeout` seconds, rather than letting `huggingface_hub` retry a refused
    connection for half a minute. `instead` says what the user can do without the Hub. Any HTTP answer counts as
    reachable; offline mode (`HF_HUB_OFFLINE`) is left to the caller."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout, follow_redirects=False)
    except Exception as error:
        if not is_network_error(error):
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubUnreachableError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}): check the network or HF_ENDPOINT, "
            f"or {instead}"
        ) from None


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
    """The candidates closest to a misspelt `name` (difflib), best first; compared case-insensitively. Only those
    nearly as close as the best are kept (a suggestion far behind it is noise).

    Example:
    ```python
    >>> from datadiet.validation import closest_names
    >>> closest_names("sklearn-digit", ["sklearn-digits", "mnist"])
    ['sklearn-digits']
    >>> closest_names("learning_rat", ["learning_rate", "dynamic_pruning_ratio", "lr_scheduler_type"])
    ['learning_rate']

    ```
    """
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=cutoff)
    similarity = [difflib.SequenceMatcher(None, name.lower(), match).ratio() for match in matches]
    return [by_lower[match] for match, value in zip(matches, similarity) if value >= similarity[0] - 0.15]
