"""Dynamic pruning (InfoBatch, Qin et al. 2024) for `DataDietTrainer`: the epoch plan of kept rows and loss weights,
the sampler that yields the kept rows, and a learning-rate schedule driven by epochs rather than steps."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DynamicPruning",
    "DynamicPruningSampler",
    "EpochProgressScheduler",
    "plan_epoch",
    "resume_position",
    "steps_in_epoch",
]


class DynamicPruningSampler(torch.utils.data.Sampler):
    """Yields the rows kept for the current epoch (set by the trainer at the start of each epoch) in a random order
    seeded by (seed, epoch), identical on every process so that accelerate can shard it.

    Example:
    ```python
    >>> import numpy as np
    >>> from datadiet.trainer.dynamic import DynamicPruningSampler
    >>> sampler = DynamicPruningSampler(6, seed=0)
    >>> sampler.set_plan(1, np.array([0, 2, 4]))
    >>> len(sampler), sorted(sampler)
    (3, [0, 2, 4])

    ```
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self.kept = np.arange(num_rows)

    def set_plan(self, epoch: int, kept: np.ndarray) -> None:
        """Yield the rows `kept` during `epoch`."""
        self.epoch = epoch
        self.kept = np.asarray(kept, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        # The epoch comes with the plan; the Trainer's call is a no-op here.
        pass

    def __len__(self) -> int:
        return len(self.kept)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.kept), generator=generator).numpy()
        yield from self.kept[order].tolist()


class EpochProgressScheduler:
    """Drives a learning-rate schedule by the fraction of epochs completed rather than by optimizer steps, so that
    epochs shortened by dynamic pruning move through the schedule as fast as full epochs and the schedule ends on
    time (it was built for the full-data number of steps).

    Example (an epoch of 2 steps instead of 4 moves the schedule by a whole epoch):
    ```python
    >>> import torch
    >>> from datadiet.trainer.dynamic import EpochProgressScheduler
    >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> scheduler = EpochProgressScheduler(torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, 8), 4)
    >>> scheduler.start_epoch(0, 2)
    >>> for _ in range(2):
    ...     optimizer.step()
    ...     scheduler.step()
    >>> scheduler.get_last_lr()
    [0.5]

    ```
    """

    def __init__(self, scheduler, steps_per_epoch: int):
        self.scheduler = scheduler
        self.steps_per_epoch = steps_per_epoch
        self.progress = 0.0
        self.inner_steps = 0
        self.advance = 1.0

    def _catch_up(self, target: float) -> None:
        while self.inner_steps < math.floor(target + 1e-6):
            self.scheduler.step()
            self.inner_steps += 1

    def start_epoch(self, epoch: int, steps_this_epoch: int) -> None:
        """Begin `epoch`, which takes `steps_this_epoch` optimizer steps."""
        self.progress = float(epoch * self.steps_per_epoch)
        self._catch_up(self.progress)
        self.advance = self.steps_per_epoch / max(steps_this_epoch, 1)

    def step(self) -> None:
        self.progress += self.advance
        self._catch_up(self.progress)

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "progress": self.progress, "inner_steps": self.inner_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress, self.inner_steps = state["progress"], state["inner_steps"]

    def __getattr__(self, name):
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)


def plan_epoch(
    scores: np.ndarray | None,
    *,
    epoch: int,
    num_rows: int,
    ratio: float,
    pruning_epochs: int,
    seed: int,
    batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows kept in `epoch` and every row's loss weight (InfoBatch, Qin et al. 2024, sec. 3.1-3.2): each row whose
    last score is below the mean is skipped with probability `ratio`, the kept ones among them weighted
    1 / (1 - ratio); rows never scored (NaN) are kept. From epoch `pruning_epochs` on (InfoBatch's annealing), or
    without scores, every row is kept with weight 1.

    Args:
        scores (`np.ndarray` of shape `[num_rows]`, *optional*): each row's latest score (e.g. its training loss).
        epoch (`int`): the epoch planned (0-based); with `seed`, it seeds the random skipping.
        num_rows (`int`): rows in the training set.
        ratio (`float`): the probability of skipping a row below the mean score.
        pruning_epochs (`int`): the number of leading epochs that prune.
        seed (`int`): the training seed.
        batch_size (`int`): the per-device training batch size.
        gradient_accumulation_steps (`int`): with more than 1, a few skipped rows are restored so that every process
            steps whole accumulations.
        world_size (`int`): the number of processes.

    Example:
    ```python
    >>> import numpy as np
    >>> from datadiet.trainer.dynamic import plan_epoch
    >>> kept, weights = plan_epoch(np.array([0.1, 0.2, 3.0, 4.0]), epoch=0, num_rows=4, ratio=0.5, pruning_epochs=1,
    ...                            seed=0, batch_size=2, gradient_accumulation_steps=1, world_size=1)
    >>> 2 in kept and 3 in kept, float(weights[2:].max())
    (True, 1.0)

    ```
    """
    weights = np.ones(num_rows, dtype=np.float32)
    kept = np.arange(num_rows)
    if scores is not None and epoch < pruning_epochs and ratio > 0 and np.isfinite(scores).any():
        seen = np.isfinite(scores)
        # Easy = below the mean score; rows never scored yet are kept.
        easy = seen & (scores < scores[seen].mean())
        rng = np.random.default_rng([seed, epoch])
        skip = easy & (rng.random(num_rows) < ratio)
        if gradient_accumulation_steps > 1:
            # Whole accumulations on every process: top the kept rows up to a multiple of the global batch by
            # restoring a few skipped ones (otherwise the epoch's last partial accumulation would never be
            # stepped, its gradient spilling into the next epoch).
            unit = batch_size * gradient_accumulation_steps * max(world_size, 1)
            target = min(num_rows, math.ceil((num_rows - skip.sum()) / unit) * unit)
            restore = target - (num_rows - int(skip.sum()))
            if restore > 0:
                skip[rng.choice(np.flatnonzero(skip), size=restore, replace=False)] = False
        weights[easy & ~skip] = 1.0 / (1.0 - ratio)
        kept = np.flatnonzero(~skip)
    return kept, weights


def steps_in_epoch(num_rows: int, *, batch_size: int, gradient_accumulation_steps: int, world_size: int) -> int:
    """Optimizer steps of an epoch over `num_rows` rows, counted like the Trainer counts them for a full epoch.

    Example:
    ```python
    >>> from datadiet.trainer.dynamic import steps_in_epoch
    >>> steps_in_epoch(100, batch_size=8, gradient_accumulation_steps=2, world_size=1)
    7

    ```
    """
    batches = math.ceil(math.ceil(num_rows / batch_size) / max(world_size, 1))
    return math.ceil(batches / gradient_accumulation_steps)


def resume_position(pruning_history: list[dict], global_step: int) -> tuple[int, int] | None:
    """(epochs completed, optimizer steps into the next epoch) at `global_step` of a dynamically pruned run, from the
    steps each planned epoch took (`pruning_history`): its epochs are shorter than the Trainer's full-data count, so
    `global_step // steps_per_epoch` would resume in the wrong epoch. None for a history without step counts.

    Example:
    ```python
    >>> from datadiet.trainer.dynamic import resume_position
    >>> resume_position([{"epoch": 0, "steps": 8}, {"epoch": 1, "steps": 6}, {"epoch": 2, "steps": 5}], 16)
    (2, 2)

    ```
    """
    completed = 0
    for entry in sorted(pruning_history, key=lambda entry: entry["epoch"]):
        if "steps" not in entry:
            return None
        if completed + entry["steps"] > global_step:
            return entry["epoch"], global_step - completed
        completed += entry["steps"]
    last = max((entry["epoch"] for entry in pruning_history), default=-1)
    return last + 1, global_step - completed


class DynamicPruning:
    """`DataDietTrainer`'s dynamic pruning (a mixin of its `Trainer`): each epoch's plan of kept rows and loss weights
    set on its [`DynamicPruningSampler`], and the epoch-driven learning-rate schedule. The trainer holds
    `_pruning_sampler`, `_pruning_weights`, `pruning_history`, `score_callback` and `_steps_per_epoch`."""

    def _plan_epoch(self, epoch: int) -> None:
        """Choose the rows of `epoch` and their loss weights (InfoBatch, Qin et al. 2024, sec. 3.1-3.2)."""
        sampler = self._pruning_sampler
        if sampler is None:
            return
        num_rows = sampler.num_rows
        dynamics = self.score_callback.dynamics
        scores = dynamics.latest(self.args.dynamic_pruning_score) if dynamics and dynamics.num_epochs else None
        kept, weights = plan_epoch(
            scores,
            epoch=epoch,
            num_rows=num_rows,
            ratio=self.args.dynamic_pruning_ratio,
            # InfoBatch's annealing: the final (1 - until) of the epochs train on the full data.
            pruning_epochs=int(self.args.dynamic_pruning_until * self.args.num_train_epochs),
            seed=self.args.seed,
            batch_size=self._train_batch_size,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            world_size=self.args.world_size,
        )
        sampler.set_plan(epoch, kept)
        self._pruning_weights = torch.as_tensor(weights, device=self.args.device)
        skipped_fraction = 1.0 - len(kept) / max(num_rows, 1)
        steps = steps_in_epoch(
            len(kept),
            batch_size=self._train_batch_size,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            world_size=self.args.world_size,
        )
        # A run resumed in the middle of `epoch` plans it again, identically: one entry per epoch.
        entry = {"epoch": epoch, "kept": len(kept), "skipped_fraction": skipped_fraction, "steps": steps}
        self.pruning_history = [e for e in self.pruning_history if e["epoch"] < epoch] + [entry]
        if isinstance(self.lr_scheduler, EpochProgressScheduler):
            self.lr_scheduler.start_epoch(epoch, steps)
        logger.info("Epoch %d: dynamic pruning skips %.1f%% of the rows.", epoch, 100 * skipped_fraction)
        self.log({"dynamic_pruning_skipped_fraction": skipped_fraction})

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.args.dynamic_pruning and not isinstance(scheduler, EpochProgressScheduler):
            self.lr_scheduler = EpochProgressScheduler(scheduler, self._steps_per_epoch)
        return self.lr_scheduler
