"""The SFT curve (`datadiet report sft-curve`): which instructions to keep. LoRA fine-tunes of a causal LM on subsets of
a scored instruction pool (scores × strategies × keep fractions, plus random and the full pool, all at the same number
of optimizer steps), compared by held-out mean completion-token loss: on validation rows while choosing
(`selection.json`), then, with `confirm_seeds`, the chosen cell, random and the full pool on fresh seeds, each tested
once on the test rows and on out-of-distribution rows. It shares the classification curve's statistics, run store
(`runs.jsonl`, claims, the folder's recorded protocol) and selection format."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..store import (
    SEED_SCHEME,
    append_run,
    check_result_config,
    claim_run,
    planned_runs,
    read_runs,
    run_key,
    run_until_finished,
)
from ..training import stream_seed
from .arguments import SFTCurveArguments
from .data import SPLIT_FILE, split_for_selection, to_prompt_completion
from .summary import choose_sft_cells, write_sft_summary

logger = logging.getLogger(__name__)

__all__ = ["SFTCurveArguments", "run_sft_curve", "split_for_selection"]

# Fields that change what a finished run means: resuming a folder with other values of them is refused.
_RESULT_FIELDS = (
    "dataset_name",
    "validation_dataset",
    "test_dataset",
    "ood_dataset",
    "model_name_or_path",
    "gguf_file",
    "scoring_seeds",
    "max_steps",
    "per_device_train_batch_size",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "max_length",
    "max_eval_rows",
)


def _config(args: SFTCurveArguments, protocol: str) -> dict:
    config = {name: getattr(args, name) for name in _RESULT_FIELDS}
    config.update(metric="eval_loss", lower_is_better=True, evaluated_on=protocol, seed_scheme=SEED_SCHEME)
    return config


def _load(path: str | None, max_rows: int | None = None):
    from ...loading import load_data

    return None if path is None else load_data(path, max_rows=max_rows)


def _check_disjoint(*datasets) -> None:
    """Refuse held-out rows that are also in the pool (by the `row` positions `datadiet split` adds)."""
    pool, *held_out = datasets
    if "row" in pool.column_names:
        pool_rows = set(pool["row"])
        for part in held_out:
            if part is not None and "row" in part.column_names and pool_rows & set(part["row"]):
                raise ValueError(
                    f"{len(pool_rows & set(part['row']))} held-out rows are also in the pool (same `row` positions): "
                    "make the pool, validation and test rows with one `datadiet split` run."
                )


def _subset(pool, run: tuple) -> np.ndarray:
    """Positions in the pool of the rows one run trains on, chosen by `datadiet.prune` on the score column."""
    from datasets import Dataset

    from ...selection import prune

    score, strategy, keep, seed = run
    if score == "full":
        return np.arange(len(pool))
    columns = {"position": np.arange(len(pool))}
    if score != "random":
        columns[score] = np.asarray(pool[score], dtype=np.float64)
    pruned = prune(
        Dataset.from_dict(columns), None if score == "random" else score, keep, strategy=strategy, seed=seed
    )
    return np.asarray(pruned["position"], dtype=np.int64)


def run_sft_curve(args: SFTCurveArguments) -> dict:
    """Run (or resume) the SFT curve in `args.output_dir`: every planned run not yet in `runs.jsonl` is trained and
    its validation loss recorded; once the grid is complete, `selection.json` names the lowest-loss cell per keep
    fraction, and with `confirm_seeds` the confirm stage runs in `output_dir/confirm`. Returns the validation summary.
    """
    import torch

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    check_result_config(_config(args, "validation"), output_dir)
    confirm_dir = output_dir / "confirm"
    if args.report_only:
        if (confirm_dir / "runs.jsonl").exists():
            write_sft_summary(
                _confirm_arguments(args, output_dir), confirm_dir, evaluated_on="test", confirmation=True
            )
        return write_sft_summary(args, output_dir, evaluated_on="validation", confirmation=False)
    pool = _load(args.dataset_name)
    missing = [score for score in args.scores if score not in pool.column_names]
    if missing:
        raise ValueError(
            f"{args.dataset_name} has no score column {missing} (its columns are {pool.column_names}): score the pool "
            f"first, e.g. `datadiet score --task causal_lm --dataset_name <pool> --methods {' '.join(missing)} ...`."
        )
    validation = _load(args.validation_dataset, args.max_eval_rows)
    _check_disjoint(pool, validation, _load(args.test_dataset))
    from .training import load_causal_lm

    logger.info("Loading %s ...", args.gguf_file or args.model_name_or_path)
    model, tokenizer = load_causal_lm(args.model_name_or_path, args.gguf_file)
    eval_sets = {"validation": to_prompt_completion(validation)}
    run_until_finished(
        lambda: _run_all(args, pool, model, tokenizer, eval_sets, output_dir, planned_runs(args), "validation"),
        output_dir / "runs.jsonl", planned_runs(args), "validation",
    )  # fmt: skip
    summary = write_sft_summary(args, output_dir, evaluated_on="validation", confirmation=False)
    split = {"validation_rows": len(validation)}
    record = Path(args.dataset_name).parent / SPLIT_FILE
    if record.exists():
        split["split"] = json.loads(record.read_text())
    selection = choose_sft_cells(args, summary["eval_loss"], split)
    (output_dir / "selection.json").write_text(json.dumps(selection, indent=2))
    for cell in selection["chosen"]:
        logger.info("Chosen on validation rows at keep %g: %s / %s (loss %.4f).", cell["keep"], cell["score"],
                    cell["strategy"], cell["mean"])  # fmt: skip
    if args.confirm_seeds:
        confirm_args = _confirm_arguments(args, output_dir)
        check_result_config(_config(confirm_args, "test"), confirm_dir)
        test_sets = {"test": to_prompt_completion(_load(args.test_dataset, args.max_eval_rows))}
        if args.ood_dataset:
            test_sets["ood"] = to_prompt_completion(_load(args.ood_dataset, args.max_eval_rows))
        runs = [("full", "full", 1.0, seed) for seed in confirm_args.seeds]
        for cell in selection["chosen"]:
            runs += [("random", "random", cell["keep"], seed) for seed in confirm_args.seeds]
            runs += [(cell["score"], cell["strategy"], cell["keep"], seed) for seed in confirm_args.seeds]
        _run_all(confirm_args, pool, model, tokenizer, test_sets, confirm_dir, runs, "test")
        write_sft_summary(confirm_args, confirm_dir, evaluated_on="test", confirmation=True)
    return summary


def _confirm_arguments(args: SFTCurveArguments, output_dir: Path) -> SFTCurveArguments:
    """The confirm stage's arguments: the chosen cells on the fresh seeds."""
    chosen = json.loads((output_dir / "selection.json").read_text())["chosen"]
    return replace(
        args,
        seeds=list(args.confirm_seeds),
        confirm_seeds=[],
        scores=list(dict.fromkeys(cell["score"] for cell in chosen)),
        strategies=list(dict.fromkeys(cell["strategy"] for cell in chosen)),
        keep_fractions=[cell["keep"] for cell in chosen],
        output_dir=str(output_dir / "confirm"),
    )


def _run_all(args, pool, model, tokenizer, eval_sets: dict, output_dir: Path, runs: list, protocol: str) -> None:
    """Train and evaluate every run of `runs` not yet in `output_dir/runs.jsonl` (shared with other processes through
    claims); `eval_sets` are the validation rows, or the test (and OOD) rows."""
    from .training import held_out_loss, train_lora

    runs_path = output_dir / "runs.jsonl"
    done = {run_key(r["score"], r["strategy"], r["keep"], r["seed"]) for r in read_runs(runs_path, protocol)}
    todo = [run for run in runs if run_key(*run) not in done]
    stage = "validation stage" if protocol == "validation" else "confirm stage"
    logger.info("%s: %d runs planned, %d already finished.", stage, len(runs), len(runs) - len(todo))
    for index, run in enumerate(todo):
        score, strategy, keep, seed = run
        if not claim_run(output_dir, runs_path, run):
            continue
        logger.info("[%s %d/%d] %s / %s keep=%g seed=%d: training %d steps", stage, index + 1, len(todo), score,
                    strategy, keep, seed, args.max_steps)  # fmt: skip
        started = time.time()
        rows = _subset(pool, run)
        torch_seed = stream_seed("training", seed)
        trainer = train_lora(model, tokenizer, to_prompt_completion(pool.select(rows)), args, torch_seed, eval_sets)
        losses = {name: held_out_loss(trainer, name) for name in eval_sets}
        for name, loss in losses.items():
            # SFTTrainer drops rows with no completion token within max_length; they add no token to the
            # token-weighted mean, so the loss is the same, but the count is recorded and said.
            loss["rows_without_completion"] = len(eval_sets[name]) - loss["rows"]
            if loss["rows_without_completion"]:
                logger.warning("%d %s rows have no completion token within max_length=%d (prompt too long): they do "
                               "not count.", loss["rows_without_completion"], name, args.max_length)  # fmt: skip
        first = "validation" if protocol == "validation" else "test"
        record = {
            "score": score,
            "strategy": strategy,
            "keep": keep,
            "seed": seed,
            "eval_loss": losses[first]["loss"],
            "eval_tokens": losses[first]["tokens"],
            "eval_rows": losses[first]["rows"],
            "eval_rows_without_completion": losses[first]["rows_without_completion"],
            "ood_loss": losses["ood"]["loss"] if "ood" in losses else None,
            "ood_tokens": losses["ood"]["tokens"] if "ood" in losses else None,
            "train_rows": len(rows),
            # SFTTrainer drops training rows whose prompt fills max_length (no token to learn from).
            "train_rows_without_completion": len(rows) - len(trainer.train_dataset),
            "steps": args.max_steps,
            "train_loss": trainer.state.log_history[-1].get("train_loss"),
            "seconds": round(time.time() - started, 1),
            "evaluated_on": protocol,
            "torch_seed": torch_seed,
        }
        append_run(runs_path, record)
        logger.info("[%s %d/%d] %s loss %.4f%s (%.0f s)", stage, index + 1, len(todo), first, record["eval_loss"],
                    f", ood loss {record['ood_loss']:.4f}" if record["ood_loss"] is not None else "",
                    record["seconds"])  # fmt: skip
