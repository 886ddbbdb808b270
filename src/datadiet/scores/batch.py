"""The one dispatch of score methods over a batch: one forward pass shared by the logit scores, the input scores, the
gradient scores on the model itself, with the finite-logits and label-range checks and optional autocast."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .logits import forward_logits, slice_batch
from .registry import get_score_spec

__all__ = ["main_input", "score_batch", "validate_methods"]


def validate_methods(methods: Sequence[str] | str) -> list[str]:
    """Check every method is a registered score; return them as a list (a single string is one method).

    Example:
    ```python
    >>> from datadiet.scores import validate_methods
    >>> validate_methods("el2n")
    ['el2n']

    ```
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError("methods is empty: name at least one score, e.g. methods=('el2n',).")
    for method in methods:
        get_score_spec(method)  # raises a ValueError listing the valid names
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods} names a score more than once.")
    return methods


def main_input(inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The input tensor of a batch of model inputs, what input scores (`input_norm`) measure: the tensor itself, the
    `pixel_values` / `input_values` / `inputs` entry of a dict, or its only floating-point tensor; otherwise the dict
    unchanged (tokenised text), which an input score refuses with its own message."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    for name in ("pixel_values", "input_values", "inputs"):
        if name in inputs:
            return inputs[name]
    tensors = [value for value in inputs.values() if torch.is_tensor(value) and value.is_floating_point()]
    return tensors[0] if len(tensors) == 1 else inputs


def _check_labels(labels: torch.Tensor, num_classes: int, row_ids: Sequence[int]) -> None:
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if len(bad):
        rows = [int(row_ids[i]) for i in bad[:5]]
        raise ValueError(
            f"Labels outside the model's {num_classes} classes at rows {rows} (label {int(labels[bad[0]])}). Build "
            "the model with as many outputs as the dataset has classes, or fix the label column."
        )


def _check_finite(logits: torch.Tensor, row_ids: Sequence[int]) -> None:
    bad = (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten()
    if len(bad):
        rows = [int(row_ids[i]) for i in bad[:5]]
        raise ValueError(
            f"The model produced NaN or infinite logits for rows {rows}{' ...' if len(bad) > 5 else ''}. Check "
            "those inputs and the model's weights (a diverged training run, or inputs not normalised)."
        )


def score_batch(
    model: nn.Module,
    inputs: torch.Tensor | dict[str, torch.Tensor],
    labels: torch.Tensor,
    methods: Sequence[str] | str,
    *,
    input_tensor: torch.Tensor | None = None,
    row_ids: Sequence[int] | None = None,
    num_classes: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    gradient_chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Score one batch with `model` (already in eval mode) for each method.

    Logit scores share one no-grad forward pass (under autocast when `autocast_dtype` is given), checked for NaN or
    infinite logits and for labels outside the model's classes; gradient scores (`grand`, `tracin_self_influence`)
    run their own forward and backward on `model` and `inputs`; input scores (`input_norm`) see `input_tensor`.

    Args:
        model (`nn.Module`): the classifier, in eval mode.
        inputs (`torch.Tensor` or `dict`): model-ready inputs: a tensor passed positionally or a dict passed as
            keywords (see `datadiet.models.as_model_inputs`).
        labels (`torch.Tensor`): class ids `[B]`, on the device of the batch (autocast runs on that device).
        methods (`str` or sequence of `str`): registered score names.
        input_tensor (`torch.Tensor`, *optional*): what input scores measure; by default `main_input(inputs)`.
        row_ids (sequence of `int`, *optional*): the rows' ids, named in error messages; positions by default.
        num_classes (`int`, *optional*): the model's number of classes, to check the labels when only gradient
            scores run (no logits are computed then), e.g. `datadiet.models.num_labels_of(model)`.
        autocast_dtype (`torch.dtype`, *optional*): autocast the logits' forward pass to this dtype.
        gradient_chunk_size (`int`, *optional*): run gradient scores on at most this many examples at once, to bound
            memory.

    Returns:
        `dict[str, torch.Tensor]`: one detached float32 CPU tensor of shape `[B]` per method.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores import score_batch
    >>> model = torch.nn.Linear(4, 3).eval()
    >>> scores = score_batch(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), ["el2n", "grand"])
    >>> {name: tuple(value.shape) for name, value in scores.items()}
    {'el2n': (5,), 'grand': (5,)}

    ```
    """
    row_ids = range(len(labels)) if row_ids is None else row_ids
    specs = [get_score_spec(method) for method in ([methods] if isinstance(methods, str) else methods)]
    results: dict[str, torch.Tensor] = {}
    if any(spec.needs == "logits" for spec in specs) or not any(spec.needs == "gradients" for spec in specs):
        device_type = labels.device.type  # autocast on the device the batch is on (cpu, cuda, ...)
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = forward_logits(model, inputs).float()
        _check_finite(logits, row_ids)
        _check_labels(labels, logits.shape[-1], row_ids)
    elif num_classes is not None:
        _check_labels(labels, num_classes, row_ids)
    for spec in specs:
        if spec.needs == "logits":
            results[spec.name] = spec.fn(logits, labels)
        elif spec.needs == "inputs":
            results[spec.name] = spec.fn(main_input(inputs) if input_tensor is None else input_tensor)
        else:
            values = _gradient_score(spec.fn, model, inputs, labels, gradient_chunk_size)
            if not torch.isfinite(values).all():
                _check_finite(values[:, None], row_ids)
            results[spec.name] = values
    return {name: value.detach().float().cpu() for name, value in results.items()}


def _gradient_score(fn, model: nn.Module, inputs, labels: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    batch_size = len(labels)
    if chunk_size is None or chunk_size >= batch_size:
        return fn(model, inputs, labels)
    if chunk_size < 1:
        raise ValueError(f"gradient_chunk_size must be a positive number of examples, got {chunk_size}.")
    return torch.cat(
        [
            fn(model, slice_batch(inputs, start, start + chunk_size, batch_size), labels[start : start + chunk_size])
            for start in range(0, batch_size, chunk_size)
        ]
    )
