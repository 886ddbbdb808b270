"""Dataset views for training: items carrying their row position (`with_row_ids`), and a `set_transform` dataset
hidden from the Trainer's column removal (`TransformedView`)."""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_ROW_ID_COLUMN", "RowIdDataset", "TransformedView", "has_transform", "with_row_ids"]

DEFAULT_ROW_ID_COLUMN = "datadiet_row_id"


class RowIdDataset(torch.utils.data.Dataset):
    """A map-style view of `dataset` whose items carry their position under `column`, so that every example of a
    batch can be traced back to its row whatever the sampler, the number of processes or the preprocessing (a
    `set_transform` that returns only model inputs keeps it too). See [`with_row_ids`]."""

    def __init__(self, dataset, column: str = DEFAULT_ROW_ID_COLUMN):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                f"Row ids need a map-style dataset (with __len__ and __getitem__); got {type(dataset).__name__}. "
                "For a streaming dataset, materialise it first (e.g. `Dataset.from_generator`)."
            )
        self.dataset = dataset
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def _with_id(self, item, index) -> dict:
        if not isinstance(item, dict):
            item = dict(item)  # BatchEncoding and other mappings
        return {**item, self.column: int(index)}

    def __getitem__(self, index: int) -> dict:
        return self._with_id(self.dataset[index], index)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # `datasets.Dataset.__getitems__` reads and transforms the whole batch at once (much faster than row by row).
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(list(indices)) if getitems is not None else [self.dataset[i] for i in indices]
        return [self._with_id(item, index) for item, index in zip(items, indices)]


def with_row_ids(dataset, column: str = DEFAULT_ROW_ID_COLUMN) -> RowIdDataset:
    """`dataset` (a `datasets.Dataset`, formatted or with a `set_transform`, or any map-style dataset of dicts) with
    each item's position added under `column`. [`ScoreCallback`] and [`DataDietTrainer`] know each batch's rows from
    the sampler; a data collator that keeps this key in the batch lets them read the rows from the batch instead, so
    that it may reorder the examples (sort by length, say).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.trainer import with_row_ids
    >>> with_row_ids(Dataset.from_dict({"x": [5, 6]}))[1]
    {'x': 6, 'datadiet_row_id': 1}

    ```
    """
    return RowIdDataset(dataset, column)


def has_transform(dataset) -> bool:
    """Whether `dataset` is a `datasets.Dataset` preprocessed on the fly by `set_transform` / `with_transform`.

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.trainer.views import has_transform
    >>> dataset = Dataset.from_dict({"x": [1, 2]})
    >>> has_transform(dataset), has_transform(dataset.with_transform(lambda batch: batch))
    (False, True)

    ```
    """
    format_kwargs = (getattr(dataset, "format", None) or {}).get("format_kwargs") or {}
    return format_kwargs.get("transform") is not None


class TransformedView(torch.utils.data.Dataset):
    """A `datasets.Dataset` with a `set_transform`, hidden from the Trainer's dataset-level column removal (which
    would drop the raw columns the transform reads, e.g. the images); unused keys are removed after the transform
    by the Trainer's collator instead."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, indices):
        return self.dataset.__getitems__(list(indices))
