"""`datadiet prune`: keep a subset of a scored dataset and save it."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field

from .parsing import command_line, dataset_folder, parse_config

logger = logging.getLogger("datadiet")

__all__ = ["PruneArguments", "main", "run_prune"]


# The prune settings a `selection.json` holds, with the value each takes when neither a flag nor a selection sets it
# (`prune`'s own defaults, and `el2n` for `by`). Their fields default to None so that a value the user typed (on the
# command line, in a recipe or in Python), whatever it is, can be told from one left unset.
_PRUNE_DEFAULTS = {
    "by": "el2n",
    "strategy": "hardest",
    "offset": 0.0,
    "hard_cutoff": 0.0,
    "num_bins": 50,
    "class_balanced": False,
}


@dataclass
class PruneArguments:
    """Arguments of `datadiet prune`: keep a subset of a scored dataset and save it."""

    dataset_name: str = field(metadata={"help": "A scored dataset (the output_dir of `datadiet score`)."})
    by: str | None = field(default=None, metadata={"help": "Score column to prune by (el2n if not given)."})
    keep: float | None = field(
        default=None,
        metadata={
            "help": "Fraction in (0, 1], or a row count if > 1 (0.5 if not given; with --from_selection, "
            "which of its keep fractions)."
        },
    )
    strategy: str | None = field(
        default=None,
        metadata={"help": "hardest (default), easiest, random, window, stratified (see the list below)."},
    )
    offset: float | None = field(default=None, metadata={"help": "window: fraction of hardest rows to skip (0)."})
    class_balanced: bool | None = field(default=None, metadata={"help": "Apply the strategy per class (false)."})
    hard_cutoff: float | None = field(
        default=None, metadata={"help": "stratified: fraction of hardest rows dropped (0)."}
    )
    num_bins: int | None = field(default=None, metadata={"help": "stratified: number of score bins (50)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random draws."})
    output_dir: str = field(default="outputs/pruned", metadata={"help": "The pruned dataset (save_to_disk)."})
    from_selection: str | None = field(
        default=None,
        metadata={
            "help": "A selection.json (or the folder holding it) written by `datadiet report curve` with "
            "--validation_fraction: prune with the score, strategy and every option it chose on validation rows "
            "(a flag that contradicts it is refused)."
        },
    )

    def __post_init__(self):
        from ..selection.strategies import check_prune_options

        if self.from_selection is not None:
            self._apply_selection()
        for name, default in _PRUNE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.keep is None:
            self.keep = 0.5
        # The same check as `prune(...)`, so that the command and the Python API never disagree.
        self.keep = check_prune_options(
            self.keep, strategy=self.strategy, offset=self.offset, hard_cutoff=self.hard_cutoff
        )

    def _apply_selection(self) -> None:
        from ..curve.selection import read_selection

        chosen = read_selection(self.from_selection, keep=self.keep)
        for name, value in chosen.items():
            given = getattr(self, name)
            if name != "keep" and given is not None and given != value:
                raise ValueError(
                    f"--{name} {given} conflicts with {self.from_selection}, which chose {name}={value}: drop "
                    f"--{name} (the selection sets it) or drop --from_selection."
                )
            setattr(self, name, value)
        logger.info("From %s: %s", self.from_selection, ", ".join(f"{k}={v}" for k, v in chosen.items()))

    def prune_options(self) -> dict:
        """The keyword arguments of the `prune(dataset, **options)` call this command makes."""
        return {"keep": self.keep, "seed": self.seed, **{name: getattr(self, name) for name in _PRUNE_DEFAULTS}}


def run_prune(args: PruneArguments, *, command: str | None = None):
    """Load a scored dataset, prune it and save it; returns the pruned dataset."""
    from ..data import load_data
    from ..provenance import record_provenance
    from ..selection import prune

    dataset = load_data(args.dataset_name)
    if args.from_selection is not None and args.by not in dataset.column_names:
        from ..curve.selection import how_to_score

        raise ValueError(
            f"{args.dataset_name} has no {args.by!r} column, which {args.from_selection} prunes by: "
            f"{how_to_score(args.by, args.dataset_name)}"
        )
    pruned = prune(dataset, **args.prune_options())
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
