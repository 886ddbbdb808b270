"""Training dynamics: per-example quantities recorded at every epoch of training, and the scores derived from their
histories (forgetting events, area under the margin, data-map confidence / variability / correctness). Pure PyTorch
and NumPy.

A history is a `[num_rows, num_epochs]` array holding one value per example and epoch, with NaN where the example was
not seen that epoch (dynamic pruning skipped it, or training stopped early)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .causal_lm import per_example_mean
from .functional import el2n, loss, margin

__all__ = [
    "TRACKED_QUANTITIES",
    "TRACKED_SCORES",
    "TRACKED_SCORES_HIGHER_IS_HARDER",
    "TrainingDynamics",
    "area_under_margin",
    "confidence",
    "correctness",
    "fill_unseen",
    "forgetting_events",
    "sequence_training_quantities",
    "training_quantities",
    "variability",
]

# What is recorded for each example at each epoch, from the logits of its training forward pass.
TRACKED_QUANTITIES = ("loss", "el2n", "margin", "probability", "correct")


def training_quantities(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-example quantities tracked during training, from one batch of logits: cross-entropy `loss`, `el2n`,
    `margin` (true-class logit minus the largest other), `probability` of the true class and `correct` (1.0 when the
    arg-max prediction is the label). Each has shape `[B]`, float32, on the logits' device.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores import training_quantities
    >>> q = training_quantities(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> q["correct"]
    tensor([1., 0.])

    ```
    """
    logits = logits.detach().float()
    labels = labels.detach().long()
    probability = logits.softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)
    return {
        "loss": loss(logits, labels),
        "el2n": el2n(logits, labels),
        "margin": margin(logits, labels),
        "probability": probability,
        "correct": (logits.argmax(dim=-1) == labels).float(),
    }


def sequence_training_quantities(
    nll: torch.Tensor,
    mask: torch.Tensor,
    correct: torch.Tensor | None = None,
    *,
    el2n: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The tracked quantities of a sequence model's rows (a causal LM's, over its trained tokens), from per-token
    values `[B, T]` meaningful where `mask` is True: `loss` the mean token NLL (the row's own loss as transformers and
    TRL compute it), `probability` the mean probability of the target tokens (data-map confidence for sequences),
    `correct` 1.0 when at least half of the row's target tokens are the arg-max prediction (its token accuracy, TRL's
    `mean_token_accuracy` for the row alone, is >= 0.5: forgetting events count a row falling below that), and the
    mean token `el2n` and `margin`. A quantity whose per-token values are not given (TRL's fused LM head builds no
    logits, so no EL2N or margin) is NaN. Each has shape `[B]`, float32.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.trackers import sequence_training_quantities
    >>> nll = torch.tensor([[0.0, 2.0, 0.5], [1.0, 1.0, 9.0]])
    >>> mask = torch.tensor([[False, True, True], [True, True, False]])
    >>> q = sequence_training_quantities(nll, mask, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    >>> q["loss"].tolist(), q["correct"].tolist(), q["el2n"].isnan().tolist()
    ([1.25, 1.0], [1.0, 0.0], [True, True])

    ```
    """
    nll = nll.detach().float()
    mask = mask.to(nll.device)
    missing = torch.full((nll.shape[0],), float("nan"), device=nll.device)

    def mean(values):
        return missing if values is None else per_example_mean(values.detach().float(), mask)

    accuracy = mean(correct)
    return {
        "loss": per_example_mean(nll, mask),
        "el2n": mean(el2n),
        "margin": mean(margin),
        "probability": per_example_mean(torch.exp(-nll), mask),
        # NaN accuracy (not given) stays NaN rather than counting as "not learned".
        "correct": torch.where(accuracy.isnan(), accuracy, (accuracy >= 0.5).float()),
    }


def _as_history(history) -> np.ndarray:
    array = np.asarray(history, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"A history must have shape [num_rows, num_epochs]; got shape {array.shape}.")
    return array


def _nan_reduce(fn, history: np.ndarray) -> np.ndarray:
    # Rows never seen give NaN (not a warning): they have no value, and callers can see that.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(history, axis=1)


def forgetting_events(correct_history, *, never_learned: float | None = None) -> np.ndarray:
    """Number of forgetting events per example (Toneva et al. 2019, sec. 3): transitions from correctly to
    incorrectly classified between two consecutive presentations of the example during training.

    Args:
        correct_history: `[num_rows, num_epochs]`, 1 where the example was classified correctly at that presentation,
            0 where not, NaN where it was not presented (skipped epochs are stepped over, not counted as errors).
        never_learned: the value given to examples never classified correctly at any presentation. Toneva et al.
            rank them as the most forgotten ("infinitely many forgetting events"); the default is the number of
            epochs of the history, finite so that the column can be averaged over seeds, and larger than any
            example that was learned can reach (at most `num_epochs // 2` events).

    Returns:
        `np.ndarray` of shape `[num_rows]` (float64; NaN for rows never presented).

    Example:
    ```python
    >>> from datadiet.scores import forgetting_events
    >>> forgetting_events([[0, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).tolist()
    [2.0, 0.0, 5.0]

    ```
    """
    history = _as_history(correct_history)
    num_rows, num_epochs = history.shape
    if never_learned is None:
        never_learned = float(num_epochs)
    events = np.zeros(num_rows)
    learned = np.zeros(num_rows, dtype=bool)
    seen = np.zeros(num_rows, dtype=bool)
    previous = np.full(num_rows, np.nan)
    for epoch in range(num_epochs):
        current = history[:, epoch]
        present = ~np.isnan(current)
        # Compare with the previous *presentation*: NaN entries leave `previous` untouched.
        events += present & (previous == 1) & (current == 0)
        learned |= present & (current == 1)
        seen |= present
        previous = np.where(present, current, previous)
    events[seen & ~learned] = never_learned
    events[~seen] = np.nan
    return events


def area_under_margin(margin_history) -> np.ndarray:
    """Area under the margin (AUM, Pleiss et al. 2020, eq. 2): the mean over epochs of the margin (true-class logit
    minus the largest other logit). Low or negative marks hard or mislabelled examples. Shape `[num_rows]`.

    Example:
    ```python
    >>> import numpy as np
    >>> from datadiet.scores import area_under_margin
    >>> area_under_margin([[1.0, 3.0], [-2.0, np.nan]]).tolist()
    [2.0, -2.0]

    ```
    """
    return _nan_reduce(np.nanmean, _as_history(margin_history))


def confidence(probability_history) -> np.ndarray:
    """Data-map confidence (Swayamdipta et al. 2020, eq. 1): the mean over epochs of the probability the model gives
    the true class. Low = hard to learn. Shape `[num_rows]`.

    Example:
    ```python
    >>> from datadiet.scores import confidence
    >>> confidence([[0.2, 0.4], [0.9, 0.9]]).round(3).tolist()
    [0.3, 0.9]

    ```
    """
    return _nan_reduce(np.nanmean, _as_history(probability_history))


def variability(probability_history) -> np.ndarray:
    """Data-map variability (Swayamdipta et al. 2020, eq. 2): the standard deviation over epochs of the probability
    of the true class (population form, as in the authors' code). High = ambiguous. Shape `[num_rows]`.

    Example:
    ```python
    >>> from datadiet.scores import variability
    >>> variability([[0.2, 0.4], [0.9, 0.9]]).round(3).tolist()
    [0.1, 0.0]

    ```
    """
    return _nan_reduce(np.nanstd, _as_history(probability_history))


def correctness(correct_history) -> np.ndarray:
    """Data-map correctness (Swayamdipta et al. 2020, sec. 2): the fraction of epochs at which the example was
    classified correctly. Shape `[num_rows]`.

    Example:
    ```python
    >>> from datadiet.scores import correctness
    >>> correctness([[1, 0, 1, 1]]).tolist()
    [0.75]

    ```
    """
    return _nan_reduce(np.nanmean, _as_history(correct_history))


def _last_observed(history: np.ndarray) -> np.ndarray:
    """The value at the last epoch each row was seen (NaN for rows never seen; all NaN for an empty history)."""
    if history.shape[1] == 0:
        return np.full(history.shape[0], np.nan)
    present = ~np.isnan(history)
    last = history.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)
    values = history[np.arange(history.shape[0]), last]
    values[~present.any(axis=1)] = np.nan
    return values


def fill_unseen(values) -> np.ndarray:
    """`values` with the NaN of rows never presented (a fraction of an epoch, a dropped last batch) replaced by the
    median of the others, so that every row has a score to rank by.

    Example:
    ```python
    >>> from datadiet.scores.trackers import fill_unseen
    >>> fill_unseen([0.0, float("nan"), 2.0, 1.0]).tolist()
    [0.0, 1.0, 2.0, 1.0]

    ```
    """
    values = np.asarray(values, dtype=np.float64)
    if not np.isnan(values).any():
        return values
    return np.where(np.isnan(values), np.nanmedian(values), values)


# The summary scores a `TrainingDynamics` can produce: name -> (function of the histories, higher_is_harder).
_SUMMARIES = {
    "loss": (lambda h: _last_observed(h["loss"]), True),
    "el2n": (lambda h: _last_observed(h["el2n"]), True),
    "margin": (lambda h: _last_observed(h["margin"]), False),
    "forgetting": (lambda h: forgetting_events(h["correct"]), True),
    "aum": (lambda h: area_under_margin(h["margin"]), False),
    "confidence": (lambda h: confidence(h["probability"]), False),
    "variability": (lambda h: variability(h["probability"]), True),
    "correctness": (lambda h: correctness(h["correct"]), False),
}
TRACKED_SCORES = tuple(_SUMMARIES)
# Whether a higher value of each summary score marks a harder / more important example (pruning orients by it).
TRACKED_SCORES_HIGHER_IS_HARDER = {name: harder for name, (_, harder) in _SUMMARIES.items()}


class TrainingDynamics:
    """Per-example, per-epoch histories of the `TRACKED_QUANTITIES`, filled one epoch at a time, and the summary
    scores computed from them.

    Args:
        num_rows: the number of examples; row ids are their positions `0 .. num_rows - 1`.

    Example:
    ```python
    >>> from datadiet.scores import TrainingDynamics
    >>> dynamics = TrainingDynamics(num_rows=2)
    >>> dynamics.add_epoch([1, 0], {"correct": [1.0, 0.0], "margin": [2.0, -1.0]})  # rows 1 and 0, in that order
    >>> dynamics.add_epoch([0, 1], {"correct": [1.0, 0.0], "margin": [3.0, -2.0]})
    >>> {name: values.tolist() for name, values in dynamics.summary(["aum", "forgetting"]).items()}
    {'aum': [1.0, 0.0], 'forgetting': [0.0, 1.0]}

    ```
    """

    def __init__(self, num_rows: int):
        if num_rows < 0:
            raise ValueError(f"num_rows must be >= 0, got {num_rows}.")
        self.num_rows = int(num_rows)
        self._epochs: dict[str, list[np.ndarray]] = {name: [] for name in TRACKED_QUANTITIES}

    @property
    def num_epochs(self) -> int:
        return max(len(columns) for columns in self._epochs.values())

    def add_epoch(self, row_ids: Iterable[int], values: Mapping[str, Iterable[float]]) -> None:
        """Append one epoch: `values[name][i]` is the value of quantity `name` for row `row_ids[i]`. A row id seen
        twice in the epoch (the wrap-around padding a distributed sampler adds) keeps its first value; rows absent
        get NaN."""
        row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        unknown = set(values) - set(TRACKED_QUANTITIES)
        if unknown:
            raise ValueError(f"Unknown quantities {sorted(unknown)}; tracked quantities are {TRACKED_QUANTITIES}.")
        if row_ids.size and (row_ids.min() < 0 or row_ids.max() >= self.num_rows):
            raise ValueError(
                f"Row ids must lie in [0, {self.num_rows}); got ids from {row_ids.min()} to {row_ids.max()}. "
                "The row-id column must hold each example's position in the training dataset."
            )
        unique_ids, first = np.unique(row_ids, return_index=True)
        epoch = self.num_epochs
        for name in TRACKED_QUANTITIES:
            column = np.full(self.num_rows, np.nan, dtype=np.float32)
            if name in values:
                given = np.asarray(values[name], dtype=np.float32).reshape(-1)
                if given.shape[0] != row_ids.shape[0]:
                    raise ValueError(f"{name!r} has {given.shape[0]} values for {row_ids.shape[0]} row ids.")
                column[unique_ids] = given[first]
            columns = self._epochs[name]
            # Quantities not given this epoch stay NaN, keeping every history the same length.
            while len(columns) < epoch:
                columns.append(np.full(self.num_rows, np.nan, dtype=np.float32))
            columns.append(column)

    def history(self, name: str) -> np.ndarray:
        """The `[num_rows, num_epochs]` history of quantity `name` (float32, NaN where not seen)."""
        if name not in self._epochs:
            raise ValueError(f"Unknown quantity {name!r}; tracked quantities are {TRACKED_QUANTITIES}.")
        columns = self._epochs[name]
        if not columns:
            return np.zeros((self.num_rows, 0), dtype=np.float32)
        return np.stack(columns, axis=1)

    def latest(self, name: str) -> np.ndarray:
        """The value of quantity `name` at the last epoch each row was seen (NaN for rows never seen)."""
        return _last_observed(self.history(name).astype(np.float64))

    def summary(self, names: Iterable[str] = TRACKED_SCORES) -> dict[str, np.ndarray]:
        """Summary scores over the epochs recorded so far, `[num_rows]` float64 each: `loss`, `el2n`, `margin` at the
        last epoch the row was seen; `forgetting` (`forgetting_events`), `aum` (`area_under_margin`), `confidence`,
        `variability` and `correctness`."""
        names = list(names)
        unknown = [name for name in names if name not in _SUMMARIES]
        if unknown:
            raise ValueError(f"Unknown tracked scores {unknown}; valid names are {list(TRACKED_SCORES)}.")
        if self.num_epochs == 0:
            raise ValueError(
                "No epoch of training dynamics was recorded, so there are no scores: train at least one epoch with "
                "the scores tracked (no training batch was recorded)."
            )
        histories = {name: self.history(name).astype(np.float64) for name in TRACKED_QUANTITIES}
        return {name: _SUMMARIES[name][0](histories) for name in names}
