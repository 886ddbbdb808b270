"""The scoring loop of `score_dataset`: one loop body that scores prepared batches and writes them to shards, fed by a
`Dataset` (contiguous blocks of rows per process) or by a stream (a disjoint part per process, done rows skipped)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from .batches import score_collated
from .plan import ScoringPlan
from .prefetch import prefetch
from .store import isin_sorted, positions_of, prepare_shard_dir, read_shards, write_shard

logger = logging.getLogger(__name__)

__all__ = ["score_rows", "score_stream"]

# What the loop consumes: (rows read, their row ids to score, the task's collated batch); a batch whose rows were all
# scored by an earlier run comes with no ids (and no batch), so that the progress still counts its rows.
Batch = tuple[int, np.ndarray, object]


def _score_batches(
    model: nn.Module,
    plan: ScoringPlan,
    batches: Iterator[Batch],
    *,
    shard_dir: Path | None,
    state,
    description: str,
    total: int | None = None,
    keep: bool = True,
) -> tuple[int, int, list[dict[str, np.ndarray]]]:
    """Score each batch with `model` in eval mode and write the scores, keyed by row id, to a shard of this process
    every `plan.save_every` batches (what a crash can lose). Returns the rows read, the rows scored and, with `keep`,
    the scores of every batch in order (a stream keeps none: memory holds one batch and the unwritten ones)."""
    task = plan.batches.task
    model.to(state.device)
    was_training = model.training
    model.eval()
    kept: list[dict[str, np.ndarray]] = []
    pending_ids: list[np.ndarray] = []
    pending_values: list[dict[str, np.ndarray]] = []
    read_rows = scored_rows = 0

    def flush() -> None:
        if shard_dir is not None and pending_ids:
            write_shard(shard_dir, state.process_index, pending_ids, pending_values)
        if keep:
            kept.extend(pending_values)
        pending_ids.clear()
        pending_values.clear()

    progress = tqdm(total=total, desc=description, disable=not state.is_local_main_process, unit="row")
    try:
        with closing(batches):
            for read, ids, batch in batches:
                read_rows += read
                progress.update(read)
                if not len(ids):
                    continue
                pending_values.append(
                    score_collated(
                        model,
                        task,
                        plan.evaluated,
                        batch,
                        state.device,
                        row_ids=ids,
                        autocast_dtype=plan.autocast_dtype,
                    )
                )
                pending_ids.append(ids)
                scored_rows += len(ids)
                if len(pending_ids) >= plan.save_every:
                    flush()
        flush()
    finally:
        progress.close()
        model.train(was_training)
    return read_rows, scored_rows, kept


def _contiguous(indices: np.ndarray) -> bool:
    return len(indices) > 0 and int(indices[-1]) - int(indices[0]) == len(indices) - 1


def score_rows(
    model: nn.Module, plan: ScoringPlan, *, shard_dir: Path | None, state, description: str
) -> dict[str, np.ndarray]:
    """Score every row of the plan's `Dataset` once with `model`; returns one float32 array per method, in row order.
    Shards are keyed by the row-id column's ids when the dataset has one, by position otherwise."""
    dataset, keys, methods = plan.dataset, plan.keys, plan.evaluated
    num_rows = len(dataset)
    done_keys, done_values = read_shards(shard_dir, methods)
    done_ids = positions_of(done_keys, keys, num_rows, shard_dir)
    prepare_shard_dir(shard_dir, state)
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

    def load(indices: np.ndarray) -> Batch:
        rows = plan.rows
        rows = rows[int(indices[0]) : int(indices[-1]) + 1] if _contiguous(indices) else rows[indices.tolist()]
        ids = indices if keys is None else keys[indices]
        return len(indices), ids, plan.batches(rows, ids)

    # The next batches are read and decoded in a background thread while the model scores this one.
    positions = [todo[start : start + plan.batch_size] for start in range(0, len(todo), plan.batch_size)]
    loaded = prefetch(load, positions)
    _, _, values = _score_batches(
        model, plan, loaded, shard_dir=shard_dir, state=state, description=description, total=len(todo)
    )

    local_ids = todo
    local = {m: np.concatenate([v[m] for v in values]) if values else np.zeros(0, np.float32) for m in methods}
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


def score_stream(model: nn.Module, plan: ScoringPlan, *, shard_dir: Path, state, description: str) -> None:
    """Score every row of the plan's stream once with `model`, writing the scores straight to Parquet shards keyed by
    the stored row id: memory holds one batch, `save_every` batches of floats and the ids already done (resume)."""
    from datasets.distributed import split_dataset_by_node

    rank, world = state.process_index, state.num_processes
    row_id_column, methods = plan.row_id_column, plan.evaluated
    done = np.unique(read_shards(shard_dir, methods, ids_only=True)[0])
    prepare_shard_dir(shard_dir, state)
    if len(done):
        logger.info("Resuming from %s: %d rows already scored are skipped.", shard_dir, len(done))
    columns = list(dict.fromkeys([row_id_column, *plan.batches.columns]))
    # Each process reads a disjoint part of the stream (whole shards when their number divides evenly, else every
    # `world`-th row), so no row reaches two processes and nothing is padded.
    local = split_dataset_by_node(plan.dataset, rank=rank, world_size=world) if world > 1 else plan.dataset
    # Python formatting reads Arrow-backed streams (Parquet, Hub) a batch at a time, about twice as fast as the
    # row-by-row default, and still gives the lists (decoded images) the preprocessing expects.
    local = local.select_columns(columns).with_format("python")

    def load(batch: dict) -> Batch:
        ids = np.asarray(batch[row_id_column], dtype=np.int64)
        todo = ~isin_sorted(ids, done)
        if not todo.any():
            return len(ids), ids[:0], None
        if not todo.all():
            keep = np.flatnonzero(todo)
            batch = {name: [values[i] for i in keep] for name, values in batch.items()}
        return len(ids), ids[todo], plan.batches(batch, ids[todo])

    # The stream is read and the next batches decoded in a background thread while the model scores this one.
    loaded = prefetch(load, local.iter(batch_size=plan.batch_size))
    seen, scored, _ = _score_batches(
        model, plan, loaded, shard_dir=shard_dir, state=state, description=description, keep=False
    )
    logger.info("Process %d read %d rows of the stream and scored %d of them.", rank, seen, scored)

    total_seen = seen
    if world > 1:
        from accelerate.utils import gather_object

        total_seen = int(sum(gather_object([seen])))
    state.wait_for_everyone()  # every process has written its last shard
    ids = read_shards(shard_dir, methods, ids_only=True)[0]
    ids.sort()
    distinct = len(ids) - int(np.count_nonzero(ids[1:] == ids[:-1]))
    if distinct != len(ids) or distinct != total_seen:
        raise RuntimeError(
            f"The scores in {str(shard_dir)!r} do not cover the stream's {total_seen} rows exactly once "
            f"({len(ids)} scores for {distinct} distinct row ids). Either row_id_column {row_id_column!r} repeats "
            "ids (every row needs its own), or the folder holds scores of another dataset: use a new output_dir."
        )
