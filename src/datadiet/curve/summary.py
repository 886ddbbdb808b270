"""A pruning curve's results: mean ± std per point over seeds (`summarize_runs`), one verdict per score × strategy
against random and the full data, the per-seed table, and `summary.json`, `curve.md` and `curve.png`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .arguments import CurveArguments
from .statistics import equivalent, no_verdict_reason, paired_interval, sample_std, verdict_against
from .store import read_runs

__all__ = ["paired_values", "summarize_runs", "write_curve_report", "write_summary"]


def write_summary(args: CurveArguments, output_dir: Path, runs_path: Path, *, evaluated_on: str = "test") -> dict:
    """Summarise the finished runs in `runs_path` and write `summary.json`, `curve.md` and `curve.png` to `output_dir`;
    return the summary."""
    # Only the runs of this folder's protocol: a validation accuracy is never summarised as a test accuracy.
    summary = summarize_runs(read_runs(runs_path, evaluated_on))
    summary["arguments"] = asdict(args)
    summary["evaluated_on"] = evaluated_on
    summary["std"] = "sample std (ddof = 1) over training seeds"
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    title = _title(args, summary["points"])
    write_curve_report(
        summary,
        output_dir,
        title=title,
        evaluated_on=evaluated_on,
        margin=getattr(args, "equivalence_margin", 0.005),
        confirmation=getattr(args, "confirmation", False),
    )
    return summary


def _title(args: CurveArguments, points: list[dict]) -> str:
    budget = f"{args.max_steps} steps" if args.max_steps is not None else f"{args.epochs:g} epochs of each subset"
    # The seeds finished, not the ones asked for this time: a folder may hold points of a 4th seed run on its own.
    counts = sorted({p["n"] for p in points}) or [len(args.seeds)]
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    checkpoint = getattr(args, "model_name_or_path", None)
    model = f"fine-tuned from {checkpoint}" if checkpoint else args.model_name
    return (
        f"{Path(args.data_files or args.dataset_name).parent.name or args.dataset_name}: {model}, "
        f"{budget} at batch {args.batch_size}, {seeds} seeds per point; scores from {len(args.scoring_seeds)} "
        f"proxies after {args.scoring_epochs} epoch(s)"
    )


def summarize_runs(runs: list[dict], metric: str = "accuracy", values_key: str = "accuracies") -> dict:
    """Mean and sample std (ddof = 1; `None` for a single seed) of the `metric` of each (score, strategy, keep) over
    its seeds (the accuracy; the SFT curve summarises `eval_loss` into `values_key="losses"`).

    Returns `{"points": [{"score", "strategy", "keep", "mean", "std", "n", "seeds", "accuracies"}...]}`, sorted
    (`accuracies[i]` is the run of `seeds[i]`; the list is named `values_key`).

    Example:
    ```python
    >>> from datadiet.curve import summarize_runs
    >>> runs = [{"score": "full", "strategy": "full", "keep": 1.0, "seed": 0, "accuracy": 0.9},
    ...         {"score": "full", "strategy": "full", "keep": 1.0, "seed": 1, "accuracy": 0.8}]
    >>> point = summarize_runs(runs)["points"][0]
    >>> point["mean"], point["std"], point["seeds"]
    (0.85, 0.070711, [0, 1])

    ```
    """
    groups: dict[tuple, dict[int, float]] = {}
    for run in runs:
        # A run repeated (e.g. two processes on one folder) counts once per seed: the last line wins.
        groups.setdefault((run["score"], run["strategy"], float(run["keep"])), {})[int(run["seed"])] = run[metric]
    points = []
    for (score, strategy, keep), by_seed in sorted(groups.items()):
        values = np.array([by_seed[s] for s in sorted(by_seed)])
        points.append(
            {
                "score": score,
                "strategy": strategy,
                "keep": keep,
                "mean": round(float(values.mean()), 6),
                "std": round(sample_std(values), 6) if len(values) > 1 else None,
                "n": len(values),
                "seeds": sorted(by_seed),
                values_key: [by_seed[s] for s in sorted(by_seed)],
            }
        )
    return {"points": points}


def _std_text(point: dict) -> str:
    return "—" if point.get("std") is None else f"{100 * point['std']:.2f}"


def _by_seed(point: dict, values_key: str = "accuracies") -> dict[int, float]:
    """A summary point's accuracy (or other `values_key`) of each seed."""
    return dict(zip(point.get("seeds", []), point.get(values_key, [])))


def _on_seeds(reference: dict, seeds: list[int]) -> dict:
    """`reference` (a summary point) restricted to `seeds`, so that a point run on fewer seeds than its baselines is
    compared with the baselines' runs of the same seeds. Points written before per-seed accuracies were kept, or
    missing one of the seeds, are used whole."""
    by_seed = _by_seed(reference)
    if not by_seed or set(seeds) == set(by_seed) or not set(seeds) <= set(by_seed):
        return reference
    values = np.array([by_seed[s] for s in seeds])
    std = sample_std(values) if len(values) > 1 else None
    return {**reference, "mean": float(values.mean()), "std": std, "n": len(values)}


def paired_values(point: dict, reference: dict, values_key: str = "accuracies") -> tuple[list[float], list[float]]:
    """The values of `point` and `reference` (summary points) on the seeds both have, in seed order (the pairs of a
    paired test)."""
    mine, theirs = _by_seed(point, values_key), _by_seed(reference, values_key)
    seeds = sorted(set(mine) & set(theirs))
    return [mine[s] for s in seeds], [theirs[s] for s in seeds]


def _interval_text(interval: dict) -> str:
    if interval["n"] < 2:
        return f"{100 * interval['mean']:+.2f} pt, n=1: no interval"
    low, high = 100 * interval["low"], 100 * interval["high"]
    return f"{100 * interval['mean']:+.2f} pt, 95% CI [{low:+.2f}, {high:+.2f}], n={interval['n']}"


def _verdicts(points: list[dict], margin: float = 0.005) -> list[str]:
    """One sentence per (score, strategy): at each keep fraction, the paired difference from random and from the full
    data over the seeds both have, with its 95% t-interval. "beats random" only when the interval lies above 0,
    "loses to random" when below; "matches full data" only when two one-sided tests at 5% put the difference within
    ±`margin`."""
    full = next((p for p in points if p["score"] == "full"), None)
    random = {p["keep"]: p for p in points if p["score"] == "random"}
    sentences = []
    methods = sorted({(p["score"], p["strategy"]) for p in points if p["score"] not in ("full", "random")})
    for score, strategy in methods:
        parts = []
        for point in sorted(
            (p for p in points if (p["score"], p["strategy"]) == (score, strategy)), key=lambda p: -p["keep"]
        ):
            pieces = []
            if point["keep"] in random:
                a, b = paired_values(point, random[point["keep"]])
                if a:
                    interval = paired_interval(a, b)
                    pieces.append(f"{verdict_against(interval, 'random')} ({_interval_text(interval)})")
            if full is not None:
                a, b = paired_values(point, full)
                if a:
                    interval = paired_interval(a, b)
                    reason = no_verdict_reason(interval)
                    if reason is not None:
                        words = f"gives no verdict against the full data: {reason}"
                    elif equivalent(a, b, margin):
                        words = f"matches the full data within ±{100 * margin:g} pt"
                    elif interval["low"] > 0:
                        words = "is above the full data"
                    elif interval["high"] < 0:
                        words = "is below the full data"
                    else:
                        words = f"is not shown to match the full data within ±{100 * margin:g} pt"
                    pieces.append(f"{words} ({_interval_text(interval)})")
            parts.append(f"at {100 * point['keep']:g}% it " + " and ".join(pieces))
        sentences.append(f"- **{score} / {strategy}**: " + "; ".join(parts) + ".")
    return sentences


def _per_seed_table(points: list[dict], evaluated_on: str = "test") -> list[str]:
    """Every run's accuracy by seed, and each pruned run minus the random subset of its seed and keep fraction (the
    paired difference: a method that wins on every seed is more convincing than its mean alone says)."""
    seeds = sorted({seed for point in points for seed in point.get("seeds", [])})
    if not seeds or all(point["score"] == "full" for point in points):
        return []  # the report already says that no pruned run has finished
    random = {p["keep"]: p for p in points if p["score"] == "random"}
    lines = ["", "## Per seed", ""]
    lines.append(
        f"{evaluated_on.capitalize()} accuracy (%) of every run; in brackets, minus the random subset of the same "
        "seed and keep (pt)."
    )
    lines.append("")
    lines.append("| score | strategy | keep | " + " | ".join(f"seed {seed}" for seed in seeds) + " |")
    lines.append("|---|---|---|" + "---|" * len(seeds))
    for point in sorted(points, key=lambda p: (p["score"] != "full", p["score"] != "random", -p["keep"])):
        by_seed = _by_seed(point)
        paired = point["score"] not in ("full", "random")
        baseline = _by_seed(random.get(point["keep"], {})) if paired else {}
        cells = []
        for seed in seeds:
            if seed not in by_seed:
                cells.append("—")
            elif seed in baseline:
                cells.append(f"{100 * by_seed[seed]:.2f} ({100 * (by_seed[seed] - baseline[seed]):+.2f})")
            else:
                cells.append(f"{100 * by_seed[seed]:.2f}")
        lines.append(
            f"| {point['score']} | {point['strategy']} | {100 * point['keep']:g}% | " + " | ".join(cells) + " |"
        )
    return lines


def write_curve_report(
    summary: dict,
    output_dir: str | Path,
    *,
    title: str | None = None,
    evaluated_on: str = "test",
    margin: float = 0.005,
    confirmation: bool = False,
) -> tuple[Path, Path]:
    """Write `curve.md` (a table of mean ± std test accuracy per score × strategy and keep fraction, then one plain
    verdict per score × strategy) and `curve.png` (see `datadiet.report.plot_pruning_curve`); return both paths.
    An exploration (several cells per keep fraction) also names the best cell of each, as exploratory; a
    `confirmation` (cells fixed before its runs) names none."""
    from ..report import plot_pruning_curve

    output_dir = Path(output_dir)
    points = summary["points"]
    keeps = sorted({p["keep"] for p in points if p["score"] != "full"}, reverse=True)
    full = next((p for p in points if p["score"] == "full"), None)
    rows = [("random", "random")] + sorted(
        {(p["score"], p["strategy"]) for p in points} - {("full", "full"), ("random", "random")}
    )
    lookup = {(p["score"], p["strategy"], p["keep"]): p for p in points}
    lines = [f"# Pruning curve{': ' + title if title else ''}", ""]
    cells = len({(p["score"], p["strategy"], p["keep"]) for p in points} - {("full", "full", 1.0)}) - len(
        {p["keep"] for p in points if p["score"] == "random"}
    )
    lines.append(
        f"{evaluated_on.capitalize()} accuracy (%), mean ± sample std (ddof = 1) over training seeds (n = number of "
        "seeds)."
        + (
            " Every run was evaluated on validation rows held out of the training split, never on the test split."
            if evaluated_on == "validation"
            else ""
        )
    )
    lines.append("")
    which = (
        "The verdict compares the pruned cell" if cells == 1 else f"Verdicts compare each of the {cells} pruned cells"
    )
    multiplicity = (
        ""
        if cells == 1
        else f" No correction for comparing {cells} cells: about 1 in 20 intervals excludes 0 by chance alone, so a "
        "cell picked as the best of many needs fresh seeds to confirm it."
    )
    lines.append(
        f"{which} (score × strategy × keep) here with random and with the full data on the same seeds: paired "
        'differences with 95% Student-t intervals. "Beats random" means the interval lies above 0; "matches the full '
        f'data" means two one-sided tests at 5% put the difference within ±{100 * margin:g} pt.{multiplicity}'
    )
    lines.append("")
    if full is not None:
        lines.append(f"Full data (100%): **{100 * full['mean']:.2f} ± {_std_text(full)}** (n={full['n']})")
        lines.append("")
    best: dict[float, dict] = {}
    if keeps:
        lines.append("| score | strategy | " + " | ".join(f"keep {100 * k:g}%" for k in keeps) + " |")
        lines.append("|---|---|" + "---|" * len(keeps))
    else:
        lines.append("No pruned run has finished yet: rerun the curve command to continue.")
        rows = []
    for score, strategy in rows:
        cells = []
        for keep in keeps:
            point = lookup.get((score, strategy, keep))
            if point is None:
                cells.append("—")
                continue
            cells.append(f"{100 * point['mean']:.2f} ± {_std_text(point)} (n={point['n']})")
            if score != "random" and point["mean"] > best.get(keep, {"mean": -1.0})["mean"]:
                best[keep] = point
        lines.append(f"| {score} | {strategy} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", ""]
    lines += _verdicts(points, margin)
    pruned_cells = [p for p in points if p["score"] not in ("full", "random")]
    several = any(sum(p["keep"] == keep for p in pruned_cells) > 1 for keep in keeps)
    if best and several and not confirmation:  # a confirmation's cells were fixed before its runs: nothing to pick
        lines += [
            "",
            "Best score / strategy per keep fraction, picked after seeing these runs (exploratory; the baselines on the same seeds):",
        ]
        for keep in keeps:
            if keep in best:
                point = best[keep]
                seeds = point.get("seeds", [])
                random = lookup.get(("random", "random", keep))
                versus = f", random {100 * _on_seeds(random, seeds)['mean']:.2f}" if random else ""
                versus += f", full {100 * _on_seeds(full, seeds)['mean']:.2f}" if full else ""
                name = f"{point['score']} / {point['strategy']}"
                lines.append(f"- {100 * keep:g}%: {name} {100 * point['mean']:.2f} (n={point['n']}){versus}")
    lines += _per_seed_table(points, evaluated_on)
    markdown = output_dir / "curve.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown.write_text("\n".join(lines) + "\n")
    image = plot_pruning_curve(points, output_dir / "curve.png", title=title)
    return markdown, image
