"""The SFT curve's data: Alpaca rows as TRL's conversational prompt-completion rows, and the one explicit split of an
instruction set into a pool, validation rows (for choosing) and test rows (for the confirmation only)."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, DatasetDict

__all__ = ["SPLIT_FILE", "split_for_selection", "to_prompt_completion", "write_split"]

SPLIT_FILE = "datadiet_split.json"


def to_prompt_completion(dataset: Dataset) -> Dataset:
    """`dataset` as `prompt` / `completion` rows only (what `SFTTrainer` trains on with a completion-only loss): Alpaca
    rows converted by `datadiet.tasks.causal_lm.alpaca_to_prompt_completion` (conversational: the user turn is
    `instruction`, plus `"\\n\\n" + input` when `input` is non-empty; the assistant turn is `output`) as the
    `causal_lm` task converts them for scoring, so that scores and the curve tokenise rows alike; prompt-completion
    rows kept; every other column (scores, ids) dropped. Rows keep their order.

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.curve.sft.data import to_prompt_completion
    >>> rows = Dataset.from_dict({"instruction": ["Hi."], "input": [""], "output": ["Hello."], "loss": [1.5]})
    >>> to_prompt_completion(rows).column_names
    ['prompt', 'completion']

    ```
    """
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        return dataset.select_columns(["prompt", "completion"])
    if {"instruction", "output"} <= columns:
        from ...tasks.causal_lm import alpaca_to_prompt_completion

        return dataset.map(
            alpaca_to_prompt_completion,
            fn_kwargs={"conversational": True},
            remove_columns=dataset.column_names,
            desc="Alpaca rows to prompt/completion",
        )
    raise ValueError(
        f"The rows have columns {sorted(columns)}: the SFT curve needs `instruction` / `output` (Alpaca, `input` "
        "optional) or `prompt` / `completion`. Rename the columns with Dataset.rename_column."
    )


def split_for_selection(
    dataset: Dataset,
    *,
    validation_rows: int,
    test_rows: int,
    pool_rows: int | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Split `dataset` once into disjoint `pool`, `validation` and `test` rows, so that targeted scores (aimed at the
    validation rows) and the SFT curve see the same split. A seeded permutation of the rows: the first
    `validation_rows` go to validation, the next `test_rows` to test, then `pool_rows` (all the rest by default) to
    the pool. Each split keeps the rows in their original order and gains a `row` column (the position in `dataset`).
    Pure: `dataset` is not changed.

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.curve.sft.data import split_for_selection
    >>> parts = split_for_selection(Dataset.from_dict({"x": list(range(10))}), validation_rows=2, test_rows=3, seed=0)
    >>> {name: part.num_rows for name, part in parts.items()}
    {'pool': 5, 'validation': 2, 'test': 3}

    ```
    """
    import numpy as np

    from ...validation import check_positive_int

    check_positive_int("validation_rows", validation_rows)
    check_positive_int("test_rows", test_rows)
    available = len(dataset) - validation_rows - test_rows
    if pool_rows is None:
        pool_rows = available
    check_positive_int("pool_rows", pool_rows)
    if pool_rows > available:
        raise ValueError(
            f"{len(dataset)} rows cannot give {validation_rows} validation + {test_rows} test + {pool_rows} pool rows: "
            f"pass --pool_rows {available} or fewer (or fewer validation / test rows)."
        )
    if "row" in dataset.column_names:
        raise ValueError("The dataset has a `row` column already: rename it (the split records positions in `row`).")
    order = np.random.default_rng(seed).permutation(len(dataset))
    ends = np.cumsum([validation_rows, test_rows, pool_rows])
    parts = {"validation": order[: ends[0]], "test": order[ends[0] : ends[1]], "pool": order[ends[1] : ends[2]]}
    with_rows = dataset.add_column("row", list(range(len(dataset))))
    return DatasetDict(
        {name: with_rows.select(sorted(parts[name].tolist())) for name in ("pool", "validation", "test")}
    )


def write_split(parts: DatasetDict, output_dir: str | Path, record: dict) -> None:
    """Save each split of `parts` as a `save_to_disk` folder under `output_dir` and `record` (source, sizes, seed)
    as `output_dir/datadiet_split.json`."""
    import json

    output_dir = Path(output_dir)
    for name, part in parts.items():
        part.save_to_disk(str(output_dir / name))
    (output_dir / SPLIT_FILE).write_text(json.dumps(record, indent=2))
