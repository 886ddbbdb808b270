"""A small registry of tasks, timm-style: the names are the strings used in configs and on the command line."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["check_task_name", "get_task", "list_tasks", "register_task"]

_REGISTRY: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator registering a task class under `name` (also set as the class's `name` attribute)."""

    def decorator(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_task(name: str, **kwargs):
    """A task object: the class registered as `name`, built with `kwargs` (e.g. `tokenizer=`, `max_length=`).

    Example:
    ```python
    >>> from datadiet.tasks import get_task
    >>> get_task("image_classification").name
    'image_classification'

    ```
    """
    return _REGISTRY[check_task_name(name)](**kwargs)


def check_task_name(name: str) -> str:
    """`name` if it is a registered task; otherwise a `ValueError` listing the tasks, with the closest as a suggestion.

    Example:
    ```python
    >>> from datadiet.tasks import check_task_name
    >>> check_task_name("causal_lm")
    'causal_lm'

    ```
    """
    if name not in _REGISTRY:
        from ..validation import closest_names

        close = closest_names(str(name), list_tasks())
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown task {name!r}{hint}. Valid tasks: {', '.join(list_tasks())}.")
    return name


def list_tasks() -> list[str]:
    """The names of all registered tasks, sorted.

    Example:
    ```python
    >>> from datadiet.tasks import list_tasks
    >>> list_tasks()
    ['causal_lm', 'image_classification', 'text_classification']

    ```
    """
    return sorted(_REGISTRY)
