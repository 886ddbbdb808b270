"""Per-example scores in pure PyTorch (no Hugging Face import): forward-pass scores, exact per-example gradient norms,
per-example gradients for TracIn, training-dynamics trackers, the dispatch of methods over a batch, and a registry
mapping config and column names to implementations (per task: a causal LM's `loss` is not a classifier's)."""

from .batch import main_input, score_batch, validate_methods
from .causal_lm import causal_lm_el2n, causal_lm_loss, causal_lm_perplexity, ifd
from .functional import el2n, entropy, input_norm, loss, margin
from .grad_norms import causal_lm_grand, grand, per_example_grad_norms
from .gradients import RandomProjector, per_example_gradients, tracin_self_influence
from .logits import forward_logits, unwrap_logits
from .registry import ScoreSpec, get_score, get_score_spec, list_scores, register_score, varies_with_the_model
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
    "RandomProjector",
    "ScoreSpec",
    "TrainingDynamics",
    "area_under_margin",
    "causal_lm_el2n",
    "causal_lm_grand",
    "causal_lm_loss",
    "causal_lm_perplexity",
    "confidence",
    "correctness",
    "el2n",
    "entropy",
    "forgetting_events",
    "forward_logits",
    "get_score",
    "get_score_spec",
    "grand",
    "ifd",
    "input_norm",
    "list_scores",
    "loss",
    "main_input",
    "margin",
    "per_example_grad_norms",
    "per_example_gradients",
    "register_score",
    "score_batch",
    "tracin_self_influence",
    "varies_with_the_model",
    "training_quantities",
    "unwrap_logits",
    "validate_methods",
    "variability",
]
