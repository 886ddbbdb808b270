"""EL2N scoring throughput of `score_dataset` on real CIFAR-10 images (decode and transform included), against the
bound set by its parts measured in the same process:

    sum-of-parts bound rows/s = 1 / (decode+transform seconds per row + pure-inference seconds per row)

(pure inference: the model and `el2n` on tensors decoded beforehand), at the same batch size. `score_dataset`
decodes the next batches in a background thread while the model scores the current one, so it may pass that
bound; the bench also times the same parts overlapped by hand (decoding in a thread, inference in this one) and
the perfect-overlap bound 1 / max(decode, inference). Goal of issue #19: score_dataset >= 0.95x the sum-of-parts
bound on CIFAR-10, resnet18, batch 128.

Discipline (see `discipline.py`): the four measurements alternate over `--rounds` rounds (order reversed every other
round); each round gives its own ratio of score_dataset to the bound, reported as min / median / max; the torch
thread count and the load average before and after are recorded, and no verdict is printed when the load was above
the number of cores ("machine busy: no verdict").

Run from the repository root, on a quiet machine:

    python recipes/bench/el2n.py --rows 3000 --output outputs/bench/el2n.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import discipline  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402

from datadiet import score_dataset  # noqa: E402
from datadiet.data import Preprocessor, build_image_transform, detect_columns  # noqa: E402
from datadiet.scores import el2n  # noqa: E402

DATA = Path(os.environ.get("DATADIET_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
GOAL = 0.95


PARTS = ["decode+transform", "pure inference", "sum-of-parts bound", "perfect-overlap bound", "overlapped by hand",
         "score_dataset"]  # fmt: skip
HEADERS = ["part", "rows/s min", "rows/s median", "rows/s max", "× bound min", "× bound median", "× bound max"]


def table_rows(result: dict) -> list[list[str]]:
    """Per part: the spread of its rows/s and, for the two scoring paths, of their ratio to the sum-of-parts bound."""
    to_bound = {"score_dataset": result["score_dataset_to_bound"],
                "overlapped by hand": result["overlapped_by_hand_to_bound"]}  # fmt: skip
    return [
        [
            name,
            *discipline.spread_cells(result["rows_per_s"][name], 0),
            *discipline.spread_cells(to_bound.get(name, {}), 3),
        ]
        for name in PARTS
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.rounds < 9:
        parser.error(f"--rounds {args.rounds}: at least 9 rounds are needed for a spread worth reporting.")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = discipline.load_average()
    dataset = load_dataset(
        "parquet", data_files={"train": str(DATA / "cifar10/train-00000-of-00001.parquet")}, split="train"
    ).select(range(args.rows))
    transform = build_image_transform(mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])
    model = timm.create_model(args.model, num_classes=10).eval()
    input_column, kind, label_column = detect_columns(dataset)
    preprocessor = Preprocessor(transform, input_column=input_column, kind=kind, label_column=label_column)
    source = dataset.select_columns(preprocessor.columns).with_format(None)
    bs = args.batch_size
    starts = range(0, len(source), bs)
    decoded = [preprocessor(source[start : start + bs]) for start in starts]  # for pure inference

    def decode_and_transform():
        for start in starts:
            preprocessor(source[start : start + bs])

    def score(inputs, labels):
        with torch.no_grad():
            return el2n(model(inputs), labels)

    def inference():
        for inputs, labels in decoded:
            score(inputs, labels)

    def overlapped_by_hand():
        # Decoding one batch ahead in a thread, inference here: what the parts give when overlapped.
        slots = [None] * len(starts)
        done = [threading.Event() for _ in starts]

        def produce():
            for i, start in enumerate(starts):
                slots[i] = preprocessor(source[start : start + bs])
                done[i].set()

        thread = threading.Thread(target=produce)
        thread.start()
        for i in range(len(starts)):
            done[i].wait()
            score(*slots[i])
            slots[i] = None
        thread.join()

    def scoring():
        score_dataset(dataset, model, "el2n", transform=transform, batch_size=bs)

    runners = {
        "decode+transform": decode_and_transform,
        "pure inference": inference,
        "overlapped by hand": overlapped_by_hand,
        "score_dataset": scoring,
    }
    for run in runners.values():  # warm-up
        run()
    times, loads = discipline.alternate(runners, args.rounds)
    load_after = discipline.load_average()
    threads = torch.get_num_threads()
    sums = [d + i for d, i in zip(times["decode+transform"], times["pure inference"])]
    perfect = [max(d, i) for d, i in zip(times["decode+transform"], times["pure inference"])]
    to_bound = discipline.round_ratios(
        sums, times["score_dataset"]
    )  # (rows/s of score_dataset) / (rows/s of the bound)
    hand_to_bound = discipline.round_ratios(sums, times["overlapped by hand"])
    busy = discipline.machine_busy(load_before, load_after, discipline.cores(), threads)
    rate = {name: discipline.spread([args.rows / t for t in values]) for name, values in times.items()}
    rate["sum-of-parts bound"] = discipline.spread([args.rows / t for t in sums])
    rate["perfect-overlap bound"] = discipline.spread([args.rows / t for t in perfect])
    ratio = discipline.spread(to_bound)
    result = {
        "model": args.model,
        "rows": args.rows,
        "batch_size": bs,
        "threads": threads,
        "cores": discipline.cores(),
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": load_after,
        "load_per_round": loads,
        "busy": busy,
        "seconds": times,
        "rows_per_s": rate,
        "score_dataset_to_bound": ratio,
        "overlapped_by_hand_to_bound": discipline.spread(hand_to_bound),
        "verdict": discipline.verdict(ratio["median"] >= GOAL, busy),
    }
    print(
        f"EL2N scoring, {args.model}, {args.rows} CIFAR-10 rows, batch {bs}, torch {torch.__version__}, {threads} "
        f"threads, {discipline.cores()} cores, {args.rounds} alternated rounds, load {load_before:.2f} → {load_after:.2f}\n"
    )
    print(discipline.markdown_table(HEADERS, table_rows(result)))
    print(
        f"\nscore_dataset / sum-of-parts bound, median {discipline.fmt(ratio['median'], 3)} (goal >= {GOAL}): {result['verdict']}"
    )
    if busy:
        print(busy)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
