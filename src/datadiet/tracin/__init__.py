"""TracIn (Pruthi et al. 2020): influence of training examples through the checkpoints of a training run. The
per-example gradients and the projector live in `datadiet.scores.gradients`; checkpoint reading in `checkpoints`."""

from .checkpoints import load_checkpoint
from .influence import InfluenceResult, TracIn

__all__ = ["InfluenceResult", "TracIn", "load_checkpoint"]
