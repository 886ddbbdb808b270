"""datadiet: find the training examples that matter, inside the Hugging Face ecosystem."""

__version__ = "0.1.0.dev0"

from .scores import el2n, entropy, get_score, input_norm, list_scores, loss, margin, register_score

__all__ = [
    "__version__",
    "el2n",
    "entropy",
    "get_score",
    "input_norm",
    "list_scores",
    "loss",
    "margin",
    "register_score",
]
