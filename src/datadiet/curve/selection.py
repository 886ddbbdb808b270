"""The validation protocol's choice: every grid cell's validation accuracy and the cell chosen for each keep fraction
by a rule fixed before the runs (`selection.json`), and reading that choice back as `prune` arguments."""

from __future__ import annotations

import json
from pathlib import Path

from .arguments import CurveArguments, strategy_options
from .statistics import sample_std

__all__ = ["SELECTION_RULE", "choose_cells", "how_to_score", "read_selection"]

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
    lookup = {(p["score"], p["strategy"], float(p["keep"])): p for p in points}
    cells, chosen = [], []
    for keep in args.keep_fractions:
        best = None
        for score in args.scores:
            for strategy in args.strategies:
                point = lookup.get((score, strategy, float(keep)))
                if point is None:
                    continue
                cell = _cell(point)
                cells.append(cell)
                if best is None or cell["mean"] > best["mean"]:
                    best = cell
        if best is not None:
            name, options = strategy_options(best["strategy"], args)
            settings = {"by": best["score"], "keep": float(keep), "strategy": name, **options}
            chosen.append({**best, "prune": {**settings, "class_balanced": args.class_balanced}})
    baselines = [_cell(p) for p in points if p["score"] in ("full", "random")]
    return {
        "rule": SELECTION_RULE,
        "evaluated_on": "validation",
        "validation_fraction": args.validation_fraction,
        "validation_seed": args.validation_seed,
        "validation_rows": validation_rows,
        "seeds": list(args.seeds),
        "scoring_seeds": list(args.scoring_seeds),
        "cells_compared": len(cells),
        "std": "sample std (ddof = 1) over training seeds",
        "chosen": chosen,
        "cells": cells,
        "baselines": baselines,
    }


def _cell(point: dict) -> dict:
    return {
        "score": point["score"],
        "strategy": point["strategy"],
        "keep": float(point["keep"]),
        "mean": point["mean"],
        "std": sample_std(point["accuracies"]),
        "n": point["n"],
        "seeds": point["seeds"],
        "accuracies": point["accuracies"],
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
