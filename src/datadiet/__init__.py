"""datadiet: find the training examples that matter, inside the Hugging Face ecosystem.

The public names are loaded on first use (PEP 562), so `import datadiet` and the `datadiet` command do not pay for
transformers, accelerate or cvxpy until something needs them."""

from __future__ import annotations

import importlib

__version__ = "0.1.0.dev0"

# public name -> submodule defining it
_EXPORTS = {
    "ScoreTransform": "data",
    "join_scores": "engine",
    "load_scores": "engine",
    "score_dataset": "scoring",
    "HostCPResult": "selection.hostcp",
    "prune_hostcp": "selection.hostcp",
    "select_hostcp": "selection.hostcp",
    "push_to_hub": "hub",
    "save_pruned": "hub",
    "read_provenance": "provenance",
    "record_provenance": "provenance",
    "el2n": "scores",
    "entropy": "scores",
    "get_score": "scores",
    "input_norm": "scores",
    "list_scores": "scores",
    "loss": "scores",
    "margin": "scores",
    "per_example_grad_norms": "scores",
    "register_score": "scores",
    "list_strategies": "selection",
    "prune": "selection",
    "InfluenceResult": "tracin",
    "TracIn": "tracin",
    "DataDietConfig": "trainer",
    "DataDietTrainer": "trainer",
    "ScoreCallback": "trainer",
    "with_row_ids": "trainer",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'datadiet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
