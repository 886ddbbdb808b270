"""Causal-LM training under [`ScoreCallback`] and [`DataDietTrainer`]: whether a model is tracked as a causal LM,
TRL's packed and padding-free batches refused, the rows of `SFTTrainer`'s prepared dataset mapped back to the user's
rows, each batch's tokens checked against the rows it claims, and per-row quantities from the training forward (its
logits, or the per-token log-probabilities of TRL's fused LM head)."""

from __future__ import annotations

import logging

import numpy as np

from ..models import is_causal_lm
from ..tasks.causal_lm import CausalLMTask
from ..tasks.classification import ClassificationTask
from .views import RowIdDataset, TransformedView

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "TokenReference",
    "check_rows_separable",
    "resolve_task",
    "source_rows",
    "task_class",
]

# What `task=` accepts: a causal LM (per-row means over the trained tokens) or a classifier (one label per row); the
# classification tasks' registry names are accepted too.
TASKS = ("causal_lm", "classification", "image_classification", "text_classification")
# The tracked quantities a fused LM head does not give (it builds no logits), and the scores made from them.
NEEDS_LOGITS = {"el2n": "el2n", "margin": "margin", "aum": "margin"}


def resolve_task(task: str | None, model) -> str:
    """`"causal_lm"` or `"classification"`: `task` when given, else from the model's class (see
    [`~datadiet.models.is_causal_lm`]).

    Example:
    ```python
    >>> import torch
    >>> from datadiet.trainer.causal_lm import resolve_task
    >>> resolve_task(None, torch.nn.Linear(2, 2)), resolve_task("causal_lm", torch.nn.Linear(2, 2))
    ('classification', 'causal_lm')

    ```
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: choose among {list(TASKS)}, or None to detect it from the model.")
    if task is None:
        return "causal_lm" if model is not None and is_causal_lm(model) else "classification"
    return "causal_lm" if task == "causal_lm" else "classification"


def _base_dataset(dataset):
    while isinstance(dataset, (RowIdDataset, TransformedView)):
        dataset = dataset.dataset
    return dataset


def _column_names(dataset) -> list[str]:
    return list(getattr(_base_dataset(dataset), "column_names", None) or [])


def check_rows_separable(args, dataset) -> None:
    """Refuses training batches whose rows cannot be told apart: TRL's `packing=True` (several rows concatenated into
    one sequence) and `padding_free=True` (a batch flattened into one row).

    Example:
    ```python
    >>> from types import SimpleNamespace
    >>> from datadiet.trainer.causal_lm import check_rows_separable
    >>> check_rows_separable(SimpleNamespace(packing=True), None)
    Traceback (most recent call last):
    ...
    ValueError: SFTConfig(packing=True) merges rows into packed sequences, so per-row scores cannot be told apart: set packing=False while scoring (pack when training on the pruned rows).

    ```
    """
    if getattr(args, "packing", False) or "seq_lengths" in _column_names(dataset):
        raise ValueError(
            "SFTConfig(packing=True) merges rows into packed sequences, so per-row scores cannot be told apart: set "
            "packing=False while scoring (pack when training on the pruned rows)."
        )
    if getattr(args, "padding_free", False):
        raise ValueError(
            "SFTConfig(padding_free=True) flattens each batch into one sequence, so per-row scores cannot be told "
            "apart: set padding_free=False while scoring."
        )


def _is_sft_config(args) -> bool:
    return hasattr(args, "packing") and hasattr(args, "dataset_text_field") and hasattr(args, "max_length")


def source_rows(dataset, args) -> tuple[np.ndarray | None, int]:
    """The row of the user's dataset each row of the training set comes from (`None`: the same position) and the
    number of the user's rows.

    A `trl.SFTTrainer` trains on its own tokenised copy of the user's dataset: with `max_length` set it truncates the
    rows and drops those left with no trained token (a `filter`, which gives the copy an indices mapping over the
    table of all the user's rows, in their order), and with `shuffle_dataset=True` it shuffles them. The mapping is
    read from there, so that scores go to the user's rows; rows dropped get none. Without `max_length` no row is
    dropped and the copy is in the user's order (refused when shuffled: the order cannot be known). Any other training
    set is the user's own: positions are rows.

    Example:
    ```python
    >>> from types import SimpleNamespace
    >>> from datasets import Dataset
    >>> from datadiet.trainer.causal_lm import source_rows
    >>> prepared = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5]]}).filter(lambda row: len(row["input_ids"]) > 1)
    >>> args = SimpleNamespace(packing=False, dataset_text_field="text", max_length=8, dataset_kwargs=None)
    >>> rows, num_rows = source_rows(prepared, args)
    >>> rows.tolist(), num_rows
    ([0, 2], 3)

    ```
    """
    skipped = (getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset", False)
    base = _base_dataset(dataset)
    if not _is_sft_config(args) or skipped or not hasattr(base, "_indices") or not hasattr(base, "data"):
        return None, len(dataset)
    indices = base._indices
    if args.max_length is not None:
        num_rows = base.data.num_rows
        rows = np.arange(len(base)) if indices is None else np.asarray(indices.column(0)).astype(np.int64)
        dropped = num_rows - len(np.unique(rows))
        if dropped:
            missing = np.setdiff1d(np.arange(num_rows), rows)
            logger.warning(
                "SFTTrainer dropped %d of the %d rows (no trained token left after truncation to max_length=%d), "
                "e.g. rows %s: they are not trained on and get no score (NaN); filter them out or raise max_length "
                "before pruning.",
                dropped,
                num_rows,
                args.max_length,
                missing[:8].tolist(),
            )
        return rows, num_rows
    if indices is not None and getattr(args, "shuffle_dataset", False):
        raise ValueError(
            "SFTConfig(shuffle_dataset=True) with max_length=None shuffles the training rows in a way that cannot be "
            "traced back to your dataset's rows: set shuffle_dataset=False (the Trainer's sampler shuffles anyway)."
        )
    return None, len(dataset)


class TokenReference:
    """Every training row's tokens, read once from the training set's Arrow column (`labels`, else `input_ids`),
    against which each batch is checked: the tokens of batch row b (where its `attention_mask` is 1) must be those of
    the training row the sampler says it holds. This is what keeps a collator that reorders, truncates or mixes
    examples from giving a causal LM's scores to the wrong rows.

    Example:
    ```python
    >>> import torch
    >>> from datasets import Dataset
    >>> from datadiet.trainer.causal_lm import TokenReference
    >>> reference = TokenReference.from_dataset(Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]]}))
    >>> batch = torch.tensor([[8, 9, 0], [5, 6, 7]])
    >>> reference.mismatch([1, 0], input_ids=batch, attention_mask=(batch > 0).long()) is None
    True
    >>> reference.mismatch([0, 1], input_ids=batch, attention_mask=(batch > 0).long())
    'training row 0 has 3 tokens in its input_ids column starting [5, 6, 7], batch row 0 has 2 starting [8, 9]'

    ```
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray, table_rows: np.ndarray | None, column: str):
        self.values = values
        self.offsets = offsets
        self.table_rows = table_rows
        self.column = column

    @classmethod
    def from_dataset(cls, dataset) -> TokenReference | None:
        """The reference of a `datasets.Dataset` with a `labels` or `input_ids` column of token lists; `None` for any
        other training set (its batches are then not checked)."""
        from datasets import Dataset

        base = _base_dataset(dataset)
        if not isinstance(base, Dataset):
            return None
        format_kwargs = (base.format or {}).get("format_kwargs") or {}
        if format_kwargs.get("transform") is not None:
            return None
        for column in ("labels", "input_ids"):
            if column not in base.column_names:
                continue
            array = base.data.column(column).combine_chunks()
            if not hasattr(array, "offsets"):
                return None
            indices = base._indices
            table_rows = None if indices is None else np.asarray(indices.column(0)).astype(np.int64)
            return cls(array.values.to_numpy(zero_copy_only=False), array.offsets.to_numpy(), table_rows, column)
        return None

    def tokens(self, row: int) -> np.ndarray:
        """The tokens of training row `row`."""
        table_row = row if self.table_rows is None else int(self.table_rows[row])
        return self.values[self.offsets[table_row] : self.offsets[table_row + 1]]

    def mismatch(self, rows, *, labels=None, input_ids=None, attention_mask=None) -> str | None:
        """`None` when the batch (its `labels` or `input_ids` `[B, T]`, as the reference's column) holds the tokens of
        training rows `rows`, in order; else what differs."""
        batch = labels if self.column == "labels" else input_ids
        if batch is None:
            return f"the batch has no {self.column!r} to compare with the training set's"
        batch = batch.detach().cpu().numpy()
        mask = None if attention_mask is None else attention_mask.detach().cpu().numpy().astype(bool)
        for position, row in enumerate(rows):
            expected = self.tokens(int(row))
            got = batch[position][mask[position]] if mask is not None else batch[position][: len(expected)]
            if not np.array_equal(expected, got):
                return (
                    f"training row {int(row)} has {len(expected)} tokens in its {self.column} column starting "
                    f"{expected[:6].tolist()}, batch row {position} has {len(got)} starting {got[:6].tolist()}"
                )
        return None


def task_class(task: str) -> type:
    """The task class (see `datadiet.tasks`) whose static methods turn a training forward into per-example losses
    and tracked quantities, for a [`resolve_task`] name: `CausalLMTask` or `ClassificationTask`.

    Example:
    ```python
    >>> from datadiet.trainer.causal_lm import task_class
    >>> task_class("causal_lm").name, task_class("classification").name
    ('causal_lm', 'classification')

    ```
    """
    return CausalLMTask if task == "causal_lm" else ClassificationTask
