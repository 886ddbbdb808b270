"""datadiet: find the training examples that matter, inside the Hugging Face ecosystem."""

__version__ = "0.1.0.dev0"

from .data import ScoreTransform
from .engine import score_dataset
from .hub import push_to_hub, save_pruned
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
    "push_to_hub",
    "read_provenance",
    "record_provenance",
    "register_score",
    "save_pruned",
    "score_dataset",
]
