"""Runs models over a dataset and turns their per-example scores into dataset columns: several seeds, training of
proxy models, several processes under `accelerate launch` (each row scored exactly once), streaming datasets keyed by
a stored row id, and partial results written to `output_dir` so that an interrupted run resumes instead of starting
over."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, IterableDataset, Value
from torch import nn
from tqdm.auto import tqdm

from .data import (
    Preprocessor,
    column_values,
    compute_scores,
    detect_columns,
    training_view,
    validate_methods,
    weights_fingerprint,
)
from .provenance import record_provenance

logger = logging.getLogger(__name__)

__all__ = ["get_process_state", "join_scores", "load_scores", "score_dataset"]

_CONFIG_FILE = "datadiet_scoring.json"


def _working_cpu_launch(num_processes: int = 2) -> str:
    config = (
        "`accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml your_script.py`, or "
        if num_processes == 2
        else ""
    )
    return (
        f"{config}`accelerate launch --multi_gpu --num_processes {num_processes} --num_machines 1 --mixed_precision no "
        f"--dynamo_backend no your_script.py`, or `torchrun --nproc_per_node {num_processes} your_script.py` "
        "(datadiet runs the processes on CPU with the gloo backend when there is no GPU)"
    )


def _launcher_arguments(argv: Sequence[str]) -> list[str] | None:
    """The arguments after `accelerate launch` in a command line, or `None` if it is not an accelerate launch."""
    for index, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name == "accelerate-launch" or arg.endswith("accelerate.commands.launch"):
            return list(argv[index + 1 :])
        if (name == "accelerate" or arg.endswith("accelerate_cli")) and argv[index + 1 : index + 2] == ["launch"]:
            return list(argv[index + 2 :])
    return None


def _requested_cpu_processes() -> int:
    """How many processes `accelerate launch` was asked for when it ran this script through its one-process launcher,
    read from the launcher's command line and config file; 0 if unknown.

    That launcher (used for `--cpu`, `use_cpu: true`, and for `--num_processes N` without `--multi_gpu` on a machine
    without GPUs) marks its child with ACCELERATE_USE_CPU and starts several processes only through mpirun, so
    `--num_processes 2` silently gives one process (with OMP_NUM_THREADS=1).
    """
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:
        return 0
    try:
        import psutil

        arguments = _launcher_arguments(psutil.Process(os.getppid()).cmdline())
        if arguments is None:
            return 0
        from accelerate.commands.config import default_config_file
        from accelerate.commands.launch import launch_command_parser

        parsed, _ = launch_command_parser().parse_known_args(arguments)
        if parsed.num_processes is not None:
            return int(parsed.num_processes)
        config_file = parsed.config_file
        if config_file is None and not parsed.cpu and os.path.isfile(default_config_file):
            config_file = default_config_file  # accelerate reads its default config unless --cpu is given
        if config_file is None:
            return 0
        import yaml

        with open(config_file, encoding="utf-8") as f:
            return int((yaml.safe_load(f) or {}).get("num_processes") or 0)
    except (Exception, SystemExit) as error:  # best effort: never fail a run because the launcher is unreadable
        logger.debug("Could not read the accelerate launcher's arguments: %s", error)
        return 0


def get_process_state():
    """The accelerate `PartialState` of this process (CPU processes with the gloo backend when there is no GPU),
    failing loudly on the known silent fallbacks instead of letting N processes each score every row.

    - `accelerate launch --cpu --num_processes 2` (or `--num_processes 2` without `--multi_gpu` on a machine without
      GPUs) starts one process (accelerate runs several CPU processes only through mpirun), which would score
      everything alone with one thread.
    - `accelerate launch --multi_gpu` (or `torchrun`) on a machine with no GPU sets WORLD_SIZE > 1, but a state
      created earlier without `cpu=True` (e.g. `Accelerator()` in the user's script) holds a single process, so every
      process would score every row.
    - WORLD_SIZE > 1 set by hand without a launcher: there is no process group to join.

    Example:
    ```python
    >>> from datadiet.engine import get_process_state
    >>> state = get_process_state()  # under `python script.py`: one process
    >>> state.num_processes, state.process_index
    (1, 0)

    ```
    """
    from accelerate import PartialState

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and "RANK" not in os.environ and not PartialState._shared_state:
        raise RuntimeError(
            f"The environment says WORLD_SIZE={world_size} but gives no RANK: these processes were not started by a "
            f"launcher, so there is no process group to join. Unset WORLD_SIZE for one process, or launch with "
            f"{_working_cpu_launch(world_size)}."
        )
    state = PartialState(cpu=not torch.cuda.is_available())
    if world_size > 1 and state.num_processes != world_size:
        raise RuntimeError(
            f"The environment says WORLD_SIZE={world_size} but accelerate's process state holds "
            f"{state.num_processes} process(es), so each process would score every row. This happens when an "
            "`Accelerator()` / `PartialState()` is created before datadiet without `cpu=True` on a machine with no "
            "GPU (`accelerate launch --multi_gpu` without CPU mode): create it with `Accelerator(cpu=True)`, or "
            f"create none and let datadiet set up the processes. Working CPU launches: {_working_cpu_launch(world_size)}."
        )
    requested = _requested_cpu_processes()
    if requested > 1 and state.num_processes == 1:
        raise RuntimeError(
            f"`accelerate launch` was asked for {requested} processes but started one: without `--multi_gpu` (or "
            "with `--cpu` / `use_cpu: true`) accelerate starts several processes only on several GPUs or through "
            "mpirun, so this single process would score every row alone with one thread. Start "
            f"{requested} real CPU processes with {_working_cpu_launch(requested)}."
        )
    return state


def _dataset_digest(dataset: Dataset, label_column: str) -> str:
    # In-memory datasets get random fingerprints, so describe the data by what resuming must not change: the
    # number of rows, the features, and the labels in order.
    digest = hashlib.sha256()
    digest.update(f"{len(dataset)}:{dataset.features.to_dict()}".encode())
    digest.update(column_values(dataset, label_column).astype(np.int64).tobytes())
    return digest.hexdigest()


def _stream_digest(dataset: IterableDataset, row_id_column: str, label_column: str, head: int = 1024) -> str:
    # A stream has no length and may be expensive to read twice: describe it by its features and the row ids and
    # labels of its first rows, which a different dataset (or a different order of the same one) changes.
    digest = hashlib.sha256()
    digest.update(f"stream:{row_id_column}:{dataset.features.to_dict()}".encode())
    for batch in dataset.select_columns([row_id_column, label_column]).take(head).iter(batch_size=head):
        digest.update(np.asarray(batch[row_id_column], dtype=np.int64).tobytes())
        digest.update(np.asarray(batch[label_column], dtype=np.int64).tobytes())
    return digest.hexdigest()


def _check_row_id_feature(features: Features, row_id_column: str) -> None:
    if row_id_column not in features:
        raise ValueError(
            f"row_id_column {row_id_column!r} is not a column of the dataset; its columns are {list(features)}."
        )
    feature = features[row_id_column]
    if not (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))):
        raise ValueError(
            f"row_id_column {row_id_column!r} must hold integer ids (one per row, never repeated), but its feature is "
            f"{feature}. Add one with e.g. `dataset.map(lambda row, i: {{'row_id': i}}, with_indices=True)` before "
            "streaming."
        )


def _row_keys(dataset: Dataset, row_id_column: str | None) -> np.ndarray | None:
    """The stored row ids of a map-style dataset (checked unique), or `None` when rows are keyed by position."""
    if row_id_column is None:
        return None
    _check_row_id_feature(dataset.features, row_id_column)
    keys = column_values(dataset, row_id_column).astype(np.int64)
    unique, counts = np.unique(keys, return_counts=True)
    if len(unique) != len(keys):
        raise ValueError(
            f"row_id_column {row_id_column!r} repeats ids (e.g. {unique[counts > 1][:5].tolist()}): every row needs "
            "its own id."
        )
    return keys


def _check_or_write_config(output_dir: Path, config: dict, state) -> None:
    path = output_dir / _CONFIG_FILE
    if path.exists():
        existing = json.loads(path.read_text())
        differing = sorted(key for key in set(existing) | set(config) if existing.get(key) != config.get(key))
        if differing:
            raise ValueError(
                f"output_dir {str(output_dir)!r} holds scores from a different configuration (differs in: "
                f"{', '.join(differing)}). Use a new output_dir, or delete this one to start over."
            )
        return
    state.wait_for_everyone()
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
        os.replace(tmp, path)
    state.wait_for_everyone()


def _read_shards(
    shard_dir: Path | None, methods: Sequence[str], *, ids_only: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Row ids and scores already written to `shard_dir` (complete shards only: they are renamed into place)."""
    ids, values = [np.zeros(0, dtype=np.int64)], {m: [np.zeros(0, dtype=np.float32)] for m in methods}
    if shard_dir is not None and shard_dir.exists():
        import pyarrow.parquet as pq

        for path in sorted(shard_dir.glob("*.parquet")):
            table = pq.read_table(path, columns=["row_id"] if ids_only else None)
            ids.append(table.column("row_id").to_numpy().astype(np.int64))
            if not ids_only:
                for method in methods:
                    if method not in table.column_names:
                        raise ValueError(f"Shard {path} has no {method!r} column: it was written by another run.")
                    values[method].append(table.column(method).to_numpy().astype(np.float32))
    return np.concatenate(ids), ({} if ids_only else {m: np.concatenate(v) for m, v in values.items()})


def _write_shard(shard_dir: Path, rank: int, ids: list[np.ndarray], values: list[dict[str, np.ndarray]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"row_id": pa.array(np.concatenate(ids).astype(np.int64))}
    for method in values[0]:
        columns[method] = pa.array(np.concatenate([v[method] for v in values]).astype(np.float32))
    shard_dir.mkdir(parents=True, exist_ok=True)
    path = shard_dir / f"rank{rank:04d}-{time.time_ns()}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written shard that would be read back


def _prepare_shard_dir(shard_dir: Path | None, state) -> None:
    # Shards half-written by a crashed run keep their temporary name; they are never read, so remove them. The
    # barrier also makes every process read the finished shards before any process writes a new one.
    if shard_dir is not None and state.is_main_process and shard_dir.exists():
        for stale in shard_dir.glob("*.tmp"):
            stale.unlink(missing_ok=True)
    state.wait_for_everyone()


def _to_device(inputs: torch.Tensor | dict, device: torch.device) -> torch.Tensor | dict:
    if isinstance(inputs, dict):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)


def _contiguous(indices: np.ndarray) -> bool:
    return len(indices) > 0 and int(indices[-1]) - int(indices[0]) == len(indices) - 1


def _positions_of(ids: np.ndarray, keys: np.ndarray | None, num_rows: int, shard_dir: Path | None) -> np.ndarray:
    """Row positions of shard ids (the ids are positions themselves when the dataset has no row-id column)."""
    if keys is None:
        positions = ids
        unknown = ids[(ids < 0) | (ids >= num_rows)]
    else:
        sorter = np.argsort(keys, kind="stable")
        found = np.clip(np.searchsorted(keys, ids, sorter=sorter), 0, max(num_rows - 1, 0))
        positions = sorter[found]
        unknown = ids[keys[positions] != ids]
    if len(unknown):
        raise RuntimeError(
            f"Shards in {str(shard_dir)!r} hold row ids {unknown[:5].tolist()} that this dataset does not have: they "
            "were written for another dataset. Use a new output_dir, or delete this one."
        )
    return positions


def _score_model(
    model: nn.Module,
    dataset: Dataset,
    methods: Sequence[str],
    preprocessor: Preprocessor,
    *,
    batch_size: int,
    shard_dir: Path | None,
    state,
    autocast_dtype: torch.dtype | None,
    save_every: int,
    description: str,
    keys: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Score every row of `dataset` once with `model`; returns one float32 array per method, in row order. Shards
    are keyed by `keys[position]` when the dataset has a row-id column, by position otherwise."""
    num_rows = len(dataset)
    done_keys, done_values = _read_shards(shard_dir, methods)
    done_ids = _positions_of(done_keys, keys, num_rows, shard_dir)
    _prepare_shard_dir(shard_dir, state)
    rank, world = state.process_index, state.num_processes
    # Contiguous blocks per process: no sampler, so no wrap-around padding and no row scored twice.
    mine = np.arange(rank * num_rows // world, (rank + 1) * num_rows // world)
    todo = mine[~np.isin(mine, done_ids)]
    if len(done_ids):
        logger.info(
            "Resuming from %s: %d of %d rows already scored; process %d scores %d more.",
            shard_dir,
            len(done_ids),
            num_rows,
            rank,
            len(todo),
        )
    source = dataset.select_columns(preprocessor.columns).with_format(None)
    model.to(state.device)
    was_training = model.training
    model.eval()
    new_ids: list[np.ndarray] = []
    new_values: list[dict[str, np.ndarray]] = []
    pending = 0
    try:
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        for indices in tqdm(batches, desc=description, disable=not state.is_local_main_process, unit="batch"):
            rows = source[int(indices[0]) : int(indices[-1]) + 1] if _contiguous(indices) else source[indices.tolist()]
            inputs, labels = preprocessor(rows)
            scores = compute_scores(
                model,
                methods,
                _to_device(inputs, state.device),
                labels.to(state.device),
                row_ids=indices if keys is None else keys[indices],
                autocast_dtype=autocast_dtype,
            )
            new_ids.append(indices)
            new_values.append(scores)
            pending += 1
            if shard_dir is not None and pending >= save_every:
                _write_shard(shard_dir, rank, _keyed(new_ids[-pending:], keys), new_values[-pending:])
                pending = 0
        if shard_dir is not None and pending:
            _write_shard(shard_dir, rank, _keyed(new_ids[-pending:], keys), new_values[-pending:])
    finally:
        model.train(was_training)

    local_ids = np.concatenate(new_ids) if new_ids else np.zeros(0, dtype=np.int64)
    local = {m: np.concatenate([v[m] for v in new_values]) if new_values else np.zeros(0, np.float32) for m in methods}
    if world > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(local_ids, local)])
        local_ids = np.concatenate([ids for ids, _ in gathered])
        local = {m: np.concatenate([values[m] for _, values in gathered]) for m in methods}
    all_ids = np.concatenate([done_ids, local_ids])
    counts = np.bincount(all_ids, minlength=num_rows)
    if len(counts) != num_rows or not (counts == 1).all():
        missing, repeated = np.flatnonzero(counts == 0)[:5].tolist(), np.flatnonzero(counts > 1)[:5].tolist()
        raise RuntimeError(
            f"Scores do not cover every row exactly once (missing rows {missing}, repeated rows {repeated}). If "
            f"output_dir {str(shard_dir)!r} was written by another dataset, delete it."
        )
    order = np.argsort(all_ids, kind="stable")
    return {m: np.concatenate([done_values[m], local[m]])[order].astype(np.float32) for m in methods}


def _keyed(indices: list[np.ndarray], keys: np.ndarray | None) -> list[np.ndarray]:
    return indices if keys is None else [keys[batch] for batch in indices]


def _isin_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    if len(sorted_ids) == 0:
        return np.zeros(len(values), dtype=bool)
    found = np.clip(np.searchsorted(sorted_ids, values), 0, len(sorted_ids) - 1)
    return sorted_ids[found] == values


def _score_stream(
    model: nn.Module,
    dataset: IterableDataset,
    methods: Sequence[str],
    preprocessor: Preprocessor,
    *,
    row_id_column: str,
    batch_size: int,
    shard_dir: Path,
    state,
    autocast_dtype: torch.dtype | None,
    save_every: int,
    description: str,
) -> None:
    """Score every row of a stream once with `model`, writing the scores straight to Parquet shards keyed by the
    stored row id: memory holds one batch, `save_every` batches of floats and the ids already done (resume)."""
    from datasets.distributed import split_dataset_by_node

    rank, world = state.process_index, state.num_processes
    done = np.unique(_read_shards(shard_dir, methods, ids_only=True)[0])
    _prepare_shard_dir(shard_dir, state)
    if len(done):
        logger.info("Resuming from %s: %d rows already scored are skipped.", shard_dir, len(done))
    columns = list(dict.fromkeys([row_id_column, *preprocessor.columns]))
    # Each process reads a disjoint part of the stream (whole shards when their number divides evenly, else every
    # `world`-th row), so no row reaches two processes and nothing is padded.
    local = split_dataset_by_node(dataset, rank=rank, world_size=world) if world > 1 else dataset
    # Python formatting reads Arrow-backed streams (Parquet, Hub) a batch at a time, about twice as fast as the
    # row-by-row default, and still gives the lists (decoded images) the preprocessing expects.
    local = local.select_columns(columns).with_format("python")
    model.to(state.device)
    was_training = model.training
    model.eval()
    pending_ids: list[np.ndarray] = []
    pending_values: list[dict[str, np.ndarray]] = []
    seen = scored = 0
    progress = tqdm(desc=description, disable=not state.is_local_main_process, unit="row")
    try:
        for batch in local.iter(batch_size=batch_size):
            ids = np.asarray(batch[row_id_column], dtype=np.int64)
            seen += len(ids)
            progress.update(len(ids))
            todo = ~_isin_sorted(ids, done)
            if not todo.any():
                continue
            if not todo.all():
                keep = np.flatnonzero(todo)
                batch = {name: [values[i] for i in keep] for name, values in batch.items()}
                ids = ids[keep]
            inputs, labels = preprocessor(batch)
            pending_values.append(
                compute_scores(
                    model,
                    methods,
                    _to_device(inputs, state.device),
                    labels.to(state.device),
                    row_ids=ids,
                    autocast_dtype=autocast_dtype,
                )
            )
            pending_ids.append(ids)
            scored += len(ids)
            if len(pending_ids) >= save_every:
                _write_shard(shard_dir, rank, pending_ids, pending_values)
                pending_ids, pending_values = [], []
        if pending_ids:
            _write_shard(shard_dir, rank, pending_ids, pending_values)
    finally:
        progress.close()
        model.train(was_training)
    logger.info("Process %d read %d rows of the stream and scored %d of them.", rank, seen, scored)

    total_seen = seen
    if world > 1:
        from accelerate.utils import gather_object

        total_seen = int(sum(gather_object([seen])))
    state.wait_for_everyone()  # every process has written its last shard
    ids = _read_shards(shard_dir, methods, ids_only=True)[0]
    ids.sort()
    distinct = len(ids) - int(np.count_nonzero(ids[1:] == ids[:-1]))
    if distinct != len(ids) or distinct != total_seen:
        raise RuntimeError(
            f"The scores in {str(shard_dir)!r} do not cover the stream's {total_seen} rows exactly once "
            f"({len(ids)} scores for {distinct} distinct row ids). Either row_id_column {row_id_column!r} repeats "
            "ids (every row needs its own), or the folder holds scores of another dataset: use a new output_dir."
        )


def load_scores(output_dir: str | os.PathLike, *, row_id_column: str = "row_id") -> Dataset:
    """Read the scores `score_dataset` wrote to `output_dir` into a `Dataset` keyed by row id, one row per scored row
    sorted by id: the column `row_id_column` (the stored row id, or the row's position when the scored dataset had no
    row-id column), one float32 column per method, and `<method>_std` over seeds when there are several.

    Join it back to the scored data with `join_scores`. Memory holds the ids and the scores, not the rows.

    Args:
        output_dir: the `output_dir` given to `score_dataset`.
        row_id_column: the name of the id column in the returned dataset.

    Example:
    ```python
    >>> import tempfile, torch
    >>> from datasets import Dataset
    >>> from datadiet.engine import load_scores, score_dataset
    >>> ds = Dataset.from_dict({"x": [[0.0, 1.0], [2.0, 0.5], [1.0, 1.0]], "label": [0, 1, 0]})
    >>> folder = tempfile.mkdtemp()
    >>> _ = score_dataset(ds, torch.nn.Linear(2, 2), "el2n", image_column="x", output_dir=folder)
    >>> scores = load_scores(folder)
    >>> scores.column_names, list(scores["row_id"])
    (['row_id', 'el2n'], [0, 1, 2])

    ```
    """
    output_dir = Path(output_dir)
    config_path = output_dir / _CONFIG_FILE
    if not config_path.exists():
        raise ValueError(
            f"{str(output_dir)!r} holds no scores: {_CONFIG_FILE} is missing. Pass score_dataset's output_dir."
        )
    config = json.loads(config_path.read_text())
    methods, seeds = config["methods"], config["seeds"]
    ids: np.ndarray | None = None
    totals: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    for seed in seeds:
        shard_dir = output_dir / f"seed-{seed}" / "scores"
        seed_ids, values = _read_shards(shard_dir, methods)
        order = np.argsort(seed_ids, kind="stable")
        seed_ids = seed_ids[order]
        if len(seed_ids) and (seed_ids[1:] == seed_ids[:-1]).any():
            raise ValueError(f"{str(shard_dir)!r} scores some row ids twice: it was written by different datasets.")
        if ids is not None and not np.array_equal(ids, seed_ids):
            raise ValueError(
                f"Seed {seed} has scores for {len(seed_ids)} rows but seed {seeds[0]} for {len(ids)}: the run in "
                f"{str(output_dir)!r} is unfinished. Rerun score_dataset with the same output_dir to complete it."
            )
        ids = seed_ids
        # Running sums over seeds (float64), so memory does not grow with the number of seeds.
        for method in methods:
            column = values.pop(method)[order].astype(np.float64)
            totals[method] = totals[method] + column if method in totals else column
            if len(seeds) > 1:
                squares[method] = squares[method] + column**2 if method in squares else column**2
    columns: dict[str, np.ndarray] = {row_id_column: ids}
    for method in methods:
        mean = totals.pop(method) / len(seeds)
        columns[method] = mean.astype(np.float32)
        if len(seeds) > 1:
            variance = np.maximum(squares.pop(method) / len(seeds) - mean**2, 0.0)  # population variance
            columns[f"{method}_std"] = np.sqrt(variance).astype(np.float32)
    # Typed numpy columns become int64 / float32 Arrow columns directly; passing `features` would encode every value
    # as a Python object (50x slower, 3x the memory at 1M rows).
    return Dataset.from_dict(columns)


def _score_lookup(scores: Dataset, row_id_column: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if row_id_column not in scores.column_names:
        raise ValueError(f"The scores have no {row_id_column!r} column; their columns are {scores.column_names}.")
    ids = column_values(scores, row_id_column).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    values = {name: column_values(scores, name)[order] for name in scores.column_names if name != row_id_column}
    return ids[order], values


def join_scores(
    dataset: Dataset | IterableDataset,
    scores: Dataset,
    row_id_column: str | None = None,
    *,
    overwrite: bool = False,
) -> Dataset | IterableDataset:
    """Add the score columns of `scores` (as `load_scores` returns them) to `dataset`, matching rows by id.

    A map-style `Dataset` is matched by `row_id_column`, or by position when it is `None` (the ids `score_dataset`
    writes for a dataset without a row-id column); the columns are added at once. A streaming `IterableDataset` is
    matched lazily by `row_id_column` as it is read. Every row must have a score.

    Args:
        dataset: the scored data (or another view of it holding the same row ids).
        scores: a dataset with an id column and score columns, e.g. `load_scores(output_dir)`.
        row_id_column: the id column, in both `dataset` and `scores`; `None`: positions, matched to `scores["row_id"]`.
        overwrite: replace existing columns of the same names instead of failing.

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.engine import join_scores
    >>> ds = Dataset.from_dict({"row_id": [7, 3], "label": [0, 1]})
    >>> scores = Dataset.from_dict({"row_id": [3, 7], "el2n": [0.25, 0.5]})
    >>> list(join_scores(ds, scores, "row_id")["el2n"])
    [0.5, 0.25]

    ```
    """
    ids, values = _score_lookup(scores, row_id_column or "row_id")
    names = list(values)
    existing = dataset.column_names or []
    clashing = [name for name in names if name in existing]
    if clashing and not overwrite:
        raise ValueError(f"The dataset already has column(s) {clashing}: pass overwrite=True to replace them.")

    def lookup(wanted: np.ndarray) -> dict[str, np.ndarray]:
        found = np.clip(np.searchsorted(ids, wanted), 0, max(len(ids) - 1, 0))
        missing = wanted[(ids[found] != wanted) if len(ids) else slice(None)]
        if len(missing):
            raise ValueError(
                f"No scores for row ids {missing[:5].tolist()}: the scores come from another dataset, or the "
                "scoring run is unfinished."
            )
        return {name: column[found] for name, column in values.items()}

    if isinstance(dataset, IterableDataset):
        if row_id_column is None:
            raise ValueError("A streaming dataset is matched to its scores by a stored id: pass row_id_column=... .")
        features = None
        if dataset.features is not None:
            features = Features({k: v for k, v in dataset.features.items() if k not in names})
            features.update({name: Value(str(values[name].dtype)) for name in names})
        source = dataset.remove_columns(clashing) if clashing else dataset

        def add_scores(batch: dict[str, list]) -> dict[str, list]:
            found = lookup(np.asarray(batch[row_id_column], dtype=np.int64))
            return {name: column.tolist() for name, column in found.items()}

        return source.map(add_scores, batched=True, features=features)
    if row_id_column is None:
        wanted = np.arange(len(dataset), dtype=np.int64)
    else:
        _check_row_id_feature(dataset.features, row_id_column)
        wanted = column_values(dataset, row_id_column).astype(np.int64)
    joined = dataset.remove_columns(clashing) if clashing else dataset
    for name, column in lookup(wanted).items():
        joined = joined.add_column(name, column)
    return joined


def _model_identity(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}:{weights_fingerprint(model)}"


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    load_model(model, str(path))


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    tmp = path.with_suffix(".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)


def _train(
    model: nn.Module,
    dataset: Dataset,
    preprocessor: Preprocessor,
    *,
    epochs: float,
    seed: int,
    batch_size: int,
    output_dir: Path | None,
    training_kwargs: dict,
) -> nn.Module:
    from .trainer import train_proxy_model

    return train_proxy_model(
        model,
        training_view(dataset, preprocessor),
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        output_dir=str(output_dir) if output_dir else None,
        **training_kwargs,
    )


def score_dataset(
    dataset: Dataset | IterableDataset,
    model: nn.Module | None = None,
    methods: Sequence[str] | str = ("el2n",),
    *,
    model_init: Callable[[int], nn.Module] | None = None,
    seeds: Sequence[int] = (0,),
    train_epochs: float = 0,
    transform: Callable | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 128,
    output_dir: str | os.PathLike | None = None,
    text_column: str | None = None,
    overwrite: bool = False,
    mixed_precision: str | None = None,
    save_every: int = 20,
    training_kwargs: dict[str, Any] | None = None,
    row_id_column: str | None = None,
) -> Dataset:
    """Score every example of `dataset` and return the dataset with one float32 column per method.

    With `model`, that model is scored as it is. With `model_init(seed) -> model` and `seeds`, one model per seed is
    built (after `transformers.set_seed(seed)`), trained `train_epochs` epochs on `dataset` (0: scored at
    initialisation, e.g. "GraNd at init") and scored; the column `<method>` holds the mean over seeds and
    `<method>_std` the standard deviation (population std, only with several seeds). Models run in eval mode on
    un-augmented inputs, as EL2N and GraNd are defined (Paul et al. 2021).

    Under `accelerate launch` / `torchrun` with N processes, each process scores its own rows (contiguous blocks of
    a `Dataset`, disjoint parts of a stream; no sampler padding) and every row gets exactly one score: the result is
    the one-process result. Every process returns the full result.

    A streaming `IterableDataset` needs a stored integer `row_id_column` (positions in a stream are not stable ids)
    and an `output_dir`: the scores go straight to Parquet shards keyed by row id, memory stays flat whatever the
    number of rows, and the return value is the scores keyed by row id (`load_scores(output_dir)`), which
    `join_scores(stream, scores, row_id_column)` joins back.

    Args:
        dataset: a `datasets.Dataset` (or streaming `datasets.IterableDataset`) with an input column (`Image`, text,
            or array) and a label column.
        model: a timm model, a transformers `*ForImageClassification` / `*ForSequenceClassification`, or any
            `nn.Module` returning logits.
        methods: score names, see `datadiet.scores.list_scores()` (`el2n`, `grand`, `loss`, `margin`, ...).
        model_init: builds a fresh model for a seed; use it for several independently initialised models.
        seeds: the seeds of the models to average over.
        train_epochs: epochs each model from `model_init` is trained before scoring (fractions allowed).
        transform: per-image callable (timm / torchvision transform), transformers image processor, or tokenizer.
        image_column / text_column / label_column: detected from the features when not given.
        batch_size: rows per forward pass.
        output_dir: where partial scores (Parquet shards keyed by row id, written atomically) and trained proxy
            weights are written; a rerun with the same folder and configuration skips the rows already scored (also
            after a crash), and a rerun with another configuration fails.
        overwrite: replace existing columns of the same names instead of failing.
        mixed_precision: `"bf16"` to run the forward passes under bfloat16 autocast.
        save_every: batches between two shard writes (what a crash can lose per process).
        training_kwargs: extra arguments for the proxy models' training (learning rate, ...).
        row_id_column: an integer column holding each row's own id, which keys the shards in `output_dir`.
            Required for an `IterableDataset`; optional for a `Dataset`, whose rows are keyed by position without it.

    Example:
    ```python
    >>> import timm
    >>> from datasets import ClassLabel, Dataset, Features, Image
    >>> from PIL import Image as PILImage
    >>> from datadiet import score_dataset
    >>> images = [PILImage.new("RGB", (32, 32), color=(i * 30, 0, 0)) for i in range(6)]
    >>> ds = Dataset.from_dict({"img": images, "label": [0, 1, 2, 0, 1, 2]},
    ...                        features=Features({"img": Image(), "label": ClassLabel(num_classes=3)}))
    >>> scored = score_dataset(ds, model_init=lambda seed: timm.create_model("test_resnet", num_classes=3),
    ...                        methods=["el2n", "loss"], seeds=[0, 1])
    >>> scored.column_names
    ['img', 'label', 'el2n', 'el2n_std', 'loss', 'loss_std']

    ```
    """
    methods = validate_methods(methods)
    streaming = isinstance(dataset, IterableDataset)
    if streaming:
        _check_stream_arguments(dataset, row_id_column, output_dir, train_epochs)
    elif len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to score.")
    if (model is None) == (model_init is None):
        raise ValueError("Pass exactly one of model= (score this model) or model_init= (one fresh model per seed).")
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed, e.g. seeds=(0,).")
    if model is not None and len(seeds) > 1:
        raise ValueError("Several seeds need independently initialised models: pass model_init=lambda seed: ... .")
    if train_epochs < 0:
        raise ValueError(f"train_epochs must be >= 0, got {train_epochs}.")
    if mixed_precision not in (None, "no", "bf16"):
        raise ValueError(f"mixed_precision must be None, 'no' or 'bf16', got {mixed_precision!r}.")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1 (batches between two shard writes), got {save_every}.")
    autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    input_column, kind, label_column = detect_columns(
        dataset, image_column=image_column, text_column=text_column, label_column=label_column
    )
    keys = None if streaming else _row_keys(dataset, row_id_column)
    new_columns = [name for method in methods for name in (method, f"{method}_std")]
    clashing = [name for name in new_columns if name in dataset.column_names]
    if clashing and not overwrite and not streaming:
        raise ValueError(f"The dataset already has column(s) {clashing}: pass overwrite=True to replace them.")
    preprocessor = Preprocessor(transform, input_column=input_column, kind=kind, label_column=label_column)
    state = get_process_state()
    output_dir = Path(output_dir) if output_dir is not None else None

    per_seed: list[dict[str, np.ndarray]] = []
    identities = []
    for seed in seeds:
        if model_init is not None:
            from transformers import set_seed

            set_seed(seed)
            seed_model = model_init(seed)
        else:
            seed_model = copy.deepcopy(model) if train_epochs > 0 else model
        identities.append(_model_identity(seed_model))
        seed_dir = output_dir / f"seed-{seed}" if output_dir is not None else None
        if output_dir is not None and seed == seeds[0]:
            config = {
                "methods": methods,
                "seeds": seeds,
                "train_epochs": train_epochs,
                "num_rows": None if streaming else len(dataset),
                "row_id_column": row_id_column,
                "data": (
                    _stream_digest(dataset, row_id_column, label_column)
                    if streaming
                    else _dataset_digest(dataset, label_column)
                ),
                "preprocessing": preprocessor.fingerprint(),
                "model": identities[0],
                "mixed_precision": mixed_precision,
                "training": json.dumps(training_kwargs or {}, sort_keys=True, default=str),
            }
            _check_or_write_config(output_dir, config, state)
        if train_epochs > 0:
            weights = seed_dir / "model.safetensors" if seed_dir is not None else None
            if weights is not None and weights.exists():
                logger.info("Loading the seed-%d model trained by an earlier run from %s.", seed, weights)
                _load_weights(seed_model, weights)
            else:
                seed_model = _train(
                    seed_model,
                    dataset,
                    preprocessor,
                    epochs=train_epochs,
                    seed=seed,
                    batch_size=batch_size,
                    output_dir=seed_dir / "training" if seed_dir else None,
                    training_kwargs=training_kwargs or {},
                )
                if weights is not None and state.is_main_process:
                    weights.parent.mkdir(parents=True, exist_ok=True)
                    _save_weights(seed_model, weights)
                state.wait_for_everyone()
        common = {
            "batch_size": batch_size,
            "state": state,
            "autocast_dtype": autocast_dtype,
            "save_every": save_every,
            "description": f"Scoring {'+'.join(methods)} (seed {seed})",
        }
        if streaming:
            _score_stream(
                seed_model,
                dataset,
                methods,
                preprocessor,
                row_id_column=row_id_column,
                shard_dir=seed_dir / "scores",
                **common,
            )
        else:
            shard_dir = seed_dir / "scores" if seed_dir is not None else None
            per_seed.append(
                _score_model(seed_model, dataset, methods, preprocessor, shard_dir=shard_dir, keys=keys, **common)
            )

    model_description = type(model if model is not None else seed_model).__name__
    config_of = getattr(model if model is not None else seed_model, "config", None)
    provenance = {
        "methods": methods,
        "seeds": seeds,
        "train_epochs": train_epochs,
        "model": model_description,
        "model_config": config_of.to_dict() if hasattr(config_of, "to_dict") else None,
        "input_column": input_column,
        "label_column": label_column,
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
        "num_processes": state.num_processes,
    }
    if streaming:
        return record_provenance(load_scores(output_dir, row_id_column=row_id_column), scoring=provenance)

    scored = dataset.remove_columns(clashing) if clashing else dataset
    for method in methods:
        stacked = np.stack([scores[method] for scores in per_seed]).astype(np.float64)
        scored = scored.add_column(method, stacked.mean(axis=0).astype(np.float32))
        if len(seeds) > 1:
            scored = scored.add_column(f"{method}_std", stacked.std(axis=0).astype(np.float32))
    return record_provenance(scored, scoring=provenance)


def _check_stream_arguments(
    dataset: IterableDataset, row_id_column: str | None, output_dir: str | os.PathLike | None, train_epochs: float
) -> None:
    if row_id_column is None:
        raise ValueError(
            "A streaming IterableDataset needs a stored row id: positions in a stream are not stable ids. Pass "
            "row_id_column=... naming an integer column with one id per row (add one before streaming, e.g. "
            "`dataset.map(lambda row, i: {'row_id': i}, with_indices=True)`)."
        )
    if dataset.features is None:
        raise ValueError(
            "The streaming dataset's features are unknown, so its columns cannot be found: give them when building "
            "it, e.g. IterableDataset.from_generator(..., features=Features({...})) or `dataset.cast(features)`."
        )
    _check_row_id_feature(dataset.features, row_id_column)
    if output_dir is None:
        raise ValueError(
            "Scoring a streaming dataset writes its scores to Parquet shards keyed by row id instead of holding "
            "them in memory: pass output_dir=... ."
        )
    if train_epochs > 0:
        raise ValueError(
            "Proxy models are trained on map-style datasets only: train the model yourself (e.g. DataDietTrainer) "
            "and pass model=..., or pass a datasets.Dataset."
        )
