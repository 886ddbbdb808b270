"""Reading training checkpoints for TracIn: weights from `transformers.Trainer` folders or weight files (safetensors,
or pickled tensors only), the learning rate logged at each, and matching their keys to a model."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["TRAINER_STATE", "Checkpoint", "load_checkpoint", "match_keys", "read_learning_rate"]

# Folders written by `transformers.Trainer` (and so by DataDietTrainer) hold the weights under one of these names.
_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLED = "pytorch_model.bin"
TRAINER_STATE = "trainer_state.json"


def read_learning_rate(folder: Path) -> float | None:
    """The learning rate logged at (or last before) the checkpoint's step, from `trainer_state.json`."""
    path = folder / TRAINER_STATE
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    step = state.get("global_step")
    logged = [
        entry
        for entry in state.get("log_history", [])
        if "learning_rate" in entry and "step" in entry and (step is None or entry["step"] <= step)
    ]
    if not logged:
        return None
    entry = max(logged, key=lambda e: e["step"])
    if step is not None and entry["step"] != step:
        logger.info("%s: using the learning rate logged at step %d for the checkpoint at step %d.",
                    folder, entry["step"], step)  # fmt: skip
    return float(entry["learning_rate"])


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        # weights_only: never unpickle arbitrary objects from a file a user points at.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors, which are not loaded (unpickling arbitrary objects can run "
            "code). Save the weights with safetensors (`safetensors.torch.save_model`) or as a plain state_dict."
        ) from error
    if isinstance(loaded, Mapping) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            nested = loaded.get(key)
            if isinstance(nested, Mapping) and all(isinstance(v, torch.Tensor) for v in nested.values()):
                return dict(nested)
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping from parameter names to tensors).")
    return dict(loaded)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], float | None]:
    """Read the weights and the learning rate of one checkpoint.

    `path` is a `transformers.Trainer` / `DataDietTrainer` checkpoint folder (`model.safetensors`, sharded
    safetensors or `pytorch_model.bin`, and `trainer_state.json` whose `log_history` gives the learning rate at that
    step), or a single `.safetensors` / `.bin` / `.pt` file (learning rate `None`). Pickled files are read with
    `torch.load(weights_only=True)`: nothing but tensors is unpickled.

    Example:
    ```python
    >>> import tempfile, torch
    >>> from safetensors.torch import save_model
    >>> from datadiet.tracin import load_checkpoint
    >>> folder = tempfile.mkdtemp()
    >>> save_model(torch.nn.Linear(2, 2), f"{folder}/model.safetensors")
    >>> state_dict, lr = load_checkpoint(folder)
    >>> sorted(state_dict), lr
    (['bias', 'weight'], None)

    ```
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if (path / _SAFETENSORS).exists():
            state_dict = load_file(path / _SAFETENSORS)
        elif (path / _SAFETENSORS_INDEX).exists():
            shards = sorted(set(json.loads((path / _SAFETENSORS_INDEX).read_text())["weight_map"].values()))
            state_dict = {k: v for shard in shards for k, v in load_file(path / shard).items()}
        elif (path / _PICKLED).exists():
            state_dict = _torch_load(path / _PICKLED)
        else:
            raise ValueError(
                f"No weights in {path}: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX} or {_PICKLED} (a "
                "transformers Trainer checkpoint folder such as output_dir/checkpoint-500)."
            )
        return state_dict, read_learning_rate(path)
    if not path.exists():
        raise ValueError(f"Checkpoint {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        return load_file(path), None
    return _torch_load(path), None


def match_keys(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Rename the checkpoint's keys to the model's: a timm model trained through `ClassifierWrapper` is saved under
    the `model.` prefix, a DistributedDataParallel one under `module.`."""
    wanted = set(model.state_dict())
    candidates = [dict(state_dict)]
    for prefix in ("model.", "module.", "module.model."):
        if any(k.startswith(prefix) for k in state_dict):
            candidates.append({(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()})
        candidates.append({prefix + k: v for k, v in state_dict.items()})
    best = max(candidates, key=lambda c: len(wanted & set(c)))
    missing = sorted(wanted - set(best))
    unexpected = sorted(set(best) - wanted)
    if missing:
        # safetensors stores a tied weight once; the model shares it, so it is loaded through its twin.
        shared = _tied_names(model)
        missing = [name for name in missing if not (shared.get(name, set()) & set(best))]
    model_state = model.state_dict()
    mismatched = [
        f"{name} {tuple(best[name].shape)} vs {tuple(model_state[name].shape)}"
        for name in sorted(wanted & set(best))
        if best[name].shape != model_state[name].shape
    ]
    if mismatched:
        raise ValueError(
            f"Checkpoint {source} does not fit the model: shapes differ for {mismatched[:3]} (checkpoint vs model). "
            "Pass the architecture the checkpoint was trained with."
        )
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {source} does not fit the model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. Pass the architecture the "
            "checkpoint was trained with (for a timm model trained through ClassifierWrapper, the timm model)."
        )
    return best


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    by_pointer: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_pointer.setdefault(tensor.data_ptr(), set()).add(name)
    return {name: names - {name} for names in by_pointer.values() for name in names}


@dataclass
class Checkpoint:
    """One checkpoint of a TracIn run: where it comes from, its learning rate, and its weights when held in memory."""

    source: str
    learning_rate: float
    state_dict: dict[str, torch.Tensor] | None = None  # in memory; None: read from `source` when needed

    def load(self) -> dict[str, torch.Tensor]:
        return self.state_dict if self.state_dict is not None else load_checkpoint(self.source)[0]
