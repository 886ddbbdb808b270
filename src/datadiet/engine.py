"""Runs models over a dataset and turns their per-example scores into dataset columns: several seeds, training of
proxy models, several processes under `accelerate launch` (each row scored exactly once), and partial results
written to `output_dir` so that an interrupted run resumes instead of starting over."""

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
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from .data import Preprocessor, compute_scores, detect_columns, validate_methods, weights_fingerprint
from .provenance import record_provenance

logger = logging.getLogger(__name__)

__all__ = ["score_dataset", "get_process_state"]

_CONFIG_FILE = "datadiet_scoring.json"


def get_process_state():
    """The accelerate `PartialState` of this process, failing loudly on the known silent fallbacks.

    `accelerate launch --cpu --num_processes 2` (and `--multi_gpu` without CPU mode on a machine with no GPU) set
    WORLD_SIZE > 1 in the environment yet leave each process believing it is alone, so every process would score
    every row. Catch that instead of producing N copies of the work.
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and state.num_processes != world_size:
        raise RuntimeError(
            f"The environment says WORLD_SIZE={world_size} but accelerate started {state.num_processes} process(es) "
            "in this group, so each process would score every row. On CPU-only machines launch with "
            "`accelerate launch --multi_gpu --num_processes 2 ...` (or `accelerate launch --config_file "
            "recipes/accelerate_configs/cpu_2proc.yaml ...`, or `torchrun --nproc_per_node 2 ...`); "
            "`accelerate launch --cpu --num_processes 2` starts only one real process group."
        )
    return state


def _dataset_digest(dataset: Dataset, label_column: str) -> str:
    # In-memory datasets get random fingerprints, so describe the data by what resuming must not change: the
    # number of rows, the features, and the labels in order.
    digest = hashlib.sha256()
    digest.update(f"{len(dataset)}:{dataset.features.to_dict()}".encode())
    digest.update(np.asarray(dataset.with_format("numpy")[label_column]).astype(np.int64).tobytes())
    return digest.hexdigest()


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


def _read_shards(shard_dir: Path | None, methods: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Row ids and scores already written to `shard_dir` (complete shards only: they are renamed into place)."""
    ids, values = [np.zeros(0, dtype=np.int64)], {m: [np.zeros(0, dtype=np.float32)] for m in methods}
    if shard_dir is not None and shard_dir.exists():
        import pyarrow.parquet as pq

        for path in sorted(shard_dir.glob("*.parquet")):
            table = pq.read_table(path)
            ids.append(table.column("row_id").to_numpy())
            for method in methods:
                values[method].append(table.column(method).to_numpy())
    return np.concatenate(ids), {m: np.concatenate(v) for m, v in values.items()}


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


def _to_device(inputs: torch.Tensor | dict, device: torch.device) -> torch.Tensor | dict:
    if isinstance(inputs, dict):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)


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
) -> dict[str, np.ndarray]:
    """Score every row of `dataset` once with `model`; returns one float32 array per method, in row order."""
    num_rows = len(dataset)
    done_ids, done_values = _read_shards(shard_dir, methods)
    rank, world = state.process_index, state.num_processes
    # Contiguous blocks per process: no sampler, so no wrap-around padding and no row scored twice.
    mine = np.arange(rank * num_rows // world, (rank + 1) * num_rows // world)
    todo = mine[~np.isin(mine, done_ids)]
    if len(done_ids):
        logger.info("Resuming from %s: %d of %d rows already scored.", shard_dir, len(done_ids), num_rows)
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
                row_ids=indices,
                autocast_dtype=autocast_dtype,
            )
            new_ids.append(indices)
            new_values.append(scores)
            pending += 1
            if shard_dir is not None and pending >= save_every:
                _write_shard(shard_dir, rank, new_ids[-pending:], new_values[-pending:])
                pending = 0
        if shard_dir is not None and pending:
            _write_shard(shard_dir, rank, new_ids[-pending:], new_values[-pending:])
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

    def collate_view(batch: dict[str, list]) -> dict[str, Any]:
        inputs, labels = preprocessor(batch)
        features = dict(inputs) if isinstance(inputs, dict) else {"pixel_values": inputs}
        return {**features, "labels": labels}

    view = dataset.select_columns(preprocessor.columns).with_transform(collate_view)
    return train_proxy_model(
        model,
        view,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        output_dir=str(output_dir) if output_dir else None,
        **training_kwargs,
    )


def score_dataset(
    dataset: Dataset,
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
) -> Dataset:
    """Score every example of `dataset` and return the dataset with one float32 column per method.

    With `model`, that model is scored as it is. With `model_init(seed) -> model` and `seeds`, one model per seed is
    built (after `transformers.set_seed(seed)`), trained `train_epochs` epochs on `dataset` (0: scored at
    initialisation, e.g. "GraNd at init") and scored; the column `<method>` holds the mean over seeds and
    `<method>_std` the standard deviation (population std, only with several seeds). Models run in eval mode on
    un-augmented inputs, as EL2N and GraNd are defined (Paul et al. 2021).

    Args:
        dataset: a `datasets.Dataset` with an input column (`Image`, text, or array) and a label column.
        model: a timm model, a transformers `*ForImageClassification` / `*ForSequenceClassification`, or any
            `nn.Module` returning logits.
        methods: score names, see `datadiet.scores.list_scores()` (`el2n`, `grand`, `loss`, `margin`, ...).
        model_init: builds a fresh model for a seed; use it for several independently initialised models.
        seeds: the seeds of the models to average over.
        train_epochs: epochs each model from `model_init` is trained before scoring (fractions allowed).
        transform: per-image callable (timm / torchvision transform), transformers image processor, or tokenizer.
        image_column / text_column / label_column: detected from the features when not given.
        batch_size: rows per forward pass.
        output_dir: where partial scores (Parquet shards keyed by row id) and trained proxy weights are written; a
            rerun with the same folder and configuration skips what is done.
        overwrite: replace existing columns of the same names instead of failing.
        mixed_precision: `"bf16"` to run the forward passes under bfloat16 autocast.
        save_every: batches between two shard writes.
        training_kwargs: extra arguments for the proxy models' training (learning rate, ...).

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
    if len(dataset) == 0:
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
    autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    input_column, kind, label_column = detect_columns(
        dataset, image_column=image_column, text_column=text_column, label_column=label_column
    )
    new_columns = [name for method in methods for name in (method, f"{method}_std")]
    clashing = [name for name in new_columns if name in dataset.column_names]
    if clashing and not overwrite:
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
                "num_rows": len(dataset),
                "data": _dataset_digest(dataset, label_column),
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
        per_seed.append(
            _score_model(
                seed_model,
                dataset,
                methods,
                preprocessor,
                batch_size=batch_size,
                shard_dir=seed_dir / "scores" if seed_dir is not None else None,
                state=state,
                autocast_dtype=autocast_dtype,
                save_every=save_every,
                description=f"Scoring {'+'.join(methods)} (seed {seed})",
            )
        )

    scored = dataset.remove_columns(clashing) if clashing else dataset
    for method in methods:
        stacked = np.stack([scores[method] for scores in per_seed]).astype(np.float64)
        scored = scored.add_column(method, stacked.mean(axis=0).astype(np.float32))
        if len(seeds) > 1:
            scored = scored.add_column(f"{method}_std", stacked.std(axis=0).astype(np.float32))
    model_description = type(model if model is not None else seed_model).__name__
    config_of = getattr(model if model is not None else seed_model, "config", None)
    return record_provenance(
        scored,
        scoring={
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
        },
    )
