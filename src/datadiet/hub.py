"""Pruned datasets (or their scores alone) to a local folder or the Hugging Face Hub, in the layout
`Dataset.push_to_hub` produces, with a dataset card recording how they were made."""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, DatasetInfo, SplitDict, SplitInfo
from datasets.features.features import require_decoding
from datasets.info import DatasetInfosDict
from datasets.table import embed_table_storage
from datasets.utils.py_utils import convert_file_size_to_int

from .data import column_values
from .provenance import read_provenance

logger = logging.getLogger(__name__)

__all__ = ["PushArguments", "push_to_hub", "run_push", "save_pruned"]

HISTOGRAM_FILENAME = "score_histogram.png"
CARD_FILENAME = "README.md"
DATA_DIR = "data"
# Score column names from the design (some are produced by trackers rather than the registry), so that a dataset
# scored elsewhere is recognised even when the module registering the score was not imported.
_KNOWN_SCORE_COLUMNS = (
    "el2n",
    "grand",
    "forgetting",
    "loss",
    "margin",
    "entropy",
    "input_norm",
    "confidence",
    "variability",
    "tracin_self_influence",
)
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_SHARD_NAME = re.compile(r"^[\w.-]+-\d{5}-of-\d{5}\.parquet$")


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
            a method in the provenance, or a score of the design (`el2n`, `grand`, `forgetting`, ...), and their
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
        name: {column: _statistics(splits[name], column) for column in columns if column in splits[name].column_names}
        for name, columns in columns_by_split.items()
    }
    histogram_file = None
    main_columns = [c for c in columns_by_split[main_split] if not c.endswith("_std")] or columns_by_split[main_split]
    if histogram and main_columns:
        from .report import plot_score_histogram

        values = {c: column_values(splits[main_split], c) for c in main_columns}
        histogram_file = plot_score_histogram(
            values, folder / HISTOGRAM_FILENAME, title=f"{main_split}: {len(splits[main_split]):,} rows"
        ).name

    card = _build_card(
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
    )
    card.save(folder / CARD_FILENAME)
    logger.info(
        "Wrote %s to %s (%s).",
        "scores" if scores_only else "dataset",
        folder,
        ", ".join(f"{name}: {len(ds):,} rows in {len(shard_files[name])} shard(s)" for name, ds in splits.items()),
    )
    return folder


def push_to_hub(
    dataset: Dataset | DatasetDict,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    scores_only: bool = False,
    commit_message: str | None = None,
    create_pr: bool = False,
    **kwargs: Any,
):
    """Push `dataset` (pruned, or its scores alone) to the Hub dataset repository `repo_id` with its dataset card.

    The files are those `save_pruned` writes (built in a temporary folder), uploaded in one commit with
    `huggingface_hub.HfApi.upload_folder`; Parquet shards left in `data/` by an earlier push are deleted in the same
    commit, so the repository holds exactly this dataset. The token is handed to `HfApi` only: it is never written to
    a file or a log.

    Args:
        dataset (`Dataset` or `DatasetDict`):
            The dataset to push.
        repo_id (`str`):
            The dataset repository, `"user/name"`; created if missing.
        token (`str`, *optional*):
            A Hub token with write access; by default the one from `hf auth login` or `HF_TOKEN`.
        private (`bool`, *optional*):
            Visibility of a repository created here (an existing repository keeps its own).
        revision (`str`, *optional*):
            The branch to push to (created if missing); `main` by default.
        scores_only (`bool`, *optional*, defaults to `False`):
            Push only the row id and score columns (see `save_pruned`).
        commit_message (`str`, *optional*):
            The commit message.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request instead of committing to the branch.
        kwargs:
            Passed to `save_pruned` (`provenance`, `source`, `command`, `score_columns`, `pretty_name`, ...).

    Returns:
        `huggingface_hub.CommitInfo`: the commit.

    Example (the push itself needs the network and a Hub token with write access, so it is not run as a doctest):
    ```python
    >>> from datasets import Dataset
    >>> from datadiet import prune
    >>> from datadiet.hub import push_to_hub
    >>> scored = Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1], "el2n": [0.1, 0.9, 0.4, 0.7]})
    >>> pruned = prune(scored, "el2n", keep=0.5)
    >>> push_to_hub(pruned, "me/my-dataset-el2n-keep50", private=True)  # doctest: +SKIP

    ```
    """
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repository id; use 'user/name' (letters, digits, -_.).")
    from huggingface_hub import constants

    # Fail before building the files: with offline mode on, every HfApi call would raise after that work.
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            "HF_HUB_OFFLINE is set, so nothing can be pushed. Unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to push, "
            "or write the same files locally with save_pruned(dataset, folder) / `datadiet push --output_dir`."
        )
    for reserved in ("folder", "overwrite"):
        if reserved in kwargs:
            raise ValueError(
                f"push_to_hub builds its own folder: drop {reserved}= (use save_pruned to write locally)."
            )
    with tempfile.TemporaryDirectory(prefix="datadiet-push-") as tmp:
        folder = save_pruned(dataset, Path(tmp) / "repo", scores_only=scores_only, repo_id=repo_id, **kwargs)
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        what = "scores" if scores_only else "pruned dataset"
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="dataset",
            revision=revision,
            commit_message=commit_message or f"Upload {what} with datadiet",
            create_pr=create_pr,
            delete_patterns=[f"{DATA_DIR}/*.parquet"],
        )
    logger.info("Pushed the %s to https://huggingface.co/datasets/%s", what, repo_id)
    return commit


@dataclass
class PushArguments:
    """Arguments of `datadiet push`: publish a scored or pruned dataset saved with `Dataset.save_to_disk`."""

    dataset_path: str | None = field(
        default=None, metadata={"help": "Folder written by `Dataset.save_to_disk` (a Dataset or a DatasetDict)."}
    )
    repo_id: str | None = field(
        default=None, metadata={"help": "Hub dataset repository to push to, e.g. `me/cifar10-el2n-keep50`."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Local folder to write the same files to (works offline)."}
    )
    scores_only: bool = field(
        default=False, metadata={"help": "Publish only the row id and score columns, not the data."}
    )
    private: bool | None = field(default=None, metadata={"help": "Create the Hub repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier save in a non-empty `output_dir`."})

    def __post_init__(self):
        if not self.dataset_path:
            raise ValueError("dataset_path is required: the folder written by `Dataset.save_to_disk`.")
        if not self.repo_id and not self.output_dir:
            raise ValueError("Nothing to do: give repo_id (push to the Hub), output_dir (write locally), or both.")


def run_push(args: PushArguments) -> dict[str, Any]:
    """Load `args.dataset_path` and write it to `args.output_dir` and/or push it to `args.repo_id`.

    Returns:
        `dict`: `{"output_dir": Path | None, "commit": CommitInfo | None}`.

    Example:
    ```python
    >>> import tempfile
    >>> from datasets import Dataset
    >>> from datadiet.hub import PushArguments, run_push
    >>> folder = tempfile.mkdtemp()
    >>> Dataset.from_dict({"text": ["a", "b"], "label": [0, 1], "el2n": [0.2, 0.8]}).save_to_disk(f"{folder}/pruned")
    >>> result = run_push(PushArguments(dataset_path=f"{folder}/pruned", output_dir=f"{folder}/pruned-hub"))
    >>> sorted(path.name for path in result["output_dir"].iterdir()), result["commit"]
    (['README.md', 'data', 'score_histogram.png'], None)

    ```
    """
    from datasets import load_from_disk

    if not Path(args.dataset_path).is_dir():
        raise ValueError(f"dataset_path={args.dataset_path!r} is not a folder; pass a `Dataset.save_to_disk` folder.")
    dataset = load_from_disk(args.dataset_path)
    result: dict[str, Any] = {"output_dir": None, "commit": None}
    if args.output_dir:
        result["output_dir"] = save_pruned(
            dataset, args.output_dir, scores_only=args.scores_only, repo_id=args.repo_id, overwrite=args.overwrite
        )
    if args.repo_id:
        result["commit"] = push_to_hub(
            dataset, args.repo_id, private=args.private, revision=args.revision, scores_only=args.scores_only
        )
    return result


# --------------------------------------------------------------------------------------------------- helpers


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
    from .scores import list_scores

    scoring = provenance.get("scoring") if isinstance(provenance.get("scoring"), Mapping) else {}
    methods = scoring.get("methods") or []
    names = {*list_scores(), *_KNOWN_SCORE_COLUMNS, *([methods] if isinstance(methods, str) else methods)}
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


def _statistics(dataset: Dataset, column: str) -> dict[str, Any]:
    values = np.asarray(column_values(dataset, column), dtype=np.float64)
    finite = values[np.isfinite(values)]
    stats: dict[str, Any] = {"count": int(finite.size)}
    if finite.size < values.size:
        stats["non_finite"] = int(values.size - finite.size)
    if finite.size:
        stats.update(mean=finite.mean(), std=finite.std(ddof=1) if finite.size > 1 else 0.0, min=finite.min())
        stats.update({f"q{round(q * 100):02d}": np.quantile(finite, q) for q in _QUANTILES})
        stats["max"] = finite.max()
    return {key: _round(value) for key, value in stats.items()}


def _round(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return float(f"{value:.6g}") if math.isfinite(value) else value
    return int(value) if isinstance(value, np.integer) else value


def _plain(value: Any) -> Any:
    """A YAML-safe copy: dicts with string keys, lists, str, bool, int, float, None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return _round(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _versions() -> dict[str, str]:
    from . import __version__

    versions = {"datadiet": __version__}
    for package in ("datasets", "huggingface_hub", "torch", "transformers", "timm", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _commands(command: str | Sequence[str] | None, provenance: Mapping) -> list[str]:
    if command is not None:
        return [command] if isinstance(command, str) else [str(c) for c in command]
    commands = []
    for step in provenance.get("steps") or []:
        if isinstance(step, Mapping) and step.get("command"):
            commands.append(str(step["command"]))
    recorded = provenance.get("command")
    if isinstance(recorded, str):
        commands.append(recorded)
    elif isinstance(recorded, Sequence):
        commands.extend(str(c) for c in recorded)
    return commands


def _settings(settings: Mapping[str, Any]) -> str:
    """`key = value` pairs for the card body; nested configs (a transformers `model_config`) stay in the YAML block."""
    shown = [f"{k} = `{v}`" for k, v in settings.items() if v is not None and not isinstance(v, Mapping)]
    hidden = [k for k, v in settings.items() if isinstance(v, Mapping) and v]
    return "; ".join(shown + ([f"{', '.join(hidden)} in the YAML header"] if hidden else []))


def _size_category(rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return label
    return "1M<n<10M" if rows < 10_000_000 else "10M<n<100M" if rows < 100_000_000 else "100M<n<1B"


def _build_card(
    splits: dict[str, Dataset],
    provenance: dict[str, Any],
    *,
    statistics: dict[str, dict[str, dict]],
    sizes: dict[str, int],
    main_split: str,
    scores_only: bool,
    row_id_column: str,
    command: str | Sequence[str] | None,
    repo_id: str | None,
    pretty_name: str | None,
    license: str | None,
    histogram_file: str | None,
):
    from huggingface_hub import DatasetCard, DatasetCardData

    pruning = provenance.get("pruning") if isinstance(provenance.get("pruning"), Mapping) else {}
    commands = _commands(command, provenance)
    rows_after = {name: len(ds) for name, ds in splits.items()}
    block = {
        **{k: v for k, v in provenance.items() if k not in ("command", "steps")},
        "scores_only": scores_only,
        "rows_before": pruning.get("rows_before"),
        "rows_after": pruning.get("rows_after", rows_after[main_split]),
        "splits": rows_after,
        "score_statistics": statistics,
        "command": commands or None,
        "steps": provenance.get("steps"),
        "versions": _versions(),
    }
    if scores_only:
        block["row_id_column"] = row_id_column
    block = _plain({k: v for k, v in block.items() if v is not None})

    info = DatasetInfo(features=splits[main_split].features, splits=SplitDict(), download_size=0, dataset_size=0)
    for name, ds in splits.items():
        info.splits.add(SplitInfo(name=name, num_bytes=ds._estimate_nbytes(), num_examples=len(ds)))
        info.download_size += sizes[name]
        info.dataset_size += ds._estimate_nbytes()
    info.size_in_bytes = info.download_size + info.dataset_size

    data = DatasetCardData(
        pretty_name=pretty_name,
        license=license,
        size_categories=_size_category(sum(rows_after.values())),
        tags=["datadiet", "data-pruning", "example-difficulty"],
    )
    # The same `dataset_info` and `configs` metadata `Dataset.push_to_hub` writes: `load_dataset` reads its data
    # files from `configs`, the Hub viewer its features from `dataset_info`.
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    data["configs"] = [
        {
            "config_name": "default",
            "data_files": [{"split": name, "path": f"{DATA_DIR}/{name}-*"} for name in splits],
        }
    ]
    data["datadiet"] = block
    body = _card_body(
        block,
        provenance,
        splits,
        main_split,
        scores_only,
        row_id_column,
        commands,
        repo_id,
        pretty_name,
        histogram_file,
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _card_body(
    block: dict,
    provenance: Mapping,
    splits: dict[str, Dataset],
    main_split: str,
    scores_only: bool,
    row_id_column: str,
    commands: list[str],
    repo_id: str | None,
    pretty_name: str | None,
    histogram_file: str | None,
) -> str:
    source = block.get("source") or {}
    scoring = block.get("scoring") or {}
    pruning = block.get("pruning") or {}
    source_name = source.get("path") or source.get("name") or source.get("data_files") or "an unrecorded source"
    revision = source.get("revision") or source.get("fingerprint")
    title = pretty_name or (f"Scores of {source_name}" if scores_only else f"{source_name}, pruned with datadiet")
    lines = [f"# {title}", ""]

    rows_after, rows_before = block["rows_after"], block.get("rows_before")
    # Provenance is stored with sorted keys; show prune()'s own argument order first.
    order = ["by", "keep", "strategy", "offset", "class_balanced", "seed"]
    names = [k for k in order if k in pruning] + [k for k in pruning if k not in order]
    prune_args = {k: pruning[k] for k in names if k not in ("rows_before", "rows_after") and pruning[k] is not None}
    prune_call = "dataset = datadiet.prune(dataset, " + ", ".join(f"{k}={v!r}" for k, v in prune_args.items()) + ")"
    if scores_only:
        columns = [c for c in splits[main_split].column_names if c != row_id_column]
        lines += [
            f"Per-example scores ({', '.join(f'`{c}`' for c in columns)}) of **{source_name}**, one row per example, "
            f"keyed by `{row_id_column}`. The data themselves are not included: join the scores to the source by "
            f"`{row_id_column}` and prune it your own way.",
        ]
    elif pruning:
        kept = (
            f"{rows_after:,} of {rows_before:,} rows ({rows_after / rows_before:.1%})"
            if rows_before
            else (f"{rows_after:,} rows")
        )
        lines += [
            f"A subset of **{source_name}** made by datadiet: it keeps {kept}, chosen by per-example scores "
            f"({_settings(prune_args)})."
        ]
    else:
        lines += [f"**{source_name}** with per-example scores added by datadiet (not pruned)."]
    lines += ["", "## How it was made", ""]
    lines.append(
        f"- **Source**: `{source_name}`"
        + (f" (split `{source['split']}`)" if source.get("split") else "")
        + (f", revision/fingerprint `{revision}`" if revision else "")
    )
    if scoring:
        lines.append(f"- **Scoring**: {_settings(scoring)}")
    if pruning:
        lines.append(f"- **Pruning**: {_settings(prune_args)}")
    lines.append(
        "- **Rows**: "
        + ", ".join(f"{name}: {n:,}" for name, n in block["splits"].items())
        + (f" (before pruning: {rows_before:,})" if rows_before else "")
    )
    lines.append(f"- **Library versions**: {', '.join(f'{k} {v}' for k, v in block['versions'].items())}")
    methods = scoring.get("methods") or []
    if "grand" in methods and scoring.get("train_epochs") in (0, None):
        lines += [
            "",
            "> GraNd at initialisation correlates with the input norm and did not beat random pruning in "
            "Kirsch (2023); compare against the `input_norm` and `random` baselines before relying on it.",
        ]

    statistics = block.get("score_statistics") or {}
    if any(statistics.values()):
        lines += ["", "## Scores", ""]
        if histogram_file:
            lines += [f"![Histogram of the scores of the {main_split} split]({histogram_file})", ""]
        keys = ["count", "mean", "std", "min", "q05", "q25", "q50", "q75", "q95", "max"]
        lines += ["| split | column | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for name, columns in statistics.items():
            for column, stats in columns.items():
                lines.append(f"| {name} | `{column}` | " + " | ".join(str(stats.get(k, "")) for k in keys) + " |")

    where = repo_id or "path/to/this/folder"
    lines += [
        "",
        "## Use it",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'dataset = load_dataset("{where}")',
        "```",
    ]
    if scores_only:
        score_column = next((c for c in splits[main_split].column_names if c != row_id_column), "score")
        lines += [
            "",
            "To prune the source yourself (here keeping the hardest half):",
            "",
            "```python",
            "import datadiet",
            "from datasets import load_dataset",
            "",
            f'scores = load_dataset("{where}", split="{main_split}").sort("{row_id_column}")',
            f'source = load_dataset("{source_name}", split="{source.get("split", main_split)}")'
            f'.select(scores["{row_id_column}"])',
            f'source = source.add_column("{score_column}", scores["{score_column}"])',
            f'pruned = datadiet.prune(source, by="{score_column}", keep=0.5, strategy="hardest")',
            "```",
        ]

    lines += ["", "## Reproduce it", ""]
    if commands:
        lines += ["```bash", *commands, "```"]
        if pruning and not any(" prune" in c for c in commands):
            # The pruning step was not recorded as a command: give its equivalent call from the provenance.
            lines += ["", "then, on the scored dataset:", "", "```python", "import datadiet", "", prune_call, "```"]
    else:
        lines += [
            "The exact command was not recorded. In Python, with the settings above:",
            "",
            "```python",
            "import datadiet",
            "from datasets import load_dataset",
            "",
            f'dataset = load_dataset("{source_name}", split="{source.get("split", "train")}")',
            f"dataset = datadiet.score_dataset(dataset, model, methods={list(methods) or ['el2n']})",
        ]
        if pruning:
            lines.append(prune_call)
        lines.append("```")
    lines += ["", "The full provenance is the `datadiet:` block of this card's YAML header.", ""]
    return "\n".join(lines)
