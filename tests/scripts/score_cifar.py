"""Scores a saved dataset with a saved timm model through `datadiet.score_dataset`; `tests/test_distributed.py`
launches it under `accelerate launch` with several processes (and with one) and compares what it writes."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="a folder written by Dataset.save_to_disk")
    parser.add_argument("--weights", required=True, help="safetensors weights of timm test_resnet")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["el2n"])
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--result", required=True, help="Parquet file the main process writes the scores to")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--save_every", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds slept per forward pass (kill tests)")
    parser.add_argument("--streaming", action="store_true", help="score the dataset as an IterableDataset")
    parser.add_argument(
        "--init_accelerator_first",
        action="store_true",
        help="create accelerate.Accelerator() (no cpu=True) before scoring, as a user script might",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on two cores

    if args.init_accelerator_first:
        from accelerate import Accelerator

        Accelerator()

    import timm
    from datasets import load_from_disk
    from safetensors.torch import load_model

    from datadiet import score_dataset

    model = timm.create_model("test_resnet", pretrained=False, num_classes=args.num_classes)
    load_model(model, args.weights)
    if args.delay:
        # Slow every forward pass down so that a test can kill the run between two shard writes.
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(args.delay))
    dataset = load_from_disk(args.data)
    if args.streaming:
        dataset = dataset.to_iterable_dataset(num_shards=4)
    scored = score_dataset(
        dataset,
        model,
        args.methods,
        batch_size=args.batch_size,
        output_dir=args.output_dir,
        save_every=args.save_every,
        **({"row_id_column": "row_id"} if args.streaming else {}),
    )
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        columns = ["row_id", *args.methods] if "row_id" in scored.column_names else args.methods
        tmp = args.result + ".tmp"
        scored.select_columns(columns).to_parquet(tmp)
        os.replace(tmp, args.result)
        with open(args.result + ".json", "w") as f:
            json.dump({"num_processes": state.num_processes}, f)


if __name__ == "__main__":
    main()
