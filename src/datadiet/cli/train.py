"""`datadiet train`: train a freshly initialised model on a (pruned) dataset, over several seeds, and report its test
accuracy and the first seed's data map."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..arguments import DataArguments, ModelArguments
from .parsing import parse_config

logger = logging.getLogger(__name__)

__all__ = ["TrainArguments", "main", "run_train"]


@dataclass
class TrainArguments(ModelArguments, DataArguments):
    """Arguments of `datadiet train`: train a freshly initialised model on a dataset (a `save_to_disk` folder, data
    files, a folder written by `save_pruned`, or a Hub id) and report its test accuracy over several seeds."""

    augment: bool = field(default=False, metadata={"help": "Random crop + flip while training."})
    max_steps: int | None = field(default=None, metadata={"help": "Training budget in optimiser steps."})
    epochs: float | None = field(default=None, metadata={"help": "Training budget in epochs (if no max_steps)."})
    batch_size: int = field(default=128, metadata={"help": "Per-device training batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Training seeds."})
    output_dir: str = field(default="outputs/train", metadata={"help": "Where results.json is written."})

    def __post_init__(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("Give exactly one training budget: max_steps (fixed steps) or epochs.")
        super().__post_init__()
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one training seed.")


def run_train(args: TrainArguments) -> dict:
    """Train one model per seed and write `results.json` (accuracy per seed, mean, std) and the first seed's data map
    (`data_map.png`: confidence against variability, coloured by correctness) to `args.output_dir`."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..data import build_image_transform, column_values, detect_columns, load_data, num_classes_of
    from ..models import model_init_from_arguments
    from ..report import plot_data_map
    from ..trainer.proxy import evaluate_accuracy, fit

    train = load_data(args.dataset_name, split=args.split, data_files=args.data_files or None, max_rows=args.max_rows)
    test = load_data(
        args.eval_dataset_name or args.dataset_name,
        split=args.eval_split,
        data_files=args.eval_data_files or None,
        max_rows=args.max_eval_rows,
    )
    _, _, label_column = detect_columns(train, image_column=args.image_column, label_column=args.label_column)
    model_init = model_init_from_arguments(args, num_classes_of(train, label_column))
    eval_transform = build_image_transform(args.image_size, mean=args.mean, std=args.std)
    train_transform = build_image_transform(args.image_size, mean=args.mean, std=args.std, augment=args.augment)
    accuracies = []
    for seed in tqdm(args.seeds, desc="Training seeds"):
        model, trainer = fit(
            model_init(seed),
            train,
            transform=train_transform,
            return_trainer=True,
            track_scores=["confidence", "variability", "correctness"],
            epochs=args.epochs,
            max_steps=args.max_steps,
            seed=seed,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            image_column=args.image_column,
            label_column=args.label_column,
            output_dir=str(Path(args.output_dir) / f"seed-{seed}"),
        )
        accuracies.append(
            evaluate_accuracy(
                model, test, transform=eval_transform, image_column=args.image_column, label_column=args.label_column
            )
        )
        logger.info("seed %d: test accuracy %.4f", seed, accuracies[-1])
        if seed == args.seeds[0]:  # the data map of the first seed's training run (Swayamdipta et al. 2020)
            dynamics = trainer.scores
            plot_data_map(
                column_values(dynamics, "confidence"),
                column_values(dynamics, "variability"),
                Path(args.output_dir) / "data_map.png",
                correctness=column_values(dynamics, "correctness"),
                title=f"Data map of {args.model_name} on {len(train)} rows (seed {seed})",
            )
    results = {
        "accuracy": accuracies,
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "train_rows": len(train),
        "test_rows": len(test),
        "arguments": asdict(args),
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str]) -> int:
    """`datadiet train [--config recipe.yaml] [--flag value ...]`; prints the test accuracy; returns the exit code."""
    (args,) = parse_config((TrainArguments,), argv)
    results = run_train(args)
    print(
        f"test accuracy {results['accuracy_mean']:.4f} ± {results['accuracy_std']:.4f} "
        f"over seeds {args.seeds} ({results['train_rows']} training rows)"
    )
    return 0
