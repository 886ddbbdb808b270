"""Training-dynamics scores in `score_dataset` (`forgetting`, `aum`, data-map `confidence` / `variability` /
`correctness`): taken from the proxy models' own training, as the pruning curve takes forgetting from its proxies,
rather than from an eval-mode pass over a finished model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..scores import list_scores, validate_methods
from ..scores.trackers import TRACKED_SCORES, fill_unseen
from ..validation import closest_names

__all__ = ["TRAINING_DYNAMICS", "ScoringMethods", "dynamics_of", "split_methods"]

# Scores only a training run gives (from the training forward passes of every epoch); the others (`loss`, `el2n`,
# `margin`, `grand`, ...) are taken in eval mode from the model once it is trained.
TRAINING_DYNAMICS = tuple(name for name in TRACKED_SCORES if name not in list_scores())


class ScoringMethods(NamedTuple):
    """Methods checked by `split_methods`: the eval-mode scores and the training-dynamics scores, in the order given.
    `plan_scoring` takes them as they are (the command checks its `--methods` once, before any data is read)."""

    evaluated: list[str]
    dynamics: list[str]


def split_methods(
    methods: Sequence[str] | str, train_epochs: float, *, trains: bool = True, task: str | None = None
) -> ScoringMethods:
    """`methods` checked and split into (eval-mode scores, training-dynamics scores); a training-dynamics score needs
    proxies that train (`train_epochs` >= 1 and `trains`: models built by `model_init`, not given already trained).

    Example:
    ```python
    >>> from datadiet.engine.dynamics import split_methods
    >>> split_methods(["el2n", "forgetting"], train_epochs=2)
    ScoringMethods(evaluated=['el2n'], dynamics=['forgetting'])

    ```
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    dynamics = [] if task == "causal_lm" else [name for name in methods if name in TRAINING_DYNAMICS]
    evaluated = [name for name in methods if name not in dynamics]
    _check_names(evaluated, task)
    if evaluated or not dynamics:
        validate_methods(evaluated, task)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods} names a score more than once.")
    if dynamics and (train_epochs < 1 or not trains):
        raise ValueError(
            f"{dynamics} come from the proxy models' training (at least one epoch): pass train_epochs >= 1 (e.g. "
            "--train_epochs 1) and no model_weights."
        )
    return ScoringMethods(evaluated, dynamics)


def _check_names(methods: list[str], task: str | None) -> None:
    """One line for a method that is not a score of `task`: the closest valid name and all of them."""
    if "less" in methods:
        raise ValueError(
            "less scores instruction rows from warm-up checkpoints and target rows: use datadiet.tracin.less.LESS(...)"
            ".with_scores(dataset, targets), or `datadiet score --task causal_lm --methods less --target_dataset ... "
            "--less_checkpoints ...`."
        )
    valid = list_scores(task) + ([] if task == "causal_lm" else list(TRAINING_DYNAMICS))
    for method in methods:
        if method not in valid:
            close = closest_names(str(method), valid)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            which = f" for task {task!r}" if task else ""
            raise ValueError(f"Unknown score method {method!r}{which}{hint}. Valid methods: {', '.join(valid)}.")


def dynamics_of(tracked: Mapping | None, names: Sequence[str], cache: Path | None) -> dict[str, np.ndarray]:
    """The training-dynamics scores `names` of the rows a proxy trained on (`tracked`, what its training returned:
    `{score: per-row values}`), rows never presented (a fraction of an epoch) given the median, as the curve does;
    cached at `cache` (an `.npz`) so that a resumed run whose proxy weights are loaded from disk has them too. With
    `tracked=None`, read from `cache`."""
    if tracked is None:
        if cache is None or not cache.exists():
            raise ValueError(
                f"The proxy weights of an earlier run were found but not its training-dynamics scores {list(names)} "
                f"({cache}): delete that run's folder to train the proxies again."
            )
        with np.load(cache) as stored:
            return {name: stored[name] for name in names}
    values = {name: fill_unseen(np.asarray(tracked[name], dtype=np.float64)) for name in names}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **values)
    return values
