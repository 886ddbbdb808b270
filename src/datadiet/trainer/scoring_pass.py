"""The eval-mode scoring passes of `DataDietTrainer`: every row of a data loader scored with chosen methods, the rows
known from the loader's sampler and gathered from every process."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..models import ClassifierWrapper
from ..scores.batch import score_batch
from .batch_indices import record_batch_indices
from .callback import all_gather_objects

__all__ = ["score_rows"]


def score_rows(
    model: torch.nn.Module,
    loader,
    methods: Sequence[str],
    *,
    num_rows: int,
    label_name: str = "labels",
    prepare: Callable[[dict], dict] = lambda batch: batch,
    drop_keys: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Score every row `loader` yields with `methods`, `model` in eval mode (its mode restored after, no gradient
    left behind): `{method: float32 [num_rows]}`, NaN for a row no process scored. The rows of each batch are the
    indices its sampler yields, so the collator may keep only the model inputs and labels.

    Args:
        model (`torch.nn.Module`): the classifier; a [`~datadiet.models.ClassifierWrapper`] is scored on its network.
        loader (`DataLoader`): a map-style, possibly accelerate-prepared data loader of dict batches.
        methods (`list[str]`): registered score names.
        num_rows (`int`): rows of the dataset.
        label_name (`str`): the batch key of the labels.
        prepare (`Callable`): moves a batch to the device (the Trainer's `_prepare_inputs`).
        drop_keys (`list[str]`): batch keys that are no model input.
    """
    indices = record_batch_indices(loader)
    was_training = model.training
    model.eval()
    ids, values = [], {method: [] for method in methods}
    for batch in loader:
        batch = prepare(batch)
        for key in drop_keys:
            batch.pop(key, None)
        labels = batch.pop(label_name)
        row_ids = torch.as_tensor(indices.pop(len(labels)), dtype=torch.long)
        # The one dispatch of datadiet.scores (finite-logit and label checks included). Scores get the network itself:
        # a wrapped timm model is scored on its input tensor, a transformers model on its keywords.
        if isinstance(model, ClassifierWrapper):
            network, inputs = model.model, batch[model.input_name]
        else:
            network, inputs = model, batch
        scores = score_batch(network, inputs, labels, methods, row_ids=row_ids.tolist())
        for name, value in scores.items():
            values[name].append(value)
        ids.append(row_ids)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    local = (
        torch.cat(ids).numpy() if ids else np.zeros(0, np.int64),
        {name: torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.float32) for name, parts in values.items()},
    )
    gathered = all_gather_objects(local)
    all_ids = np.concatenate([part[0] for part in gathered])
    # Keep the first value of each row: distributed samplers pad with wrap-around duplicates.
    unique_ids, first = np.unique(all_ids, return_index=True)
    columns = {}
    for name in values:
        column = np.full(num_rows, np.nan, dtype=np.float32)
        column[unique_ids] = np.concatenate([part[1][name] for part in gathered])[first]
        columns[name] = column
    return columns
