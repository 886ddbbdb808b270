"""A small registry of per-example scores, timm-style: the names are the strings used in configs and dataset columns."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ScoreSpec", "register_score", "get_score", "get_score_spec", "list_scores", "varies_with_the_model"]

# What a score needs from a batch: the logits (and labels), the model inputs, the model itself (gradients), or (causal
# LMs' `ifd`) the losses of the response with and without its instruction.
_NEEDS = ("logits", "inputs", "gradients", "response")


@dataclass(frozen=True)
class ScoreSpec:
    """A registered score.

    Args:
        name: the method name, also the dataset column it fills.
        fn: the implementation.
        needs: `"logits"` (`fn(logits, labels)`), `"inputs"` (`fn(inputs)`), `"gradients"`
            (`fn(model, inputs, labels)`) or `"response"` (`fn(conditioned_loss, response_loss)`).
        higher_is_harder: whether a higher value marks a harder / more important example. Pruning strategies orient
            themselves by it (e.g. a low `margin` is hard).
        task: `None` for classification scores, else the task whose outputs `fn` reads (`"causal_lm"`): a causal LM's
            `loss` or `el2n` share a classifier's names but not its implementation.
    """

    name: str
    fn: Callable
    needs: str = "logits"
    higher_is_harder: bool = True
    task: str | None = None


_REGISTRY: dict[str, ScoreSpec] = {}
_TASK_REGISTRIES: dict[str, dict[str, ScoreSpec]] = {}


def register_score(
    name: str, *, needs: str = "logits", higher_is_harder: bool = True, task: str | None = None
) -> Callable:
    """Decorator registering `fn` as the score `name` (of the task `task`; classification when `None`).

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
        registry = _REGISTRY if task is None else _TASK_REGISTRIES.setdefault(task, {})
        registry[name] = ScoreSpec(name=name, fn=fn, needs=needs, higher_is_harder=higher_is_harder, task=task)
        return fn

    return decorator


def _registry(task: str | None) -> dict[str, ScoreSpec]:
    if task is None:
        return _REGISTRY
    if task not in _TASK_REGISTRIES:
        raise ValueError(f"No scores are registered for task {task!r}; tasks with scores: {sorted(_TASK_REGISTRIES)}.")
    return _TASK_REGISTRIES[task]


def get_score_spec(name: str, task: str | None = None) -> ScoreSpec:
    """The `ScoreSpec` registered as `name` (for `task`); a `ValueError` listing the valid names otherwise."""
    registry = _registry(task)
    if name not in registry:
        which = f" for task {task!r}" if task is not None else ""
        # `datadiet.validation.closest_names` is out of reach of the pure-torch scores: difflib directly.
        close = difflib.get_close_matches(str(name).lower(), list_scores(task), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown score method {name!r}{which}{hint}. Valid methods: {', '.join(list_scores(task))}.")
    return registry[name]


def get_score(name: str, task: str | None = None) -> Callable:
    """The implementation of the score `name` (for `task`)."""
    return get_score_spec(name, task).fn


def list_scores(task: str | None = None) -> list[str]:
    """The names of all registered scores (of `task`; classification scores when `None`), sorted."""
    return sorted(_registry(task))


def varies_with_the_model(name: str) -> bool:
    """Whether the score `name` depends on the model (and so spreads over seeds). A score of the inputs alone, such as
    `input_norm`, is the same for every seed: it gets no `<name>_std` column. Names that are not registered scores
    (e.g. tracked summaries) are taken to depend on the model."""
    return name not in _REGISTRY or _REGISTRY[name].needs != "inputs"
