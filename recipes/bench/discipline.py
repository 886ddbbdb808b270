"""Timing discipline shared by the speed benchmarks (`grand.py`, `el2n.py`, `sft.py`): alternate the things compared in
one process, report the spread over rounds (not one number), record the machine's load and thread count, and refuse a
verdict when the machine was busy. Also the Markdown tables every benchmark prints (`markdown_table`, and the cells of
a speed table's row, `table_row`).

A verdict is refused when the 1-minute load average before the run, or after it less the benchmark's own threads
(which kept that many cores busy for the whole last minute), is above the number of cores: the other processes then
held cores the benchmark needed, and the ratios say more about them than about the code.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

BUSY = "machine busy: no verdict"


def cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def spread(values: list[float]) -> dict:
    """min / median / max of a list of measurements, with their count."""
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


def machine_busy(load_before: float, load_after: float, num_cores: int, own_threads: int) -> str | None:
    """Why the machine was too busy for a verdict, or None when it was quiet enough (see the module docstring)."""
    if load_before > num_cores:
        return f"load average {load_before:.2f} before the run is above the {num_cores} cores"
    others_after = load_after - own_threads
    if others_after > num_cores:
        return (
            f"load average {load_after:.2f} after the run, less the benchmark's {own_threads} threads, is above the "
            f"{num_cores} cores"
        )
    return None


def verdict(met: bool, busy: str | None) -> str:
    """The verdict text of one goal: met / missed, or refused on a busy machine."""
    if busy is not None:
        return BUSY
    return "goal met" if met else "goal missed"


def alternate(runners: dict[str, Callable[[], object]], rounds: int, skip: Callable[[str, int], bool] | None = None):
    """Run each of `runners` once per round, alternating their order (forward in even rounds, backward in odd ones,
    so that a drift in the machine's load hits every runner alike); returns each runner's seconds per round (None
    where skipped) and the load average sampled before every round."""
    times: dict[str, list[float | None]] = {name: [] for name in runners}
    loads = []
    names = list(runners)
    for round_ in range(rounds):
        loads.append(load_average())
        for name in names if round_ % 2 == 0 else names[::-1]:
            if skip is not None and skip(name, round_):
                times[name].append(None)
                continue
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times, loads


def round_ratios(numerator: list[float | None], denominator: list[float | None]) -> list[float]:
    """Per-round ratios of two alternated runners (rounds where either was skipped are left out)."""
    return [n / d for n, d in zip(numerator, denominator) if n is not None and d is not None]


def method_entries(seconds: dict[str, list[float | None]], memory: dict[str, dict], baseline: str) -> dict[str, dict]:
    """Per method: the spread of its seconds, of its per-round ratio to `baseline` (not for the baseline itself), its
    peak resident memory (`memory[method]["peak_rss_mb"]`, when measured) and the extra over the baseline's."""
    base_mb = memory.get(baseline, {}).get("peak_rss_mb")
    entries = {}
    for method, values in seconds.items():
        entry = {"seconds": spread([v for v in values if v is not None])}
        if method != baseline:
            entry["ratio"] = spread(round_ratios(values, seconds[baseline]))
        peak = memory.get(method, {}).get("peak_rss_mb")
        entry["peak_rss_mb"] = peak
        entry["extra_mb"] = peak - base_mb if peak is not None and base_mb is not None else None
        entries[method] = entry
    return entries


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def spread_cells(values: dict, digits: int, suffix: str = "") -> list[str]:
    """The min / median / max cells of a `spread` ("n/a" where a value is missing)."""
    return [fmt(values.get(key), digits, suffix) for key in ("min", "median", "max")]


def table_row(
    label: str, entry: dict, result: dict, *, peak_rss: bool = True, extra: list[str] = (), verdict: str = ""
) -> list:
    """One method's row of a speed table: its label, threads, rounds, median seconds, the spread of its per-round
    ratio to the baseline, its peak resident memory (unless `peak_rss=False`) and the extra over the baseline's, the
    `extra` cells, the load average before -> after and the verdict. `entry` is one of `method_entries`; `result`
    holds `threads`, `load_before` and `load_after`."""
    return [
        label,
        result["threads"],
        entry["seconds"]["n"],
        fmt(entry["seconds"]["median"], 3),
        *spread_cells(entry.get("ratio", {}), 2, "×"),
        *([fmt(entry["peak_rss_mb"], 0)] if peak_rss else []),
        fmt(entry["extra_mb"], 0),
        *extra,
        f"{result['load_before']:.2f} → {result['load_after']:.2f}",
        verdict,
    ]
