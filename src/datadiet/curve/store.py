"""The curve's run store in its output folder: `runs.jsonl` (one line per finished run), the runs planned, claims that
let several processes share one folder, and the check that a folder is resumed with the same configuration."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .arguments import CurveArguments

logger = logging.getLogger(__name__)

__all__ = [
    "SEED_SCHEME",
    "append_run",
    "check_config",
    "check_result_config",
    "claim_run",
    "config_digest",
    "planned_runs",
    "read_runs",
    "result_config",
    "run_key",
    "run_until_finished",
]

# How a curve turns its seed integers into random streams (see `training.stream_seed`). Folders made before this key
# existed drew training, proxy and validation randomness from the bare integers: their runs cannot be continued.
SEED_SCHEME = "per-purpose-v1"

# Fields that change what a finished run or a cached score means: a rerun with other values needs another folder.
_RESULT_FIELDS = (
    "dataset_name",
    "data_files",
    "split",
    "eval_dataset_name",
    "eval_data_files",
    "eval_split",
    "max_rows",
    "max_eval_rows",
    "model_name",
    "model_kwargs",
    "mean",
    "std",
    "crop_padding",
    "flip",
    "offset",
    "hard_cutoff",
    "num_bins",
    "class_balanced",
    "scoring_seeds",
    "scoring_epochs",
    "max_steps",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "label_smoothing",
)


def result_config(args: CurveArguments, protocol: str | None = None) -> dict:
    """The values that define the curve's results, the evaluation protocol (validation hold-out fraction and seed,
    and which rows the runs are evaluated on: `protocol`, by default `evaluated_on(args)`) and the seed scheme
    included, whether validation is on or off; the classes kept and the checkpoint every model starts from (with
    its weights' sha256 when local) when set."""
    config = {name: getattr(args, name) for name in _RESULT_FIELDS}
    config.update(
        validation_fraction=args.validation_fraction,
        validation_seed=args.validation_seed,
        evaluated_on=protocol or evaluated_on(args),
        seed_scheme=SEED_SCHEME,
    )
    for name in ("keep_classes", "proxy_model_name"):
        if getattr(args, name):
            config[name] = getattr(args, name)
    if args.model_name_or_path:
        from ..model_sources import checkpoint_sha256

        config.update(model_name_or_path=args.model_name_or_path, checkpoint_file=args.checkpoint_file)
        config["checkpoint_sha256"] = checkpoint_sha256(args.model_name_or_path, args.checkpoint_file)
    return config


def evaluated_on(args: CurveArguments) -> str:
    """`"validation"` when the curve holds out validation rows (its runs are never tested), else `"test"`."""
    return "validation" if args.validation_fraction else "test"


def run_key(score: str, strategy: str, keep: float, seed: int) -> str:
    """The key of one run (a score, strategy, keep fraction and seed) in `runs.jsonl` and in claim names."""
    return f"{score}|{strategy}|{keep:g}|{seed}"


def planned_runs(args: CurveArguments) -> list[tuple[str, str, float, int]]:
    """Every run of the curve as `(score, strategy, keep, seed)`: the full data, then per keep fraction random and each
    score × strategy."""
    runs = [("full", "full", 1.0, seed) for seed in args.seeds]
    for keep in args.keep_fractions:
        runs += [("random", "random", keep, seed) for seed in args.seeds]
        for score in args.scores:
            for strategy in args.strategies:
                runs += [(score, strategy, keep, seed) for seed in args.seeds]
    return runs


def read_runs(path: Path, protocol: str | None = None) -> list[dict]:
    """The finished runs in `runs.jsonl` at `path` (none if it does not exist), skipping a line cut by an interrupt;
    with `protocol` (`"validation"` or `"test"`), only the runs evaluated that way (a run without the key was
    tested: the lines written before validation existed)."""
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("Skipping a truncated line of %s (an interrupted write).", path)
    if protocol is not None:
        runs = [run for run in runs if run.get("evaluated_on", "test") == protocol]
    return runs


def append_run(path: Path, record: dict) -> None:
    """Append one finished run to `runs.jsonl` at `path`, on a line of its own: after an interrupted write the file may
    end in a cut line, which `read_runs` skips; the record must not be glued to it."""
    with path.open("a+b") as handle:
        cut = False
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            cut = handle.read(1) != b"\n"
        handle.write((("\n" if cut else "") + json.dumps(record) + "\n").encode())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run(output_dir: Path, runs_path: Path, run) -> bool:
    """Claim `run` for this process: several processes may share one curve folder (more CPU share on a busy
    machine), each taking the runs nobody has finished or is running. A claim whose process is gone is taken over."""
    key = run_key(*run)
    if key in {run_key(r["score"], r["strategy"], r["keep"], r["seed"]) for r in read_runs(runs_path)}:
        return False
    claims = output_dir / "claims"
    claims.mkdir(exist_ok=True)
    path = claims / key.replace("|", "_")
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                text = path.read_text().strip()
                owner = int(text) if text else -1  # -1: just created, its owner is writing its pid
            except (OSError, ValueError):
                owner = 0
            if owner in (os.getpid(), -1):
                return owner == os.getpid()
            if owner and _pid_alive(owner):
                return False
            path.unlink(missing_ok=True)  # a stale claim from an interrupted process
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def run_until_finished(run_remaining, runs_path: Path, runs: list, protocol: str | None = None, *, poll_seconds=60.0):
    """Call `run_remaining()` (which trains the runs of `runs` this process can claim) until every run of `runs` is in
    `runs_path`. Runs that other processes sharing the folder hold are waited for, and a claim whose process has died
    is taken over at the next call; so every process started on a folder goes on to the choice made from the whole
    grid (and to the confirm stage), however the runs fell between them."""
    while True:
        run_remaining()
        finished = {run_key(r["score"], r["strategy"], r["keep"], r["seed"]) for r in read_runs(runs_path, protocol)}
        missing = [run for run in runs if run_key(*run) not in finished]
        if not missing:
            return
        logger.info(
            "Waiting for %d runs that other processes sharing %s are running (checked every %g s): the choice needs "
            "the whole grid.", len(missing), runs_path.parent, poll_seconds,
        )  # fmt: skip
        time.sleep(poll_seconds)


def check_config(
    args: CurveArguments, output_dir: Path, *, report_only: bool = False, protocol: str | None = None
) -> None:
    """Record the fields that define the curve's results in `output_dir/curve_config.json`, or, when the folder
    holds a curve already, refuse to resume it with other values of them (the evaluation protocol included).

    A folder made before the seed scheme was recorded is refused for training (its runs drew every random stream
    from the bare seed integers) and read as it is with `report_only`: its missing protocol keys then mean no
    validation, as they did when it was written. `protocol` overrides where the runs are evaluated (the confirm
    stage holds the validation rows out of training and tests on the test split)."""
    config = result_config(args, protocol)
    path = Path(output_dir) / "curve_config.json"
    stored = json.loads(path.read_text()) if path.exists() else None
    if stored is not None and "seed_scheme" not in stored:
        if not report_only:
            raise ValueError(
                f"{output_dir} was made before training, proxy and validation seeds had separate random streams (its "
                "curve_config.json has no seed_scheme): new runs would not be comparable with its runs. Use another "
                "output_dir, or pass --report_only true to rewrite its report from its runs."
            )
        legacy = {"validation_fraction": 0.0, "validation_seed": args.validation_seed, "evaluated_on": "test"}
        if stored.get("validation_fraction"):
            legacy["evaluated_on"] = protocol or "validation"
        expected = {**legacy, **stored, "seed_scheme": SEED_SCHEME}
        differing = sorted(key for key in config if expected.get(key) != config[key])
        if differing:
            raise ValueError(_mismatch(Path(output_dir), differing, expected, config))
        return
    check_result_config(config, output_dir)


def check_result_config(config: dict, output_dir: str | Path) -> None:
    """Record `config` (the values that define a curve's results, its protocol included) in
    `output_dir/curve_config.json`, or refuse to resume a folder whose recorded values differ: the one check every
    curve (classification or SFT) makes before its runs."""
    from ..engine.store import check_or_write_config

    def mismatch(folder: Path, changed: list[str], previous: dict) -> str:
        return _mismatch(folder, changed, previous, config)

    check_or_write_config(
        output_dir, config, file_name="curve_config.json", new_keys_only=True, sort_keys=False, mismatch=mismatch
    )


def _mismatch(folder: Path, changed: list[str], previous: dict, config: dict) -> str:
    return (
        f"{folder} holds a curve made with other values of {changed} (was "
        f"{ {name: previous.get(name) for name in changed} }, now { {name: config.get(name) for name in changed} }"
        "): its finished runs would not be comparable. Use another output_dir, or restore those values to resume."
    )


def config_digest(args: CurveArguments) -> str:
    """A short digest of the fields that define the curve's results (for naming folders)."""
    config = json.dumps(result_config(args), sort_keys=True)
    return hashlib.sha256(config.encode()).hexdigest()[:12]
