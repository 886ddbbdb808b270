"""A small registry of per-example scores, timm-style: the names are the strings used in configs and dataset columns."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ScoreSpec", "register_score", "get_score", "get_score_spec", "list_scores", "varies_with_the_model"]

# What a score needs from a batch: the logits (and labels), the model inputs, or the model itself (gradients).
_NEEDS = ("logits", "inputs", "gradients")


@dataclass(frozen=True)
class ScoreSpec:
    """A registered score.

    Args:
        name: the method name, also the dataset column it fills.
        fn: the implementation.
        needs: `"logits"` (`fn(logits, labels)`), `"inputs"` (`fn(inputs)`) or `"gradients"`
            (`fn(model, inputs, labels)`).
        higher_is_harder: whether a higher value marks a harder / more important example. Pruning strategies orient
            themselves by it (e.g. a low `margin` is hard).
    """

    name: str
    fn: Callable
    needs: str = "logits"
    higher_is_harder: bool = True


_REGISTRY: dict[str, ScoreSpec] = {}


def register_score(name: str, *, needs: str = "logits", higher_is_harder: bool = True) -> Callable:
    """Decorator registering `fn` as the score `name`.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores import register_score, get_score
    >>> @register_score("max_logit")
    ... def max_logit(logits, labels):
    ...     return logits.max(dim=-1).values
    >>> get_score("max_logit")(torch.tensor([[1.0, 3.0]]), torch.tensor([0]))
    tensor([3.])

    ```
    """
    if needs not in _NEEDS:
        raise ValueError(f"needs={needs!r} is not one of {_NEEDS}.")

    def decorator(fn: Callable) -> Callable:
        _REGISTRY[name] = ScoreSpec(name=name, fn=fn, needs=needs, higher_is_harder=higher_is_harder)
        return fn

    return decorator


def get_score_spec(name: str) -> ScoreSpec:
    """The `ScoreSpec` registered as `name`; a `ValueError` listing the valid names otherwise."""
    if name not in _REGISTRY:
        # `datadiet.validation.closest_names` is out of reach of the pure-torch scores: difflib directly.
        close = difflib.get_close_matches(str(name).lower(), list_scores(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown score method {name!r}{hint}. Valid methods: {', '.join(list_scores())}.")
    return _REGISTRY[name]


def get_score(name: str) -> Callable:
    """The implementation of the score `name`."""
    return get_score_spec(name).fn


def list_scores() -> list[str]:
    """The names of all registered scores, sorted."""
    return sorted(_REGISTRY)


def varies_with_the_model(name: str) -> bool:
    """Whether the score `name` depends on the model (and so spreads over seeds). A score of the inputs alone, such as
    `input_norm`, is the same for every seed: it gets no `<name>_std` column. Names that are not registered scores
    (e.g. tracked summaries) are taken to depend on the model."""
    return name not in _REGISTRY or _REGISTRY[name].needs != "inputs"
