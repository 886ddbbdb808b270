"""Reading training checkpoints for TracIn and LESS: weights from `transformers.Trainer` folders (peft adapters
included) or weight files (safetensors, or pickled tensors only), the learning rate logged at each, the optimizer's
Adam state per named parameter, and matching their keys to a model."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZER_STATE",
    "TRAINER_STATE",
    "Checkpoint",
    "match_keys",
    "read_adam_state",
    "read_checkpoint",
    "read_learning_rate",
    "resolve_checkpoints",
]

# Folders written by `transformers.Trainer` (and so by DataDietTrainer) hold the weights under one of these names.
_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLED = "pytorch_model.bin"
_ADAPTER = "adapter_model.safetensors"  # a Trainer checkpoint of a peft model holds the adapters only
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


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


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], float | None]:
    """Read the weights and the learning rate of one checkpoint.

    `path` is a `transformers.Trainer` / `DataDietTrainer` checkpoint folder (`model.safetensors`, sharded
    safetensors or `pytorch_model.bin`, and `trainer_state.json` whose `log_history` gives the learning rate at that
    step; a peft model's checkpoint holds `adapter_model.safetensors`, under peft's key names), or a single
    `.safetensors` / `.bin` / `.pt` file (learning rate `None`). Pickled files are read with
    `torch.load(weights_only=True)`: nothing but tensors is unpickled.

    Example:
    ```python
    >>> import tempfile, torch
    >>> from safetensors.torch import save_model
    >>> from datadiet.tracin import read_checkpoint
    >>> folder = tempfile.mkdtemp()
    >>> save_model(torch.nn.Linear(2, 2), f"{folder}/model.safetensors")
    >>> state_dict, lr = read_checkpoint(folder)
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
        elif (path / _ADAPTER).exists():
            state_dict = load_file(path / _ADAPTER)
        else:
            raise ValueError(
                f"No weights in {path}: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_PICKLED} or {_ADAPTER} (a "
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
        return self.state_dict if self.state_dict is not None else read_checkpoint(self.source)[0]


def resolve_checkpoints(checkpoints: Any, learning_rates: Sequence[float] | None = None) -> list[Checkpoint]:
    """The checkpoints of a run, as TracIn and LESS take them, each with its learning rate.

    Args:
        checkpoints: a list of checkpoint folders or weights files, `(folder, lr)` or `(state_dict, lr)` pairs; a
            single one of these stands for a list of one.
        learning_rates (`list[float]`, *optional*): one per checkpoint, overriding the pairs' and the folders'.

    Each learning rate is `learning_rates[i]` if given, else the pair's, else the one logged in the folder's
    `trainer_state.json` (at, or last before, the checkpoint's step). A `state_dict` is copied (the caller's model may
    keep training); a folder's weights are read when needed. Raises a `ValueError` saying what to give instead for an
    empty list, a count of learning rates other than the checkpoints', or a checkpoint with no learning rate.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.tracin.checkpoints import resolve_checkpoints
    >>> model = torch.nn.Linear(2, 2)
    >>> [(c.source, c.learning_rate) for c in resolve_checkpoints((model.state_dict(), 0.1))]
    [('#0', 0.1)]

    ```
    """
    if isinstance(checkpoints, (str, os.PathLike)) or (isinstance(checkpoints, tuple) and len(checkpoints) == 2
                                                       and isinstance(checkpoints[1], (int, float))):  # fmt: skip
        checkpoints = [checkpoints]
    if len(checkpoints) == 0:
        raise ValueError("checkpoints is empty: give at least one checkpoint folder or (state_dict, lr) pair.")
    if learning_rates is not None and len(learning_rates) != len(checkpoints):
        raise ValueError(f"{len(learning_rates)} learning_rates for {len(checkpoints)} checkpoints: give one each.")
    return [
        _resolve_checkpoint(spec, i, None if learning_rates is None else learning_rates[i])
        for i, spec in enumerate(checkpoints)
    ]


def _resolve_checkpoint(spec: Any, index: int, learning_rate: float | None) -> Checkpoint:
    """One checkpoint of `resolve_checkpoints`: the learning rate is `learning_rate` if given, else the pair's, else
    the one logged in the folder's `trainer_state.json`."""
    given_lr = None if learning_rate is None else float(learning_rate)
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ValueError(f"Checkpoint {index} is a tuple of {len(spec)} items: give (state_dict, lr).")
        weights, lr = spec
        given_lr = float(lr) if given_lr is None else given_lr
        if isinstance(weights, Mapping):
            # A copy: the caller's model may keep training and change the tensors under us.
            return Checkpoint(f"#{index}", given_lr, {k: v.detach().clone() for k, v in weights.items()})
        spec = weights
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(
            f"Checkpoint {index} is a {type(spec).__name__}: give a checkpoint folder, a weights file, or a "
            "(state_dict, learning_rate) pair."
        )
    path = Path(spec)
    lr = given_lr
    if lr is None:
        lr = read_learning_rate(path) if path.is_dir() else None
    if lr is None:
        raise ValueError(
            f"No learning rate for checkpoint {str(path)!r}: its folder has no {TRAINER_STATE} with a logged "
            "learning_rate. Pass learning_rates=[...] (one per checkpoint) or (path, lr) pairs."
        )
    if lr < 0 or not math.isfinite(lr):
        raise ValueError(f"Checkpoint {str(path)!r} has learning rate {lr}: it must be finite and >= 0.")
    return Checkpoint(str(path), lr)


@dataclass
class AdamState:
    """One parameter's Adam state in a checkpoint: the moments, the steps taken and the group's hyper-parameters."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: float
    betas: tuple[float, float]
    eps: float


def _trainer_decay_names(model: nn.Module) -> set[str] | None:
    try:
        from transformers import Trainer

        # The rule `Trainer.create_optimizer` splits parameters by (it does not read the Trainer's own state).
        return set(Trainer.get_decay_parameter_names(None, model))
    except (ImportError, AttributeError, TypeError):
        return None


def _optimizer_order(groups: list[dict], model: nn.Module, trainable: list[str]) -> tuple[list[str], str] | None:
    """The parameter name of each optimizer index, and the rule that gave it, or `None` if no rule fits."""
    sizes = [len(group["params"]) for group in groups]
    if all("param_names" in group for group in groups):  # an optimizer built from named parameters says so itself
        return [name for group in groups for name in group["param_names"]], "param_names"
    candidates = []
    decay = _trainer_decay_names(model)
    if decay is not None:
        split = [[n for n in trainable if n in decay], [n for n in trainable if n not in decay]]
        candidates.append((split, "transformers.Trainer's weight-decay groups"))
        candidates.append(([group for group in split if group], "transformers.Trainer's weight-decay groups"))
    candidates.append(([trainable], "named_parameters order"))
    for split, rule in candidates:
        if [len(group) for group in split] == sizes:
            return [name for group in split for name in group], rule
    return None


def read_adam_state(
    path: str | os.PathLike, model: nn.Module, parameter_names: list[str] | None = None
) -> dict[str, AdamState]:
    """The Adam / AdamW state of each trainable parameter of `model`, by name, from a Trainer checkpoint.

    `optimizer.pt` is `torch.optim.Optimizer.state_dict()`: its state is keyed by integer positions that number the
    parameters of `param_groups` in order, group after group. `transformers.Trainer.create_optimizer` builds two
    groups from `model.named_parameters()` (trainable parameters with weight decay, then those without: biases and
    norms), so position `i` is the `i`-th name of that split, not of `named_parameters()`. The split is rebuilt with
    the Trainer's own rule and accepted only if its group sizes equal the file's and every moment's shape equals its
    parameter's; a single group in `named_parameters()` order (a hand-built optimizer) is tried next.

    Args:
        path (`str` or `os.PathLike`): a checkpoint folder holding `optimizer.pt`, or the file itself.
        model (`nn.Module`): the model the checkpoint was trained as (e.g. the peft model given to the Trainer).
        parameter_names (`list[str]`, *optional*): the names wanted; every trainable parameter by default.

    Example:
    ```python
    >>> import tempfile, torch
    >>> from datadiet.tracin.checkpoints import read_adam_state
    >>> model = torch.nn.Linear(3, 2)
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> model(torch.randn(4, 3)).sum().backward(); optimizer.step()
    >>> folder = tempfile.mkdtemp()
    >>> torch.save(optimizer.state_dict(), f"{folder}/optimizer.pt")
    >>> state = read_adam_state(folder, model)
    >>> sorted(state), state["weight"].exp_avg.shape, state["weight"].step
    (['bias', 'weight'], torch.Size([2, 3]), 1.0)

    ```
    """
    path = Path(path)
    file = path / OPTIMIZER_STATE if path.is_dir() else path
    if not file.exists():
        raise ValueError(
            f"No optimizer state at {str(file)!r}: Adam normalisation needs the {OPTIMIZER_STATE} of a Trainer "
            "checkpoint (saved unless save_only_model=True). Pass adam=False to use plain gradients."
        )
    saved = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(saved, Mapping) or "state" not in saved or "param_groups" not in saved:
        raise ValueError(f"{file} is not a torch optimizer state_dict (no 'state' and 'param_groups').")
    named = dict(model.named_parameters())
    trainable = [name for name, param in named.items() if param.requires_grad]
    found = _optimizer_order(saved["param_groups"], model, trainable)
    if found is None:
        sizes = [len(group["params"]) for group in saved["param_groups"]]
        raise ValueError(
            f"The optimizer in {file} has parameter groups of sizes {sizes}, which fit neither transformers.Trainer's "
            f"grouping nor a single group of the model's {len(trainable)} trainable parameters: pass the model the "
            "checkpoint was trained as (same trainable parameters, e.g. the same peft LoraConfig)."
        )
    order, rule = found
    by_name = {}
    for name, (group, index) in zip(order, ((g, i) for g in saved["param_groups"] for i in g["params"])):
        state = saved["state"].get(index, {})
        if "exp_avg" not in state or "exp_avg_sq" not in state:
            by_name[name] = None
            continue
        if state["exp_avg"].shape != named[name].shape:
            raise ValueError(
                f"The optimizer in {file} does not fit the model: position {index}, read as {name} by "
                f"{rule}, has moments of shape {tuple(state['exp_avg'].shape)}, the parameter "
                f"{tuple(named[name].shape)}. Pass the model the checkpoint was trained as."
            )
        betas = tuple(float(b) for b in group.get("betas", (0.9, 0.999)))
        by_name[name] = AdamState(
            state["exp_avg"], state["exp_avg_sq"], float(state.get("step", 0)), betas, float(group["eps"])
        )
    wanted = trainable if parameter_names is None else list(parameter_names)
    missing = [name for name in wanted if by_name.get(name) is None]
    if missing:
        raise ValueError(
            f"The optimizer in {file} holds no Adam moments for {missing[:3]}{' ...' if len(missing) > 3 else ''} "
            "(never updated, or not an Adam optimizer). Pass adam=False to use plain gradients."
        )
    logger.info("%s: optimizer positions mapped to parameter names by %s.", file, rule)
    return {name: by_name[name] for name in wanted}
