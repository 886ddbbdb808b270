"""Pruned datasets (or their scores alone) to a local folder in the layout `Dataset.push_to_hub` produces: Parquet
shards, the score histogram and the dataset card."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from datasets.features.features import require_decoding
from datasets.table import embed_table_storage
from datasets.utils.py_utils import convert_file_size_to_int

from ..data import column_values
from ..provenance import read_provenance
from .card import build_card, score_statistics

logger = logging.getLogger(__name__)

__all__ = ["CARD_FILENAME", "DATA_DIR", "HISTOGRAM_FILENAME", "known_score_columns", "save_pruned"]

HISTOGRAM_FILENAME = "score_histogram.png"
CARD_FILENAME = "README.md"
DATA_DIR = "data"
_SHARD_NAME = re.compile(r"^[\w.-]+-\d{5}-of-\d{5}\.parquet$")


def known_score_columns() -> set[str]:
    """The names of score columns: every registered score (`datadiet.scores.list_scores()`, which also names the
    scores registered by modules not imported yet) and every score the trainer tracks
    (`datadiet.scores.trackers.TRACKED_SCORES`); their `_std` columns hold the spread over seeds."""
    from ..scores import list_scores
    from ..scores.trackers import TRACKED_SCORES

    return {*list_scores(), *TRACKED_SCORES}


def save_pruned(
    dataset: Dataset | DatasetDict,
    folder: str | Path,
    *,
    provenance: Mapping[str, Any] | None = None,
    scores_only: bool = False,
    score_columns: Sequence[str] | None = None,
    row_id_column: str = "row_id",
    source: str | Mapping[str, Any] | None = None,
    command: str | Sequence[str] | None = None,
    repo_id: str | None = None,
    pretty_name: str | None = None,
    license: str | None = None,
    max_shard_size: int | str = "500MB",
    num_shards: int | Mapping[str, int] | None = None,
    histogram: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `dataset` to `folder` in the layout `Dataset.push_to_hub` produces: Parquet shards
    `data/<split>-00000-of-0000N.parquet` (image/audio bytes embedded) and a `README.md` dataset card whose `configs:`
    YAML lets `datasets.load_dataset(folder)` load it back with the same rows and features.

    The card carries a `datadiet:` YAML block (source dataset and its revision or fingerprint, scoring models and
    their configs, seeds, epochs, methods, pruning strategy and keep fraction, rows before and after, statistics of
    every score column, library versions, the exact command) and a readable body with the score histogram
    (`score_histogram.png`) and how to reproduce the dataset. The provenance is the one recorded on the dataset by
    `score_dataset` and `prune` (`datadiet.provenance.read_provenance`), merged with `provenance`.

    Args:
        dataset (`Dataset` or `DatasetDict`):
            The (pruned) dataset. A `Dataset` is written as the `train` split (or its own `split` name); each split
            of a `DatasetDict` is written under its name.
        folder (`str` or `Path`):
            Where to write. Created if missing; must be empty unless `overwrite=True`.
        provenance (`dict`, *optional*):
            Extra provenance merged over the recorded one (nested dicts key by key).
        scores_only (`bool`, *optional*, defaults to `False`):
            Publish only the row id column and the score columns (with their `_std` columns), so that others can
            prune the original dataset their own way. Pass the scored, unpruned dataset: without a `row_id_column`,
            the row position in `dataset` is written as `row_id`.
        score_columns (`list[str]`, *optional*):
            The score columns. By default, the columns named after a registered score (`datadiet.list_scores()`),
            a method in the provenance, or a score the trainer tracks (`forgetting`, `confidence`, ...), and their
            `_std` columns.
        row_id_column (`str`, *optional*, defaults to `"row_id"`):
            The column identifying rows of the source dataset.
        source (`str` or `dict`, *optional*):
            The source dataset (a Hub name or a path, or a dict with `path`, `revision`, `split`, ...); overrides the
            recorded one.
        command (`str` or `list[str]`, *optional*):
            The exact command(s) that made this dataset; by default the ones recorded in the provenance.
        repo_id (`str`, *optional*):
            The Hub repository, used in the card's loading snippet (set by `push_to_hub`).
        pretty_name (`str`, *optional*):
            The card's title.
        license (`str`, *optional*):
            The license of the data (that of the source dataset).
        max_shard_size (`int` or `str`, *optional*, defaults to `"500MB"`):
            Largest Parquet shard, as in `Dataset.push_to_hub`.
        num_shards (`int` or `dict[str, int]`, *optional*):
            Number of shards (per split for a dict); overrides `max_shard_size`.
        histogram (`bool`, *optional*, defaults to `True`):
            Write `score_histogram.png` and show it in the card (when there are score columns).
        overwrite (`bool`, *optional*, defaults to `False`):
            Allow writing into a non-empty folder: the shards, card and histogram of an earlier save are replaced;
            other files are left alone.

    Returns:
        `Path`: the folder.

    Example:
    ```python
    >>> import tempfile
    >>> from datasets import Dataset, load_dataset
    >>> from datadiet.hub import save_pruned
    >>> ds = Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0], "el2n": [0.1, 0.9, 0.4]})
    >>> folder = save_pruned(ds, tempfile.mkdtemp() + "/pruned", source="my/source-dataset")
    >>> list(load_dataset(str(folder), split="train")["el2n"])
    [0.1, 0.9, 0.4]

    ```
    """
    splits = _as_splits(dataset)
    folder = Path(folder)
    _prepare_folder(folder, overwrite=overwrite)

    main_split = "train" if "train" in splits else next(iter(splits))
    recorded = next((read_provenance(ds) for ds in [splits[main_split], *splits.values()] if read_provenance(ds)), {})
    merged = _merge(recorded, dict(provenance or {}))
    if source is not None:
        merged["source"] = _merge(merged.get("source") or {}, {"path": source} if isinstance(source, str) else source)

    columns_by_split = {name: _find_score_columns(ds, score_columns, merged) for name, ds in splits.items()}
    if scores_only:
        if not any(columns_by_split.values()):
            raise ValueError(
                f"scores_only=True but no score column was found among the columns {splits[main_split].column_names}. "
                "Score the dataset first (datadiet.score_dataset) or name the columns with score_columns=[...]."
            )
        splits = {
            name: _scores_table(ds, columns_by_split[name], row_id_column, pruned="pruning" in merged)
            for name, ds in splits.items()
        }

    shard_files, sizes = {}, {}
    for name, ds in splits.items():
        wanted = num_shards.get(name) if isinstance(num_shards, Mapping) else num_shards
        shard_files[name], sizes[name] = _write_shards(ds, folder / DATA_DIR, name, max_shard_size, wanted)

    statistics = {
        name: {
            column: score_statistics(splits[name], column) for column in columns if column in splits[name].column_names
        }
        for name, columns in columns_by_split.items()
    }
    histogram_file = None
    main_columns = [c for c in columns_by_split[main_split] if not c.endswith("_std")] or columns_by_split[main_split]
    if histogram and main_columns:
        from ..report import plot_score_histogram

        values = {c: column_values(splits[main_split], c) for c in main_columns}
        histogram_file = plot_score_histogram(
            values, folder / HISTOGRAM_FILENAME, title=f"{main_split}: {len(splits[main_split]):,} rows"
        ).name

    card = build_card(
        splits,
        merged,
        statistics=statistics,
        sizes=sizes,
        main_split=main_split,
        scores_only=scores_only,
        row_id_column=row_id_column,
        command=command,
        repo_id=repo_id,
        pretty_name=pretty_name,
        license=license,
        histogram_file=histogram_file,
        data_dir=DATA_DIR,
    )
    card.save(folder / CARD_FILENAME)
    logger.info(
        "Wrote %s to %s (%s).",
        "scores" if scores_only else "dataset",
        folder,
        ", ".join(f"{name}: {len(ds):,} rows in {len(shard_files[name])} shard(s)" for name, ds in splits.items()),
    )
    return folder


def _as_splits(dataset: Dataset | DatasetDict) -> dict[str, Dataset]:
    if isinstance(dataset, DatasetDict):
        splits = dict(dataset)
    elif isinstance(dataset, Dataset):
        # A sliced split ("train[:10%]") cannot name a shard file; a single dataset is then published as "train".
        name = str(dataset.split) if dataset.split else "train"
        splits = {name if re.fullmatch(r"\w+(\.\w+)*", name) else "train": dataset}
    else:
        raise TypeError(
            f"Expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}. An IterableDataset must be "
            "materialised first (Dataset.from_generator or .take(n) then Dataset.from_list)."
        )
    if not splits:
        raise ValueError("The DatasetDict has no split: there is nothing to save.")
    for name, ds in splits.items():
        if not re.fullmatch(r"\w+(\.\w+)*", name):
            raise ValueError(f"Split name {name!r} cannot name a Parquet shard; use letters, digits, '_' or '.'.")
        if len(ds) == 0:
            raise ValueError(
                f"The {name!r} split has no rows: there is nothing to save. Check the keep fraction given to prune()."
            )
    return splits


def _prepare_folder(folder: Path, *, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is a file; give a folder path.")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{folder} exists and is not empty. Pass overwrite=True to replace an earlier save there, or choose "
                "an empty folder."
            )
        # Remove only what an earlier save wrote: stale shards would otherwise match the `data/<split>-*` patterns.
        for path in (folder / DATA_DIR).glob("*.parquet"):
            if _SHARD_NAME.match(path.name):
                path.unlink()
        for name in (CARD_FILENAME, HISTOGRAM_FILENAME):
            (folder / name).unlink(missing_ok=True)
    (folder / DATA_DIR).mkdir(parents=True, exist_ok=True)


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _find_score_columns(dataset: Dataset, explicit: Sequence[str] | None, provenance: Mapping) -> list[str]:
    if explicit is not None:
        explicit = [explicit] if isinstance(explicit, str) else list(explicit)
        missing = [c for c in explicit if c not in dataset.column_names]
        if missing:
            raise ValueError(f"score_columns {missing} are not columns of the dataset ({dataset.column_names}).")
        return explicit
    scoring = provenance.get("scoring") if isinstance(provenance.get("scoring"), Mapping) else {}
    methods = scoring.get("methods") or []
    names = {*known_score_columns(), *([methods] if isinstance(methods, str) else methods)}
    columns = []
    for column in dataset.column_names:
        base = column[: -len("_std")] if column.endswith("_std") else column
        dtype = getattr(dataset.features[column], "dtype", "")
        if base in names and ("float" in dtype or "int" in dtype):
            columns.append(column)
    return columns


def _scores_table(dataset: Dataset, columns: list[str], row_id_column: str, *, pruned: bool) -> Dataset:
    keep = [c for c in columns if c != row_id_column]
    if row_id_column in dataset.column_names:
        return dataset.select_columns([row_id_column, *keep]).flatten_indices()
    if pruned:
        logger.warning(
            "The dataset has no %r column and was pruned: the row ids written are positions in the pruned dataset, "
            "not in its source. Publish the scores of the unpruned dataset to let others prune the source.",
            row_id_column,
        )
    scores = dataset.select_columns(keep).flatten_indices()
    return scores.add_column(row_id_column, np.arange(len(scores), dtype=np.int64)).select_columns(
        [row_id_column, *keep]
    )


def _write_shards(
    dataset: Dataset, data_dir: Path, split: str, max_shard_size: int | str, num_shards: int | None
) -> tuple[list[Path], int]:
    """Mirror `Dataset._push_parquet_shards_to_hub`: same shard count rule, names and embedded media bytes."""
    if num_shards is None:
        num_shards = int(dataset._estimate_nbytes() / convert_file_size_to_int(max_shard_size)) + 1
    num_shards = max(1, min(int(num_shards), len(dataset)))
    # Images/audio stored as local file paths must travel as bytes, or the Parquet file points at the writer's disk.
    embed = any(require_decoding(feature, ignore_decode_attribute=True) for feature in dataset.features.values())
    paths, written = [], 0
    for index in range(num_shards):
        shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
        if embed:
            shard = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
        path = data_dir / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
        shard.to_parquet(str(path))
        paths.append(path)
        written += path.stat().st_size
    return paths, written
