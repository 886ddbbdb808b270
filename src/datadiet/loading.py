"""Loading a split of a dataset from wherever it is (a `save_to_disk` folder, data files, a folder of data files, a
Hub id, scikit-learn's bundled digits), refusing what cannot be read with what to pass instead."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from datasets import Dataset

__all__ = ["BUILT_IN_DATASETS", "check_hub_dataset_reachable", "load_data", "load_digits_dataset", "load_saved"]

# Names datadiet reads without a download.
BUILT_IN_DATASETS = ("sklearn-digits",)


def load_digits_dataset(test_size: float = 0.25, seed: int = 0):
    """scikit-learn's digits (1,797 8×8 grey images) as a `DatasetDict` with an `Image` column `image` and a
    `ClassLabel` column `label`, split into train/test (stratified, fixed seed).

    Example:
    ```python
    >>> from datadiet.data import load_digits_dataset
    >>> splits = load_digits_dataset()
    >>> len(splits["train"]), len(splits["test"])
    (1347, 450)

    ```
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = [PILImage.fromarray((image * (255 / 16)).round().astype(np.uint8), mode="L") for image in digits.images]
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=test_size, random_state=seed, stratify=digits.target
    )
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def build(indices):
        indices = np.sort(indices)
        return Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": digits.target[indices].tolist()}, features=features
        )

    return DatasetDict(train=build(train_idx), test=build(test_idx))


def load_data(
    name_or_path: str,
    *,
    split: str = "train",
    data_files: str | Sequence[str] | None = None,
    max_rows: int | None = None,
) -> Dataset:
    """Load a split from a `save_to_disk` folder (or the `output_dir` of `datadiet score`, whose scored dataset is
    its `dataset` folder), data files (Parquet, CSV, JSON), a dataset folder such as one
    written by `save_pruned`, a Hub id, or `"sklearn-digits"` (scikit-learn's bundled digits, no download);
    optionally only its first `max_rows` rows.

    Example:
    ```python
    >>> import tempfile
    >>> from datasets import Dataset
    >>> from datadiet.data import load_data
    >>> folder = tempfile.mkdtemp()
    >>> Dataset.from_dict({"x": [1, 2, 3]}).save_to_disk(folder)
    >>> list(load_data(folder, max_rows=2)["x"])
    [1, 2]

    ```
    """
    from pathlib import Path

    from datasets import load_dataset

    path = Path(name_or_path)
    if name_or_path in BUILT_IN_DATASETS and data_files is None and not path.exists():
        splits = load_digits_dataset()
        _check_split(name_or_path, split, list(splits))
        dataset = splits[split]
    elif data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        suffix = Path(files[0]).suffix.lstrip(".")
        builder = {"parquet": "parquet", "csv": "csv", "json": "json", "jsonl": "json", "arrow": "arrow"}.get(suffix)
        if builder is None:
            raise ValueError(f"Cannot tell the format of data file {files[0]!r}: use .parquet, .csv, .json or .arrow.")
        missing = [f for f in files if "*" not in f and not Path(f).exists()]
        if missing:
            raise ValueError(f"Data file(s) not found: {missing}.")
        dataset = load_dataset(builder, data_files={split: files}, split=split)
    elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = load_saved(path, split)
    elif path.is_dir() and any((path / "dataset" / marker).exists() for marker in ("state.json", "dataset_dict.json")):
        dataset = load_saved(path / "dataset", split)  # a `datadiet score` output_dir: its scored dataset
    elif path.is_dir() and (path / "partial").is_dir():
        raise ValueError(
            f"{str(path)!r} holds only the partial score shards of a `datadiet score` run that did not finish (no "
            f"{str(path / 'dataset')!r}): rerun the same command to resume it, then load that folder."
        )
    elif path.is_dir():
        dataset = _load_folder(path, split)
    else:
        dataset = _load_from_hub(name_or_path, split)
    if max_rows is not None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}.")
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset


def _check_split(name: str, split: str, available: list[str]) -> None:
    if split not in available:
        raise ValueError(
            f"{name!r} has no split {split!r}; its splits are {available}: pass --split {available[0]} "
            f"(split={available[0]!r} in Python)."
        )


def load_saved(path, split: str | None = None):
    """A `save_to_disk` folder, refusing one that holds an empty dataset (which `load_from_disk` cannot read). With
    `split`, a `DatasetDict`'s split (named splits checked) or a single `Dataset` (asking it for a split other than
    its own is refused rather than ignored); without, what the folder holds.

    Example:
    ```python
    >>> import tempfile
    >>> from datasets import Dataset, DatasetDict
    >>> from datadiet.loading import load_saved
    >>> splits = DatasetDict(train=Dataset.from_dict({"x": [1, 2]}), test=Dataset.from_dict({"x": [3]}))
    >>> splits.save_to_disk(folder := tempfile.mkdtemp())
    >>> sorted(load_saved(folder)), len(load_saved(folder, split="test"))
    (['test', 'train'], 1)

    ```
    """
    import json
    from pathlib import Path

    from datasets import DatasetDict, load_from_disk

    path = Path(path)
    states = [path / "state.json"] if (path / "state.json").exists() else sorted(path.glob("*/state.json"))
    for state in states:
        if not json.loads(state.read_text()).get("_data_files"):
            raise ValueError(
                f"{str(state.parent)!r} holds an empty dataset (0 rows): there is nothing to read. Point at a folder "
                "with rows, or rerun the step that wrote it."
            )
    dataset = load_from_disk(str(path))
    if split is None:
        return dataset
    if isinstance(dataset, DatasetDict):
        _check_split(str(path), split, list(dataset))
        return dataset[split]
    own = dataset.split or "train"
    if split not in ("train", str(own)):
        raise ValueError(
            f"{str(path)!r} holds a single split ({own}), not {split!r}: leave out --split (split=... in Python), "
            "or point at the folder that holds that split."
        )
    return dataset


def _load_folder(path, split: str) -> Dataset:
    """A folder of data files (such as one written by `save_pruned`), read by `datasets.load_dataset`."""
    from datasets import load_dataset
    from datasets.data_files import EmptyDatasetError

    try:
        return load_dataset(str(path), split=split)
    except EmptyDatasetError:
        raise ValueError(
            f"{str(path)!r} is a folder with no dataset in it (no save_to_disk state.json, no data files): pass the "
            "folder `datadiet score` / `prune` / `save_pruned` wrote."
        ) from None


def _is_hub_id(name: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None and not name.endswith(
        (".parquet", ".csv", ".json", ".jsonl", ".arrow")
    )


def _offline_variable() -> str | None:
    """The environment variable that puts `datasets` offline, if one does."""
    import os

    on = ("1", "ON", "YES", "TRUE")
    return next((name for name in _OFFLINE_VARIABLES if os.environ.get(name, "").upper() in on), None)


_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def check_hub_dataset_reachable(name_or_path: str, data_files: str | Sequence[str] | None = None) -> None:
    """When `load_data(name_or_path, data_files=data_files)` would fetch from the Hub (a Hub id that is no local
    folder nor a built-in name, offline mode off), check at once that the Hub answers (`HubUnreachableError` in one
    line otherwise). Cheap: the commands call it before importing torch."""
    from pathlib import Path

    from .validation import check_hub_reachable

    if data_files is not None or name_or_path in BUILT_IN_DATASETS or Path(name_or_path).exists():
        return
    if _is_hub_id(name_or_path) and "/" in name_or_path and _offline_variable() is None:
        check_hub_reachable(
            f"pass a local folder, data files or 'sklearn-digits' instead of {name_or_path!r}, or set "
            "HF_HUB_OFFLINE=1 to read it from the local cache."
        )


def _load_from_hub(name: str, split: str) -> Dataset:
    """A Hub id (or a dataset in the local cache when offline). A name that cannot be a Hub id, or that is a
    misspelling of a built-in name, is refused at once, saying what was tried, instead of waiting on the Hub."""
    from pathlib import Path

    from datasets import load_dataset

    from .validation import closest_names

    tried = f"no folder {str(Path(name).resolve())!r}, not one of datadiet's names {list(BUILT_IN_DATASETS)}"
    close = closest_names(name, BUILT_IN_DATASETS, cutoff=0.8)
    if "/" not in name and close:
        raise ValueError(f"Unknown dataset {name!r} ({tried}): did you mean {close[0]!r}?")
    parent = Path(name).parent
    nearby = closest_names(Path(name).name, [p.name for p in parent.iterdir()]) if parent.is_dir() else []
    hint = f"; in {str(parent)!r} there is {', '.join(repr(str(parent / n)) for n in nearby)}" if nearby else ""
    instead = (
        "Pass a save_to_disk folder, a folder of data files, --data_files file.parquet, 'sklearn-digits', or a Hub id "
        "such as 'uoft-cs/cifar10'."
    )
    if not _is_hub_id(name):
        raise ValueError(f"No dataset at {name!r} ({tried}, and it is not a Hub id){hint}. {instead}")
    check_hub_dataset_reachable(name)
    try:
        return load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError) as error:
        offline = _offline_variable()
        where = f"the local cache (offline: {offline} is set)" if offline else "the Hub"
        raise ValueError(
            f"No dataset {name!r} ({tried}, not in {where}: {type(error).__name__}){hint}. {instead}"
        ) from error
