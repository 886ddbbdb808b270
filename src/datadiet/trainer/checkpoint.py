"""Score state in Trainer checkpoints (saved next to the Trainer's own files, restored on `resume_from_checkpoint`)
and the final scores written to `<output_dir>/scores/` in the keyed Parquet layout `datadiet.load_scores` reads."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..engine.store import SCORING_CONFIG_FILE, check_or_write_config, write_shard
from ..scores.trackers import TRACKED_QUANTITIES, TrainingDynamics

logger = logging.getLogger(__name__)

__all__ = [
    "checkpoint_folder",
    "dynamics_from_history",
    "load_checkpoint_state",
    "load_trainer_state",
    "save_checkpoint_state",
    "save_trainer_state",
    "write_final_scores",
]

SCORES_FOLDER = "scores"
# The file name of DataDietTrainer's own score state (scoring passes, dynamic pruning) in a checkpoint folder.
TRAINER_STATE = "datadiet_trainer"


def checkpoint_folder(output_dir: str | os.PathLike, global_step: int) -> Path:
    """The folder the Trainer saves its checkpoint of `global_step` in (`<output_dir>/checkpoint-<step>`)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{global_step}"


def save_checkpoint_state(folder: str | os.PathLike, name: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write `arrays` (`<name>.npz`) and the JSON-serialisable `meta` (`<name>.json`) into a checkpoint `folder`,
    atomically (a crash never leaves half a file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{name}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, folder / f"{name}.npz")
    tmp = folder / f"{name}.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / f"{name}.json")


def load_checkpoint_state(folder: str | os.PathLike, name: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays and metadata [`save_checkpoint_state`] wrote into `folder` as `name`, or None if it has none."""
    folder = Path(folder)
    if not (folder / f"{name}.json").exists():
        return None
    with np.load(folder / f"{name}.npz") as stored:
        arrays = {key: stored[key] for key in stored.files}
    return arrays, json.loads((folder / f"{name}.json").read_text())


def save_trainer_state(
    folder: str | os.PathLike, scoring_columns: dict[str, np.ndarray], pruning_history: list[dict]
) -> None:
    """Save `DataDietTrainer`'s scoring-pass columns and dynamic-pruning history into a checkpoint `folder`."""
    meta = {"pruning_history": pruning_history, "scoring_columns": list(scoring_columns)}
    save_checkpoint_state(folder, TRAINER_STATE, dict(scoring_columns), meta)


def load_trainer_state(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[dict]] | None:
    """The scoring-pass columns and pruning history [`save_trainer_state`] saved in `folder`, or None."""
    stored = load_checkpoint_state(folder, TRAINER_STATE)
    if stored is None:
        return None
    arrays, meta = stored
    return {name: arrays[name] for name in meta["scoring_columns"]}, list(meta["pruning_history"])


def dynamics_from_history(history: dict[str, np.ndarray], num_rows: int) -> TrainingDynamics:
    """A `TrainingDynamics` holding the per-epoch `history` (`{quantity: [num_rows, num_epochs]}`, NaN where a row
    was not seen), as `TrainingDynamics.history` returns it: a resumed run continues from it.

    Example:
    ```python
    >>> import numpy as np
    >>> from datadiet.trainer.checkpoint import dynamics_from_history
    >>> history = {"correct": np.array([[1.0, 0.0], [0.0, np.nan]])}
    >>> dynamics = dynamics_from_history(history, 2)
    >>> dynamics.num_epochs, dynamics.history("correct")[0].tolist()
    (2, [1.0, 0.0])

    ```
    """
    dynamics = TrainingDynamics(num_rows)
    num_epochs = max((values.shape[1] for values in history.values()), default=0)
    rows = np.arange(num_rows)
    for epoch in range(num_epochs):
        dynamics.add_epoch(rows, {name: history[name][:, epoch] for name in TRACKED_QUANTITIES if name in history})
    return dynamics


def write_final_scores(output_dir: str | os.PathLike, scores, *, seed: int) -> Path:
    """Write the columns of `scores` (a `datasets.Dataset` or a dict of arrays; row `i` = training example `i`) as
    float32 under `<output_dir>/scores/`, in the
    keyed layout of `datadiet.score_dataset` (its config file and one Parquet shard keyed by row position), so that
    `datadiet.load_scores(f"{output_dir}/scores")` reads them. A second `train()` replaces them.

    Example:
    ```python
    >>> import tempfile, numpy as np
    >>> from datadiet import load_scores
    >>> from datadiet.trainer.checkpoint import write_final_scores
    >>> folder = write_final_scores(tempfile.mkdtemp(), {"aum": np.array([0.5, -1.0])}, seed=0)
    >>> list(load_scores(folder)["aum"])
    [0.5, -1.0]

    ```
    """
    if hasattr(scores, "with_format"):
        scores = scores.with_format("numpy")[:]  # whole columns, not a row-by-row `Column` per name
    scores = {name: np.asarray(values, dtype=np.float32) for name, values in scores.items()}
    folder = Path(output_dir) / SCORES_FOLDER
    config = {"methods": list(scores), "seeds": [seed], "source": "DataDietTrainer"}
    if (folder / SCORING_CONFIG_FILE).exists():
        # The scores of this training replace those of an earlier `train()` in the same output_dir.
        for stale in folder.glob("seed-*/scores/*.parquet"):
            stale.unlink()
        (folder / SCORING_CONFIG_FILE).unlink()
    check_or_write_config(folder, config, sort_keys=False)
    num_rows = len(next(iter(scores.values()))) if scores else 0
    write_shard(
        folder / f"seed-{seed}" / "scores",
        0,
        [np.arange(num_rows, dtype=np.int64)],
        [scores],
    )
    logger.info("Wrote the scores of %d rows to %s (datadiet.load_scores reads them).", num_rows, folder)
    return folder
