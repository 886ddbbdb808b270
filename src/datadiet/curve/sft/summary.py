"""The SFT curve's report: mean ± sample std of the held-out loss per cell, paired differences from random and from
the full pool in nats and in percent with 95% intervals and the verdict words they support (lower loss is better),
`summary.json`, `curve.md`, and `selection.json` (the cell chosen per keep fraction on validation rows)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..selection import baseline_cells, best_cells, selection_record
from ..statistics import equivalent, no_verdict_reason, paired_interval, verdict_against
from ..store import read_runs
from ..summary import paired_values, summarize_runs
from .arguments import SFTCurveArguments

__all__ = ["METRIC", "SFT_SELECTION_RULE", "choose_sft_cells", "write_sft_summary"]

METRIC = (
    "mean completion-token loss (nats): the summed next-token negative log-likelihood of every completion token of "
    "the held-out rows over the number of those tokens (a token-weighted mean; rows cut at max_length as in training)"
)
SFT_SELECTION_RULE = (
    "For each keep fraction, the pruned cell (score x strategy) with the lowest mean validation loss over the "
    "training seeds; a tie goes to the cell listed first in the grid (scores, then strategies, in the order given). "
    "Fixed before any run; the test and OOD rows are never read while choosing."
)
# Per held-out set: the run field, the name of the per-seed list in a summary point, and its label.
_SETS = {"eval_loss": "losses", "ood_loss": "ood_losses"}


def write_sft_summary(args: SFTCurveArguments, output_dir: Path, *, evaluated_on: str, confirmation: bool) -> dict:
    """Summarise `output_dir/runs.jsonl` (the runs evaluated on `evaluated_on` only) into `summary.json` and
    `curve.md`; return the summary."""
    runs = read_runs(output_dir / "runs.jsonl", evaluated_on)
    summary = {"metric": METRIC, "evaluated_on": evaluated_on, "std": "sample std (ddof = 1) over training seeds"}
    for field, values_key in _SETS.items():
        measured = [run for run in runs if run.get(field) is not None]
        summary[field] = summarize_runs(measured, field, values_key)["points"]
    summary["arguments"] = asdict(args)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# SFT curve: {_title(args, summary['eval_loss'])}", ""]
    where = (
        "validation rows (held out of the pool; the test and OOD rows unread)"
        if evaluated_on == "validation"
        else "the test rows and the OOD rows, each run tested once"
    )
    lines += [
        f"Held-out loss on {where}: {METRIC}. **Lower is better.** Mean ± sample std (ddof = 1) over training seeds "
        "(n = number of seeds).",
        "",
        "Verdicts compare each pruned cell with random (same keep fraction) and with the full pool on the same seeds: "
        "paired differences (cell − baseline) in nats and in percent of the baseline's mean loss on those seeds, "
        'with 95% Student-t intervals. "Beats random" means the interval lies below 0 (lower loss); "matches the full '
        f'pool" means two one-sided tests at 5% put the difference within ±{args.equivalence_margin:g} nats. No '
        f"verdict from fewer than 3 paired seeds. Every run trains {args.max_steps} optimizer steps, the full pool too.",
    ]
    if not confirmation:
        cells = len({(p["score"], p["strategy"], p["keep"]) for p in summary["eval_loss"]} - _baselines(summary))
        lines += [
            "",
            f"{cells} pruned cells compared, without correction: a cell picked as the best of many needs the "
            "confirm stage's fresh seeds.",
        ]
    titles = {"eval_loss": "Validation loss" if evaluated_on == "validation" else "Test loss", "ood_loss": "OOD loss"}
    for field, values_key in _SETS.items():
        if summary[field]:
            image = _plot(summary[field], output_dir / _IMAGES[field], titles[field], _title(args, summary[field]))
            lines += ["", f"## {titles[field]}", "", f"![{titles[field]} per cell]({image.name})", ""]
            lines += _section(summary[field], values_key, args.equivalence_margin)
    (output_dir / "curve.md").write_text("\n".join(lines) + "\n")
    return summary


_IMAGES = {"eval_loss": "curve.png", "ood_loss": "curve_ood.png"}


def _plot(points: list[dict], path: Path, what: str, title: str) -> Path:
    """The held-out loss of every cell (mean ± sample std), the lowest at the top, random and the full pool marked."""
    from ...report import plot_pruning_curve

    metric = f"{what.lower()}, completion tokens"
    return plot_pruning_curve(points, path, title=title, metric=metric, unit="nats", lower_is_better=True)


def _baselines(summary: dict) -> set:
    return {(p["score"], p["strategy"], p["keep"]) for p in summary["eval_loss"] if p["score"] in ("full", "random")}


def _title(args: SFTCurveArguments, points: list[dict]) -> str:
    counts = sorted({p["n"] for p in points}) or [0]
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    model = Path(args.gguf_file or args.model_name_or_path).name
    return (
        f"{model}, LoRA r={args.lora_r} ({', '.join(args.lora_target_modules)}), {args.max_steps} steps at batch "
        f"{args.per_device_train_batch_size}, max_length {args.max_length}, {seeds} seeds per cell"
    )


def _difference_text(interval: dict, reference_mean: float) -> str:
    percent = 100 * interval["mean"] / reference_mean
    if interval["n"] < 2:
        return f"{interval['mean']:+.4f} nats ({percent:+.2f}%), n=1: no interval"
    low, high = 100 * interval["low"] / reference_mean, 100 * interval["high"] / reference_mean
    return (
        f"{interval['mean']:+.4f} nats, 95% CI [{interval['low']:+.4f}, {interval['high']:+.4f}]; {percent:+.2f}% "
        f"[{low:+.2f}, {high:+.2f}]; n={interval['n']}"
    )


def _against(point: dict, reference: dict, values_key: str, name: str, margin: float | None) -> str | None:
    """The verdict words of `point` against `reference` over their shared seeds, with the difference in nats and %."""
    mine, theirs = paired_values(point, reference, values_key)
    if not mine:
        return None
    interval = paired_interval(mine, theirs)
    reference_mean = sum(theirs) / len(theirs)
    if margin is None:
        words = verdict_against(interval, name, lower_is_better=True)
    elif (reason := no_verdict_reason(interval)) is not None:
        words = f"gives no verdict against {name}: {reason}"
    elif equivalent(mine, theirs, margin):
        words = f"matches {name} within ±{margin:g} nats"
    elif interval["high"] < 0:
        words = f"has a lower loss than {name}"
    elif interval["low"] > 0:
        words = f"has a higher loss than {name}"
    else:
        words = f"is not shown to match {name} within ±{margin:g} nats"
    return f"{words} ({_difference_text(interval, reference_mean)})"


def _section(points: list[dict], values_key: str, margin: float) -> list[str]:
    keeps = sorted({p["keep"] for p in points if p["score"] != "full"}, reverse=True)
    full = next((p for p in points if p["score"] == "full"), None)
    random = {p["keep"]: p for p in points if p["score"] == "random"}
    lookup = {(p["score"], p["strategy"], p["keep"]): p for p in points}
    rows = [("random", "random")] + sorted(
        {(p["score"], p["strategy"]) for p in points if p["score"] not in ("full", "random")}
    )
    lines = []
    if full is not None:
        lines += [f"Full pool: **{_mean_text(full)}**", ""]
    if keeps:
        lines.append("| score | strategy | " + " | ".join(f"keep {100 * k:g}%" for k in keeps) + " |")
        lines.append("|---|---|" + "---|" * len(keeps))
        for score, strategy in rows:
            cells = [
                _mean_text(lookup[(score, strategy, k)]) if (score, strategy, k) in lookup else "—" for k in keeps
            ]
            lines.append(f"| {score} | {strategy} | " + " | ".join(cells) + " |")
    lines += [""]
    for score, strategy in rows:
        parts = []
        for keep in keeps:
            point = lookup.get((score, strategy, keep))
            if point is None:
                continue
            pieces = []
            if score != "random" and keep in random:
                pieces.append(_against(point, random[keep], values_key, "random", None))
            if full is not None:
                pieces.append(_against(point, full, values_key, "the full pool", margin))
            pieces = [piece for piece in pieces if piece]
            if pieces:
                parts.append(f"at {100 * keep:g}% it " + " and ".join(pieces))
        if parts:
            lines.append(f"- **{score} / {strategy}**: " + "; ".join(parts) + ".")
    seeds = sorted({seed for point in points for seed in point["seeds"]})
    lines += [
        "",
        "Per seed (loss, nats):",
        "",
        "| score | strategy | keep | " + " | ".join(f"seed {s}" for s in seeds) + " |",
    ]
    lines.append("|---|---|---|" + "---|" * len(seeds))
    for point in sorted(
        points, key=lambda p: (p["score"] != "full", p["score"] != "random", -p["keep"], p["score"], p["strategy"])
    ):
        by_seed = dict(zip(point["seeds"], point[values_key]))
        cells = [f"{by_seed[s]:.4f}" if s in by_seed else "—" for s in seeds]
        lines.append(
            f"| {point['score']} | {point['strategy']} | {100 * point['keep']:g}% | " + " | ".join(cells) + " |"
        )
    return lines


def _mean_text(point: dict) -> str:
    std = "—" if point["std"] is None else f"{point['std']:.4f}"
    return f"{point['mean']:.4f} ± {std} (n={point['n']})"


def choose_sft_cells(args: SFTCurveArguments, points: list[dict], split: dict) -> dict:
    """The content of `selection.json` from the validation-loss summary `points`: the lowest-loss cell per keep
    fraction, as `prune` arguments that `datadiet prune --from_selection` reads.

    Example:
    ```python
    >>> from datadiet.curve.sft import SFTCurveArguments
    >>> from datadiet.curve.sft.summary import choose_sft_cells
    >>> args = SFTCurveArguments("pool", validation_dataset="validation", model_name_or_path="m", scores=["ifd"])
    >>> points = [{"score": "ifd", "strategy": s, "keep": 0.1, "mean": m, "n": 3, "seeds": [1, 2, 3],
    ...            "losses": [m - 0.01, m, m + 0.01]} for s, m in [("hardest", 1.9), ("easiest", 1.8)]]
    >>> choose_sft_cells(args, points, {})["chosen"][0]["prune"]
    {'by': 'ifd', 'keep': 0.1, 'strategy': 'easiest', 'class_balanced': False}

    ```
    """
    cells, best = best_cells(
        points, args.keep_fractions, args.scores, args.strategies, lower_is_better=True, values_key="losses"
    )
    chosen = [
        {
            **cell,
            "prune": {
                "by": cell["score"],
                "keep": cell["keep"],
                "strategy": cell["strategy"],
                "class_balanced": False,
            },
        }
        for cell in best
    ]
    protocol = {"metric": METRIC, "validation_dataset": args.validation_dataset, **split}
    baselines = baseline_cells(points, "losses")
    return selection_record(SFT_SELECTION_RULE, protocol, args, cells, chosen, baselines)
