"""`datadiet split`: split an instruction set once into pool, validation and test folders (disjoint rows, seeded and
recorded), so that targeted scores and the SFT curve see the same split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .parsing import command_line, parse_config

__all__ = ["SplitArguments", "main", "run_split"]


@dataclass
class SplitArguments:
    """Arguments of `datadiet split`."""

    dataset_name: str = field(metadata={"help": "The rows to split: a Parquet file or folder, a save_to_disk folder."})
    validation_rows: int = field(default=500, metadata={"help": "Rows for choosing (validation)."})
    test_rows: int = field(default=500, metadata={"help": "Rows for the confirmation only (test)."})
    pool_rows: int | None = field(default=None, metadata={"help": "Pool rows (all the rest by default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the permutation that splits the rows."})
    output_dir: str = field(default="outputs/split", metadata={"help": "Gets pool/, validation/, test/."})


def run_split(args: SplitArguments) -> dict:
    """Split `args.dataset_name` and write `pool/`, `validation/`, `test/` and `datadiet_split.json` to
    `args.output_dir`; return the record.

    Example:
    ```python
    >>> import tempfile
    >>> from datasets import Dataset
    >>> from datadiet.cli.split import SplitArguments, run_split
    >>> folder = tempfile.mkdtemp()
    >>> Dataset.from_dict({"instruction": list("abcdefgh"), "output": list("ABCDEFGH")}).save_to_disk(f"{folder}/rows")
    >>> run_split(SplitArguments(f"{folder}/rows", validation_rows=2, test_rows=2, output_dir=f"{folder}/split"))["rows"]
    {'pool': 4, 'validation': 2, 'test': 2}

    ```
    """
    from ..curve.sft.data import split_for_selection, write_split
    from ..loading import load_data

    dataset = load_data(args.dataset_name)
    parts = split_for_selection(
        dataset,
        validation_rows=args.validation_rows,
        test_rows=args.test_rows,
        pool_rows=args.pool_rows,
        seed=args.seed,
    )
    record = {
        "source": args.dataset_name,
        "source_rows": len(dataset),
        "seed": args.seed,
        "rows": {name: part.num_rows for name, part in parts.items()},
        "rule": "a numpy default_rng(seed) permutation of the rows: validation first, then test, then pool; `row` is "
        "each row's position in the source",
        "command": command_line(),
    }
    write_split(parts, Path(args.output_dir), record)
    return record


def main(argv: list[str]) -> int:
    """`datadiet split [--config recipe.yaml] [--flag value ...]`; returns the exit code."""
    (args,) = parse_config((SplitArguments,), argv)
    record = run_split(args)
    print(f"split written to {args.output_dir}: {record['rows']}")
    return 0
