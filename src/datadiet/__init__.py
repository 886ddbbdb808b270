"""datadiet: find the training examples that matter, inside the Hugging Face ecosystem."""

__version__ = "0.1.0.dev0"

from .data import ScoreTransform
from .engine import join_scores, load_scores, score_dataset
from .hostcp import HostCPResult, prune_hostcp, select_hostcp
from .hub import push_to_hub, save_pruned
from .provenance import read_provenance, record_provenance
from .scores import (
    el2n,
    entropy,
    get_score,
    input_norm,
    list_scores,
    loss,
    margin,
    per_example_grad_norms,
    register_score,
)
from .selection import list_strategies, prune
from .tracin import InfluenceResult, TracIn
from .trainer import DataDietConfig, DataDietTrainer, ScoreCallback, with_row_ids

__all__ = [
    "HostCPResult",
    "InfluenceResult",
    "TracIn",
    "prune_hostcp",
    "select_hostcp",
    "DataDietConfig",
    "DataDietTrainer",
    "ScoreCallback",
    "ScoreTransform",
    "__version__",
    "el2n",
    "entropy",
    "get_score",
    "input_norm",
    "join_scores",
    "list_scores",
    "list_strategies",
    "load_scores",
    "loss",
    "margin",
    "per_example_grad_norms",
    "prune",
    "push_to_hub",
    "read_provenance",
    "record_provenance",
    "register_score",
    "save_pruned",
    "score_dataset",
    "with_row_ids",
]
