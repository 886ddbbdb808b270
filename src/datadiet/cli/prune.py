"""`datadiet prune`: keep a subset of a scored dataset and save it."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field, fields

from .parsing import command_line, dataset_folder, parse_config

logger = logging.getLogger("datadiet")

__all__ = ["PruneArguments", "main", "run_prune"]


@dataclass
class PruneArguments:
    """Arguments of `datadiet prune`: keep a subset of a scored dataset and save it."""

    dataset_name: str = field(metadata={"help": "A scored dataset (the output_dir of `datadiet score`)."})
    by: str | None = field(default="el2n", metadata={"help": "Score column to prune by."})
    keep: float | None = field(
        default=None,
        metadata={
            "help": "Fraction in (0, 1], or a row count if > 1 (0.5 if not given; with --from_selection, "
            "which of its keep fractions)."
        },
    )
    strategy: str = field(
        default="hardest", metadata={"help": "hardest, easiest, random, window, stratified (see the list below)."}
    )
    offset: float = field(default=0.0, metadata={"help": "window: fraction of hardest rows to skip."})
    class_balanced: bool = field(default=False, metadata={"help": "Apply the strategy per class."})
    hard_cutoff: float = field(default=0.0, metadata={"help": "stratified: fraction of hardest rows dropped."})
    seed: int = field(default=0, metadata={"help": "Seed of the random draws."})
    output_dir: str = field(default="outputs/pruned", metadata={"help": "The pruned dataset (save_to_disk)."})
    from_selection: str | None = field(
        default=None,
        metadata={
            "help": "A selection.json (or the folder holding it) written by `datadiet report curve` with "
            "--validation_fraction: prune with the score, strategy and options it chose on validation rows."
        },
    )

    def __post_init__(self):
        from ..selection.strategies import check_prune_options

        if self.from_selection is not None:
            self._apply_selection()
        if self.keep is None:
            self.keep = 0.5
        # The same check as `prune(...)`, so that the command and the Python API never disagree.
        self.keep = check_prune_options(
            self.keep, strategy=self.strategy, offset=self.offset, hard_cutoff=self.hard_cutoff
        )

    def _apply_selection(self) -> None:
        from ..curve.selection import read_selection

        chosen = read_selection(self.from_selection, keep=self.keep)
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in chosen.items():
            current = getattr(self, name)
            if name != "keep" and current != defaults[name] and current != value:
                raise ValueError(
                    f"--{name} {current} conflicts with {self.from_selection}, which chose {name}={value}: drop "
                    f"--{name} (the selection sets it) or drop --from_selection."
                )
            setattr(self, name, value)
        logger.info("From %s: %s", self.from_selection, ", ".join(f"{k}={v}" for k, v in chosen.items()))


def run_prune(args: PruneArguments, *, command: str | None = None):
    """Load a scored dataset, prune it and save it; returns the pruned dataset."""
    from ..data import load_data
    from ..provenance import record_provenance
    from ..selection import prune

    dataset = load_data(args.dataset_name)
    pruned = prune(
        dataset,
        args.by,
        args.keep,
        strategy=args.strategy,
        offset=args.offset,
        class_balanced=args.class_balanced,
        seed=args.seed,
        hard_cutoff=args.hard_cutoff,
    )
    pruned = record_provenance(pruned, steps=[{"command": command or command_line()}])
    pruned.save_to_disk(args.output_dir)
    logger.info("Kept %d of %d rows; saved to %s", len(pruned), len(dataset), args.output_dir)
    return pruned


def main(argv: list[str]) -> int:
    """`datadiet prune [--config recipe.yaml] [--flag value ...]`; returns the exit code."""
    from ..selection import list_strategies

    (args,) = parse_config((PruneArguments,), argv, epilog=f"strategies: {', '.join(list_strategies())}")
    args.dataset_name = dataset_folder(args.dataset_name)
    run_prune(args, command="datadiet " + shlex.join(["prune", *argv]))
    return 0
