"""Dynamic pruning (InfoBatch, Qin et al. 2024) with `DataDietTrainer` on real CIFAR-10: training wall time and test
accuracy, full data against dynamic pruning, several seeds.

CPU budget (2 cores, no GPU): the first 10,000 rows of the CIFAR-10 training split (about 1,000 per class), the
full 10,000-image test split, and the small CIFAR net of MEASURED.md (3x3 stem of 24 channels, then three
conv-maxpool-BN-GELU-conv-BN-GELU blocks of widths 32/128/128, global max-pool, linear; 0.4M parameters), trained
16 epochs at batch 256: SGD with Nesterov momentum, peak learning rate 0.1, linear warm-up over the first 20% of the
steps then linear decay to 0 (a one-cycle schedule), weight decay 5e-4, label smoothing 0.2, random crop (pad 4,
reflect) and horizontal flip; tested with flip test-time augmentation. Dynamic pruning: InfoBatch's defaults, skip
with probability 0.5 each example whose last training loss is below the mean, rescale the kept easy ones by 2, and
train the last 12.5% of the epochs on the full data. torch uses its default threads (both cores). Runs alternate
full / dynamic for each seed so that load from other processes on the machine hits both alike. About 3 minutes per
full run on an idle machine.

Run from the repository root (`nice` because the cores are shared):

    nice -n 10 .venv/bin/python recipes/bench/dynamic.py --output outputs/bench/dynamic.json

Writes one JSON record per run (mode, seed, training wall time, test accuracy, fraction of example presentations
skipped) and a summary (mean wall-time saving and accuracy change) to `--output`, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("DATADIET_SHARED_DATA", REPO.parent / "shared" / "data")) / "cifar10"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def load_split(split: str, rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a CIFAR-10 split once into normalised float tensors `[N, 3, 32, 32]` and labels `[N]`."""
    from datasets import load_dataset

    path = DATA / f"{split}-00000-of-00001.parquet"
    if not path.exists():
        raise SystemExit(f"{path} is absent: this benchmark needs the shared CIFAR-10 parquet files.")
    dataset = load_dataset("parquet", data_files={split: str(path)}, split=split)
    if rows is not None:
        dataset = dataset.select(range(min(rows, len(dataset))))
    images = np.stack([np.asarray(image.convert("RGB")) for image in dataset["img"]])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return ((x - MEAN) / STD).contiguous(), torch.as_tensor(np.asarray(dataset["label"]), dtype=torch.long)


class AugmentedCifar(torch.utils.data.Dataset):
    """Random crop (pad 4, reflect) and horizontal flip, applied to a whole batch of rows at once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.padded = nn.functional.pad(images, (4, 4, 4, 4), mode="reflect")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        index = torch.as_tensor(indices)
        offsets = torch.randint(0, 9, (len(index), 2))
        flips = torch.rand(len(index)) < 0.5
        items = []
        for row, (dy, dx), flip in zip(index.tolist(), offsets.tolist(), flips.tolist()):
            image = self.padded[row, :, dy : dy + 32, dx : dx + 32]
            items.append({"pixel_values": image.flip(-1) if flip else image, "labels": self.labels[row]})
        return items


def cifar_net(num_classes: int = 10) -> nn.Module:
    """The small CIFAR net of MEASURED.md."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(cout),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.GELU(),
        ]

    return nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1, bias=False),
        nn.BatchNorm2d(24),
        nn.GELU(),
        *block(24, 32),
        *block(32, 128),
        *block(128, 128),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes, bias=False),
    )


@torch.no_grad()
def test_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy with flip test-time augmentation (mean of the logits of the image and its mirror)."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), 1000):
        x = images[start : start + 1000]
        logits = model(x) + model(x.flip(-1))
        correct += int((logits.argmax(dim=-1) == labels[start : start + 1000]).sum())
    return correct / len(labels)


def run(mode: str, seed: int, train: AugmentedCifar, test: tuple, args: argparse.Namespace) -> dict:
    from transformers.trainer_callback import PrinterCallback

    from datadiet.models import ClassifierWrapper
    from datadiet.trainer import DataDietConfig, DataDietTrainer

    torch.manual_seed(seed)
    model = cifar_net()
    steps = args.epochs * -(-len(train) // args.batch_size)
    config = DataDietConfig(
        output_dir=str(Path(args.output).parent / f"dynamic-{mode}-{seed}"),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=5e-4,
        lr_scheduler_type="linear",
        warmup_steps=int(0.2 * steps),
        label_smoothing_factor=0.2,
        max_grad_norm=0.0,
        seed=seed,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        report_to=[],
        dataloader_pin_memory=False,
        track_scores=["loss"],
        dynamic_pruning=mode == "dynamic",
        dynamic_pruning_ratio=args.ratio,
        dynamic_pruning_until=args.until,
    )
    trainer = DataDietTrainer(
        ClassifierWrapper(model),
        config,
        train_dataset=train,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    )
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    accuracy = test_accuracy(model, *test)
    skipped = [entry["skipped_fraction"] for entry in trainer.pruning_history]
    return {
        "mode": mode,
        "seed": seed,
        "train_wall_time_s": round(wall, 1),
        "test_accuracy": round(100 * accuracy, 2),
        "optimizer_steps": trainer.state.global_step,
        "skipped_fraction": round(float(np.mean(skipped)) if skipped else 0.0, 4),
        "skipped_per_epoch": [round(value, 3) for value in skipped],
    }


def summarise(records: list[dict]) -> dict:
    by_seed = {}
    for record in records:
        by_seed.setdefault(record["seed"], {})[record["mode"]] = record
    pairs = [runs for runs in by_seed.values() if {"full", "dynamic"} <= set(runs)]
    saving = [1 - runs["dynamic"]["train_wall_time_s"] / runs["full"]["train_wall_time_s"] for runs in pairs]
    change = [runs["dynamic"]["test_accuracy"] - runs["full"]["test_accuracy"] for runs in pairs]
    return {
        "seeds": len(pairs),
        "wall_time_saved_percent": round(100 * float(np.mean(saving)), 1) if pairs else None,
        "accuracy_change_points": round(float(np.mean(change)), 2) if pairs else None,
        "full_accuracy_mean": round(float(np.mean([r["full"]["test_accuracy"] for r in pairs])), 2) if pairs else None,
        "dynamic_accuracy_mean": round(float(np.mean([r["dynamic"]["test_accuracy"] for r in pairs])), 2)
        if pairs
        else None,
        "presentations_skipped_percent": round(100 * float(np.mean([r["dynamic"]["skipped_fraction"] for r in pairs])), 1)
        if pairs
        else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="training rows (the first N of the train split)")
    parser.add_argument("--test-rows", type=int, default=None, help="test rows (default: all 10,000)")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--ratio", type=float, default=0.5, help="InfoBatch pruning probability of easy examples")
    parser.add_argument("--until", type=float, default=0.875, help="fraction of epochs with pruning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["full", "dynamic"], choices=["full", "dynamic"])
    parser.add_argument("--output", default="outputs/bench/dynamic.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    train = AugmentedCifar(*load_split("train", args.rows))
    test = load_split("test", args.test_rows)
    records = []
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for mode in args.modes:
            record = run(mode, seed, train, test, args)
            records.append(record)
            print(json.dumps(record), flush=True)
            result = {"config": vars(args), "runs": records, "summary": summarise(records)}
            output.write_text(json.dumps(result, indent=2))
    print("\n| mode | seed | train wall time (s) | test accuracy (%) | presentations skipped |")
    print("|---|---|---|---|---|")
    for record in records:
        print(
            f"| {record['mode']} | {record['seed']} | {record['train_wall_time_s']} | {record['test_accuracy']} | "
            f"{100 * record['skipped_fraction']:.1f}% |"
        )
    print("\nsummary:", json.dumps(result["summary"]))
    return result


if __name__ == "__main__":
    main()
