"""Scale benchmark of streaming scoring: 1,000,000 synthetic rows (an 8x8 "image" of 64 floats, a label, a stored
row id) in Parquet files, streamed with `load_dataset(..., streaming=True)` and scored with EL2N by a tiny MLP
through `datadiet.score_dataset`, which writes Parquet shards keyed by row id.

Reports the peak resident memory (RSS) of one process at 100k and at 1M rows, each in a fresh subprocess (goal: at
most 1.2x growth, i.e. memory independent of the number of rows), and rows/s with 1 and with 2 processes (a real
`accelerate launch` of two CPU processes). Every run checks that each row was scored exactly once.

    python recipes/bench/scale.py                       # 100k and 1M rows, 1 and 2 processes (a few minutes)
    python recipes/bench/scale.py --rows 20000 200000   # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEATURES_DIM = 64
NUM_CLASSES = 10
BLOCK = 10_000  # rows generated per block (one numpy draw), and per stream shard


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_rows(folder: Path, rows: int) -> list[str]:
    """Write `rows` synthetic rows as Parquet files of BLOCK rows each; returns the files in row order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for start in range(0, rows, BLOCK):
        row_ids = np.arange(start, min(start + BLOCK, rows), dtype=np.int64)
        pixels = np.random.default_rng(start).standard_normal((len(row_ids), FEATURES_DIM), dtype=np.float32)
        table = pa.table(
            {
                "row_id": row_ids,
                "x": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), FEATURES_DIM),
                "label": (row_ids * 7) % NUM_CLASSES,
            }
        )
        path = folder / f"part-{start // BLOCK:05d}.parquet"
        pq.write_table(table, path)
        files.append(str(path))
    return files


def worker(rows: int, data_dir: str, output_dir: str, batch_size: int, methods: list[str]) -> None:
    """Score the first `rows` rows of `data_dir` as a stream and print one JSON line of measurements (per process)."""
    import numpy as np
    import torch
    from datasets import load_dataset
    from torch import nn

    from datadiet.engine import get_process_state, score_dataset

    torch.set_num_threads(1)  # one thread per process: 1 and 2 processes compare on the same footing
    state = get_process_state()
    files = sorted(str(path) for path in Path(data_dir).glob("*.parquet"))[: -(-rows // BLOCK)]
    # One stream shard per file, so that each process reads only its own files.
    stream = load_dataset("parquet", data_files=files, split="train", streaming=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES_DIM, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))
    baseline = _peak_rss_mb()
    state.wait_for_everyone()
    start, cpu_start = time.perf_counter(), time.process_time()
    scores = score_dataset(
        stream,
        model,
        methods,
        image_column="x",
        row_id_column="row_id",
        batch_size=batch_size,
        output_dir=output_dir,
        save_every=10,
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    ids = scores.with_format("arrow")[:]["row_id"].to_numpy()
    if len(ids) != rows or not np.array_equal(ids, np.arange(rows)):
        raise RuntimeError(f"expected every one of {rows} rows scored once, got {len(ids)} scores")
    print(
        "RESULT "
        + json.dumps(
            {
                "rows": rows,
                "process": state.process_index,
                "num_processes": state.num_processes,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "rss_before_scoring_mb": baseline,
                "peak_rss_mb": _peak_rss_mb(),
            }
        ),
        flush=True,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(rows: int, num_processes: int, args: argparse.Namespace, scratch: Path) -> list[dict]:
    output_dir = scratch / f"rows{rows}-proc{num_processes}"
    shutil.rmtree(output_dir, ignore_errors=True)
    worker_args = [__file__, "--worker", "--rows", str(rows), "--output_dir", str(output_dir)]
    worker_args += ["--data_dir", str(scratch / "data")]
    worker_args += ["--batch_size", str(args.batch_size), "--methods", *args.methods]
    if num_processes == 1:
        command = [sys.executable, *worker_args]
    else:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
        command += worker_args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    results = [json.loads(line[len("RESULT ") :]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    print(f"  {rows:>9,} rows, {num_processes} process(es): {time.perf_counter() - started:.0f} s wall", flush=True)
    shutil.rmtree(output_dir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", default=["el2n"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts timed at most rows")
    parser.add_argument("--json", default="outputs/bench/scale.json", help="where the measurements are saved")
    args = parser.parse_args()
    if args.worker:
        worker(args.rows[0], args.data_dir, args.output_dir, args.batch_size, args.methods)
        return

    scratch = Path(tempfile.mkdtemp(prefix="datadiet-scale-"))
    try:
        started = time.perf_counter()
        write_rows(scratch / "data", max(args.rows))
        print(f"  wrote {max(args.rows):,} rows of Parquet in {time.perf_counter() - started:.0f} s", flush=True)
        memory = {rows: _run(rows, 1, args, scratch)[0] for rows in args.rows}
        largest = max(args.rows)
        speed = {1: [memory[largest]]}
        for num_processes in args.processes:
            if num_processes > 1:
                speed[num_processes] = _run(largest, num_processes, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    smallest = min(args.rows)
    growth = memory[largest]["peak_rss_mb"] / memory[smallest]["peak_rss_mb"]
    print(f"\nStreaming scoring ({'+'.join(args.methods)}, tiny MLP, batch {args.batch_size}, 1 thread per process)")
    print("| rows | processes | peak RSS per process (MB) | RSS before scoring (MB) | seconds | rows/s | rows/CPU-s |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for rows, result in sorted(memory.items()):
        table.append((rows, 1, [result]))
    for num_processes, results in sorted(speed.items()):
        if num_processes > 1:
            table.append((largest, num_processes, results))
    summary = []
    for rows, num_processes, results in table:
        seconds = max(result["seconds"] for result in results)
        peak = max(result["peak_rss_mb"] for result in results)
        before = max(result["rss_before_scoring_mb"] for result in results)
        # Rows per CPU-second of the scoring processes: what rows/s would be with a core each to themselves; unlike
        # rows/s it does not depend on what else runs on the machine.
        per_cpu = rows / sum(result["cpu_seconds"] for result in results)
        print(
            f"| {rows:,} | {num_processes} | {peak:.0f} | {before:.0f} | {seconds:.1f} | {rows / seconds:,.0f} "
            f"| {per_cpu:,.0f} |"
        )
        summary.append(
            {
                "rows": rows,
                "processes": num_processes,
                "peak_rss_mb": peak,
                "seconds": seconds,
                "rows_per_s": rows / seconds,
                "rows_per_cpu_s": per_cpu,
            }
        )
    goal = "met" if growth <= 1.2 else "NOT met"
    print(f"\nPeak RSS growth from {smallest:,} to {largest:,} rows: {growth:.3f}x (goal <= 1.2x: {goal})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": summary, "rss_growth": growth}, indent=2))


if __name__ == "__main__":
    main()
