"""Reading a command's arguments: a recipe YAML (`--config`) whose values are defaults that command-line flags
override (TRL / alignment-handbook style), parsed into argument dataclasses."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path

__all__ = ["command_line", "dataset_folder", "parse_config", "set_program"]

# The `prog` of the argument parsers, "datadiet <command>", set by the dispatcher for the command it runs.
_program: str | None = None


def set_program(program: str | None) -> None:
    """Name the command being run (e.g. `datadiet score`) in the usage line of `--help` and of argument errors."""
    global _program
    _program = program


def parse_config(dataclass_types: tuple, argv: list[str], *, epilog: str | None = None) -> tuple:
    """Parse `argv` into instances of `dataclass_types`: `--config recipe.yaml` sets defaults, flags override them.
    A YAML key or flag that no dataclass knows is an error (a typo must not be silently ignored); `epilog` ends
    `--help` (e.g. the valid score methods).

    Example:
    ```python
    >>> from datadiet.cli.parsing import parse_config
    >>> from datadiet.cli.prune import PruneArguments
    >>> (args,) = parse_config((PruneArguments,), ["--dataset_name", "scored", "--keep", "0.3"])
    >>> args.keep, args.strategy
    (0.3, 'hardest')

    ```
    """
    import yaml
    from transformers import HfArgumentParser

    # allow_abbrev=False: `--method` must not quietly stand for `--methods` (nor a typo for whichever flag it starts).
    parser = HfArgumentParser(dataclass_types, prog=_program, epilog=epilog, allow_abbrev=False)
    parser.add_argument(
        "--config", metavar="RECIPE.yaml", help="A recipe YAML whose values are the defaults; flags override them."
    )
    argv = list(argv)
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a path to a recipe YAML.")
        config_path = argv[position + 1]
        del argv[position : position + 2]
        if not Path(config_path).exists():
            raise ValueError(f"Recipe {config_path!r} not found.")
        try:
            values = yaml.safe_load(Path(config_path).read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{config_path}:{mark.line + 1}:{mark.column + 1}" if mark else config_path
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(
                f"{where}: the recipe is not valid YAML ({problem}): write one `key: value` per line, lists as [a, b]."
            ) from None
        if not isinstance(values, dict):
            raise ValueError(f"Recipe {config_path!r} must be a YAML mapping of argument names to values.")
        known = {f.name for cls in dataclass_types for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown key(s) {unknown} in {config_path!r}. Valid keys: {sorted(known)}.")
        # Mappings (e.g. model_kwargs) travel as JSON strings, like their command-line form.
        values = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in values.items()}
        parser.set_defaults(**values)
        # HfArgumentParser marks fields without defaults as required; a recipe may provide them.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        raise ValueError(_unknown_arguments_message(remaining, parser))
    return tuple(item for item in parsed if not isinstance(item, argparse.Namespace))  # drop --config's namespace


def _unknown_arguments_message(remaining: list[str], parser: argparse.ArgumentParser) -> str:
    """`unknown argument --x (did you mean --y?)` for the first flag no dataclass knows (or a stray value)."""
    from ..validation import closest_names

    flags = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    unknown = next((arg.split("=", 1)[0] for arg in remaining if arg.startswith("-")), None)
    if unknown is None:
        return f"unexpected value(s) {' '.join(remaining)}: each value follows its --flag (see --help)."
    close = closest_names(unknown, flags)
    hint = f"did you mean {close[0]}?" if close else "see --help for the flags"
    return f"unknown argument {unknown} ({hint})"


def command_line() -> str:
    """The command this process runs, as `datadiet <subcommand> ...` (recorded in a dataset's provenance)."""
    return "datadiet " + shlex.join(sys.argv[1:])


def dataset_folder(path: str) -> str:
    """`datadiet score` saves the scored dataset under `<output_dir>/dataset`: accept that folder or the dataset's."""
    return str(Path(path) / "dataset") if (Path(path) / "dataset" / "state.json").exists() else path
