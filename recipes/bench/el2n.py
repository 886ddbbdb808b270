"""Benchmark: EL2N scoring throughput of `score_dataset` on real CIFAR-10 images (decode and transform included),
against the bound set by its parts measured in the same run:

    bound rows/s = 1 / (decode+transform seconds per row + pure-inference seconds per row on pre-decoded tensors)

at the same batch size. Goal: ratio = score_dataset rows/s / bound ≥ 0.9.

    python recipes/bench/el2n.py [--rows 5000] [--model resnet18] [--batch-size 128]
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import timm
import torch
from datasets import load_dataset

from datadiet import score_dataset
from datadiet.data import Preprocessor, build_image_transform, detect_columns
from datadiet.scores import el2n

DATA = Path(os.environ.get("DATADIET_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dataset = load_dataset(
        "parquet", data_files={"train": str(DATA / "cifar10/train-00000-of-00001.parquet")}, split="train"
    ).select(range(args.rows))
    transform = build_image_transform(mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])
    model = timm.create_model(args.model, num_classes=10).eval()
    input_column, kind, label_column = detect_columns(dataset)
    preprocessor = Preprocessor(transform, input_column=input_column, kind=kind, label_column=label_column)
    source = dataset.select_columns(preprocessor.columns).with_format(None)
    bs = args.batch_size

    def decode_and_transform():
        return [preprocessor(source[i : i + bs]) for i in range(0, len(source), bs)]

    def inference(batches):
        with torch.no_grad():
            for inputs, labels in batches:
                el2n(model(inputs), labels)

    def scoring():
        score_dataset(dataset, model, "el2n", transform=transform, batch_size=bs)

    parts, inference_times, totals = [], [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits every part alike
        start = time.perf_counter()
        batches = decode_and_transform()
        parts.append(time.perf_counter() - start)
        start = time.perf_counter()
        inference(batches)
        inference_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        scoring()
        totals.append(time.perf_counter() - start)
    decode, infer, total = (statistics.median(t) for t in (parts, inference_times, totals))
    bound = args.rows / (decode + infer)
    achieved = args.rows / total
    print(
        f"EL2N scoring, {args.model}, {args.rows} CIFAR-10 rows, batch {bs}, {torch.get_num_threads()} threads "
        f"(median of {args.repeats})"
    )
    print(f"  decode+transform   {decode:7.2f} s  ({args.rows / decode:8.0f} rows/s)")
    print(f"  pure inference     {infer:7.2f} s  ({args.rows / infer:8.0f} rows/s)")
    print(f"  bound              {decode + infer:7.2f} s  ({bound:8.0f} rows/s)")
    print(f"  score_dataset      {total:7.2f} s  ({achieved:8.0f} rows/s)")
    print(f"  ratio to bound     {achieved / bound:.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
