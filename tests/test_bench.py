"""The speed benchmarks' discipline (recipes/bench/discipline.py): no verdict on a busy machine, ratios taken round
by round, alternated order, spreads. (The timings themselves are the benchmark, not tests.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "recipes" / "bench"


@pytest.fixture(scope="module")
def discipline():
    spec = importlib.util.spec_from_file_location("bench_discipline", BENCH / "discipline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_verdict_when_the_load_is_above_the_cores(discipline):
    # Before the run the load is all other processes'; after it, the bench's own threads are taken off.
    assert discipline.machine_busy(0.3, 2.1, num_cores=2, own_threads=2) is None
    assert discipline.machine_busy(2.0, 4.0, num_cores=2, own_threads=2) is None
    assert "before the run" in discipline.machine_busy(2.5, 2.0, num_cores=2, own_threads=2)
    assert "after the run" in discipline.machine_busy(0.5, 4.5, num_cores=2, own_threads=2)
    assert discipline.verdict(True, discipline.machine_busy(5.0, 5.0, 2, 2)) == "machine busy: no verdict"
    assert discipline.verdict(False, discipline.machine_busy(5.0, 5.0, 2, 2)) == "machine busy: no verdict"
    assert discipline.verdict(True, None) == "goal met"
    assert discipline.verdict(False, None) == "goal missed"


def test_alternated_rounds_and_per_round_ratios(discipline):
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("plain", "ours", "naive")}
    times, loads = discipline.alternate(runners, 4, skip=lambda name, round_: name == "naive" and round_ >= 1)
    # Order reversed every other round, so a drift in the load hits every method alike; skipped rounds are None.
    assert calls == ["plain", "ours", "naive", "ours", "plain", "plain", "ours", "ours", "plain"]
    assert [t is None for t in times["naive"]] == [False, True, True, True]
    assert len(times["plain"]) == len(loads) == 4
    assert discipline.round_ratios([2.0, None, 6.0], [1.0, 1.0, 2.0]) == [2.0, 3.0]
    assert discipline.spread([3.0, 1.0, 2.0]) == {"n": 3, "min": 1.0, "median": 2.0, "max": 3.0}
    assert discipline.spread([])["median"] is None


def test_grand_bench_refuses_a_verdict_on_a_busy_machine_and_reports_the_spread(discipline, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("grand_bench", BENCH / "grand.py")
    grand = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grand)
    timing = {
        "seconds": {"plain": [1.0, 1.0, 2.0], "ours": [1.2, 1.5, 2.2]},
        "norms": {},
        "errors": {},
    }
    memory = {"plain": {"peak_rss_mb": 1000.0}, "ours": {"peak_rss_mb": 1200.0}}
    quiet = grand.summarise("resnet18_b128", timing, memory, load_before=0.2, load_after=2.3, threads=2)
    ratio = quiet["methods"]["ours"]["ratio"]
    assert (ratio["min"], ratio["median"], ratio["max"]) == (pytest.approx(1.1), pytest.approx(1.2), 1.5)
    assert quiet["methods"]["ours"]["extra_mb"] == 200.0
    assert quiet["verdict"] == "goal met"  # median 1.2 <= 1.3, extra 200 MB <= 300
    busy = grand.summarise("resnet18_b128", timing, memory, load_before=4.0, load_after=6.0, threads=2)
    assert busy["verdict"] == "machine busy: no verdict" and "above the" in busy["busy"]
    heavy = {"plain": {"peak_rss_mb": 1000.0}, "ours": {"peak_rss_mb": 1400.0}}
    assert grand.summarise("resnet18_b128", timing, heavy, 0.2, 2.3, 2)["verdict"] == "goal missed"
    assert "machine busy: no verdict" in "\n".join(map(str, sum(grand.table_rows("resnet18_b128", busy), [])))
    sys.modules.pop("discipline", None)


@pytest.fixture
def sft_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("sft_bench", BENCH / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    yield sft
    sys.modules.pop("discipline", None)


def test_sft_bench_runs_end_to_end_on_a_tiny_llama(sft_bench, tmp_path, one_thread, monkeypatch):
    from conftest import ALPACA, require_shared_data

    require_shared_data(ALPACA)
    monkeypatch.setattr(sft_bench, "ALPACA", ALPACA)
    output = tmp_path / "sft.json"
    argv = ["--model", "tiny", "--batch_size", "3", "--max_length", "48", "--rounds", "2", "--naive_rounds", "1"]
    result = sft_bench.main([*argv, "--no_memory", "--output", str(output)])
    assert json.loads(output.read_text())["methods"].keys() == set(sft_bench.METHODS)
    # Every method timed in every round (the naive loop in its first only), ratios to the training step per round.
    seconds = result["raw"]["seconds"]
    assert {len(seconds[m]) for m in sft_bench.METHODS if m != "naive"} == {2}
    assert [t is None for t in seconds["naive"]] == [False, True]
    assert result["methods"]["grand"]["ratio"]["n"] == 2 and result["methods"]["naive"]["ratio"]["n"] == 1
    # The exact norms agree with the bench's own batch-size-1 autograd loop, and are not all zero (B was trained).
    assert result["max_rel_diff_to_naive"] < 1e-4
    assert min(result["raw"]["grand_norms"]) > 0
    # Two rounds give numbers, never a verdict.
    assert result["busy"] is not None
    assert {result["methods"][m]["verdict"] for m in ("grand", "scores")} <= {
        "too few rounds: no verdict",
        "machine busy: no verdict",
    }
    assert len(result["rows"]) == 3
    # The peak-memory measurement (run here in-process): the high-water mark of one call, model and batch included.
    memory = sft_bench.memory_of(sft_bench.parse_args(argv), "grand")
    assert memory["how"] == "VmHWM after clear_refs"
    assert memory["peak_rss_mb"] >= memory["rss_before_mb"] > 0


def test_sft_precision_compares_both_float32_norms_with_a_float64_loop(sft_bench, tmp_path, one_thread, monkeypatch):
    from conftest import ALPACA, require_shared_data

    require_shared_data(ALPACA)
    monkeypatch.setattr(sft_bench, "ALPACA", ALPACA)
    monkeypatch.setitem(sys.modules, "sft", sft_bench)  # the module sft_precision imports, ALPACA set
    spec = importlib.util.spec_from_file_location("sft_precision", BENCH / "sft_precision.py")
    precision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(precision)
    output = tmp_path / "precision.json"
    result = precision.main(["--model", "tiny", "--batch_size", "3", "--max_length", "48", "--output", str(output)])
    diffs = json.loads(output.read_text())["max_rel_diff"]
    assert diffs == result["max_rel_diff"] and len(diffs) == 4
    assert diffs["exact norms (float64) vs reference"] < 1e-6  # the same quantity, both in float64
    assert diffs["exact norms (float32) vs reference"] < 1e-4


def test_sft_bench_verdicts_per_goal(sft_bench):
    timing = {"seconds": {"train": [1.0] * 9, "grand": [0.9] * 9, "scores": [0.5] * 9}}
    memory = {"train": {"peak_rss_mb": 1000.0}, "grand": {"peak_rss_mb": 1100.0}, "scores": {"peak_rss_mb": 900.0}}
    quiet = sft_bench.summarise(timing, memory, load_before=0.2, load_after=2.1, threads=2, rounds=9)
    assert quiet["methods"]["grand"]["verdict"] == "goal met"  # 0.9 <= 1.0
    assert quiet["methods"]["scores"]["verdict"] == "goal missed"  # 0.5 > 0.4
    assert (quiet["methods"]["grand"]["extra_mb"], quiet["methods"]["scores"]["extra_mb"]) == (100.0, -100.0)
    busy = sft_bench.summarise(timing, memory, load_before=7.0, load_after=7.5, threads=2, rounds=9)
    assert {busy["methods"][m]["verdict"] for m in ("grand", "scores")} == {"machine busy: no verdict"}
    few = sft_bench.summarise(timing, memory, load_before=0.2, load_after=2.1, threads=2, rounds=3)
    assert few["methods"]["grand"]["verdict"] == "too few rounds: no verdict"


def test_sft_bench_bare_forward_is_the_body_alone(sft_bench, monkeypatch, one_thread):
    """The `forward` floor runs the decoder stack on the whole batch and stops before the output head: its hidden
    states are those the full model feeds its head (an independent `output_hidden_states` forward)."""
    from conftest import ALPACA, require_shared_data

    require_shared_data(ALPACA)
    monkeypatch.setattr(sft_bench, "ALPACA", ALPACA)
    args = sft_bench.parse_args(["--model", "tiny", "--batch_size", "2", "--max_length", "32"])
    state = sft_bench.build(args)
    hidden = sft_bench.run_forward(state)
    batch = state["task"].model_inputs(state["batch"])
    with torch.no_grad():
        reference = state["model"](**batch, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (2, 32, reference.shape[-1])
    torch.testing.assert_close(hidden, reference)
    # The ifd floor: the same body on the batch, then on the responses alone (their trained tokens, as ifd scores them).
    on_batch, on_responses = sft_bench.run_ifd_floor(state)
    torch.testing.assert_close(on_batch, reference)
    trained = [int((row[1:] != -100).sum()) for row in state["batch"]["labels"]]
    assert on_responses.shape[0] == 2 and on_responses.shape[1] >= max(trained)
