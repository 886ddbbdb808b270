"""Scores a saved dataset with a saved timm model through `datadiet.score_dataset`, as a user's script would;
`tests/test_distributed.py` launches it under `accelerate launch` with several processes and checks what it writes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="a folder written by Dataset.save_to_disk, with a row_id column")
    parser.add_argument("--rows", type=int, default=None, help="score only the first rows")
    parser.add_argument("--weights", required=True, help="safetensors weights of timm test_resnet")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["el2n"])
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--result", required=True, help="Parquet file the main process writes the scores to")
    parser.add_argument("--stream_output_dir", default=None, help="also score the data as a stream, into this folder")
    parser.add_argument("--stream_result", default=None, help="Parquet file for the streamed scores")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--save_every", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds slept per forward pass (kill tests)")
    parser.add_argument(
        "--init_accelerator_first",
        action="store_true",
        help="create accelerate.Accelerator() (without cpu=True) before scoring, as a user's script might",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(1)  # two processes on two cores
    # Tests find the workers through these files, e.g. to SIGKILL one of them mid-run.
    with open(f"{args.result}.rank{os.environ.get('RANK', '0')}.pid", "w") as f:
        f.write(str(os.getpid()))

    if args.init_accelerator_first:
        from accelerate import Accelerator

        Accelerator()

    import timm
    from accelerate import PartialState
    from datasets import load_from_disk
    from safetensors.torch import load_model

    from datadiet.engine import score_dataset

    model = timm.create_model("test_resnet", pretrained=False, num_classes=args.num_classes)
    load_model(model, args.weights)
    if args.delay:
        # Slow every forward pass down so that a test can kill the run between two shard writes.
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(args.delay))
    dataset = load_from_disk(args.data)
    if args.rows is not None:
        dataset = dataset.select(range(args.rows))
    common = {"batch_size": args.batch_size, "save_every": args.save_every}
    scored = score_dataset(dataset, model, args.methods, output_dir=args.output_dir, **common)
    results = [(scored.select_columns(["row_id", *args.methods]), args.result)]
    if args.stream_output_dir:
        # Four stream shards: two per process, so each process reads only its own rows.
        stream = dataset.to_iterable_dataset(num_shards=4)
        scores = score_dataset(
            stream, model, args.methods, output_dir=args.stream_output_dir, row_id_column="row_id", **common
        )
        results.append((scores, args.stream_result))

    state = PartialState()
    if state.is_main_process:
        for table, path in results:
            table.to_parquet(path + ".tmp")
            os.replace(path + ".tmp", path)
        with open(args.result + ".json", "w") as f:
            json.dump({"num_processes": state.num_processes}, f)
    state.destroy_process_group()  # end cleanly: no communication thread left running at exit


if __name__ == "__main__":
    main()
