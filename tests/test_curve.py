"""Pruning curves end to end on scikit-learn's digits (no download): runs.jsonl, resumption, the table and the plot."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch

from datadiet.curve import CurveArguments, run_curve, summarize_runs, write_curve_report

KEEPS = [0.6, 0.3]
SEEDS = [0, 1]


def _arguments(output_dir, **overrides) -> CurveArguments:
    values = dict(
        dataset_name="sklearn-digits",
        model_name="datadiet_tiny_net",
        model_kwargs=json.dumps({"stem_width": 8, "widths": [8, 16, 16]}),
        scores=["el2n", "grand"],
        strategies=["hardest", "window"],
        keep_fractions=KEEPS,
        seeds=SEEDS,
        scoring_seeds=[0],
        scoring_epochs=2,
        max_steps=40,
        batch_size=32,
        learning_rate=0.2,
        crop_padding=1,
        flip=False,
        num_threads=1,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return CurveArguments(**values)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    torch.manual_seed(0)
    output_dir = tmp_path_factory.mktemp("curve")
    summary = run_curve(_arguments(output_dir))
    return output_dir, summary


def test_every_planned_run_is_recorded_once(curve):
    output_dir, _ = curve
    runs = _lines(output_dir / "runs.jsonl")
    # full data per seed, then per keep fraction: random + 2 scores x 2 strategies, per seed.
    assert len(runs) == len(SEEDS) * (1 + len(KEEPS) * (1 + 2 * 2))
    keys = {(r["score"], r["strategy"], r["keep"], r["seed"]) for r in runs}
    assert len(keys) == len(runs)
    for run in runs:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["steps"] == 40
        # digits has 1,347 training rows; a keep fraction keeps round(keep * 1347) of them.
        assert run["train_rows"] == round(run["keep"] * 1347)
    # 40 steps of a small CNN learn something on digits: the full-data runs beat chance (10%) clearly.
    assert statistics.mean(r["accuracy"] for r in runs if r["score"] == "full") > 0.2


def test_scores_are_cached_per_proxy(curve):
    output_dir, _ = curve
    import numpy as np

    with np.load(output_dir / "scores" / "proxy-seed0.npz") as cached:
        assert cached["el2n"].shape == (1347,)
        assert cached["grand"].shape == (1347,)
        # EL2N of a 10-class softmax lies in [0, sqrt(2)]; GraNd is a norm.
        assert 0.0 <= cached["el2n"].min() and cached["el2n"].max() <= 2**0.5 + 1e-6
        assert (cached["grand"] >= 0).all()
        # After 2 epochs, forgetting counts are whole numbers of events, at most 2 (never learned = num_epochs).
        assert set(np.unique(cached["forgetting"]).tolist()) <= {0.0, 1.0, 2.0}


def test_rerun_skips_finished_runs_and_resumes_missing_ones(curve):
    output_dir, _ = curve
    path = output_dir / "runs.jsonl"
    before = path.read_text()
    run_curve(_arguments(output_dir))
    assert path.read_text() == before  # nothing re-run

    lines = before.splitlines()
    removed = [json.loads(line) for line in lines[-3:]]
    path.write_text("\n".join(lines[:-3]) + "\n")
    run_curve(_arguments(output_dir))
    after = _lines(path)
    assert len(after) == len(lines)
    redone = after[-3:]
    assert [(r["score"], r["strategy"], r["keep"], r["seed"]) for r in redone] == [
        (r["score"], r["strategy"], r["keep"], r["seed"]) for r in removed
    ]
    # Same seed, same subset, same steps, one thread: the rerun reproduces the accuracy exactly.
    assert [r["accuracy"] for r in redone] == [r["accuracy"] for r in removed]


def test_table_numbers_are_the_runs_mean_and_std(curve):
    output_dir, _ = curve
    runs = _lines(output_dir / "runs.jsonl")
    table = (output_dir / "curve.md").read_text()
    assert (output_dir / "curve.png").stat().st_size > 10_000
    assert (output_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = {}
    for line in table.split("## Verdicts")[0].splitlines():
        if line.startswith("| ") and not line.startswith("| score"):
            parts = [p.strip() for p in line.strip("|").split("|")]
            for keep, cell in zip(sorted(KEEPS, reverse=True), parts[2:]):
                cells[(parts[0], parts[1], keep)] = cell
    assert len(cells) == len(KEEPS) * (1 + 4)
    for (score, strategy, keep), cell in cells.items():
        values = [r["accuracy"] for r in runs if (r["score"], r["strategy"], r["keep"]) == (score, strategy, keep)]
        mean, std = 100 * statistics.mean(values), 100 * statistics.stdev(values)  # sample std
        match = re.fullmatch(r"([\d.]+) ± ([\d.]+) \(n=(\d+)\)", cell)
        assert match, cell
        assert float(match[1]) == pytest.approx(mean, abs=0.006)
        assert float(match[2]) == pytest.approx(std, abs=0.006)
        assert int(match[3]) == len(SEEDS)
    full = [100 * r["accuracy"] for r in runs if r["score"] == "full"]
    assert f"**{statistics.mean(full):.2f} ± {statistics.stdev(full):.2f}**" in table
    # One plain verdict per score x strategy.
    assert table.count("- **") == 4
    # The per-seed table holds every run, in its seed's column.
    per_seed = {}
    for line in table.split("## Per seed")[1].splitlines():
        if line.startswith("| ") and not line.startswith("| score"):
            parts = [p.strip() for p in line.strip("|").split("|")]
            for seed, cell in zip(SEEDS, parts[3:]):
                per_seed[(parts[0], parts[1], float(parts[2].rstrip("%")) / 100, seed)] = float(cell.split()[0])
    assert len(per_seed) == len(runs)
    for run in runs:
        assert per_seed[(run["score"], run["strategy"], run["keep"], run["seed"])] == round(100 * run["accuracy"], 2)


def _scipy_interval(a, b) -> str:
    """The paired 95% t-interval of a - b as the report writes it, computed by scipy (an independent reference)."""
    from scipy import stats

    a, b = np.array(a), np.array(b)
    low, high = stats.ttest_rel(a, b).confidence_interval(0.95)
    return f"{100 * (a - b).mean():+.2f} pt, 95% CI [{100 * low:+.2f}, {100 * high:+.2f}], n={len(a)}"


def _scipy_equivalent(a, b, margin) -> bool:
    """Two one-sided tests at 5% with scipy: is the mean of a - b shown to lie within (-margin, +margin)?"""
    from scipy import stats

    d = np.array(a) - np.array(b)
    above = stats.ttest_1samp(d, -margin, alternative="greater").pvalue < 0.05
    below = stats.ttest_1samp(d, margin, alternative="less").pvalue < 0.05
    return bool(above and below)


def test_verdicts_follow_from_paired_intervals(tmp_path):
    accuracies = {
        ("full", "full", 1.0): [0.90, 0.92, 0.91, 0.93],
        ("random", "random", 0.5): [0.88, 0.885, 0.87, 0.89],
        ("el2n", "hardest", 0.5): [0.905, 0.918, 0.909, 0.93],  # above random, equivalent to full
        ("grand", "window", 0.5): [0.86, 0.89, 0.85, 0.90],  # its interval against random straddles 0
        ("loss", "easiest", 0.5): [0.85, 0.86, 0.84, 0.86],  # below random
    }
    runs = [
        {"score": score, "strategy": strategy, "keep": keep, "seed": seed, "accuracy": accuracy}
        for (score, strategy, keep), values in accuracies.items()
        for seed, accuracy in enumerate(values)
    ]
    summary = summarize_runs(runs)
    full = next(p for p in summary["points"] if p["score"] == "full")
    assert full["std"] == pytest.approx(statistics.stdev(accuracies[("full", "full", 1.0)]), abs=1e-6)  # sample std
    markdown, image = write_curve_report(summary, tmp_path)
    text = markdown.read_text()
    random, full_runs = accuracies[("random", "random", 0.5)], accuracies[("full", "full", 1.0)]
    el2n, grand, loss = (
        accuracies[key] for key in [("el2n", "hardest", 0.5), ("grand", "window", 0.5), ("loss", "easiest", 0.5)]
    )
    assert _scipy_equivalent(el2n, full_runs, 0.005) and not _scipy_equivalent(grand, full_runs, 0.005)
    assert (
        f"**el2n / hardest**: at 50% it beats random ({_scipy_interval(el2n, random)}) and matches the full data "
        f"within ±0.5 pt ({_scipy_interval(el2n, full_runs)})." in text
    )
    assert (
        f"**grand / window**: at 50% it shows no clear difference from random ({_scipy_interval(grand, random)})"
        in text
    )
    assert (
        f"**loss / easiest**: at 50% it loses to random ({_scipy_interval(loss, random)}) and is below the full data"
        in text
    )
    assert "each of the 3 pruned cells" in text and "sample std (ddof = 1)" in text
    assert image.exists()


def test_a_point_on_fewer_seeds_is_compared_with_the_baselines_of_its_seeds(tmp_path):
    # Seed 2 of the baselines is far higher; a point run on seeds 0 and 1 only must not be judged against it.
    runs = [
        {"score": "full", "strategy": "full", "keep": 1.0, "seed": s, "accuracy": a}
        for s, a in [(0, 0.90), (1, 0.90), (2, 0.99)]
    ]
    runs += [
        {"score": "random", "strategy": "random", "keep": 0.5, "seed": s, "accuracy": a}
        for s, a in [(0, 0.88), (1, 0.88), (2, 0.97)]
    ]
    runs += [{"score": "el2n", "strategy": "window", "keep": 0.5, "seed": s, "accuracy": 0.897} for s in (0, 1)]
    # A second cell at the same keep fraction, so there is a best one to name.
    runs += [{"score": "grand", "strategy": "window", "keep": 0.5, "seed": s, "accuracy": 0.85} for s in (0, 1, 2)]
    text = write_curve_report(summarize_runs(runs), tmp_path)[0].read_text()
    # Two paired seeds (with identical differences, a zero-width interval): no verdict either way.
    assert (
        "gives no verdict against random: too few seeds to say (n=2; a verdict needs at least 3) (+1.70 pt, 95% CI "
        "[+1.70, +1.70], n=2) and gives no verdict against the full data: too few seeds to say" in text
    )
    assert "it beats random" not in text and "matches the full data within ±0.5 pt (" not in text
    assert "- 50%: el2n / window 89.70 (n=2), random 88.00, full 90.00" in text
    # The per-seed table pairs each run with the random subset of its seed; seed 2 was not run for el2n.
    assert "| el2n | window | 50% | 89.70 (+1.70) | 89.70 (+1.70) | — |" in text
    assert "| random | random | 50% | 88.00 | 88.00 | 97.00 |" in text


def test_a_zero_variance_difference_gives_no_verdict(tmp_path):
    # Three seeds whose differences from random and from full are all equal: the sample std is 0 and a t-interval
    # would have zero width; the report says it cannot judge instead of "beats random".
    runs = [
        {"score": "full", "strategy": "full", "keep": 1.0, "seed": s, "accuracy": 0.90 + s / 100} for s in range(3)
    ]
    runs += [
        {"score": "random", "strategy": "random", "keep": 0.5, "seed": s, "accuracy": 0.88 + s / 100} for s in range(3)
    ]
    runs += [
        {"score": "el2n", "strategy": "hardest", "keep": 0.5, "seed": s, "accuracy": 0.89 + s / 100} for s in range(3)
    ]
    assert np.std(np.array([0.89, 0.90, 0.91]) - np.array([0.88, 0.89, 0.90]), ddof=1) < 1e-12
    text = write_curve_report(summarize_runs(runs), tmp_path)[0].read_text()
    assert "**el2n / hardest**: at 50% it gives no verdict against random: no spread to judge by" in text
    assert "and gives no verdict against the full data: no spread to judge by" in text
    assert "it beats random" not in text and "matches the full data within ±0.5 pt (" not in text
    assert "below the full" not in text


def test_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="exactly one training budget"):
        _arguments(tmp_path, max_steps=None)
    with pytest.raises(ValueError, match="Unknown curve score"):
        _arguments(tmp_path, scores=["el2m"])
    with pytest.raises(ValueError, match="keep_fractions"):
        _arguments(tmp_path, keep_fractions=[1.0])
    with pytest.raises(ValueError, match="every curve includes it as the baseline"):
        _arguments(tmp_path, strategies=["random"])
    # torch's OneCycleLR divides by zero at 4 steps (a warm-up of 25% of them is one step long, i.e. zero).
    with pytest.raises(ValueError, match="max_steps gives 4 training step"):
        _arguments(tmp_path, max_steps=4)


def test_too_few_proxy_steps_are_refused_before_training(tmp_path):
    # 64 rows at batch 32 for 2 epochs: 4 proxy steps, too few for the one-cycle schedule.
    with pytest.raises(ValueError, match="Scoring the proxies .64 rows, batch_size=32, scoring_epochs=2. gives 4"):
        run_curve(_arguments(tmp_path, max_rows=64))


def test_changed_budget_in_the_same_folder_is_refused(curve):
    output_dir, _ = curve
    with pytest.raises(ValueError, match="max_steps"):
        run_curve(_arguments(output_dir, max_steps=7))


def test_report_hist_command_writes_a_png(tmp_path):
    from datasets import Dataset

    from datadiet.cli.report import report_main

    Dataset.from_dict({"el2n": [0.1, 0.5, 0.9, 0.3], "grand": [1.0, 2.0, 3.0, 4.0]}).save_to_disk(tmp_path / "scored")
    output = tmp_path / "hist.png"
    code = report_main(
        ["hist", "--dataset_name", str(tmp_path / "scored"), "--columns", "el2n", "grand", "--output", str(output)]
    )
    assert code == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not in the dataset"):
        report_main(["hist", "--dataset_name", str(tmp_path / "scored"), "--columns", "forgetting"])
    assert report_main(["nonsense"]) == 2


def test_a_run_claimed_by_another_live_process_is_left_to_it(curve):
    import os

    output_dir, _ = curve
    path = output_dir / "runs.jsonl"
    lines = path.read_text().splitlines()
    last = json.loads(lines[-1])
    path.write_text("\n".join(lines[:-1]) + "\n")
    claim = output_dir / "claims" / f"{last['score']}_{last['strategy']}_{last['keep']:g}_{last['seed']}"
    claim.write_text(str(os.getppid()))  # a live process that is not this one
    run_curve(_arguments(output_dir))
    assert len(_lines(path)) == len(lines) - 1
    claim.write_text("999999999")  # a process that no longer exists: its claim is stale and taken over
    run_curve(_arguments(output_dir))
    assert len(_lines(path)) == len(lines)
    assert _lines(path)[-1]["accuracy"] == last["accuracy"]


def test_a_process_waits_for_the_grid_runs_others_hold_before_choosing(tmp_path, caplog):
    """A process sharing a curve folder goes on to the choice only once the whole grid is finished: it retries (and
    so takes over a dead process's claim) until the runs others hold are in runs.jsonl; a run tested on the test
    split does not count for the validation grid."""
    from datadiet.curve.store import append_run, run_until_finished

    runs = [("el2n", "hardest", 0.5, 1), ("random", "random", 0.5, 1)]
    path = tmp_path / "runs.jsonl"

    def record(run, evaluated_on="validation"):
        return dict(zip(("score", "strategy", "keep", "seed"), run), evaluated_on=evaluated_on)

    calls = []

    def run_remaining():  # this process's share; the other process's run lands on the third look
        calls.append(len(calls))
        if len(calls) == 1:
            append_run(path, record(runs[0]))
            append_run(path, record(runs[1], evaluated_on="test"))
        elif len(calls) == 3:
            append_run(path, record(runs[1]))

    with caplog.at_level("INFO", logger="datadiet.curve.store"):
        run_until_finished(run_remaining, path, runs, "validation", poll_seconds=0)
    assert len(calls) == 3
    assert caplog.text.count("Waiting for 1 runs") == 2


def test_report_with_only_full_data_runs_says_so_instead_of_an_empty_table(tmp_path):
    runs = [{"score": "full", "strategy": "full", "keep": 1.0, "seed": s, "accuracy": 0.84} for s in (0, 1)]
    markdown, image = write_curve_report(summarize_runs(runs), tmp_path)
    text = markdown.read_text()
    assert "Full data (100%): **84.00 ± 0.00** (n=2)" in text
    assert "| score | strategy |" not in text
    assert "No pruned run has finished yet" in text
    assert image.exists()


def test_a_strategy_entry_can_carry_its_own_offset(tmp_path):
    import numpy as np

    from datadiet.curve import _subset

    args = _arguments(tmp_path, strategies=["window", "window@0.25", "stratified@0.05"], offset=0.1)
    rng = np.random.default_rng(0)
    scores = {"el2n": rng.random(400)}
    labels = rng.integers(0, 10, 400)
    by_hardness = np.argsort(-scores["el2n"])  # distinct values: no ties
    for strategy, skip in [("window", 40), ("window@0.25", 100)]:
        kept = _subset(args, scores, labels, ("el2n", strategy, 0.5, 0))
        np.testing.assert_array_equal(kept, np.sort(by_hardness[skip : skip + 200]))
    # stratified@0.05 drops exactly the hardest 5% (20 rows) before sampling, whatever the bins then take.
    kept = _subset(args, scores, labels, ("el2n", "stratified@0.05", 0.5, 0))
    assert len(kept) == 200
    assert not set(kept) & set(by_hardness[:20].tolist())
    assert set(kept) & set(by_hardness[20:40].tolist())  # the curve's own hard_cutoff (10%) would drop these


def test_strategy_values_are_validated(tmp_path):
    with pytest.raises(ValueError, match="only .* take a value after '@'"):
        _arguments(tmp_path, strategies=["hardest@0.2"])
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        _arguments(tmp_path, strategies=["window@1.5"])
    with pytest.raises(ValueError, match="must be a fraction"):
        _arguments(tmp_path, strategies=["window@x"])
    with pytest.raises(ValueError, match="Unknown pruning strategy"):
        _arguments(tmp_path, strategies=["windw@0.2"])


def test_a_single_keep_fraction_is_drawn_as_one_row_per_method(tmp_path):
    from PIL import Image

    from datadiet.report import plot_pruning_curve

    points = [
        {"score": "full", "strategy": "full", "keep": 1.0, "mean": 0.84, "std": 0.002},
        {"score": "random", "strategy": "random", "keep": 0.5, "mean": 0.83, "std": 0.001},
        {"score": "el2n", "strategy": "window", "keep": 0.5, "mean": 0.831, "std": 0.002},
        {"score": "el2n", "strategy": "window@0.3", "keep": 0.5, "mean": 0.77, "std": 0.001},
    ]
    with Image.open(plot_pruning_curve(points, tmp_path / "one.png")) as image:
        assert image.size == (1020, round((1.6 + 0.42 * 3) * 120))  # a row per pruned method, not a curve
    points.append({"score": "random", "strategy": "random", "keep": 0.3, "mean": 0.8, "std": 0.001})
    with Image.open(plot_pruning_curve(points, tmp_path / "curve.png")) as image:
        assert image.size == (1020, 624)  # several fractions: the curve


def test_validation_protocol_never_trains_on_validation_rows_and_confirms_on_fresh_seeds(tmp_path, monkeypatch):
    """The validation protocol on a tiny slice: every grid run is evaluated on held-out rows, no proxy and no subset
    ever trains on one of them (checked by recording every image each training step sees), the test split is read
    only by the confirm stage, and selection.json's choice feeds `read_selection`."""
    import datadiet.curve.training as training
    from datadiet.curve import read_selection
    from datadiet.data import load_digits_dataset

    digits = load_digits_dataset()["train"].select(range(240))
    validation_images = set()
    trained_images = set()
    original_augment = training.CurveData.augment

    def recording_augment(self, images, generator):
        # Every image any training step (proxies and subsets alike) sees passes through augment.
        trained_images.update(image.numpy().tobytes() for image in images)
        return original_augment(self, images, generator)

    monkeypatch.setattr(training.CurveData, "augment", recording_augment)
    tested = []
    original_accuracy = training.accuracy_on

    def recording_accuracy(model, data, images, labels, batch_size):
        tested.append("test" if images is data.x_test else "validation")
        validation_images.update(image.numpy().tobytes() for image in data.x_validation)
        return original_accuracy(model, data, images, labels, batch_size)

    monkeypatch.setattr(training, "accuracy_on", recording_accuracy)
    import datadiet.curve as curve

    monkeypatch.setattr(curve, "accuracy_on", recording_accuracy)
    args = _arguments(
        tmp_path / "curve",
        max_rows=240,
        max_eval_rows=60,
        keep_fractions=[0.5],
        seeds=[0, 1],
        scoring_seeds=[0],
        max_steps=10,
        scoring_epochs=1,
        batch_size=16,
        validation_fraction=0.25,
        confirm_seeds=[5, 6],
        confirm_scoring_seeds=[3],
    )
    run_curve(args)
    folder = tmp_path / "curve"
    held_out = json.loads((folder / "validation_rows.json").read_text())
    labels = np.array(digits["label"])
    # Class-stratified: each class keeps about a quarter of its rows in the hold-out.
    for label in np.unique(labels):
        assert abs(np.isin(np.flatnonzero(labels == label), held_out).sum() - 0.25 * (labels == label).sum()) <= 1
    assert 0 < len(validation_images) <= len(held_out)
    assert validation_images and not (validation_images & trained_images)
    grid = _lines(folder / "runs.jsonl")
    assert grid and all(run["evaluated_on"] == "validation" for run in grid)
    # The grid (2 scores x 2 strategies + random, 2 seeds, + full) is evaluated on validation rows; only the confirm
    # stage (chosen cell, random, full on 2 fresh seeds) reads the test split.
    assert tested.count("validation") == len(grid) and tested.count("test") == 6
    selection = json.loads((folder / "selection.json").read_text())
    assert selection["cells_compared"] == 4 and len(selection["chosen"]) == 1
    best = max(selection["cells"], key=lambda cell: cell["mean"])
    chosen = selection["chosen"][0]
    assert (chosen["score"], chosen["strategy"]) == (best["score"], best["strategy"])
    assert chosen["std"] == pytest.approx(statistics.stdev(chosen["accuracies"]))
    assert read_selection(folder / "selection.json") == chosen["prune"]
    confirm = _lines(folder / "confirm" / "runs.jsonl")
    assert sorted((run["score"], run["seed"]) for run in confirm) == sorted(
        (score, seed) for score in ("full", "random", chosen["score"]) for seed in (5, 6)
    )
    assert (folder / "confirm" / "scores" / "proxy-seed3.npz").exists()
    assert "Test accuracy" in (folder / "confirm" / "curve.md").read_text()
    assert "Validation accuracy" in (folder / "curve.md").read_text()
    # The folder records its protocol; resuming it without validation (or with another hold-out) is refused, naming
    # the difference, before any data is read.
    stored = json.loads((folder / "curve_config.json").read_text())
    assert (stored["validation_fraction"], stored["evaluated_on"], stored["seed_scheme"]) == (
        0.25,
        "validation",
        "per-purpose-v1",
    )
    plain = replace(args, validation_fraction=0.0, confirm_seeds=[], confirm_scoring_seeds=[])
    with pytest.raises(ValueError, match=r"other values of \['evaluated_on', 'validation_fraction'\]") as error:
        run_curve(plain)
    assert "'validation_fraction': 0.25" in str(error.value) and "'validation_fraction': 0.0" in str(error.value)
    with pytest.raises(ValueError, match=r"other values of \['validation_seed'\]"):
        run_curve(replace(args, validation_seed=1))


def test_confirm_seeds_must_be_fresh(tmp_path):
    with pytest.raises(ValueError, match="needs fresh seeds"):
        _arguments(tmp_path, validation_fraction=0.1, confirm_seeds=[0], confirm_scoring_seeds=[7])
    with pytest.raises(ValueError, match="set validation_fraction"):
        _arguments(tmp_path, confirm_seeds=[5], confirm_scoring_seeds=[7])


def test_a_folder_without_validation_records_its_protocol_and_reads_only_its_runs(curve, tmp_path):
    output_dir, _ = curve
    stored = json.loads((output_dir / "curve_config.json").read_text())
    assert (stored["validation_fraction"], stored["evaluated_on"], stored["seed_scheme"]) == (
        0.0,
        "test",
        "per-purpose-v1",
    )
    # Resumed with validation on: refused, naming the protocol keys.
    with pytest.raises(ValueError, match=r"other values of \['evaluated_on', 'validation_fraction'\]"):
        run_curve(_arguments(output_dir, validation_fraction=0.2))
    # A runs.jsonl holding runs of both protocols (a leak): the test-split report reads only the tested runs.
    from datadiet.curve.summary import write_summary

    runs = [
        {"score": "full", "strategy": "full", "keep": 1.0, "seed": 0, "accuracy": 0.5, "evaluated_on": "test"},
        {"score": "full", "strategy": "full", "keep": 1.0, "seed": 1, "accuracy": 0.9, "evaluated_on": "validation"},
        {"score": "full", "strategy": "full", "keep": 1.0, "seed": 2, "accuracy": 0.7},  # written before the key
    ]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(run) + "\n" for run in runs))
    summary = write_summary(_arguments(tmp_path), tmp_path, tmp_path / "runs.jsonl", evaluated_on="test")
    assert summary["points"][0]["seeds"] == [0, 2] and summary["points"][0]["mean"] == pytest.approx(0.6)


def test_a_folder_made_before_seed_streams_is_refused_for_training_and_read_for_its_report(curve, tmp_path):
    import shutil

    output_dir, _ = curve
    legacy = tmp_path / "legacy"
    shutil.copytree(output_dir, legacy)
    config = json.loads((legacy / "curve_config.json").read_text())
    for key in ("validation_fraction", "validation_seed", "evaluated_on", "seed_scheme"):
        del config[key]  # what a folder written before the protocol and the seed scheme were recorded holds
    (legacy / "curve_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="before training, proxy and validation seeds had separate random streams"):
        run_curve(_arguments(legacy))
    summary = run_curve(_arguments(legacy, report_only=True))
    assert len(summary["points"]) == 1 + len(KEEPS) * (1 + 2 * 2)
    with pytest.raises(ValueError, match="max_steps"):
        run_curve(_arguments(legacy, report_only=True, max_steps=7))


def test_training_proxy_and_validation_seeds_draw_separate_streams(tmp_path, monkeypatch):
    """The same integer as a training seed and a proxy seed: different initial weights and a different first batch."""
    import datadiet.curve as curve
    import datadiet.curve.training as training
    from datadiet.curve.training import stream_seed
    from datadiet.models import build_model

    events = []
    original_build, original_augment = training.build_curve_model, training.CurveData.augment

    def recording_build(args, data, seed, **kwargs):
        model = original_build(args, data, seed, **kwargs)
        events.append(("model", seed, torch.cat([p.detach().flatten() for p in model.parameters()]).clone()))
        return model

    def recording_augment(self, images, generator):
        if events and events[-1][0] == "model":  # the first batch after a model is built: its data order
            events.append(("batch", images.clone()))
        return original_augment(self, images, generator)

    monkeypatch.setattr(training, "build_curve_model", recording_build)
    monkeypatch.setattr(curve, "build_curve_model", recording_build)
    monkeypatch.setattr(training.CurveData, "augment", recording_augment)
    args = _arguments(
        tmp_path / "curve",
        max_rows=64,
        max_eval_rows=32,
        scores=["el2n"],
        strategies=["hardest"],
        keep_fractions=[0.5],
        seeds=[3],
        scoring_seeds=[3],
        scoring_epochs=1,
        max_steps=5,
        batch_size=8,
    )
    run_curve(args)
    models = [event for event in events if event[0] == "model"]
    batches = [event[1] for event in events if event[0] == "batch"]
    # The proxy first, then full / random / el2n, all three from the training stream of seed 3.
    assert [seed for _, seed, _ in models] == [stream_seed("proxy", 3)] + [stream_seed("training", 3)] * 3
    assert stream_seed("proxy", 3) != stream_seed("training", 3) != stream_seed("validation", 3)
    proxy_weights, full_weights = models[0][2], models[1][2]
    assert not torch.equal(proxy_weights, full_weights)
    # Both trained on all 64 rows from the same integer: their first batches differ (another order).
    assert not torch.equal(batches[0], batches[1])
    # Independent reference: timm's model built after torch.manual_seed(that stream's seed) has the same weights.
    reference = build_model(
        args.model_name,
        num_classes=10,
        in_chans=1,
        model_kwargs=json.loads(args.model_kwargs),
        seed=stream_seed("training", 3),
    )
    assert torch.equal(torch.cat([p.detach().flatten() for p in reference.parameters()]), full_weights)
    records = _lines(tmp_path / "curve" / "runs.jsonl")
    assert {run["torch_seed"] for run in records} == {stream_seed("training", 3)}


def test_append_run_starts_a_new_line_after_a_line_cut_by_an_interrupt(tmp_path):
    from datadiet.curve.store import append_run, read_runs

    path = tmp_path / "runs.jsonl"
    append_run(path, {"seed": 0})
    path.write_text(path.read_text() + '{"seed": 1, "acc')  # the process died mid-write
    append_run(path, {"seed": 1})
    append_run(path, {"seed": 2})
    assert path.read_text().splitlines() == ['{"seed": 0}', '{"seed": 1, "acc', '{"seed": 1}', '{"seed": 2}']
    assert [run["seed"] for run in read_runs(path)] == [0, 1, 2]


def test_a_validation_report_says_validation_in_every_table(tmp_path):
    runs = [
        {"score": s, "strategy": st, "keep": k, "seed": seed, "accuracy": 0.5 + 0.01 * seed + 0.001 * i}
        for i, (s, st, k) in enumerate([("full", "full", 1.0), ("random", "random", 0.5), ("el2n", "hardest", 0.5)])
        for seed in (0, 1, 2)
    ]
    write_curve_report(summarize_runs(runs), tmp_path, title="t", evaluated_on="validation")
    report = (tmp_path / "curve.md").read_text()
    assert "Validation accuracy (%) of every run" in report.split("## Per seed")[1]
    assert "Test accuracy" not in report
