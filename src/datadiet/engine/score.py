"""`score_dataset`: runs models over a dataset and turns their per-example scores into dataset columns (several
seeds, training of proxy models, each row scored exactly once under `accelerate launch`, streaming datasets keyed by
a stored row id, partial results in `output_dir` so that an interrupted run resumes instead of starting over)."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from torch import nn
from tqdm.auto import tqdm

from ..data import Preprocessor, check_input_channels, detect_columns
from ..models import input_channels_of, model_name_of, weights_fingerprint
from ..provenance import describe_source, read_provenance, record_provenance
from ..scores.registry import varies_with_the_model
from ..validation import check_positive_int
from .batches import preprocess, rows_digest, score_preprocessed, scoring_task, task_batches, task_provenance
from .dynamics import dynamics_of, split_methods
from .prefetch import prefetch
from .process import get_process_state
from .store import (
    check_or_write_config,
    check_stream_arguments,
    dataset_digest,
    isin_sorted,
    keyed_ids,
    load_scores,
    load_weights,
    positions_of,
    prepare_shard_dir,
    read_shards,
    row_keys,
    save_weights,
    stream_digest,
    write_shard,
)

logger = logging.getLogger(__name__)

__all__ = ["ProxyTrainer", "score_dataset"]

ProxyTrainer = Callable[..., tuple[nn.Module, Mapping[str, Any]]]  # see score_dataset's `train_proxy`


def _scorer(model: nn.Module, methods: Sequence[str], preprocessor, device, autocast_dtype) -> Callable:
    """`score(inputs, labels, row_ids=...)` for one batch, through the task's scoring when there is one."""
    task = getattr(preprocessor, "task", None)
    return partial(score_preprocessed, model, methods, device=device, autocast_dtype=autocast_dtype, task=task)


def _contiguous(indices: np.ndarray) -> bool:
    return len(indices) > 0 and int(indices[-1]) - int(indices[0]) == len(indices) - 1


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
    source = dataset.select_columns(preprocessor.columns).with_format(None)
    model.to(state.device)
    was_training = model.training
    model.eval()
    new_ids: list[np.ndarray] = []
    new_values: list[dict[str, np.ndarray]] = []
    pending = 0
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]

    score = _scorer(model, methods, preprocessor, state.device, autocast_dtype)

    def load(indices: np.ndarray) -> tuple:
        rows = source[int(indices[0]) : int(indices[-1]) + 1] if _contiguous(indices) else source[indices.tolist()]
        return indices, *preprocess(preprocessor, rows, indices if keys is None else keys[indices])

    # The next batches are read and decoded in a background thread while the model scores this one.
    loaded = prefetch(load, batches)
    try:
        progress = tqdm(loaded, total=len(batches), desc=description, disable=not state.is_local_main_process)
        for indices, inputs, labels in progress:
            row_ids = indices if keys is None else keys[indices]
            scores = score(inputs, labels, row_ids=row_ids)
            new_ids.append(indices)
            new_values.append(scores)
            pending += 1
            if shard_dir is not None and pending >= save_every:
                write_shard(shard_dir, rank, keyed_ids(new_ids[-pending:], keys), new_values[-pending:])
                pending = 0
        if shard_dir is not None and pending:
            write_shard(shard_dir, rank, keyed_ids(new_ids[-pending:], keys), new_values[-pending:])
    finally:
        loaded.close()
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
    done = np.unique(read_shards(shard_dir, methods, ids_only=True)[0])
    prepare_shard_dir(shard_dir, state)
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

    score = _scorer(model, methods, preprocessor, state.device, autocast_dtype)

    def load(batch: dict) -> tuple:
        ids = np.asarray(batch[row_id_column], dtype=np.int64)
        todo = ~isin_sorted(ids, done)
        if not todo.any():
            return len(ids), ids[:0], None, None
        if not todo.all():
            keep = np.flatnonzero(todo)
            batch = {name: [values[i] for i in keep] for name, values in batch.items()}
        return len(ids), ids[todo], *preprocess(preprocessor, batch, ids[todo])

    try:
        # The stream is read and the next batches decoded in a background thread while the model scores this one.
        with closing(prefetch(load, local.iter(batch_size=batch_size))) as loaded:
            for read, ids, inputs, labels in loaded:
                seen += read
                progress.update(read)
                if not len(ids):
                    continue
                scores = score(inputs, labels, row_ids=ids)
                pending_values.append(scores)
                pending_ids.append(ids)
                scored += len(ids)
                if len(pending_ids) >= save_every:
                    write_shard(shard_dir, rank, pending_ids, pending_values)
                    pending_ids, pending_values = [], []
        if pending_ids:
            write_shard(shard_dir, rank, pending_ids, pending_values)
    finally:
        progress.close()
        model.train(was_training)
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


def _model_identity(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}:{weights_fingerprint(model)}"


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
    task: str | None = None,
    tokenizer=None,
    max_length: int | None = 1024,
    train_proxy: ProxyTrainer | None = None,
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
        task: `None` (or `"image_classification"` / `"text_classification"`) for classifiers, or `"causal_lm"` for a
            causal language model scored on instruction / SFT rows (TRL's `text`, `prompt`/`completion`, `messages`,
            or Alpaca `instruction`/`input`/`output`), with the methods of `list_scores("causal_lm")` (`loss`, `perplexity`, `el2n`, `ifd`, `grand`) over the tokens
            `SFTTrainer` trains on (see `datadiet.tasks.CausalLMTask`).
        tokenizer: the causal LM's tokenizer (`task="causal_lm"`).
        max_length: `SFTConfig.max_length` for `task="causal_lm"`: rows are truncated to their first `max_length`
            tokens.
        train_proxy: `train_proxy(model, dataset, *, preprocessor, epochs, seed, batch_size, output_dir, ...,
            track_scores=[...]) -> (trained model, {score: per-row values})` trains the proxies; `datadiet.score_dataset`
            passes the trainer's `datadiet.trainer.proxy.fit_proxy` (the engine never imports the trainer).

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
    task = scoring_task(task)
    evaluated, dynamics = split_methods(methods, train_epochs, trains=model_init is not None, task=task)
    methods = [*evaluated, *dynamics]
    streaming = isinstance(dataset, IterableDataset)
    if streaming and dynamics:
        raise ValueError(f"{dynamics} come from training on the rows, which a stream cannot do: load a Dataset.")
    if streaming:
        check_stream_arguments(dataset, row_id_column, output_dir, train_epochs)
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
    if train_epochs > 0 and train_proxy is None:
        raise ValueError("train_epochs > 0 trains proxies: pass train_proxy=..., or call datadiet.score_dataset.")
    if mixed_precision not in (None, "no", "bf16"):
        raise ValueError(f"mixed_precision must be None, 'no' or 'bf16', got {mixed_precision!r}.")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1 (batches between two shard writes), got {save_every}.")
    check_positive_int("batch_size", batch_size)
    autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    if task is not None:
        preprocessor = task_batches(dataset, task, tokenizer or transform, max_length, train_epochs)
        input_column, label_column = preprocessor.columns, None
    else:
        input_column, kind, label_column = detect_columns(
            dataset, image_column=image_column, text_column=text_column, label_column=label_column
        )
        preprocessor = Preprocessor(transform, input_column=input_column, kind=kind, label_column=label_column)
    keys = None if streaming else row_keys(dataset, row_id_column)
    new_columns = [name for method in methods for name in (method, f"{method}_std")]
    clashing = [name for name in new_columns if name in dataset.column_names]
    if clashing and not overwrite and not streaming:
        raise ValueError(f"The dataset already has column(s) {clashing}: pass overwrite=True to replace them.")
    state = get_process_state()
    output_dir = Path(output_dir) if output_dir is not None else None

    per_seed: list[dict[str, np.ndarray]] = []
    for position, seed in enumerate(seeds, start=1):
        if model_init is not None:
            from transformers import set_seed

            set_seed(seed)
            seed_model = model_init(seed)
        else:
            seed_model = copy.deepcopy(model) if train_epochs > 0 else model
        if seed == seeds[0] and task is None:
            check_input_channels(dataset, preprocessor, input_channels_of(seed_model))
        seed_dir = output_dir / f"seed-{seed}" if output_dir is not None else None
        if output_dir is not None and seed == seeds[0]:
            config = {
                "methods": methods,
                "seeds": seeds,
                "train_epochs": train_epochs,
                "num_rows": None if streaming else len(dataset),
                "row_id_column": row_id_column,
                "data": (
                    stream_digest(dataset, row_id_column, label_column or row_id_column)
                    if streaming
                    else dataset_digest(dataset, label_column)
                    if label_column is not None
                    else rows_digest(dataset, preprocessor.columns)
                ),
                "preprocessing": preprocessor.fingerprint(),
                "model": _model_identity(seed_model),  # hashes every weight: only where a run folder needs it
                "mixed_precision": mixed_precision,
                "training": json.dumps(training_kwargs or {}, sort_keys=True, default=str),
            }
            check_or_write_config(output_dir, config, state=state)
        seed_dynamics: dict[str, np.ndarray] = {}
        if train_epochs > 0:
            weights = seed_dir / "model.safetensors" if seed_dir is not None else None
            dynamics_cache = seed_dir / "dynamics.npz" if seed_dir is not None else None
            if weights is not None and weights.exists():
                logger.info("Loading the seed-%d model trained by an earlier run from %s.", seed, weights)
                load_weights(seed_model, weights)
                if dynamics:
                    seed_dynamics = dynamics_of(None, dynamics, dynamics_cache)
            else:
                which = f"seed {seed} ({position} of {len(seeds)})"
                logger.info("Training proxy %s for %s epochs.", which, train_epochs)
                # Training-dynamics scores are tracked during this very training (as the curve's proxies do).
                tracking = {"track_scores": dynamics} if dynamics else {}
                seed_model, tracked = train_proxy(
                    seed_model,
                    dataset,
                    preprocessor=preprocessor,
                    epochs=train_epochs,
                    seed=seed,
                    batch_size=batch_size,
                    output_dir=seed_dir / "training" if seed_dir else None,
                    progress_bar=state.is_local_main_process,
                    progress_description=f"Training proxy {which}",
                    **{**(training_kwargs or {}), **tracking},
                )
                if dynamics:
                    seed_dynamics = dynamics_of(tracked, dynamics, dynamics_cache if state.is_main_process else None)
                if weights is not None and state.is_main_process:
                    weights.parent.mkdir(parents=True, exist_ok=True)
                    save_weights(seed_model, weights)
                state.wait_for_everyone()
        common = {
            "batch_size": batch_size,
            "state": state,
            "autocast_dtype": autocast_dtype,
            "save_every": save_every,
            "description": f"Scoring {'+'.join(evaluated)} (seed {seed})",
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
            scores = (
                _score_model(seed_model, dataset, evaluated, preprocessor, shard_dir=shard_dir, keys=keys, **common)
                if evaluated
                else {}
            )
            per_seed.append({**scores, **seed_dynamics})

    model_description = model_name_of(model if model is not None else seed_model)
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
        "model_init": model_init is not None,  # fresh models per seed, or the one model given
        "weights_sha256": weights_fingerprint(model) if model is not None else None,
        "training": training_kwargs or None,
        "preprocessing": preprocessor.fingerprint(),
    }
    if task is not None:
        provenance.update(task=task, **task_provenance(preprocessor.task))
    recorded = {} if streaming else read_provenance(dataset)
    # A dataset scored from Python names its source too (the command records its own, fuller one).
    source = {} if recorded.get("source") or streaming else {"source": describe_source(dataset)}
    if streaming:
        return record_provenance(load_scores(output_dir, row_id_column=row_id_column), scoring=provenance)

    scored = dataset.remove_columns(clashing) if clashing else dataset
    for method in methods:
        stacked = np.stack([scores[method] for scores in per_seed]).astype(np.float64)
        scored = scored.add_column(method, stacked.mean(axis=0).astype(np.float32))
        if len(seeds) > 1 and (method in dynamics or varies_with_the_model(method)):
            scored = scored.add_column(f"{method}_std", stacked.std(axis=0).astype(np.float32))
    return record_provenance(scored, scoring=provenance, **source)
