"""Training and evaluating a classifier on a (pruned) dataset: the steps behind `datadiet train` and the demo. Models
are trained by `DataDietTrainer` at a budget of steps or epochs."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from datasets import Dataset
from torch import nn

from .data import Preprocessor, detect_columns, training_view
from .models import forward_logits

logger = logging.getLogger(__name__)

__all__ = ["evaluate_accuracy", "fit"]


def fit(
    model: nn.Module,
    dataset: Dataset,
    *,
    transform: Callable | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    output_dir: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    **training_kwargs,
) -> nn.Module:
    """Train `model` on `dataset` with `DataDietTrainer` for `max_steps` optimiser steps (a fixed budget, fair
    across subsets of different sizes) or `epochs`, and return it in eval mode.

    `transform` is the training-time per-image transform (with augmentation if wanted), a transformers image
    processor, or a tokenizer.
    """
    from .trainer import train_proxy_model

    if (epochs is None) == (max_steps is None):
        raise ValueError("Give exactly one training budget: epochs=... or max_steps=... .")
    input_column, kind, label_column = detect_columns(
        dataset, image_column=image_column, text_column=text_column, label_column=label_column
    )
    preprocessor = Preprocessor(transform, input_column=input_column, kind=kind, label_column=label_column)
    if max_steps is not None:
        training_kwargs["max_steps"] = int(max_steps)
    training_kwargs.setdefault("disable_tqdm", False)
    return train_proxy_model(
        model,
        training_view(dataset, preprocessor),
        epochs=epochs if epochs is not None else 1,
        seed=seed,
        batch_size=batch_size,
        learning_rate=learning_rate,
        output_dir=output_dir,
        **training_kwargs,
    )


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    *,
    transform: Callable | None = None,
    batch_size: int = 256,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> float:
    """Top-1 accuracy of `model` on `dataset` (eval mode, un-augmented `transform`), through the packaged
    `evaluate` accuracy metric."""
    from .data import as_model_inputs
    from .metrics import load_metric

    input_column, kind, label_column = detect_columns(
        dataset, image_column=image_column, text_column=text_column, label_column=label_column
    )
    preprocessor = Preprocessor(transform, input_column=input_column, kind=kind, label_column=label_column)
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
