"""`plan_scoring`: every argument of `score_dataset` checked in one place and turned into a `ScoringPlan` (methods
split, the one preprocessor, row keys, the run folder's configuration) before any model is built."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from torch import nn

from ..data import Preprocessor, preprocessor_of
from ..models import weights_fingerprint
from ..validation import check_positive_int
from .batches import TaskBatches, classifier_batches, rows_digest, scoring_task, task_batches
from .dynamics import ScoringMethods, split_methods
from .store import check_stream_arguments, dataset_digest, row_keys, stream_digest

__all__ = ["ProxyTrainer", "ScoringPlan", "plan_scoring"]

ProxyTrainer = Callable[..., tuple[nn.Module, Mapping[str, Any]]]  # see score_dataset's `train_proxy`


@dataclass(frozen=True, eq=False)
class ScoringPlan:
    """What a `score_dataset` run does, checked: built by [`plan_scoring`], read by the proxies, the loop and the
    aggregation. `rows` is a `Dataset`'s view the loop reads (the preprocessor's columns, unformatted; `None` for a
    stream); `preprocessor` is what the rows are preprocessed with (a classifier's `Preprocessor`, which proxies train
    with, or a task's batches), `batches` the loop's rows -> batch step through the task (the same for every task);
    `config` is what `output_dir` records and a resumed run must not change (its `"model"` is filled in from the first
    seed's model)."""

    dataset: Dataset | IterableDataset
    rows: Dataset | None
    model: nn.Module | None
    model_init: Callable[[int], nn.Module] | None
    train_proxy: ProxyTrainer | None
    evaluated: list[str]
    dynamics: list[str]
    seeds: list[int]
    train_epochs: float
    streaming: bool
    task: str | None
    preprocessor: Preprocessor | TaskBatches
    batches: TaskBatches
    input_column: str | list[str]
    label_column: str | None
    keys: np.ndarray | None
    clashing: list[str]
    batch_size: int
    save_every: int
    mixed_precision: str | None
    autocast_dtype: torch.dtype | None
    row_id_column: str | None
    training_kwargs: dict[str, Any] | None
    output_dir: Path | None
    config: dict[str, Any] | None

    @property
    def methods(self) -> list[str]:
        return [*self.evaluated, *self.dynamics]

    @cached_property
    def model_sha256(self) -> str | None:
        """The sha256 of the given model's weights (`None` with `model_init`), hashed once per run: the run folder's
        configuration and the provenance both record it, and the model given is never trained in place."""
        return weights_fingerprint(self.model) if self.model is not None else None


def plan_scoring(
    dataset: Dataset | IterableDataset,
    model: nn.Module | None = None,
    methods: Sequence[str] | str | ScoringMethods = ("el2n",),
    *,
    model_init: Callable[[int], nn.Module] | None = None,
    seeds: Sequence[int] = (0,),
    train_epochs: float = 0,
    transform: Callable | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 128,
    output_dir: str | os.PathLike | None = None,
    text_column: str | None = None,
    overwrite: bool = False,
    mixed_precision: str | None = None,
    save_every: int = 20,
    training_kwargs: dict[str, Any] | None = None,
    row_id_column: str | None = None,
    task: str | None = None,
    tokenizer=None,
    max_length: int | None = 1024,
    train_proxy: ProxyTrainer | None = None,
    preprocessor: Preprocessor | None = None,
) -> ScoringPlan:
    """The arguments of [`~datadiet.engine.score.score_dataset`] checked and planned; two more for a caller that has
    done part of the work already (the command): `methods` as `split_methods` returned them (not checked again),
    and a classifier's `preprocessor` (instead of `transform` and the column names; its columns not detected
    again).

    Example:
    ```python
    >>> import torch
    >>> from datasets import Dataset
    >>> from datadiet.engine.plan import plan_scoring
    >>> dataset = Dataset.from_dict({"pixels": [[0.0, 1.0], [1.0, 0.0]], "label": [0, 1]})
    >>> plan = plan_scoring(dataset, torch.nn.Identity(), ["el2n", "loss"], image_column="pixels")
    >>> plan.evaluated, plan.input_column, plan.label_column
    (['el2n', 'loss'], 'pixels', 'label')

    ```
    """
    task = scoring_task(task)
    if isinstance(methods, ScoringMethods):
        evaluated, dynamics = methods
    else:
        evaluated, dynamics = split_methods(methods, train_epochs, trains=model_init is not None, task=task)
    streaming = isinstance(dataset, IterableDataset)
    if streaming and dynamics:
        raise ValueError(f"{dynamics} come from training on the rows, which a stream cannot do: load a Dataset.")
    if streaming:
        check_stream_arguments(dataset, row_id_column, output_dir, train_epochs)
    elif len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to score.")
    if (model is None) == (model_init is None):
        raise ValueError("Pass exactly one of model= (score this model) or model_init= (one fresh model per seed).")
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed, e.g. seeds=(0,).")
    if model is not None and len(seeds) > 1:
        raise ValueError("Several seeds need independently initialised models: pass model_init=lambda seed: ... .")
    if train_epochs < 0:
        raise ValueError(f"train_epochs must be >= 0, got {train_epochs}.")
    if train_epochs > 0 and train_proxy is None:
        raise ValueError("train_epochs > 0 trains proxies: pass train_proxy=..., or call datadiet.score_dataset.")
    if training_kwargs and hasattr(train_proxy, "check_kwargs"):
        train_proxy.check_kwargs(training_kwargs)  # the trainer's own refusal, before anything trains
    if mixed_precision not in (None, "no", "bf16"):
        raise ValueError(f"mixed_precision must be None, 'no' or 'bf16', got {mixed_precision!r}.")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1 (batches between two shard writes), got {save_every}.")
    check_positive_int("batch_size", batch_size)
    if task is not None:
        if preprocessor is not None:
            raise ValueError(f"preprocessor= is a classifier's; task={task!r} builds its own batches: drop it.")
        preprocessor = batches = task_batches(dataset, task, tokenizer or transform, max_length, train_epochs)
        input_column, label_column = preprocessor.columns, None
    else:
        columns = {"image_column": image_column, "text_column": text_column, "label_column": label_column}
        preprocessor = preprocessor_of(dataset, preprocessor, transform, **columns)
        batches = classifier_batches(preprocessor)
        input_column, label_column = preprocessor.input_column, preprocessor.label_column
    new_columns = [name for method in [*evaluated, *dynamics] for name in (method, f"{method}_std")]
    clashing = [name for name in new_columns if name in dataset.column_names]
    keys = None if streaming else row_keys(dataset, row_id_column)
    if clashing and not overwrite and not streaming:
        raise ValueError(f"The dataset already has column(s) {clashing}: pass overwrite=True to replace them.")
    config = None
    if output_dir is not None:
        if streaming:
            data = stream_digest(dataset, row_id_column, label_column or row_id_column)
        else:
            data = (
                dataset_digest(dataset, label_column)
                if label_column is not None
                else rows_digest(dataset, preprocessor.columns)
            )
        config = {
            "methods": [*evaluated, *dynamics],
            "seeds": seeds,
            "train_epochs": train_epochs,
            "num_rows": None if streaming else len(dataset),
            "row_id_column": row_id_column,
            "data": data,
            "preprocessing": preprocessor.fingerprint(),
            "model": None,  # the first seed's model, hashed when it is built: only where a run folder needs it
            "mixed_precision": mixed_precision,
            "training": json.dumps(training_kwargs or {}, sort_keys=True, default=str),
        }
    return ScoringPlan(
        dataset=dataset,
        rows=None if streaming else dataset.select_columns(preprocessor.columns).with_format(None),
        model=model,
        model_init=model_init,
        train_proxy=train_proxy,
        evaluated=list(evaluated),
        dynamics=list(dynamics),
        seeds=seeds,
        train_epochs=train_epochs,
        streaming=streaming,
        task=task,
        preprocessor=preprocessor,
        batches=batches,
        input_column=input_column,
        label_column=label_column,
        keys=keys,
        clashing=clashing,
        batch_size=batch_size,
        save_every=save_every,
        mixed_precision=mixed_precision,
        autocast_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
        row_id_column=row_id_column,
        training_kwargs=training_kwargs,
        output_dir=Path(output_dir) if output_dir is not None else None,
        config=config,
    )
