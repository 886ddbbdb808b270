"""How a dataset was made, carried inside the dataset itself (its `DatasetInfo`), so that scoring, pruning and
pushing to the Hub can each add what they did and the dataset card can record all of it."""

from __future__ import annotations

import copy
import json
from typing import Any

from datasets import Dataset

__all__ = ["read_provenance", "record_provenance"]

_MARKER = "datadiet provenance: "


def read_provenance(dataset: Dataset) -> dict[str, Any]:
    """The provenance recorded on `dataset` by datadiet (an empty dict when there is none)."""
    description = dataset.info.description or ""
    for line in description.splitlines():
        if line.startswith(_MARKER):
            return json.loads(line[len(_MARKER) :])
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
