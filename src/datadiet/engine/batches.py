"""Rows to scored batches for the engine, the same way for every task: the task's `collate` (a classifier's through its
`Preprocessor`), then the task's own `score_batch`; the digest and provenance of a task's rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

__all__ = [
    "TaskBatches",
    "classifier_batches",
    "rows_digest",
    "score_collated",
    "scoring_task",
    "task_batches",
    "task_provenance",
    "to_device",
]


def to_device(inputs: torch.Tensor | dict, device: torch.device) -> torch.Tensor | dict:
    """A tensor, or a (nested) dict of tensors, on `device`."""
    if isinstance(inputs, dict):
        return {key: to_device(value, device) for key, value in inputs.items()}
    return inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs


class TaskBatches:
    """The engine's rows -> batch step: a task object's `collate` on the columns `columns`, the row ids passed along
    so that its refusals name the dataset's rows."""

    def __init__(self, task, columns: list[str]):
        self.task, self.columns = task, columns

    def __call__(self, rows: dict[str, list], row_ids: Sequence[int]) -> dict[str, Any]:
        return self.task.collate(rows, row_ids=[int(i) for i in row_ids])

    def fingerprint(self) -> str:
        return f"{self.task.fingerprint()}:{self.columns}"


def classifier_batches(preprocessor) -> TaskBatches:
    """A classifier's batches: the `image_classification` or `text_classification` task around its `Preprocessor`
    (columns detected once, by the plan)."""
    from ..tasks import get_task

    name = "text_classification" if preprocessor.kind == "text" else "image_classification"
    return TaskBatches(get_task(name, preprocessor=preprocessor), preprocessor.columns)


def rows_digest(dataset: Dataset, columns: list[str]) -> str:
    """A hash of the rows' content in `columns` (text, conversations), which resuming must not change."""
    import hashlib

    import pyarrow as pa

    table = dataset.select_columns(columns).with_format("arrow")[:]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(f"{len(dataset)}:{columns}".encode() + sink.getvalue().to_pybytes()).hexdigest()


def score_collated(
    model: nn.Module,
    task,
    methods: Sequence[str],
    batch: dict[str, Any],
    device: torch.device,
    *,
    row_ids: Sequence[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, np.ndarray]:
    """The task's `score_batch` on a collated `batch` (moved to `device` here), as float32 numpy arrays of shape
    `[B]`."""
    scores = task.score_batch(model, to_device(batch, device), methods, row_ids=row_ids, autocast_dtype=autocast_dtype)
    return {name: value.float().numpy() for name, value in scores.items()}


def scoring_task(task: str | None) -> str | None:
    """The task `score_dataset` scores through: `"causal_lm"`, or `None` for classifiers (no task, or one of the
    classification tasks, whose columns are detected); an unknown name is refused with the valid ones."""
    from ..tasks import check_task_name

    if task is None or check_task_name(task) in ("image_classification", "text_classification"):
        return None
    return task


def task_batches(dataset, task: str, tokenizer, max_length: int | None, train_epochs: float) -> TaskBatches:
    """The rows -> batch step of `task` for `dataset`, its columns detected from the features."""
    from ..tasks import get_task

    if scoring_task(task) != "causal_lm":
        raise ValueError(
            f"task={task!r}: score_dataset takes task='causal_lm' or no task (classifiers, detected from the columns)."
        )
    if train_epochs > 0:
        raise ValueError(
            "train_epochs > 0 is not supported with task='causal_lm': fine-tune the model with TRL's SFTTrainer, then "
            "score the checkpoint (train_epochs=0)."
        )
    built = get_task(task, tokenizer=tokenizer, max_length=max_length)
    names = list(dataset.features) if dataset.features is not None else list(dataset.column_names or [])
    return TaskBatches(built, built.columns_in(names))


def task_provenance(task) -> dict[str, Any]:
    """What a causal-LM card records about the batches: max_length, the tokenizer and its chat template's hash."""
    import hashlib

    template = getattr(task.tokenizer, "chat_template", None)
    return {
        "max_length": task.max_length,
        "tokenizer": getattr(task.tokenizer, "name_or_path", type(task.tokenizer).__name__),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
    }
