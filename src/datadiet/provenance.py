"""How a dataset was made, carried inside the dataset itself (its `DatasetInfo`), so that scoring, pruning and
pushing to the Hub can each add what they did and the dataset card can record all of it."""

from __future__ import annotations

import copy
import json
from collections import deque
from collections.abc import Callable
from typing import Any

from datasets import Dataset

__all__ = ["describe_source", "name_of_source", "read_provenance", "record_provenance", "register_provenance_finder"]

_MARKER = "datadiet provenance: "

# Callables `dataset -> provenance | None` for datasets whose metadata a step could not write: `Dataset.map` copies
# the input's `DatasetInfo` and gives the mapped function no say in it, so a `ScoreTransform` registers itself here
# and recognises the datasets it scored. The newest few only (each holds its model).
_FINDERS: deque[Callable[[Dataset], dict[str, Any] | None]] = deque(maxlen=8)


def register_provenance_finder(finder: Callable[[Dataset], dict[str, Any] | None]) -> None:
    """Let `read_provenance` ask `finder(dataset)` for the provenance of a dataset that records none (newest first)."""
    _FINDERS.append(finder)


def read_provenance(dataset: Dataset) -> dict[str, Any]:
    """The provenance recorded on `dataset` by datadiet (an empty dict when there is none). A dataset scored by
    `dataset.map(ScoreTransform(...), batched=True)`, which cannot carry it in its metadata, gets the provenance of
    the transform whose scores it holds (see `ScoreTransform`)."""
    description = dataset.info.description or ""
    for line in description.splitlines():
        if line.startswith(_MARKER):
            return json.loads(line[len(_MARKER) :])
    for finder in reversed(_FINDERS):
        found = finder(dataset)
        if found:
            return found
    return {}


def record_provenance(dataset: Dataset, **entries: Any) -> Dataset:
    """Return `dataset` with `entries` merged into its provenance (nested dicts are merged key by key, lists of
    steps appended). The input dataset is left unchanged; the data are not copied."""
    provenance = read_provenance(dataset)
    for key, value in entries.items():
        if isinstance(value, dict) and isinstance(provenance.get(key), dict):
            provenance[key] = {**provenance[key], **value}
        elif key == "steps":
            provenance[key] = provenance.get(key, []) + list(value)
        else:
            provenance[key] = value
    info = copy.deepcopy(dataset.info)
    kept = [line for line in (info.description or "").splitlines() if not line.startswith(_MARKER)]
    info.description = "\n".join([*kept, _MARKER + json.dumps(provenance, default=str, sort_keys=True)])
    new = Dataset(
        dataset.data, info=info, split=dataset.split, indices_table=dataset._indices, fingerprint=dataset._fingerprint
    )
    new.set_format(**dataset.format)
    return new


def describe_source(dataset: Dataset) -> dict[str, Any]:
    """What `dataset` itself says about where it comes from, for a dataset scored from Python without a recorded
    source: the Hub id (read from its cache folder, `<namespace>___<name>`) or the `save_to_disk` folder, the builder (`parquet`, `csv`, ... for
    data files) and config, its split, row count and fingerprint.

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.provenance import describe_source
    >>> source = describe_source(Dataset.from_dict({"x": [1, 2]}, split="train"))
    >>> source["split"], source["num_rows"], len(source["fingerprint"])
    ('train', 2, 16)

    ```
    """
    from pathlib import Path

    info = dataset.info
    source: dict[str, Any] = {
        "builder": info.builder_name,
        "config_name": info.config_name,
        "split": str(dataset.split) if dataset.split is not None else None,
        "num_rows": dataset.num_rows,
        "fingerprint": dataset._fingerprint,
    }
    cache_files = getattr(dataset, "cache_files", None) or []
    if cache_files:
        # datasets caches a Hub dataset under `<cache>/<namespace>___<name>/<config>/<version>/<hash>/`.
        first = Path(cache_files[0]["filename"])
        folders = [part for part in first.parts if "___" in part]
        if (first.parent / "state.json").exists():  # loaded with `load_from_disk`: that folder
            source["path"] = str(first.parent)
        elif folders:
            source["path"] = folders[-1].replace("___", "/")
    if "path" not in source and info.dataset_name and info.dataset_name != info.builder_name:
        source["name"] = info.dataset_name
    return {key: value for key, value in source.items() if value is not None}


def name_of_source(source: dict[str, Any]) -> str:
    """How a card names a recorded source: its path or Hub id, its name, its data files, else its builder and
    fingerprint (data files scored from Python, whose paths the dataset does not keep).

    Example:
    ```python
    >>> from datadiet.provenance import name_of_source
    >>> name_of_source({"path": "uoft-cs/cifar10"}), name_of_source({"builder": "parquet", "fingerprint": "e3522096cfc691f9"})
    ('uoft-cs/cifar10', 'parquet data (fingerprint e3522096cfc691f9)')

    ```
    """
    for key in ("path", "name", "data_files"):
        if source.get(key):
            return str(source[key])
    if source.get("fingerprint") or source.get("builder"):
        fingerprint = f" (fingerprint {source['fingerprint']})" if source.get("fingerprint") else ""
        return f"{source.get('builder') or 'in-memory'} data{fingerprint}"
    return "an unrecorded source"
