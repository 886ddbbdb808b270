"""accelerate process checks: the process state datadiet scores under, refusing the launches that would silently
give one process (or N processes each scoring every row)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from ..validation import LaunchError

logger = logging.getLogger(__name__)

__all__ = ["check_process_state", "check_trainer_processes", "get_process_state"]


def _working_cpu_launch(num_processes: int = 2) -> str:
    config = (
        "`accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml your_script.py`, or "
        if num_processes == 2
        else ""
    )
    return (
        f"{config}`accelerate launch --multi_gpu --num_processes {num_processes} --num_machines 1 --mixed_precision no "
        f"--dynamo_backend no your_script.py`, or `torchrun --nproc_per_node {num_processes} your_script.py` "
        "(datadiet runs the processes on CPU with the gloo backend when there is no GPU)"
    )


def _launcher_arguments(argv: Sequence[str]) -> list[str] | None:
    """The arguments after `accelerate launch` in a command line, or `None` if it is not an accelerate launch."""
    for index, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name == "accelerate-launch" or arg.endswith("accelerate.commands.launch"):
            return list(argv[index + 1 :])
        if (name == "accelerate" or arg.endswith("accelerate_cli")) and argv[index + 1 : index + 2] == ["launch"]:
            return list(argv[index + 2 :])
    return None


def _requested_cpu_processes() -> int:
    """How many processes `accelerate launch` was asked for when it ran this script through its one-process launcher,
    read from the launcher's command line and config file; 0 if unknown.

    That launcher (used for `--cpu`, `use_cpu: true`, and for `--num_processes N` without `--multi_gpu` on a machine
    without GPUs) marks its child with ACCELERATE_USE_CPU and starts several processes only through mpirun, so
    `--num_processes 2` silently gives one process (with OMP_NUM_THREADS=1).
    """
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:
        return 0
    try:
        import psutil

        arguments = _launcher_arguments(psutil.Process(os.getppid()).cmdline())
        if arguments is None:
            return 0
        from accelerate.commands.config import default_config_file
        from accelerate.commands.launch import launch_command_parser

        parsed, _ = launch_command_parser().parse_known_args(arguments)
        if parsed.num_processes is not None:
            return int(parsed.num_processes)
        config_file = parsed.config_file
        if config_file is None and not parsed.cpu and os.path.isfile(default_config_file):
            config_file = default_config_file  # accelerate reads its default config unless --cpu is given
        if config_file is None:
            return 0
        import yaml

        with open(config_file, encoding="utf-8") as f:
            return int((yaml.safe_load(f) or {}).get("num_processes") or 0)
    except (Exception, SystemExit) as error:  # best effort: never fail a run because the launcher is unreadable
        logger.debug("Could not read the accelerate launcher's arguments: %s", error)
        return 0


def get_process_state():
    """The accelerate `PartialState` of this process (CPU processes with the gloo backend when there is no GPU),
    failing loudly on the known silent fallbacks instead of letting N processes each score every row.

    - `accelerate launch --cpu --num_processes 2` (or `--num_processes 2` without `--multi_gpu` on a machine without
      GPUs) starts one process (accelerate runs several CPU processes only through mpirun), which would score
      everything alone with one thread.
    - `accelerate launch --multi_gpu` (or `torchrun`) on a machine with no GPU sets WORLD_SIZE > 1, but a state
      created earlier without `cpu=True` (e.g. `Accelerator()` in the user's script) holds a single process, so every
      process would score every row.
    - WORLD_SIZE > 1 set by hand without a launcher: there is no process group to join.

    Example:
    ```python
    >>> from datadiet.engine import get_process_state
    >>> state = get_process_state()  # under `python script.py`: one process
    >>> state.num_processes, state.process_index
    (1, 0)

    ```
    """
    from accelerate import PartialState

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and "RANK" not in os.environ and not PartialState._shared_state:
        raise LaunchError(
            f"The environment says WORLD_SIZE={world_size} but gives no RANK: these processes were not started by a "
            f"launcher, so there is no process group to join. Unset WORLD_SIZE for one process, or launch with "
            f"{_working_cpu_launch(world_size)}."
        )
    state = PartialState(cpu=not torch.cuda.is_available())
    check_process_state()
    return state


def check_process_state() -> None:
    """Refuse an accelerate process state, already created in this process (by the user's own `Accelerator()` or
    `PartialState()`), that disagrees with the launch: WORLD_SIZE=N processes each believing they are alone (so
    `is_main_process` is true N times and each would score or train on every row), or `accelerate launch` asked for N
    CPU processes and started one. Creates no state itself.

    Example:
    ```python
    >>> from datadiet.engine.process import check_process_state
    >>> check_process_state()  # under `python script.py`: nothing to refuse

    ```
    """
    from accelerate import PartialState

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    existing = PartialState._shared_state.get("num_processes") if PartialState._shared_state else None
    if world_size > 1 and existing is not None and existing != world_size:
        raise LaunchError(
            f"The environment says WORLD_SIZE={world_size} but accelerate's process state holds {existing} "
            "process(es), so every process believes it is alone (`is_main_process` is true on each) and would score "
            "or train on every row. This happens when an `Accelerator()` / `PartialState()` is created without "
            "`cpu=True` on a machine with no GPU (`accelerate launch --multi_gpu` or cpu_2proc.yaml): create it with "
            "`Accelerator(cpu=True)`, or create none and let datadiet set up the processes. Working CPU launches: "
            f"{_working_cpu_launch(world_size)}."
        )
    requested = _requested_cpu_processes()
    if requested > 1 and existing in (None, 1):
        raise LaunchError(
            f"`accelerate launch` was asked for {requested} processes but started one: without `--multi_gpu` (or "
            "with `--cpu` / `use_cpu: true`) accelerate starts several processes only on several GPUs or through "
            "mpirun, so this single process would score every row alone with one thread. Start "
            f"{requested} real CPU processes with {_working_cpu_launch(requested)}."
        )


def check_trainer_processes(world_size: int) -> None:
    """Refuse a `transformers.Trainer` whose `args.world_size` disagrees with the launch: WORLD_SIZE=N processes each
    training alone (a stock `TrainingArguments` without `use_cpu=True` on a machine with no GPU, under cpu_2proc.yaml
    or `--multi_gpu`), or `accelerate launch --cpu --num_processes N` having started one; both would record and write
    every row N times or alone. `check_process_state` covers the states created before the Trainer's.

    Example:
    ```python
    >>> from datadiet.engine.process import check_trainer_processes
    >>> check_trainer_processes(1)  # under `python script.py`: nothing to refuse

    ```
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and world_size != launched:
        raise LaunchError(
            f"The environment says WORLD_SIZE={launched} but the Trainer runs {world_size} process(es) "
            "(`args.world_size`), so every process believes it is alone and would train on, score and write every "
            "row. On a machine with no GPU pass `use_cpu=True` to `TrainingArguments` (datadiet's `DataDietConfig` "
            f"sets it). Working CPU launches: {_working_cpu_launch(launched)}."
        )
    check_process_state()
