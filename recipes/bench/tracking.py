"""The cost of tracking: `DataDietTrainer` with its default tracking (every training example's scores recorded, each
batch checked against its rows) against a stock `transformers.Trainer` training the same model on the same rows, and
the row check alone (`RowCheck.rows`, per batch).

The worst case for the relative overhead is a model whose step costs little: by default a small MLP on scikit-learn's
digits (1,347 rows, flat 8x8 pixels, batch 32), where the per-batch bookkeeping is largest against the step; `--rows`
and `--epochs` change the load. Discipline (see `discipline.py`): the two trainers alternate over `--rounds` rounds,
the per-round ratio is reported as min / median / max, with the load average before and after; no verdict on a busy
machine.

Run from the repository root:

    python recipes/bench/tracking.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import discipline  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from datadiet.data import load_digits_dataset  # noqa: E402
from datadiet.models import ClassifierWrapper  # noqa: E402
from datadiet.trainer import DataDietConfig, DataDietTrainer  # noqa: E402
from datadiet.trainer.batch_indices import BatchIndexRecorder  # noqa: E402
from datadiet.trainer.row_check import RowCheck  # noqa: E402


def digits_rows(rows: int | None) -> Dataset:
    raw = load_digits_dataset()["train"]
    raw = raw.select(range(min(rows or len(raw), len(raw))))
    pixels = np.stack([np.asarray(image, dtype=np.float32).reshape(-1) / 255 for image in raw["image"]])
    return Dataset.from_dict({"pixel_values": pixels, "labels": raw["label"]}).with_format("torch")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return ClassifierWrapper(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)))


def settings(epochs: int, batch_size: int) -> dict:
    return dict(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=0.01,
        optim="sgd",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        report_to=[],
        logging_strategy="no",
        remove_unused_columns=False,
        seed=0,
    )


def check_seconds_per_batch(dataset: Dataset, batch_size: int, repeats: int = 2000) -> float:
    """`RowCheck.rows` alone on one recorded batch: the sampler pop, the labels gather and comparison."""
    labels = np.asarray(dataset.with_format("numpy")["labels"], dtype=np.int64)
    batch = list(range(batch_size))
    sampler = [batch] * repeats
    check = RowCheck(BatchIndexRecorder(sampler), labels, "labels", collator="default_data_collator")
    list(check.indices)
    batch_labels = torch.as_tensor(labels[batch])
    start = time.perf_counter()
    for _ in range(repeats):
        check.rows(batch_labels)
        check.end_batch()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    dataset = digits_rows(args.rows)

    def stock():
        trainer = Trainer(model(), TrainingArguments(**settings(args.epochs, args.batch_size)), train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)
        trainer.train()

    def tracked():
        config = DataDietConfig(**settings(args.epochs, args.batch_size))
        trainer = DataDietTrainer(model(), config, train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        assert np.isfinite(np.asarray(trainer.scores["forgetting"])).all()

    stock(), tracked()  # warm-up
    load_before = discipline.load_average()
    times, loads = discipline.alternate({"stock Trainer": stock, "DataDietTrainer": tracked}, args.rounds)
    load_after = discipline.load_average()
    ratios = discipline.round_ratios(times["DataDietTrainer"], times["stock Trainer"])
    busy = discipline.machine_busy(load_before, load_after, discipline.cores(), args.threads)
    per_batch = check_seconds_per_batch(dataset, args.batch_size)
    steps = args.epochs * -(-len(dataset) // args.batch_size)
    result = {
        "rows": len(dataset),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "seconds": {name: discipline.spread(values) for name, values in times.items()},
        "ratio_tracked_to_stock": discipline.spread(ratios),
        "row_check_microseconds_per_batch": per_batch * 1e6,
        "row_check_share_of_stock_median": per_batch * steps / discipline.spread(times["stock Trainer"])["median"],
        "load_average": {"before": load_before, "after": load_after, "rounds": loads},
        "busy": busy,
    }
    print(json.dumps(result, indent=2))
    if busy:
        print(discipline.BUSY + ": " + busy)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
