"""The score store of an `output_dir`: Parquet shards of scores keyed by row id (written atomically, read back to
resume), the check that refuses another configuration in the same folder, `load_scores` and `join_scores`."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, IterableDataset, Value

from ..data import column_values
from ..scores.registry import varies_with_the_model

__all__ = [
    "SCORING_CONFIG_FILE",
    "check_or_write_config",
    "check_row_id_feature",
    "check_stream_arguments",
    "dataset_digest",
    "isin_sorted",
    "join_scores",
    "load_scores",
    "load_weights",
    "positions_of",
    "prepare_shard_dir",
    "read_shards",
    "row_keys",
    "save_weights",
    "stream_digest",
    "write_shard",
]

SCORING_CONFIG_FILE = "datadiet_scoring.json"


def dataset_digest(dataset: Dataset, label_column: str) -> str:
    """A hash of what resuming a map-style dataset must not change: its length, features and labels in order (an
    in-memory dataset gets a random fingerprint, so the fingerprint cannot serve)."""
    digest = hashlib.sha256()
    digest.update(f"{len(dataset)}:{dataset.features.to_dict()}".encode())
    digest.update(column_values(dataset, label_column).astype(np.int64).tobytes())
    return digest.hexdigest()


def stream_digest(dataset: IterableDataset, row_id_column: str, label_column: str, head: int = 1024) -> str:
    """A hash of a stream's features and of the row ids and labels of its first `head` rows, which a different
    dataset (or a different order of the same one) changes; a stream has no length and may be expensive to read
    twice."""
    digest = hashlib.sha256()
    digest.update(f"stream:{row_id_column}:{dataset.features.to_dict()}".encode())
    for batch in dataset.select_columns([row_id_column, label_column]).take(head).iter(batch_size=head):
        digest.update(np.asarray(batch[row_id_column], dtype=np.int64).tobytes())
        digest.update(np.asarray(batch[label_column], dtype=np.int64).tobytes())
    return digest.hexdigest()


def check_row_id_feature(features: Features, row_id_column: str) -> None:
    """Raise a `ValueError` unless `row_id_column` is an integer column of `features`."""
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


def row_keys(dataset: Dataset, row_id_column: str | None) -> np.ndarray | None:
    """The stored row ids of a map-style dataset (checked unique), or `None` when rows are keyed by position."""
    if row_id_column is None:
        return None
    check_row_id_feature(dataset.features, row_id_column)
    keys = column_values(dataset, row_id_column).astype(np.int64)
    unique, counts = np.unique(keys, return_counts=True)
    if len(unique) != len(keys):
        raise ValueError(
            f"row_id_column {row_id_column!r} repeats ids (e.g. {unique[counts > 1][:5].tolist()}): every row needs "
            "its own id."
        )
    return keys


def _scoring_mismatch(output_dir: Path, differing: list[str], existing: Mapping[str, Any]) -> str:
    return (
        f"output_dir {str(output_dir)!r} holds scores from a different configuration (differs in: "
        f"{', '.join(differing)}). Use a new output_dir, or delete this one to start over."
    )


def check_or_write_config(
    output_dir: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    file_name: str = SCORING_CONFIG_FILE,
    state=None,
    new_keys_only: bool = False,
    sort_keys: bool = True,
    mismatch: Callable[[Path, list[str], Mapping[str, Any]], str] | None = None,
) -> None:
    """Refuse to continue a run in `output_dir` made with another configuration, or record `config` there.

    If `output_dir/file_name` exists, its JSON is compared with `config` and a `ValueError` names the differing keys;
    otherwise the folder is created and `config` written to it atomically (by the main process only, between two
    barriers, when an accelerate `state` is given).

    Args:
        output_dir (`str` or `os.PathLike`):
            The run's folder.
        config (`dict`):
            JSON-serialisable values that a resumed run must not change.
        file_name (`str`, *optional*, defaults to `"datadiet_scoring.json"`):
            The file holding the configuration in `output_dir`.
        state (`accelerate.PartialState`, *optional*):
            The process state; without it this process alone writes the file.
        new_keys_only (`bool`, *optional*, defaults to `False`):
            Compare only the keys of `config` (keys stored by an earlier version and since dropped are ignored);
            by default a key present on one side only also differs.
        sort_keys (`bool`, *optional*, defaults to `True`):
            Write the keys sorted (else in the order of `config`).
        mismatch (`Callable`, *optional*):
            `mismatch(output_dir, differing_keys, stored_config) -> str`, the error message; by default one about
            scores from a different configuration.

    Example:
    ```python
    >>> import tempfile
    >>> from datadiet.engine.store import check_or_write_config
    >>> folder = tempfile.mkdtemp()
    >>> check_or_write_config(folder, {"methods": ["el2n"], "seeds": [0]})  # first run: recorded
    >>> check_or_write_config(folder, {"methods": ["el2n"], "seeds": [0]})  # same configuration: resumes
    >>> try:
    ...     check_or_write_config(folder, {"methods": ["grand"], "seeds": [0]})
    ... except ValueError as error:
    ...     print(str(error).split(" (")[1].split(")")[0])
    differs in: methods

    ```
    """
    output_dir = Path(output_dir)
    path = output_dir / file_name
    if path.exists():
        existing = json.loads(path.read_text())
        keys = set(config) if new_keys_only else set(existing) | set(config)
        differing = sorted(key for key in keys if existing.get(key) != config.get(key))
        if differing:
            raise ValueError((mismatch or _scoring_mismatch)(output_dir, differing, existing))
        return
    if state is not None:
        state.wait_for_everyone()
    if state is None or state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=sort_keys))
        os.replace(tmp, path)
    if state is not None:
        state.wait_for_everyone()


def read_shards(
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


def write_shard(shard_dir: Path, rank: int, ids: list[np.ndarray], values: list[dict[str, np.ndarray]]) -> None:
    """Write the row ids and scores of some batches as one Parquet shard of process `rank`, atomically."""
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


def prepare_shard_dir(shard_dir: Path | None, state) -> None:
    """Remove the shards a crashed run left half-written (under their temporary name, never read), then wait for
    every process, so that every process reads the finished shards before any process writes a new one."""
    if shard_dir is not None and state.is_main_process and shard_dir.exists():
        for stale in shard_dir.glob("*.tmp"):
            stale.unlink(missing_ok=True)
    state.wait_for_everyone()


def positions_of(ids: np.ndarray, keys: np.ndarray | None, num_rows: int, shard_dir: Path | None) -> np.ndarray:
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


def isin_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """`np.isin(values, sorted_ids)` for sorted ids, by binary search."""
    if len(sorted_ids) == 0:
        return np.zeros(len(values), dtype=bool)
    found = np.clip(np.searchsorted(sorted_ids, values), 0, len(sorted_ids) - 1)
    return sorted_ids[found] == values


def load_weights(model, path: Path) -> None:
    """Load the safetensors weights a run saved with `save_weights` into `model`."""
    from safetensors.torch import load_model

    load_model(model, str(path))


def save_weights(model, path: Path) -> None:
    """Save `model`'s weights as safetensors at `path`, atomically (a crash never leaves half a file there)."""
    from safetensors.torch import save_model

    tmp = path.with_suffix(".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)


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
    config_path = output_dir / SCORING_CONFIG_FILE
    if not config_path.exists():
        raise ValueError(
            f"{str(output_dir)!r} holds no scores: {SCORING_CONFIG_FILE} is missing. Pass score_dataset's output_dir."
        )
    config = json.loads(config_path.read_text())
    methods, seeds = config["methods"], config["seeds"]
    ids: np.ndarray | None = None
    totals: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    for seed in seeds:
        shard_dir = output_dir / f"seed-{seed}" / "scores"
        seed_ids, values = read_shards(shard_dir, methods)
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
        if len(seeds) > 1 and varies_with_the_model(method):
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
        check_row_id_feature(dataset.features, row_id_column)
        wanted = column_values(dataset, row_id_column).astype(np.int64)
    joined = dataset.remove_columns(clashing) if clashing else dataset
    for name, column in lookup(wanted).items():
        joined = joined.add_column(name, column)
    return joined


def check_stream_arguments(
    dataset: IterableDataset, row_id_column: str | None, output_dir: str | os.PathLike | None, train_epochs: float
) -> None:
    """Refuse, with the fix, a streaming scoring run that cannot be keyed, stored or trained."""
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
    check_row_id_feature(dataset.features, row_id_column)
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
