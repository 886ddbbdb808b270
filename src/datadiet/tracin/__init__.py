"""TracIn (Pruthi et al. 2020): influence of training examples through the checkpoints of a training run. The
per-example gradients and the projector live in `datadiet.scores.gradients`; checkpoint reading in `checkpoints`."""

import warnings

from .checkpoints import read_checkpoint
from .influence import InfluenceResult, TracIn

__all__ = ["InfluenceResult", "TracIn", "read_checkpoint"]


def __getattr__(name: str):
    if name == "load_checkpoint":  # the old name, beside `datadiet.model_sources.load_checkpoint` which loads a model
        warnings.warn(
            "datadiet.tracin.load_checkpoint is renamed read_checkpoint and will be removed in datadiet 0.2.0: "
            "use `from datadiet.tracin import read_checkpoint`.",
            FutureWarning,
            stacklevel=2,
        )
        return read_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
