"""Benchmark: `datadiet.prune` on 1,000,000 rows, for every strategy (goal: under 1 s each).

python recipes/bench/prune.py [--rows 1000000]
"""

import argparse
import time

import numpy as np
from datasets import Dataset

from datadiet import prune


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dataset = Dataset.from_dict(
        {"el2n": rng.random(args.rows, dtype=np.float32), "label": rng.integers(0, 10, args.rows)}
    )
    print(f"prune on {args.rows:,} rows (keep 50%), seconds (best of 3)")
    for strategy, kwargs in [
        ("hardest", {}),
        ("easiest", {}),
        ("random", {}),
        ("window", {"offset": 0.1}),
        ("stratified", {"hard_cutoff": 0.05}),
        ("hardest", {"class_balanced": True}),
    ]:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            pruned = prune(dataset, "el2n", 0.5, strategy=strategy, **kwargs)
            times.append(time.perf_counter() - start)
        assert len(pruned) == args.rows // 2
        name = strategy + (" (class_balanced)" if kwargs.get("class_balanced") else "")
        print(f"  {name:<28} {min(times):6.3f} s  {'OK' if min(times) < 1 else 'OVER 1 s'}")


if __name__ == "__main__":
    main()
