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
from pathlib import Path

import numpy as np
import torch

from .arguments import CurveArguments, check_steps, strategy_options
from .store import check_config, claim_run, config_digest, planned_runs, read_runs, run_key
from .summary import summarize_runs, write_curve_report, write_summary
from .training import CurveData, accuracy_on_test, build_curve_model, proxy_scores, train_on_rows

logger = logging.getLogger(__name__)

__all__ = ["CurveArguments", "config_digest", "run_curve", "strategy_options", "summarize_runs", "write_curve_report"]


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
    from tqdm.auto import tqdm

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    check_config(args, output_dir)
    runs_path = output_dir / "runs.jsonl"
    if args.report_only:
        return write_summary(args, output_dir, runs_path)
    data = CurveData(args)
    logger.info(
        "Curve data: %d training rows, %d test rows, %d classes, %d channels.",
        len(data.y_train),
        len(data.y_test),
        data.num_classes,
        data.in_chans,
    )
    scores = proxy_scores(args, data, output_dir)
    labels = data.y_train.numpy()
    done = {run_key(r["score"], r["strategy"], r["keep"], r["seed"]) for r in read_runs(runs_path)}
    todo = [run for run in planned_runs(args) if run_key(*run) not in done]
    logger.info("%d runs planned, %d already finished.", len(planned_runs(args)), len(planned_runs(args)) - len(todo))
    for run in tqdm(todo, desc="Curve runs"):
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
        model = train_on_rows(build_curve_model(args, data, seed), data, rows, steps, args, seed)
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
        }
        with runs_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("%s %s keep=%g seed=%d: test accuracy %.4f", score, strategy, keep, seed, accuracy)
        if args.report_every and (todo.index(run) + 1) % args.report_every == 0:
            write_summary(args, output_dir, runs_path)
    return write_summary(args, output_dir, runs_path)
