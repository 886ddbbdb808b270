"""Loading batches ahead of the model: rows are read and preprocessed (images decoded and transformed, text
tokenised) in a background thread while the model scores the batch before, so that decoding overlaps inference."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch"]

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")

_END = object()


def prefetch(load: Callable[[Item], Loaded], items: Iterable[Item], depth: int = 2) -> Iterator[Loaded]:
    """`load(item)` for each of `items`, in order, computed by one background thread that runs at most `depth`
    items ahead of the caller. The items are iterated in that thread too (reading a stream is part of the loading).
    An exception raised while iterating or loading is raised in the caller, at the item where it happened; closing
    the generator early stops the thread.

    Example:
    ```python
    >>> from datadiet.engine.prefetch import prefetch
    >>> list(prefetch(lambda n: n * n, range(5)))
    [0, 1, 4, 9, 16]

    ```
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1 (items loaded ahead), got {depth}.")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((load(item), None)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the caller, raised there
            put((_END, error))
        else:
            put((_END, None))

    thread = threading.Thread(target=produce, name="datadiet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value, error = ready.get()
            if value is _END:
                if error is not None:
                    raise error
                return
            yield value
    finally:
        stop.set()
        thread.join()
