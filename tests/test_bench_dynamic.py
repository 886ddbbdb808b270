"""The dynamic-pruning benchmark's bookkeeping: a stopped run resumes, outputs of other settings are refused, and
outputs of parallel processes (one per seed) merge into one summary. (The training itself is the benchmark.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "recipes" / "bench" / "dynamic.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dynamic_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETTINGS = {
    "rows": 5000,
    "test_rows": None,
    "epochs": 90,
    "batch_size": 128,
    "lr": 0.1,
    "widths": [16, 32, 64, 64],
    "label_smoothing": 0.2,
    "until": 0.875,
    "threads": 1,
}


def _record(seed, ratio, wall, accuracy, skipped=0.0):
    return {
        "mode": "full" if ratio == 0 else f"dynamic-{ratio}",
        "seed": seed,
        "ratio": ratio,
        "train_wall_time_s": wall,
        "train_cpu_time_s": wall,
        "test_accuracy": accuracy,
        "skipped_fraction": skipped,
    }


def _write(path, runs, **changes):
    path.write_text(json.dumps({"config": {**SETTINGS, **changes, "seeds": [0]}, "runs": runs}))
    return path


def test_parallel_outputs_merge_into_one_paired_summary(bench, tmp_path, capsys):
    first = _write(tmp_path / "seed0.json", [_record(0, 0.0, 100.0, 60.0), _record(0, 0.7, 60.0, 59.0, 0.35)])
    second = _write(tmp_path / "seed1.json", [_record(1, 0.0, 200.0, 62.0), _record(1, 0.7, 140.0, 62.4, 0.33)])
    result = bench.main(["--combine", str(second), str(first), "--output", str(tmp_path / "all.json")])
    assert [(r["seed"], r["ratio"]) for r in result["runs"]] == [(0, 0.0), (0, 0.7), (1, 0.0), (1, 0.7)]
    summary = result["summary"]["dynamic-0.7"]
    assert summary["seeds"] == 2
    assert summary["wall_time_saved_percent"] == pytest.approx(100 * (0.4 + 0.3) / 2, abs=0.05)  # paired by seed
    assert summary["accuracy_change_points"] == pytest.approx((-1.0 + 0.4) / 2, abs=0.005)
    assert json.loads((tmp_path / "all.json").read_text())["config"]["seeds"] == [0, 1]
    assert "| dynamic-0.7 | 1 |" in capsys.readouterr().out


def test_outputs_of_other_settings_or_the_same_run_twice_are_refused(bench, tmp_path):
    first = _write(tmp_path / "a.json", [_record(0, 0.0, 100.0, 60.0)])
    other = _write(tmp_path / "b.json", [_record(1, 0.0, 100.0, 60.0)], epochs=30)
    with pytest.raises(SystemExit, match="other settings .*epochs"):
        bench.main(["--combine", str(first), str(other), "--output", str(tmp_path / "all.json")])
    with pytest.raises(SystemExit, match="more than one"):
        bench.main(["--combine", str(first), str(first), "--output", str(tmp_path / "all.json")])


def test_a_stopped_run_resumes_and_other_settings_are_refused(bench, tmp_path):
    import argparse

    output = _write(tmp_path / "out.json", [_record(0, 0.0, 100.0, 60.0)])
    same = argparse.Namespace(**SETTINGS)
    assert bench.resume(output, same) == [_record(0, 0.0, 100.0, 60.0)]
    with pytest.raises(SystemExit, match="other settings \\(rows\\)"):
        bench.resume(output, argparse.Namespace(**{**SETTINGS, "rows": 2500}))
    assert bench.resume(tmp_path / "absent.json", same) == []
