"""Checks that each recorded training batch holds the rows its sampler yielded, in that order, and that each batch is
recorded exactly once: what keeps a data collator that reorders examples, or a loss that runs the model twice, from
attaching scores to the wrong rows without a word."""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from .batch_indices import BatchIndexRecorder
from .causal_lm import TokenReference
from .views import RowIdDataset, TransformedView

logger = logging.getLogger(__name__)

__all__ = ["RowCheck", "collator_name", "dataset_labels"]


def collator_name(dataloader) -> str:
    """The name of the data collator a `DataLoader` batches with (its function or class name), looking through the
    Trainer's own column-removing wrapper.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.trainer.row_check import collator_name
    >>> def sort_by_label(features):
    ...     return features
    >>> collator_name(torch.utils.data.DataLoader(range(4), collate_fn=sort_by_label))
    'sort_by_label'

    ```
    """
    collator = getattr(dataloader, "collate_fn", None)
    while hasattr(collator, "data_collator"):  # transformers' RemoveColumnsCollator
        collator = collator.data_collator
    while isinstance(collator, functools.partial):
        collator = collator.func
    if collator is None:
        return "(none)"
    name = getattr(collator, "__qualname__", None) or type(collator).__name__
    return name.replace(".<locals>", "")


def dataset_labels(dataset, label_name: str = "labels") -> tuple[np.ndarray | None, str | None]:
    """The integer labels of every row of a training set, read from its Arrow column without decoding any example
    (a `set_transform` is not run), and the column's name: `label_name`, `label` or `label_ids` (the names the default
    collators turn into `labels`). `(None, None)` when they cannot be read so (not a `datasets.Dataset`, no such
    integer column).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.trainer.row_check import dataset_labels
    >>> dataset = Dataset.from_dict({"image": [b"", b""], "label": [3, 1]}).with_transform(lambda batch: batch)
    >>> labels, column = dataset_labels(dataset)
    >>> labels.tolist(), column
    ([3, 1], 'label')

    ```
    """
    while isinstance(dataset, (RowIdDataset, TransformedView)):
        dataset = dataset.dataset
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return None, None
    for column in dict.fromkeys([label_name, "label", "label_ids"]):
        if column in dataset.column_names:
            values = _arrow_column(dataset, column)
            if values.ndim == 1 and np.issubdtype(values.dtype, np.integer):
                return values.astype(np.int64), column
            return None, None
    return None, None


def _arrow_column(dataset, column: str) -> np.ndarray:
    """One column of a `datasets.Dataset` as stored: no transform runs, no image is decoded. The table is read whole
    and put in the dataset's row order (its indices mapping, after `select` or `shuffle`), much faster than a gather
    through the mapping."""
    indices = getattr(dataset, "_indices", None)
    table = getattr(dataset, "data", None)
    if table is None or (indices is not None and indices.num_columns != 1):
        return np.asarray(dataset.select_columns([column]).with_format("arrow")[:][column])
    values = np.asarray(table.column(column))
    return values if indices is None else values[np.asarray(indices.column(0))]


class RowCheck:
    """Gives the rows of each training batch, checked: their number against the batch's, and their order either
    exactly, from the row ids the batch carries (the `datadiet_row_id` key of [`with_row_ids`], when the collator
    keeps it; the rows are then read from the batch, so a collator may reorder), or else from the labels: the batch's
    labels must be the training set's labels at the sampler's rows, in order. The label check sees only reorderings
    that move a label (rows of equal labels swapped are not seen); it is skipped, with a warning, when the labels
    cannot be read without loading the examples. It also counts the recorded forwards of each micro-batch: exactly
    one, or an error at the first batch that has none or two.

    Args:
        indices ([`BatchIndexRecorder`]): the training loader's sampler record.
        labels (`np.ndarray`, *optional*): every training row's label (see [`dataset_labels`]).
        label_column (`str`, *optional*): the column `labels` comes from (named in errors).
        collator (`str`): the data collator's name (named in errors).
        caller (`str`, *optional*): the `compute_loss` that records batches (DataDietTrainer's); None when a forward
            hook on the model records them.

    Example:
    ```python
    >>> import numpy as np, torch
    >>> from torch.utils.data import BatchSampler, SequentialSampler
    >>> from datadiet.trainer.batch_indices import BatchIndexRecorder
    >>> from datadiet.trainer.row_check import RowCheck
    >>> recorder = BatchIndexRecorder(BatchSampler(SequentialSampler(range(4)), batch_size=2, drop_last=False))
    >>> _ = list(recorder)
    >>> check = RowCheck(recorder, np.array([0, 1, 1, 0]), "label", collator="reverse")
    >>> check.rows(torch.tensor([0, 1])).tolist()
    [0, 1]
    >>> check.end_batch()
    >>> check.rows(torch.tensor([0, 1]))
    Traceback (most recent call last):
    ...
    ValueError: The data collator reverse reorders the examples of a batch (rows [2, 3] have labels [1, 0] in the training set's 'label' column, the batch has [0, 1]), so scores would go to the wrong rows: keep the examples in the order the collator receives them, or train on `with_row_ids(train_dataset)` and keep its 'datadiet_row_id' key in the batch.

    ```
    """

    def __init__(
        self,
        indices: BatchIndexRecorder,
        labels: np.ndarray | None = None,
        label_column: str | None = None,
        *,
        collator: str = "(unknown)",
        caller: str | None = None,
        row_id_column: str = "datadiet_row_id",
        tokens: TokenReference | None = None,
    ):
        self.indices = indices
        self.tokens = tokens
        self.labels = labels
        self.label_column = label_column
        self.collator = collator
        self.caller = caller
        self.row_id_column = row_id_column
        self._forwards = 0
        self._warned = False

    def reset(self) -> None:
        """Forget a micro-batch in progress (a new epoch or training run)."""
        self._forwards = 0

    def rows(self, labels: torch.Tensor, row_ids=None, *, input_ids=None, attention_mask=None) -> torch.Tensor:
        """The training-set positions of the next micro-batch, whose `labels` `[B]` (and, if the batch carries them,
        `row_ids` `[B]`) are given; raises `ValueError` when they cannot be the sampler's rows. A causal LM's batch
        (labels `[B, T]`, with its `input_ids` and `attention_mask`) is checked token by token against the rows'
        tokens (`tokens`, see [`~datadiet.trainer.causal_lm.TokenReference`])."""
        self._forwards += 1
        if self._forwards > 1:
            raise ValueError(self._twice_message())
        if labels.ndim == 2:
            return self._sequence_rows(labels, row_ids, input_ids, attention_mask)
        labels = labels.detach().reshape(-1)
        indices = self.indices.pop(len(labels))
        if row_ids is not None:
            return self._batch_ids(row_ids, indices)
        if self.labels is None:
            self._warn_once(
                "The order of each batch's rows is not checked: the training set's labels cannot be read without "
                f"loading its examples, and the batches carry no {self.row_id_column!r} key. For an exact check, "
                "train on `with_row_ids(train_dataset)` and keep that key in the batch."
            )
            return torch.as_tensor(indices, dtype=torch.long)
        expected = self.labels[indices]
        got = labels.cpu().numpy()  # the Trainer synchronises at every micro-batch anyway (its NaN-loss filter)
        if not np.array_equal(expected, got):
            raise ValueError(self._mismatch_message(indices, expected, got))
        return torch.as_tensor(indices, dtype=torch.long)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(message)

    def _batch_ids(self, row_ids, indices: list[int]) -> torch.Tensor:
        """The row ids a batch carries, which must be the sampler's rows (in any order)."""
        batch_ids = torch.as_tensor(row_ids).detach().reshape(-1).long().cpu()
        if len(batch_ids) != len(indices) or sorted(batch_ids.tolist()) != sorted(indices):
            raise ValueError(
                f"The batch's {self.row_id_column!r} ids {batch_ids.tolist()[:8]} are not the rows its sampler "
                f"yielded {indices[:8]}: the data collator {self.collator} mixed examples of different batches "
                f"or changed the {self.row_id_column!r} key; return one example per row received, with its id."
            )
        return batch_ids

    def _sequence_rows(self, labels, row_ids, input_ids, attention_mask) -> torch.Tensor:
        indices = self.indices.pop(labels.shape[0])
        if row_ids is not None:
            indices = self._batch_ids(row_ids, indices).tolist()
        if self.tokens is None:
            self._warn_once(
                "The tokens of each batch are not checked against its rows: the training set is not a "
                "`datasets.Dataset` with `input_ids` or `labels` token columns."
            )
            return torch.as_tensor(indices, dtype=torch.long)
        mismatch = self.tokens.mismatch(indices, labels=labels, input_ids=input_ids, attention_mask=attention_mask)
        if mismatch is not None:
            raise ValueError(
                f"A training batch's tokens are not those of the rows its sampler yielded ({mismatch}): the data "
                f"collator {self.collator} reorders, truncates or changes examples, so scores cannot be attached to "
                "rows; use a collator that keeps each example's tokens in the order received (TRL's or transformers' "
                "DataCollatorForLanguageModeling)."
            )
        return torch.as_tensor(indices, dtype=torch.long)

    def end_batch(self) -> None:
        """Close a micro-batch: it must have been recorded once (raises `ValueError` if it was not)."""
        forwards, self._forwards = self._forwards, 0
        if forwards == 0:
            raise ValueError(self._missing_message())

    def _mismatch_message(self, indices: list[int], expected: np.ndarray, got: np.ndarray) -> str:
        shown = f"rows {indices[:8]} have labels {expected[:8].tolist()} in the training set's "
        shown += f"{self.label_column!r} column, the batch has {got[:8].tolist()}"
        fix = f"train on `with_row_ids(train_dataset)` and keep its {self.row_id_column!r} key in the batch"
        if np.array_equal(np.sort(expected), np.sort(got)):
            return (
                f"The data collator {self.collator} reorders the examples of a batch ({shown}), so scores would go to "
                f"the wrong rows: keep the examples in the order the collator receives them, or {fix}."
            )
        return (
            f"A training batch's labels are not those of the rows its sampler yielded ({shown}): the data collator "
            f"{self.collator}, the transform or compute_loss replaced examples or changed labels, so scores cannot be "
            f"attached to rows; give the model the examples received, with their labels as stored, or {fix}."
        )

    def _twice_message(self) -> str:
        if self.caller is not None:
            return (
                f"{self.caller} called DataDietTrainer.compute_loss twice on one training batch (an R-Drop-style "
                "loss?), and scores are recorded from one forward per batch: call super().compute_loss(...) once and "
                "run the extra forwards yourself with model(**inputs), or set track_scores=[] (and "
                "dynamic_pruning=False) to train untracked."
            )
        return (
            "The model ran twice in training mode on one training batch (a compute_loss that calls it twice, "
            "R-Drop-style, or a callback running it in training mode), and ScoreCallback records one forward per "
            "batch: run the extra forwards in eval mode, or train with DataDietTrainer (its compute_loss records "
            "once), or drop ScoreCallback."
        )

    def _missing_message(self) -> str:
        if self.caller is not None:
            return (
                f"{self.caller} did not call DataDietTrainer.compute_loss on a training batch (it runs the model "
                "itself?), so no score was recorded for its rows: call super().compute_loss(model, inputs, "
                "return_outputs, num_items_in_batch) once per batch, or set track_scores=[] (and "
                "dynamic_pruning=False) to train untracked."
            )
        return (
            "No training-mode forward of the model ScoreCallback hooked ran on a training batch (compute_loss calls "
            "another module?), so no score was recorded for its rows: call the model the Trainer was given, or "
            "drop ScoreCallback."
        )
