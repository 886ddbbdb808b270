"""A classifier's logits whatever its library (a tensor, a `ModelOutput` with `.logits`, a dict, a tuple), and slicing
a batch of model inputs. Pure PyTorch."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["forward_logits", "slice_batch", "unwrap_logits"]


def unwrap_logits(output) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, a `ModelOutput` with `.logits`, a dict with a `"logits"` key, or
    a tuple whose first item is the logits."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:  # ClassifierWrapper's {"loss", "logits"}
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(
        f"Cannot find logits in a model output of type {type(output).__name__}: the model should return a tensor of "
        "logits, an object with a `.logits` attribute, or a tuple whose first item is the logits."
    )


def forward_logits(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Run `model` on `inputs` (a tensor, passed positionally, or a dict of tensors, passed as keywords) and return
    its logits."""
    output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return unwrap_logits(output)


def slice_batch(inputs, start: int, stop: int, batch_size: int):
    """Rows `start:stop` of a batch of model inputs: a tensor, or a dict whose batched tensors (those with
    `batch_size` rows) are sliced and other values kept."""
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    return {
        key: value[start:stop]
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch_size
        else value
        for key, value in inputs.items()
    }
