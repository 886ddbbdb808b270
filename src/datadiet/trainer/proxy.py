"""The one path that trains a classifier on a dataset with `DataDietTrainer` (the proxy models that score a dataset, and
models retrained on a pruned one), and the accuracy they are judged by."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..data import Preprocessor, check_input_channels, preprocessor_of, training_view
from ..models import ClassifierWrapper, as_model_inputs, forward_logits, input_channels_of
from ..validation import check_positive_int, closest_names
from .config import DataDietConfig
from .trainer import DataDietTrainer

__all__ = ["evaluate_accuracy", "fit", "fit_proxy", "train_proxy_model"]


def train_proxy_model(
    model: nn.Module,
    train_dataset,
    *,
    epochs: float,
    seed: int,
    batch_size: int,
    learning_rate: float = 1e-3,
    output_dir: str | None = None,
    data_collator=None,
    return_trainer: bool = False,
    progress_description: str | None = None,
    **config_overrides,
) -> nn.Module | tuple[nn.Module, DataDietTrainer]:
    """Train `model` on `train_dataset` with [`DataDietTrainer`] and return it in eval mode: the proxy models that
    `score_dataset(..., train_epochs=t)` scores with. Quiet (no progress bar, no logging integrations), saves no
    checkpoint unless `config_overrides` asks for one, runs on the CPU when there is no GPU.

    Args:
        model: a transformers classifier, or any module mapping an input tensor to logits (timm, torchvision, your
            own), which is trained through [`~datadiet.models.ClassifierWrapper`]. Trained in place and returned.
        train_dataset: a `datasets.Dataset` (or map-style dataset) whose items hold `pixel_values` (or tokenizer
            outputs) and `labels`, e.g. through `set_transform`.
        epochs: training epochs (fractions allowed).
        seed: the training seed (data order; the model is already initialised).
        batch_size: per-device batch size.
        learning_rate: peak learning rate (AdamW and a linear decay unless `config_overrides` says otherwise).
        output_dir: where the Trainer may write (a temporary folder when `None`).
        data_collator: the collator (default: `transformers.default_data_collator`).
        return_trainer: also return the trainer, e.g. for its `scores` when `track_scores` is given (no score is
            tracked by default).
        progress_description: the label of the Trainer's progress bar (shown when `disable_tqdm=False` is given).
        config_overrides: any other [`DataDietConfig`] field, e.g. `optim="sgd"`, `weight_decay=5e-4`,
            `track_scores=["confidence", "variability", "correctness"]`.

    Example:
    ```python
    >>> import timm, torch
    >>> from datasets import Dataset
    >>> from datadiet.trainer import train_proxy_model
    >>> images = torch.randn(16, 3, 16, 16)
    >>> train_dataset = Dataset.from_dict({"pixel_values": images, "labels": [0, 1] * 8}).with_format("torch")
    >>> model = train_proxy_model(timm.create_model("test_resnet", num_classes=2), train_dataset, epochs=1, seed=0,
    ...                           batch_size=8)
    >>> model.training
    False

    ```
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0 to train a proxy model; got {epochs}.")
    trainable = model if isinstance(model, (PreTrainedModel, ClassifierWrapper)) else ClassifierWrapper(model)
    settings = {
        "num_train_epochs": epochs,
        "per_device_train_batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "logging_strategy": "no",
        "disable_tqdm": True,
        "track_scores": [],
        **config_overrides,
    }
    with tempfile.TemporaryDirectory(prefix="datadiet-proxy-") as scratch:
        config = DataDietConfig(output_dir=output_dir or scratch, **settings)
        trainer = DataDietTrainer(trainable, config, train_dataset=train_dataset, data_collator=data_collator)
        # With the progress bar off, the Trainer prints its logs; a proxy model is trained quietly.
        trainer.remove_callback(PrinterCallback)
        if progress_description is not None and trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_LabelledProgressCallback(progress_description))
        trainer.train()
    model.eval()
    return (model, trainer) if return_trainer else model


class _LabelledProgressCallback(ProgressCallback):
    """The Trainer's progress bar with a label saying what trains (a bare `200/200` does not)."""

    def __init__(self, description: str):
        super().__init__()
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.description)


def fit(
    model: nn.Module,
    dataset: Dataset,
    *,
    transform: Callable | None = None,
    preprocessor: Preprocessor | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    output_dir: str | os.PathLike | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    progress_bar: bool = True,
    progress_description: str | None = None,
    **training_kwargs,
) -> nn.Module:
    """Train `model` on `dataset` with `DataDietTrainer` for `max_steps` optimiser steps (a fixed budget, fair
    across subsets of different sizes) or `epochs`, and return it in eval mode.

    Args:
        model (`nn.Module`): the classifier, trained in place (see [`train_proxy_model`]).
        dataset (`datasets.Dataset`): raw rows (images or text, and labels).
        transform (`Callable`, *optional*): the training-time per-image transform (with augmentation if wanted), a
            transformers image processor, or a tokenizer.
        preprocessor (`datadiet.data.Preprocessor`, *optional*): an already built preprocessor, instead of
            `transform` and the column names.
        epochs (`float`, *optional*) / max_steps (`int`, *optional*): the training budget; give exactly one.
        progress_bar (`bool`, *optional*, defaults to `True`): show the Trainer's progress bar (unless
            `training_kwargs` sets `disable_tqdm`).
        progress_description (`str`, *optional*): the bar's label, e.g. `"Training on the random 50% (674 rows)"`.
        training_kwargs: `return_trainer` or any [`DataDietConfig`] field, passed to [`train_proxy_model`].

    Example (an array column, named; or an already built `Preprocessor`):
    ```python
    >>> import torch
    >>> from datasets import Dataset
    >>> from datadiet.data import Preprocessor
    >>> from datadiet.trainer.proxy import evaluate_accuracy, fit
    >>> dataset = Dataset.from_dict({"image": torch.rand(8, 1, 4, 4).tolist(), "label": [0, 1] * 4})
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    >>> model = fit(model, dataset, image_column="image", max_steps=2, batch_size=4, progress_bar=False)
    >>> preprocessor = Preprocessor(None, input_column="image", kind="array", label_column="label")
    >>> model = fit(model, dataset, preprocessor=preprocessor, epochs=1, batch_size=4, progress_bar=False)
    >>> 0.0 <= evaluate_accuracy(model, dataset, preprocessor=preprocessor) <= 1.0
    True

    ```
    """
    preprocessor = preprocessor_of(
        dataset, preprocessor, transform, image_column=image_column, text_column=text_column, label_column=label_column
    )
    check_input_channels(dataset, preprocessor, input_channels_of(model))
    return _fit_preprocessed(
        model,
        dataset,
        preprocessor,
        epochs=epochs,
        max_steps=max_steps,
        seed=seed,
        batch_size=batch_size,
        learning_rate=learning_rate,
        output_dir=output_dir,
        progress_bar=progress_bar,
        progress_description=progress_description,
        **training_kwargs,
    )


def _fit_preprocessed(
    model: nn.Module,
    dataset: Dataset,
    preprocessor: Preprocessor,
    *,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int = 128,
    output_dir: str | os.PathLike | None = None,
    progress_bar: bool = True,
    **training_kwargs,
) -> nn.Module:
    """[`fit`] once its preprocessor is built and the model's input channels checked."""
    if (epochs is None) == (max_steps is None):
        raise ValueError("Give exactly one training budget: epochs=... or max_steps=... .")
    check_positive_int("batch_size", batch_size)
    if max_steps is not None:
        training_kwargs["max_steps"] = int(max_steps)
    training_kwargs.setdefault("disable_tqdm", not progress_bar)
    return train_proxy_model(
        model,
        training_view(dataset, preprocessor),
        epochs=epochs if epochs is not None else 1,
        batch_size=batch_size,
        output_dir=str(output_dir) if output_dir else None,
        **training_kwargs,
    )


# `score_dataset`'s own arguments that its proxies' training takes from it: not `training_kwargs` keys.
_SET_BY_SCORE_DATASET = {
    "epochs": "train_epochs=",
    "max_steps": "train_epochs= (the proxies' budget is in epochs)",
    "seed": "seeds=",
    "batch_size": "batch_size=",
    "output_dir": "output_dir=",
    "preprocessor": "transform= and the column names",
    "transform": "transform=",
    "image_column": "image_column=",
    "text_column": "text_column=",
    "label_column": "label_column=",
    "track_scores": "methods= (the training-dynamics scores)",
    "return_trainer": "methods= (the training-dynamics scores)",
    "progress_bar": "nothing: the main process shows the bar",
    "progress_description": "nothing: score_dataset labels the bar",
}


def check_training_kwargs(training_kwargs: Mapping[str, Any] | None) -> None:
    """Refuse, before any proxy trains, a `training_kwargs` key that `score_dataset` sets itself (naming its own
    argument to use instead) or that the proxies' training does not take (with the closest `DataDietConfig` fields).

    Example:
    ```python
    >>> from datadiet.trainer.proxy import check_training_kwargs
    >>> check_training_kwargs({"learning_rate": 0.1, "weight_decay": 5e-4})  # DataDietConfig fields: accepted
    >>> try:
    ...     check_training_kwargs({"seed": 3})
    ... except ValueError as error:
    ...     print(error)
    training_kwargs={'seed': ...}: score_dataset sets the proxies' seed itself; pass seeds= to score_dataset instead.

    ```
    """
    import dataclasses

    accepted = {field.name for field in dataclasses.fields(DataDietConfig)} | {"learning_rate", "data_collator"}
    for key in training_kwargs or {}:
        if key in _SET_BY_SCORE_DATASET:
            raise ValueError(
                f"training_kwargs={{{key!r}: ...}}: score_dataset sets the proxies' {key} itself; pass "
                f"{_SET_BY_SCORE_DATASET[key]} to score_dataset instead."
            )
        if key not in accepted:
            close = closest_names(key, accepted)
            hint = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
            raise ValueError(
                f"training_kwargs={{{key!r}: ...}}: the proxies' training takes DataDietConfig (TrainingArguments) "
                f"fields and learning_rate, and {key!r} is none of them.{hint}"
            )


def fit_proxy(
    model: nn.Module, dataset: Dataset, *, preprocessor: Preprocessor, track_scores: Sequence[str] = (), **fit_kwargs
) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """[`fit`] as `score_dataset(..., train_epochs=t)` trains its proxies (its `train_proxy`): the trained model and
    `{score: per-row values}` of the training-dynamics scores `track_scores` (`forgetting`, `aum`, ...) recorded
    during that training, in the rows' order (NaN for a row never presented). `score_dataset` built `preprocessor`
    and checked the first model's input channels with it, so unlike [`fit`] this does neither again."""
    if not track_scores:
        return _fit_preprocessed(model, dataset, preprocessor, **fit_kwargs), {}
    fit_kwargs.update(track_scores=list(track_scores), return_trainer=True)
    model, trainer = _fit_preprocessed(model, dataset, preprocessor, **fit_kwargs)
    scores = trainer.scores
    return model, {name: np.asarray(scores[name]) for name in track_scores}


fit_proxy.check_kwargs = check_training_kwargs  # what score_dataset's plan calls before any proxy trains


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    transform: Callable | None = None,
    preprocessor: Preprocessor | None = None,
    batch_size: int = 256,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> float:
    """Top-1 accuracy of `model` on `dataset` (eval mode, un-augmented `transform`, or an already built
    `preprocessor`), through the packaged `evaluate` accuracy metric."""
    from ..metrics import load_metric

    check_positive_int("batch_size", batch_size)
    preprocessor = preprocessor_of(
        dataset, preprocessor, transform, image_column=image_column, text_column=text_column, label_column=label_column
    )
    source = dataset.select_columns(preprocessor.columns).with_format(None)
    metric = load_metric("accuracy")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(source), batch_size):
            inputs, labels = preprocessor(source[start : start + batch_size])
            inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)
            logits = forward_logits(model, as_model_inputs(model, inputs))
            metric.add_batch(predictions=logits.argmax(-1).cpu().numpy(), references=labels.numpy())
    finally:
        model.train(was_training)
    return float(metric.compute()["accuracy"])
