"""Dynamic pruning (InfoBatch, Qin et al. 2024) with `DataDietTrainer` on real CIFAR-10: training wall time, CPU
time and test accuracy, full data against dynamic pruning, several seeds.

CPU budget (documented in docs/dynamic.md; the defaults reproduce it): the first 5,000 rows of the CIFAR-10 training
split (about 500 per class), the whole 10,000-image test split, and the small CIFAR net of MEASURED.md at reduced
width (3x3 stem of 16 channels, then three conv-maxpool-BN-GELU-conv-BN-GELU blocks of widths 32/64/64, global
max-pool, linear), channels-last, trained 30 epochs at batch 128: SGD with Nesterov momentum, peak learning rate
0.1, linear warm-up over the first 20% of the steps then linear decay to 0 (a one-cycle schedule), weight decay 5e-4,
label smoothing 0.2, random crop (pad 4, reflect) and horizontal flip; tested with flip test-time augmentation. One
torch thread per run (`--threads`). Training CPU time of the process is the robust measure of the compute saved:
wall time moves with whatever else runs on the machine.

Dynamic pruning: InfoBatch's rule, skip with probability `--ratios` (0.5 is InfoBatch's default) each example whose
last training loss is below the mean, rescale the kept easy ones by 1 / (1 - ratio), and train the last 12.5% of the
epochs on the full data; the learning-rate schedule follows epochs, so it ends on time. Runs alternate full /
dynamic for each seed so that load from other processes hits all modes alike; the fraction of example
presentations skipped does not depend on load at all.

Run from the repository root:

    .venv/bin/python recipes/bench/dynamic.py --output docs/bench/dynamic/dynamic.json

The defaults are the short 30-epoch budget, at which dynamic pruning still costs accuracy. The budget that meets the
goal (>= 30% of wall time saved at <= 0.3 pt lost) is 150 epochs, one process per seed and core, then `--combine`:

    .venv/bin/python recipes/bench/dynamic.py --epochs 150 --ratios 0.7 --seeds 0 --output docs/bench/dynamic/e150-seed0.json

Writes one JSON record per run and a summary per pruning ratio (mean wall-time and CPU-time saving, accuracy change)
to `--output`, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import discipline  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("DATADIET_SHARED_DATA", REPO.parent / "shared" / "data")) / "cifar10"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def load_split(split: str, rows: int | None, *, shuffle: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the first `rows` rows of a CIFAR-10 split (of a fixed shuffle when `shuffle`) once into normalised
    float tensors `[N, 3, 32, 32]` and labels `[N]`."""
    from datasets import load_dataset

    path = DATA / f"{split}-00000-of-00001.parquet"
    if not path.exists():
        raise SystemExit(f"{path} is absent: this benchmark needs the shared CIFAR-10 parquet files.")
    dataset = load_dataset("parquet", data_files={split: str(path)}, split=split)
    if shuffle:
        dataset = dataset.shuffle(seed=0)
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


def cifar_net(widths: tuple[int, int, int, int] = (24, 32, 128, 128), num_classes: int = 10) -> nn.Module:
    """The small CIFAR net of MEASURED.md (stem width, then the three block widths): `datadiet.nets.SmallConvNet`."""
    from datadiet.nets import SmallConvNet

    stem, *blocks = widths
    return SmallConvNet(num_classes=num_classes, stem_width=stem, widths=tuple(blocks))


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


def run(ratio: float, seed: int, train: AugmentedCifar, test: tuple, args: argparse.Namespace) -> dict:
    """Train one model (`ratio` 0: full data) and measure it."""
    from transformers.trainer_callback import PrinterCallback

    from datadiet.models import ClassifierWrapper
    from datadiet.trainer import DataDietConfig, DataDietTrainer

    mode = "full" if ratio == 0 else f"dynamic-{ratio}"
    torch.manual_seed(seed)
    # channels-last convolutions are about 1.3x faster with oneDNN on this kind of CPU (the same for every mode).
    model = cifar_net(tuple(args.widths)).to(memory_format=torch.channels_last)
    steps = args.epochs * -(-len(train) // args.batch_size)
    config = DataDietConfig(
        output_dir=tempfile.mkdtemp(prefix=f"datadiet-dynamic-{mode}-{seed}-"),  # removed after training
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=5e-4,
        lr_scheduler_type="linear",
        warmup_steps=int(0.2 * steps),
        label_smoothing_factor=args.label_smoothing,
        max_grad_norm=0.0,
        seed=seed,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=False,  # the Trainer's progress bar: a 150-epoch run takes tens of minutes
        report_to=[],
        dataloader_pin_memory=False,
        track_scores=["loss"],
        dynamic_pruning=ratio > 0,
        dynamic_pruning_ratio=ratio,
        dynamic_pruning_until=args.until,
    )
    trainer = DataDietTrainer(
        ClassifierWrapper(model),
        config,
        train_dataset=train,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    )
    trainer.remove_callback(PrinterCallback)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    shutil.rmtree(config.output_dir, ignore_errors=True)
    accuracy = test_accuracy(model, *test)
    skipped = [entry["skipped_fraction"] for entry in trainer.pruning_history]
    return {
        "mode": mode,
        "seed": seed,
        "ratio": ratio,
        "train_wall_time_s": round(wall, 1),
        "train_cpu_time_s": round(cpu, 1),
        "test_accuracy": round(100 * accuracy, 2),
        "optimizer_steps": trainer.state.global_step,
        "skipped_fraction": round(float(np.mean(skipped)) if skipped else 0.0, 4),
        "skipped_per_epoch": [round(value, 3) for value in skipped],
    }


def summarise(records: list[dict]) -> dict:
    """Per pruning ratio, the mean over seeds of the savings and accuracy change against the full-data run of the
    same seed."""
    full = {record["seed"]: record for record in records if record["ratio"] == 0}
    summary = {}
    for ratio in sorted({record["ratio"] for record in records if record["ratio"] > 0}):
        pairs = [(full[r["seed"]], r) for r in records if r["ratio"] == ratio and r["seed"] in full]
        if not pairs:
            continue

        def mean(values):
            return float(np.mean(list(values)))

        summary[f"dynamic-{ratio}"] = {
            "seeds": len(pairs),
            "wall_time_saved_percent": round(
                100 * mean(1 - d["train_wall_time_s"] / f["train_wall_time_s"] for f, d in pairs), 1
            ),
            "cpu_time_saved_percent": round(
                100 * mean(1 - d["train_cpu_time_s"] / f["train_cpu_time_s"] for f, d in pairs), 1
            ),
            "presentations_skipped_percent": round(100 * mean(d["skipped_fraction"] for _, d in pairs), 1),
            "full_accuracy_mean": round(mean(f["test_accuracy"] for f, _ in pairs), 2),
            "dynamic_accuracy_mean": round(mean(d["test_accuracy"] for _, d in pairs), 2),
            "accuracy_change_points": round(mean(d["test_accuracy"] - f["test_accuracy"] for f, d in pairs), 2),
        }
    return summary


RUN_SETTINGS = ("rows", "test_rows", "epochs", "batch_size", "lr", "widths", "label_smoothing", "until", "threads")


def _changed_settings(config: dict, other: dict) -> list[str]:
    """The settings that change what a run measures (not which seeds or ratios) on which two configs differ."""
    # A setting absent from `config` (an output written before that flag existed) had its default: not a change.
    return [key for key in RUN_SETTINGS if config.get(key, other.get(key)) != other.get(key)]


def resume(output: Path, args: argparse.Namespace) -> list[dict]:
    """The runs already recorded in `output` by a run of the same settings (a benchmark stopped part-way goes on
    where it stopped); an error when `output` holds runs of other settings, rather than mixing them."""
    if not output.exists():
        return []
    previous = json.loads(output.read_text())
    changed = _changed_settings(previous["config"], vars(args))
    if changed:
        raise SystemExit(
            f"{output} holds runs with other settings ({', '.join(changed)}); pass another --output or delete it."
        )
    print(f"Resuming: {len(previous['runs'])} runs already in {output}.", flush=True)
    return previous["runs"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000, help="training rows (the first N of the train split)")
    parser.add_argument(
        "--test-rows", type=int, default=None, help="test rows (a fixed random subset; all by default)"
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--widths", type=int, nargs=4, default=[16, 32, 64, 64], help="stem and block widths")
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=[0.5, 0.7], help="InfoBatch skip probabilities of easy examples"
    )
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--until", type=float, default=0.875, help="fraction of epochs with pruning")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--output", default="outputs/bench/dynamic.json")
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="only merge the runs of these outputs (e.g. one per seed, run in parallel; same settings) into --output",
    )
    args = parser.parse_args(argv)
    if args.combine:
        return combine([Path(path) for path in args.combine], Path(args.output))
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    train = AugmentedCifar(*load_split("train", args.rows))
    test = load_split("test", args.test_rows, shuffle=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    records = resume(output, args)
    done = {(record["seed"], record["ratio"]) for record in records}
    for seed in args.seeds:
        for ratio in [0.0, *args.ratios]:
            if (seed, ratio) in done:
                continue
            record = run(ratio, seed, train, test, args)
            records.append(record)
            print(json.dumps(record), flush=True)
            output.write_text(
                json.dumps({"config": vars(args), "runs": records, "summary": summarise(records)}, indent=2)
            )
    return report({"config": vars(args), "runs": records, "summary": summarise(records)})


def combine(paths: list[Path], output: Path) -> dict:
    """Merge the runs of several outputs made with the same settings (say one process per seed) into `output`."""
    outputs = [json.loads(path.read_text()) for path in paths]
    config = outputs[0]["config"]
    for path, other in zip(paths[1:], outputs[1:]):
        changed = _changed_settings(config, other["config"])
        if changed:
            raise SystemExit(f"{path} was run with other settings than {paths[0]} ({', '.join(changed)}).")
    records = [record for other in outputs for record in other["runs"]]
    keys = [(record["seed"], record["ratio"]) for record in records]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"The same (seed, ratio) run appears in more than one of {[str(p) for p in paths]}.")
    records.sort(key=lambda record: (record["seed"], record["ratio"]))
    config = {
        **config,
        "seeds": sorted({record["seed"] for record in records}),
        "combined_from": [str(p) for p in paths],
    }
    result = {"config": config, "runs": records, "summary": summarise(records)}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    return report(result)


def report(result: dict) -> dict:
    """Print the runs as a Markdown table and the summary."""
    records = result["runs"]
    headers = [
        "mode",
        "seed",
        "train wall time (s)",
        "train CPU time (s)",
        "test accuracy (%)",
        "presentations skipped",
    ]
    rows = [
        [r["mode"], r["seed"], r["train_wall_time_s"], r["train_cpu_time_s"], r["test_accuracy"],
         f"{100 * r['skipped_fraction']:.1f}%"]
        for r in records
    ]  # fmt: skip
    print("\n" + discipline.markdown_table(headers, rows))
    print("\nsummary:", json.dumps(result["summary"]))
    return result


if __name__ == "__main__":
    main()
