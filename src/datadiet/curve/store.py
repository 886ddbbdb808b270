"""The curve's run store in its output folder: `runs.jsonl` (one line per finished run), the runs planned, claims that
let several processes share one folder, and the check that a folder is resumed with the same configuration."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .arguments import CurveArguments

logger = logging.getLogger(__name__)

__all__ = ["check_config", "claim_run", "config_digest", "planned_runs", "read_runs", "result_config", "run_key"]

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


def result_config(args: CurveArguments) -> dict:
    """The values that define the curve's results. The validation hold-out, the classes kept and the checkpoint are
    among them only when set, so that curves made before they existed resume unchanged."""
    config = {name: getattr(args, name) for name in _RESULT_FIELDS}
    for name in ("keep_classes", "proxy_model_name"):
        if getattr(args, name):
            config[name] = getattr(args, name)
    if args.model_name_or_path:  # the checkpoint every model starts from, and its weights' sha256 when local
        from ..model_sources import checkpoint_sha256

        config.update(model_name_or_path=args.model_name_or_path, checkpoint_file=args.checkpoint_file)
        config["checkpoint_sha256"] = checkpoint_sha256(args.model_name_or_path, args.checkpoint_file)
    if args.validation_fraction:
        config.update(validation_fraction=args.validation_fraction, validation_seed=args.validation_seed)
    return config


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


def read_runs(path: Path) -> list[dict]:
    """The finished runs in `runs.jsonl` at `path` (none if it does not exist), skipping a line cut by an interrupt."""
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("Skipping a truncated line of %s (an interrupted write).", path)
    return runs


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


def check_config(args: CurveArguments, output_dir: Path) -> None:
    """Record the fields that define the curve's results in `output_dir/curve_config.json`, or, when the folder
    holds a curve already, refuse to resume it with other values of them."""
    from ..engine.store import check_or_write_config

    def mismatch(folder: Path, changed: list[str], previous: dict) -> str:
        return (
            f"{folder} holds a curve made with other values of {changed} (was "
            f"{ {name: previous.get(name) for name in changed} }): its finished runs would not be comparable. "
            "Use another output_dir, or restore those values to resume."
        )

    config = result_config(args)
    check_or_write_config(
        output_dir, config, file_name="curve_config.json", new_keys_only=True, sort_keys=False, mismatch=mismatch
    )


def config_digest(args: CurveArguments) -> str:
    """A short digest of the fields that define the curve's results (for naming folders)."""
    config = json.dumps(result_config(args), sort_keys=True)
    return hashlib.sha256(config.encode()).hexdigest()[:12]
