"""Pruning curves (`datadiet report curve`): test accuracy against the fraction of training data kept, for several
scores and pruning strategies, each retrained from scratch over several seeds at a fixed training budget.

The curve scores the training set once (K proxy models trained a few epochs; cached on disk), then for every
(score, strategy, keep fraction, seed) prunes with `datadiet.prune`, trains a fresh model and evaluates it,
appending one JSON line per finished run to `runs.jsonl` so that an interrupted curve resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .arguments import CurveArguments, check_steps, strategy_options
from .selection import choose_cells, read_selection
from .store import (
    append_run,
    check_config,
    claim_run,
    config_digest,
    evaluated_on,
    planned_runs,
    read_runs,
    run_key,
    run_until_finished,
)
from .summary import summarize_runs, write_curve_report, write_summary
from .training import (
    CurveData,
    accuracy_on,
    accuracy_on_test,
    build_curve_model,
    proxy_scores,
    stream_seed,
    train_on_rows,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CurveArguments",
    "config_digest",
    "read_selection",
    "run_curve",
    "strategy_options",
    "summarize_runs",
    "write_curve_report",
]


def _subset(args: CurveArguments, scores: dict[str, np.ndarray], labels: np.ndarray, run) -> np.ndarray:
    """Positions of the kept training rows, chosen by `datadiet.prune` on a table of the score columns."""
    from datasets import ClassLabel, Dataset, Features, Value

    from ..selection import prune

    score, strategy, keep, seed = run
    if score == "full":
        return np.arange(len(labels))
    columns = {"row": np.arange(len(labels)), "label": labels}
    features = {"row": Value("int64"), "label": ClassLabel(num_classes=int(labels.max()) + 1)}
    if score != "random":
        columns[score] = scores[score]
        features[score] = Value("float64")
    table = Dataset.from_dict(columns, features=Features(features))
    name, options = strategy_options(strategy, args)
    pruned = prune(
        table,
        None if score == "random" else score,
        keep,
        strategy=name,
        **options,
        class_balanced=args.class_balanced,
        seed=seed,
        label_column="label",
    )
    return np.asarray(pruned["row"], dtype=np.int64)


def run_curve(args: CurveArguments) -> dict:
    """Score the training set once, then train and evaluate one model per (score, strategy, keep fraction, seed),
    plus full-data and random-subset references; write `runs.jsonl`, `summary.json`, `curve.png` and `curve.md` to
    `args.output_dir` and return the summary. Finished runs found in `runs.jsonl` are not run again.

    Example (a toy budget, to show the calls: 40 digits, one seed, 5 steps per run):
    ```python
    >>> import tempfile
    >>> from datadiet.curve import CurveArguments, run_curve
    >>> args = CurveArguments("sklearn-digits", model_name="datadiet_tiny_net", scores=["el2n"],
    ...                       strategies=["hardest"], keep_fractions=[0.5], seeds=[0], scoring_seeds=[0],
    ...                       max_rows=40, max_eval_rows=40, max_steps=5, batch_size=8, output_dir=tempfile.mkdtemp())
    >>> summary = run_curve(args)
    >>> [(point["score"], point["strategy"], point["keep"]) for point in summary["points"]]
    [('el2n', 'hardest', 0.5), ('full', 'full', 1.0), ('random', 'random', 0.5)]

    ```
    """
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    check_config(args, output_dir, report_only=args.report_only)
    runs_path = output_dir / "runs.jsonl"
    protocol = evaluated_on(args)
    if args.report_only:
        selection_path, confirm_dir = output_dir / "selection.json", output_dir / "confirm"
        if args.confirm_seeds and selection_path.exists() and (confirm_dir / "runs.jsonl").exists():
            selection = json.loads(selection_path.read_text())
            confirm_args = _confirm_arguments(args, selection, confirm_dir)
            check_config(confirm_args, confirm_dir, report_only=True, protocol="test")
            write_summary(confirm_args, confirm_dir, confirm_dir / "runs.jsonl", evaluated_on="test")
        return write_summary(args, output_dir, runs_path, evaluated_on=protocol)
    data = CurveData(args)
    logger.info(
        "Curve data: %d training rows, %d validation rows (never trained on), %d test rows, %d classes, %d channels.",
        len(data.y_train),
        len(data.validation_rows),
        len(data.y_test),
        data.num_classes,
        data.in_chans,
    )
    if args.validation_fraction:
        # Which rows were held out (positions in the training split), for anyone checking the protocol.
        (output_dir / "validation_rows.json").write_text(json.dumps(data.validation_rows.tolist()))
    scores = proxy_scores(args, data, output_dir)
    if not args.validation_fraction:
        _run_all(args, data, scores, output_dir, planned_runs(args), protocol)
        return write_summary(args, output_dir, runs_path, evaluated_on=protocol)
    run_until_finished(
        lambda: _run_all(args, data, scores, output_dir, planned_runs(args), protocol),
        runs_path, planned_runs(args), protocol,
    )  # fmt: skip
    summary = write_summary(args, output_dir, runs_path, evaluated_on=protocol)
    selection = choose_cells(args, summary["points"], len(data.validation_rows))
    (output_dir / "selection.json").write_text(json.dumps(selection, indent=2))
    for cell in selection["chosen"]:
        logger.info(
            "Chosen on validation rows at keep %g: %s / %s (%.4f).", cell["keep"], cell["score"], cell["strategy"],
            cell["mean"],
        )  # fmt: skip
    if args.confirm_seeds:
        _confirm(args, data, selection, output_dir / "confirm")
    return summary


def _run_all(args: CurveArguments, data, scores: dict, output_dir: Path, runs: list, evaluated_on: str) -> None:
    """Train and evaluate every run of `runs` not yet in `output_dir/runs.jsonl` (shared with other processes through
    claims), on the validation rows or the test split."""
    from tqdm.auto import tqdm

    runs_path = output_dir / "runs.jsonl"
    labels = data.y_train.numpy()
    done = {run_key(r["score"], r["strategy"], r["keep"], r["seed"]) for r in read_runs(runs_path, evaluated_on)}
    todo = [run for run in runs if run_key(*run) not in done]
    logger.info("%d runs planned, %d already finished.", len(runs), len(runs) - len(todo))
    for index, run in enumerate(tqdm(todo, desc="Curve runs" if evaluated_on == "test" else "Grid runs (validation)")):
        score, strategy, keep, seed = run
        if not claim_run(output_dir, runs_path, run):
            continue  # finished or being run by another process sharing this folder
        started = time.time()
        rows = _subset(args, scores, labels, run)
        if args.max_steps is not None:
            steps = args.max_steps
        else:
            steps = max(1, math.ceil(args.epochs * len(rows) / args.batch_size))
            check_steps(steps, f"epochs={args.epochs} of {len(rows)} rows at batch_size={args.batch_size}")
        # Training randomness (initialisation, order, augmentation) from the training stream of this seed, apart
        # from the proxies' stream of the same integer.
        torch_seed = stream_seed("training", seed)
        model = train_on_rows(build_curve_model(args, data, torch_seed), data, rows, steps, args, torch_seed)
        if evaluated_on == "validation":
            accuracy = accuracy_on(model, data, data.x_validation, data.y_validation, args.eval_batch_size)
        else:
            accuracy = accuracy_on_test(model, data, args.eval_batch_size)
        record = {
            "score": score,
            "strategy": strategy,
            "keep": keep,
            "seed": seed,
            "accuracy": accuracy,
            "train_rows": len(rows),
            "steps": steps,
            "seconds": round(time.time() - started, 1),
            "evaluated_on": evaluated_on,
            "torch_seed": torch_seed,
        }
        append_run(runs_path, record)
        logger.info("%s %s keep=%g seed=%d: %s accuracy %.4f", score, strategy, keep, seed, evaluated_on, accuracy)
        if args.report_every and (index + 1) % args.report_every == 0:
            write_summary(args, output_dir, runs_path, evaluated_on=evaluated_on)


def _confirm_arguments(args: CurveArguments, selection: dict, confirm_dir: Path) -> CurveArguments:
    """The confirm stage's arguments: the chosen cells' scores, strategies and keep fractions on the fresh seeds."""
    chosen = selection["chosen"]
    return replace(
        args,
        seeds=list(args.confirm_seeds),
        scoring_seeds=list(args.confirm_scoring_seeds),
        confirm_seeds=[],
        confirm_scoring_seeds=[],
        confirmation=True,
        scores=list(dict.fromkeys(cell["score"] for cell in chosen)),
        strategies=list(dict.fromkeys(cell["strategy"] for cell in chosen)),
        keep_fractions=[cell["keep"] for cell in chosen],
        output_dir=str(confirm_dir),
    )


def _confirm(args: CurveArguments, data, selection: dict, confirm_dir: Path) -> dict:
    """The confirm stage: the chosen cell of each keep fraction, random and full, on fresh training seeds with
    proxies from fresh scoring seeds, each tested once on the test split; its own runs.jsonl and report."""
    chosen = selection["chosen"]
    confirm_args = _confirm_arguments(args, selection, confirm_dir)
    check_config(confirm_args, confirm_dir, protocol="test")
    scores = proxy_scores(confirm_args, data, confirm_dir)
    runs = [("full", "full", 1.0, seed) for seed in confirm_args.seeds]
    for cell in chosen:
        runs += [("random", "random", cell["keep"], seed) for seed in confirm_args.seeds]
        runs += [(cell["score"], cell["strategy"], cell["keep"], seed) for seed in confirm_args.seeds]
    _run_all(confirm_args, data, scores, confirm_dir, runs, "test")
    return write_summary(confirm_args, confirm_dir, confirm_dir / "runs.jsonl", evaluated_on="test")
