"""The `datadiet` command: `score`, `prune`, `push`, `split`, `train`, `report` and `demo`, one module each, each reading a
recipe YAML (`--config`) whose values are defaults that command-line flags override. The same entry points run under
`accelerate launch -m datadiet.cli ...`."""

from __future__ import annotations

import logging
import os
import sys

from ..validation import LaunchError, is_network_error
from .parsing import parse_config, set_program
from .prune import PruneArguments, run_prune
from .score import ScoreArguments, run_score

__all__ = ["PruneArguments", "ScoreArguments", "main", "parse_config", "run_prune", "run_score"]

_USAGE = """usage: datadiet <command> [--config recipe.yaml] [--flag value ...] [--debug]

commands:
  score   score a dataset (EL2N, GraNd, ...) and save it with score columns
  prune   keep a subset of a scored dataset
  push    save a pruned dataset with its card to a folder or the Hub
  split   split an instruction set once into pool, validation and test rows (for the SFT curve)
  train   train a fresh model on a dataset and report test accuracy
  report  plots: `report curve` (pruning curves), `report sft-curve` (SFT curves), `report hist` (histograms)
  demo    the whole chain on scikit-learn's digits (no download)

`datadiet <command> --help` lists a command's flags; --debug shows the traceback behind an error.
"""


def _command(name: str):
    """The entry point `argv -> exit code` of subcommand `name`, or None. Imported on demand, so that one subcommand
    does not pay for the others' imports."""
    if name == "score":
        from .score import main
    elif name == "prune":
        from .prune import main
    elif name == "push":
        from .push import main
    elif name == "split":
        from .split import main
    elif name == "train":
        from .train import main
    elif name == "report":
        from .report import report_main as main
    elif name == "demo":
        from .demo import main
    else:
        return None
    return main


def main(argv: list[str] | None = None) -> int:
    """Run `datadiet <command> ...` (`argv` defaults to `sys.argv[1:]`) and return the exit code: 2 for a bad command,
    a `ValueError`, a refused launch or a network failure, printed as one line `datadiet <command>: error: ...` on stderr (with
    `--debug`, raised with its traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    # Under several processes (RANK set by the launcher) the main process logs; the others keep their warnings and
    # errors, which are about that process, and say which one they are.
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s " + (f"[rank {rank}] " if rank else "") + "%(name)s %(levelname)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    program = f"datadiet {command}"
    if command == "report" and rest and not rest[0].startswith("-"):
        program += f" {rest[0]}"
    set_program(program)
    try:
        run = _command(command)
        if run is None:
            print(f"Unknown command {command!r}.\n\n{_USAGE}", file=sys.stderr)
            return 2
        return run(rest)
    except (ValueError, LaunchError) as error:
        if debug:
            raise
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # A network failure deep inside huggingface_hub / datasets: one line, not a page of httpx traceback.
        if debug or not is_network_error(error):
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{program}: error: {reason}", file=sys.stderr)
        return 2
    finally:
        set_program(None)
        _end_processes()


def _end_processes() -> None:
    """Tear down the process group a multi-process launch set up, so that no communication thread is still running
    when the interpreter exits (that can abort a process with "terminate called without an active exception")."""
    distributed = sys.modules.get("torch.distributed")  # never imported: no process group (and no seconds spent)
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
