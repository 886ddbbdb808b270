"""`datadiet report`: `report curve` (pruning curves, see `datadiet.curve`), `report sft-curve` (the SFT curve, see
`datadiet.curve.sft`) and `report hist` (score histograms of a scored dataset)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..validation import check_positive_int
from .parsing import dataset_folder, parse_config

__all__ = ["HistArguments", "report_main"]

_REPORT_USAGE = """usage: datadiet report <curve|sft-curve|hist> [--config recipe.yaml] [--flag value ...]

  curve      pruning curve: test accuracy against fraction kept per score and strategy (runs.jsonl, curve.png, curve.md)
  sft-curve  the SFT curve: LoRA fine-tunes of a causal LM on pruned instruction sets, held-out completion loss
  hist       histograms of score columns of a scored dataset
"""


@dataclass
class HistArguments:
    """Arguments of `datadiet report hist`: histograms of score columns of a scored dataset."""

    dataset_name: str = field(metadata={"help": "A scored dataset (save_to_disk folder or dataset folder)."})
    columns: list[str] = field(default_factory=lambda: ["el2n"], metadata={"help": "Score columns to plot."})
    output: str = field(default="hist.png", metadata={"help": "Where the PNG goes."})
    bins: int = field(default=50, metadata={"help": "Histogram bins."})

    def __post_init__(self):
        check_positive_int("bins", self.bins)


def report_main(argv: Sequence[str]) -> int:
    """`datadiet report curve ...` (see `datadiet.curve.CurveArguments`) and `datadiet report hist --dataset_name
    scored/ --columns el2n grand --output hist.png`. Returns the exit code."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_REPORT_USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "curve":
        from ..curve import CurveArguments, run_curve

        (args,) = parse_config((CurveArguments,), rest)
        run_curve(args)
        print(f"pruning curve written to {Path(args.output_dir) / 'curve.md'} and curve.png")
        return 0
    if command == "sft-curve":
        from ..curve.sft import SFTCurveArguments, run_sft_curve

        (args,) = parse_config((SFTCurveArguments,), rest)
        run_sft_curve(args)
        print(f"SFT curve written to {Path(args.output_dir) / 'curve.md'}")
        return 0
    if command == "hist":
        from ..data import load_data
        from ..report import plot_score_histogram

        (args,) = parse_config((HistArguments,), rest)
        dataset = load_data(dataset_folder(args.dataset_name))
        from ..selection.strategies import score_columns

        present = score_columns(dataset)
        missing = [c for c in args.columns if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"Column(s) {missing} are not in the dataset (its columns are {dataset.column_names}): pass --columns "
                f"with some of its score columns {present}."
            )
        not_scores = [c for c in args.columns if c not in present]
        if not_scores:
            raise ValueError(
                f"Column(s) {not_scores} are not score columns of the dataset: pass --columns with some of {present}."
            )
        path = plot_score_histogram({c: dataset[c] for c in args.columns}, args.output, bins=args.bins)
        print(f"histogram written to {path}")
        return 0
    print(f"Unknown report {command!r}.\n\n{_REPORT_USAGE}", file=sys.stderr)
    return 2
