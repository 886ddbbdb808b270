"""Per-example scores in pure PyTorch (no Hugging Face import): forward-pass scores, exact per-example gradient norms,
and a registry mapping config and column names to implementations."""

from .functional import el2n, entropy, input_norm, loss, margin
from .grad_norms import grand, per_example_grad_norms
from .registry import ScoreSpec, get_score, get_score_spec, list_scores, register_score
from .trackers import (
    TrainingDynamics,
    area_under_margin,
    confidence,
    correctness,
    forgetting_events,
    training_quantities,
    variability,
)

__all__ = [
    "TrainingDynamics",
    "area_under_margin",
    "confidence",
    "correctness",
    "forgetting_events",
    "training_quantities",
    "variability",
    "ScoreSpec",
    "el2n",
    "entropy",
    "get_score",
    "get_score_spec",
    "grand",
    "input_norm",
    "list_scores",
    "loss",
    "margin",
    "per_example_grad_norms",
    "register_score",
]
