"""timm models in `DataDietTrainer` checkpoints: saved as timm saves them (unprefixed keys, timm's `config.json`), so
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))` loads them, and loaded back strictly."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models import ClassifierWrapper

__all__ = ["TimmCheckpoints", "is_timm_model", "load_timm_weights", "save_timm_model", "wrapped_timm_model"]


def is_timm_model(model) -> bool:
    """Whether `model` was built by timm (`timm.create_model`)."""
    return type(model).__module__.startswith("timm.") and hasattr(model, "pretrained_cfg")


def wrapped_timm_model(model) -> torch.nn.Module | None:
    """The timm network inside a [`~datadiet.models.ClassifierWrapper`], or None for any other model."""
    if isinstance(model, ClassifierWrapper) and is_timm_model(model.model):
        return model.model
    return None


def save_timm_model(network: torch.nn.Module, output_dir: str | os.PathLike, args=None) -> None:
    """Save a timm `network` in `output_dir` with timm's own `save_for_hf`: `model.safetensors` with the network's
    keys and timm's `config.json` (architecture, number of classes, input configuration, the class names when
    `network.pretrained_cfg` has them); plus the Trainer's
    `training_args.bin` when `args` are given.

    Example:
    ```python
    >>> import tempfile, timm
    >>> from datadiet.trainer.timm_checkpoint import save_timm_model
    >>> folder = tempfile.mkdtemp()
    >>> save_timm_model(timm.create_model("test_resnet", num_classes=3), folder)
    >>> model = timm.create_model("test_resnet", pretrained=True, num_classes=3,
    ...                           pretrained_cfg_overlay=dict(file=f"{folder}/model.safetensors"))
    >>> model.num_classes
    3

    ```
    """
    from timm.models import save_for_hf
    from transformers.trainer import TRAINING_ARGS_NAME

    label_names = (getattr(network, "pretrained_cfg", None) or {}).get("label_names")
    model_config = {"label_names": list(label_names)} if label_names else None  # the classes, as timm records them
    save_for_hf(network, str(output_dir), model_config=model_config, safe_serialization=True)
    if args is not None:
        torch.save(args, Path(output_dir) / TRAINING_ARGS_NAME)


def load_timm_weights(network: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load the `model.safetensors` that [`save_timm_model`] wrote in `folder` into `network`, every key matching."""
    from safetensors.torch import load_model

    path = Path(folder) / "model.safetensors"
    if not path.exists():
        raise ValueError(f"{str(folder)!r} holds no model.safetensors: it is not a checkpoint of this timm model.")
    load_model(network, str(path), strict=True)


class TimmCheckpoints:
    """Trainer mixin: a wrapped timm model is saved, resumed and reloaded as timm does it; any other model as the
    Trainer does."""

    def _save(self, output_dir=None, state_dict=None):
        network = wrapped_timm_model(self.model)
        if network is None:
            return super()._save(output_dir, state_dict)
        save_timm_model(network, output_dir if output_dir is not None else self.args.output_dir, self.args)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        network = wrapped_timm_model(self.model) if model is None else None
        if network is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_timm_weights(network, resume_from_checkpoint)

    def _load_best_model(self):
        network = wrapped_timm_model(self.model)
        if network is None:
            return super()._load_best_model()
        load_timm_weights(network, self.state.best_model_checkpoint)
