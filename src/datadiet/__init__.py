"""datadiet: find the training examples that matter, inside the Hugging Face ecosystem."""

__version__ = "0.1.0.dev0"

from .data import ScoreTransform
from .engine import score_dataset
from .provenance import read_provenance, record_provenance
from .scores import el2n, entropy, get_score, input_norm, list_scores, loss, margin, register_score
from .selection import list_strategies, prune

__all__ = [
    "ScoreTransform",
    "__version__",
    "el2n",
    "entropy",
    "get_score",
    "input_norm",
    "list_scores",
    "list_strategies",
    "loss",
    "margin",
    "prune",
    "read_provenance",
    "record_provenance",
    "register_score",
    "score_dataset",
]
