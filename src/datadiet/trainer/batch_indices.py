"""Row identity from the sampler: which dataset rows each batch of a (prepared) `DataLoader` holds, recorded from the
indices its batch sampler yields in this process, so that no collator, transform or column removal can lose it."""

from __future__ import annotations

from collections import deque

import torch

__all__ = ["BatchIndexRecorder", "record_batch_indices"]


class BatchIndexRecorder:
    """Wraps a `DataLoader`'s batch sampler and remembers, in order, the dataset indices of every batch it yields in
    this process (after accelerate's sharding). The data loader turns the batches into data in the same order (also
    with workers, which keep the order), so the n-th batch the training loop receives holds the indices of the n-th
    recorded one: [`pop`] returns them. A new pass over the loader (a new epoch) forgets what was left unread.

    Attributes of the wrapped batch sampler (`set_epoch`, `sampler`, `batch_size`...) are reached through it.

    Example:
    ```python
    >>> from torch.utils.data import BatchSampler, SequentialSampler
    >>> from datadiet.trainer.batch_indices import BatchIndexRecorder
    >>> recorder = BatchIndexRecorder(BatchSampler(SequentialSampler(range(5)), batch_size=2, drop_last=False))
    >>> batches = list(recorder)
    >>> recorder.pop(2), recorder.pop(2), recorder.pop(1)
    ([0, 1], [2, 3], [4])

    ```
    """

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler
        self._pending: deque[list[int]] = deque()
        self._skip = 0

    def skip_next(self, num_batches: int) -> None:
        """Do not record the first `num_batches` batches of the next pass (batches a resumed epoch skips unread)."""
        self._skip = int(num_batches)

    def __iter__(self):
        self._pending.clear()
        skip, self._skip = self._skip, 0
        for position, batch in enumerate(self.batch_sampler):
            if position >= skip:
                self._pending.append([int(index) for index in batch])
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __getattr__(self, name):
        if name == "batch_sampler":
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)

    def pop(self, batch_size: int) -> list[int]:
        """The dataset indices of the next batch received, checked against its `batch_size`."""
        if not self._pending:
            raise ValueError(
                "A training batch arrived that its data loader's sampler never yielded: the batches were not drawn "
                "from the training data loader the Trainer built. Score training with that loader (or train with "
                "DataDietTrainer)."
            )
        indices = self._pending.popleft()
        if len(indices) != batch_size:
            raise ValueError(
                f"A training batch holds {batch_size} examples but its sampler yielded {len(indices)} rows: the "
                "data collator added or dropped examples, so scores cannot be attached to rows. Use a collator that "
                "returns one example per row it receives, in order."
            )
        return indices


def record_batch_indices(dataloader) -> BatchIndexRecorder:
    """Install a [`BatchIndexRecorder`] on `dataloader` (a torch or accelerate `DataLoader` over a map-style
    dataset) and return it; an installed recorder is returned as it is.

    Raises `ValueError` where rows cannot be known from the sampler: an iterable (streaming) dataset, or a loader that
    dispatches one process's batches to all.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.trainer.batch_indices import record_batch_indices
    >>> loader = torch.utils.data.DataLoader(torch.arange(10.0), batch_size=4, shuffle=True)
    >>> recorder = record_batch_indices(loader)
    >>> batch = next(iter(loader))
    >>> bool((batch == torch.tensor(recorder.pop(len(batch)), dtype=torch.float)).all())
    True

    ```
    """
    current = getattr(dataloader, "batch_sampler", None)
    if isinstance(current, BatchIndexRecorder):
        return current
    dataset = getattr(dataloader, "dataset", None)
    if isinstance(dataset, torch.utils.data.IterableDataset) or current is None:
        raise ValueError(
            f"Scores are attached to rows by position, which a {type(dataset).__name__} (iterable, streaming) "
            "training set does not have: materialise it first (e.g. `Dataset.from_generator(...)` or "
            "`load_dataset(..., streaming=False)`), or score it with `datadiet.score_dataset(..., row_id_column=...)`."
        )
    if type(dataloader).__name__ == "DataLoaderDispatcher":
        raise ValueError(
            "The training data loader dispatches batches from the main process (accelerate dispatch_batches=True), "
            "so a process cannot know its rows: set `accelerator_config={'dispatch_batches': False}`."
        )
    recorder = BatchIndexRecorder(current)
    # accelerate's loaders iterate a torch DataLoader they hold (`base_dataloader`). A DataLoader refuses to change its
    # batch sampler once built; the recorder yields the very same batches, and the loader reads `batch_sampler` afresh
    # at each pass.
    loader = vars(dataloader).get("base_dataloader", dataloader)
    object.__setattr__(loader, "batch_sampler", recorder)
    return recorder
