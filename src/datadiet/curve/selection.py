"""The validation protocol's choice: every grid cell's validation accuracy and the cell chosen for each keep fraction
by a rule fixed before the runs (`selection.json`), and reading that choice back as `prune` arguments."""

from __future__ import annotations

import json
from pathlib import Path

from .arguments import CurveArguments, strategy_options
from .statistics import sample_std

__all__ = [
    "SELECTION_RULE",
    "baseline_cells",
    "best_cells",
    "choose_cells",
    "how_to_score",
    "read_selection",
    "selection_record",
]

SELECTION_RULE = (
    "For each keep fraction, the pruned cell (score x strategy) with the highest mean validation accuracy over the "
    "training seeds; a tie goes to the cell listed first in the grid (scores, then strategies, in the order given). "
    "Fixed before any run; the test split is never read while choosing."
)


def choose_cells(args: CurveArguments, points: list[dict], validation_rows: int) -> dict:
    """The content of `selection.json` from the validation summary `points` (see `summarize_runs`) of a finished grid.

    Example:
    ```python
    >>> from datadiet.curve import CurveArguments
    >>> from datadiet.curve.selection import choose_cells
    >>> args = CurveArguments("sklearn-digits", max_steps=10, scores=["el2n"], strategies=["hardest", "window@0.1"],
    ...                       keep_fractions=[0.5], validation_fraction=0.2)
    >>> points = [{"score": "el2n", "strategy": s, "keep": 0.5, "mean": m, "n": 2, "seeds": [0, 1],
    ...            "accuracies": [m - 0.01, m + 0.01]} for s, m in [("hardest", 0.80), ("window@0.1", 0.85)]]
    >>> [(cell["score"], cell["strategy"], cell["keep"]) for cell in choose_cells(args, points, 100)["chosen"]]
    [('el2n', 'window@0.1', 0.5)]

    ```
    """
    cells, best = best_cells(points, args.keep_fractions, args.scores, args.strategies)
    chosen = []
    for cell in best:
        name, options = strategy_options(cell["strategy"], args)
        settings = {"by": cell["score"], "keep": cell["keep"], "strategy": name, **options}
        chosen.append({**cell, "prune": {**settings, "class_balanced": args.class_balanced}})
    baselines = baseline_cells(points)
    protocol = {
        "validation_fraction": args.validation_fraction,
        "validation_seed": args.validation_seed,
        "validation_rows": validation_rows,
    }
    return selection_record(SELECTION_RULE, protocol, args, cells, chosen, baselines)


def selection_record(rule: str, protocol: dict, args, cells: list, chosen: list, baselines: list) -> dict:
    """The content of a `selection.json`: the rule, `"evaluated_on": "validation"`, the `protocol` (which validation
    rows), the seeds of `args`, and the cells compared, chosen and the baselines (shared by every curve)."""
    return {
        "rule": rule,
        "evaluated_on": "validation",
        **protocol,
        "seeds": list(args.seeds),
        "scoring_seeds": list(args.scoring_seeds),
        "cells_compared": len(cells),
        "std": "sample std (ddof = 1) over training seeds",
        "chosen": chosen,
        "cells": cells,
        "baselines": baselines,
    }


def best_cells(
    points: list[dict],
    keep_fractions: list[float],
    scores: list[str],
    strategies: list[str],
    *,
    lower_is_better: bool = False,
    values_key: str = "accuracies",
) -> tuple[list[dict], list[dict]]:
    """Every pruned cell of the grid found in the summary `points`, and the best cell of each keep fraction: the
    highest mean (the lowest with `lower_is_better`, e.g. a loss), a tie going to the cell listed first (scores, then
    strategies, in the order given). Each cell holds its per-seed values under `values_key`."""
    lookup = {(p["score"], p["strategy"], float(p["keep"])): p for p in points}
    cells, chosen = [], []
    for keep in keep_fractions:
        best = None
        for score in scores:
            for strategy in strategies:
                point = lookup.get((score, strategy, float(keep)))
                if point is None:
                    continue
                cell = _cell(point, values_key)
                cells.append(cell)
                if best is None or (cell["mean"] < best["mean"] if lower_is_better else cell["mean"] > best["mean"]):
                    best = cell
        if best is not None:
            chosen.append(best)
    return cells, chosen


def baseline_cells(points: list[dict], values_key: str = "accuracies") -> list[dict]:
    """The full-data and random cells of the summary `points`, as `selection.json` lists them."""
    return [_cell(p, values_key) for p in points if p["score"] in ("full", "random")]


def _cell(point: dict, values_key: str = "accuracies") -> dict:
    return {
        "score": point["score"],
        "strategy": point["strategy"],
        "keep": float(point["keep"]),
        "mean": point["mean"],
        "std": sample_std(point[values_key]),
        "n": point["n"],
        "seeds": point["seeds"],
        values_key: point[values_key],
    }


def read_selection(path: str | Path, keep: float | None = None) -> dict:
    """The `prune` arguments (`by`, `keep`, `strategy` and its options, `class_balanced`) of the cell a
    `selection.json` chose: the only one, or the one of `keep` when the grid had several keep fractions. A selection
    written before it stored `class_balanced` takes it from the `curve_config.json` beside it.

    Example:
    ```python
    >>> import json, tempfile
    >>> from datadiet.curve.selection import read_selection
    >>> path = tempfile.mkdtemp() + "/selection.json"
    >>> chosen = {"prune": {"by": "el2n", "keep": 0.5, "strategy": "window", "offset": 0.05}}
    >>> _ = open(path, "w").write(json.dumps({"chosen": [chosen]}))
    >>> read_selection(path)
    {'by': 'el2n', 'keep': 0.5, 'strategy': 'window', 'offset': 0.05}

    ```
    """
    path = Path(path)
    if path.is_dir():
        path = path / "selection.json"
    if not path.exists():
        raise ValueError(
            f"No selection at {path}: run `datadiet report curve --config <recipe> --validation_fraction 0.1` until "
            "its grid finishes; it writes <output_dir>/selection.json."
        )
    chosen = json.loads(path.read_text()).get("chosen", [])
    if keep is not None:
        matching = [cell for cell in chosen if abs(cell["prune"]["keep"] - keep) < 1e-9]
    else:
        matching = chosen
    if len(matching) != 1:
        keeps = [cell["prune"]["keep"] for cell in chosen]
        raise ValueError(
            f"{path} chose a cell for keep fractions {keeps}; "
            + (f"none for keep={keep}." if keep is not None else "pass --keep with one of them.")
        )
    settings = dict(matching[0]["prune"])
    config = path.parent / "curve_config.json"
    if "class_balanced" not in settings and config.exists():
        settings["class_balanced"] = bool(json.loads(config.read_text()).get("class_balanced", False))
    return settings


def how_to_score(method: str, dataset: str) -> str:
    """One line saying how `datadiet score` produces the score column `method` the curve chose (as the curve
    computes it: from proxies trained at least one epoch; `input_norm` needs none).

    Example:
    ```python
    >>> from datadiet.curve.selection import how_to_score
    >>> how_to_score("forgetting", "scored")
    'score it first, e.g. `datadiet score --dataset_name <the raw dataset> --methods forgetting --train_epochs 1 --output_dir scored` (add your usual --model_name / --seeds).'

    ```
    """
    epochs = "" if method == "input_norm" else " --train_epochs 1"
    return (
        f"score it first, e.g. `datadiet score --dataset_name <the raw dataset> --methods {method}{epochs} "
        f"--output_dir {dataset}` (add your usual --model_name / --seeds)."
    )
