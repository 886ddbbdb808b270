"""`datadiet train`: train a model (an architecture from scratch, or fine-tune a checkpoint) on a (pruned) dataset,
over several seeds; report its test accuracy and the first seed's data map, and save each seed's model."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..arguments import DataArguments, ModelArguments
from ..validation import check_positive_int
from .parsing import parse_config

logger = logging.getLogger(__name__)

__all__ = ["TrainArguments", "main", "run_train"]


@dataclass
class TrainArguments(ModelArguments, DataArguments):
    """Arguments of `datadiet train`: train a model from scratch (`model_name`) or fine-tune a checkpoint
    (`model_name_or_path`) on a dataset (a `save_to_disk` folder, data files, a folder written by `save_pruned`, or a
    Hub id) and report its test accuracy over several seeds."""

    augment: bool = field(default=False, metadata={"help": "Random crop + flip while training."})
    max_steps: int | None = field(default=None, metadata={"help": "Training budget in optimiser steps."})
    epochs: float | None = field(default=None, metadata={"help": "Training budget in epochs (if no max_steps)."})
    batch_size: int = field(default=128, metadata={"help": "Per-device training batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Training seeds."})
    output_dir: str = field(
        default="outputs/train",
        metadata={"help": "Where results.json goes, and each seed's model (seed-<n>/, loadable by from_pretrained)."},
    )

    def __post_init__(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("Give exactly one training budget: max_steps (fixed steps) or epochs.")
        super().__post_init__()
        check_positive_int("batch_size", self.batch_size)
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one training seed.")


def run_train(args: TrainArguments) -> dict:
    """Train one model per seed and write `results.json` (accuracy per seed, mean, std), the first seed's data map
    (`data_map.png`: confidence against variability, coloured by correctness) and each seed's model (`seed-<n>/`:
    `save_pretrained` for transformers, with the checkpoint's image processor; timm's `save_for_hf` with the class
    names and normalisation) to `args.output_dir`."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..loading import load_data

    max_rows = None if args.keep_classes else args.max_rows  # then the first rows of the kept classes
    train = load_data(args.dataset_name, split=args.split, data_files=args.data_files or None, max_rows=max_rows)
    test = _load_test_split(args, train)
    # torch, transformers' Trainer and peft take seconds to import: after the data, so that a dataset that cannot be
    # read (a typo, an unreachable Hub) is refused at once.
    from ..data import (
        Preprocessor,
        build_image_transform,
        check_input_channels,
        column_values,
        detect_columns,
        keep_classes,
        label_names_of,
    )
    from ..model_sources import ModelSource
    from ..report import plot_data_map
    from ..trainer.proxy import evaluate_accuracy, fit

    input_column, kind, label_column = detect_columns(
        train, image_column=args.image_column, label_column=args.label_column
    )
    if args.keep_classes:
        train = keep_classes(train, args.keep_classes, label_column, max_rows=args.max_rows)
        test = keep_classes(test, args.keep_classes, label_column, max_rows=args.max_eval_rows)
    # A named checkpoint is loaded (and its loading logged) here, before any training.
    model_init = ModelSource(args, label_names=label_names_of(train, label_column))
    image_size, mean, std = model_init.image_settings()
    eval_transform = build_image_transform(image_size, mean=mean, std=std)
    preprocessor = Preprocessor(eval_transform, input_column=input_column, kind=kind, label_column=label_column)
    check_input_channels(train, preprocessor, args.in_chans)  # before any model is trained
    train_transform = build_image_transform(image_size, mean=mean, std=std, augment=args.augment)
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
        # The model alone, loadable by AutoModelForImageClassification.from_pretrained / timm (local-dir:) as it is.
        trainer.save_model(str(Path(args.output_dir) / f"seed-{seed}"))
        if "processor" in model_init.preprocessing and trainer.args.should_save:
            processor = model_init.preprocessing["processor"]
            processor.image_mean, processor.image_std = list(mean), list(std)
            processor.save_pretrained(str(Path(args.output_dir) / f"seed-{seed}"))
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
                title=f"Data map of {model_init.name} on {len(train)} rows (seed {seed})",
            )
    results = {
        "accuracy": accuracies,
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "train_rows": len(train),
        "test_rows": len(test),
        "test_split": f"{args.eval_dataset_name or args.dataset_name} ({args.eval_split})",
        "model": model_init.provenance(),
        "arguments": asdict(args),
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _load_test_split(args: TrainArguments, train):
    """The test split, refused when there is none or when it is the training data itself: a test accuracy measured
    on the training rows would be silently wrong, and datadiet does not hold rows out by itself, since a held-out part
    of a pruned subset is a biased test set (its rows were chosen by score) and shrinks the training budget compared."""
    from ..data import load_data
    from ..provenance import read_provenance

    source = (read_provenance(train).get("source") or {}).get("path")
    if source and source != args.dataset_name:
        fix = f"--eval_dataset_name {source} --eval_split test (the source it was scored from)"
    else:
        fix = "--eval_dataset_name <the test data> --eval_split <its split>"
    given = args.eval_dataset_name is not None or args.eval_data_files is not None
    try:
        test = load_data(
            args.eval_dataset_name or args.dataset_name,
            split=args.eval_split,
            data_files=args.eval_data_files or None,
            max_rows=None if args.keep_classes else args.max_eval_rows,
        )
    except ValueError as error:
        if given:
            raise
        raise ValueError(
            f"{args.dataset_name!r} has no {args.eval_split!r} split to test on, and datadiet does not hold rows out of "
            f"a training set (a held-out part of a pruned subset is a biased test set). Pass {fix}."
        ) from error
    if test._fingerprint == train._fingerprint or (not given and args.eval_split == args.split):
        raise ValueError(
            f"The test split is the training data ({args.dataset_name!r}, {args.split!r}): its accuracy would not be "
            f"a test accuracy. Pass {fix}."
        )
    return test


def main(argv: list[str]) -> int:
    """`datadiet train [--config recipe.yaml] [--flag value ...]`; prints the test accuracy; returns the exit code."""
    (args,) = parse_config((TrainArguments,), argv)
    results = run_train(args)
    print(
        f"test accuracy {results['accuracy_mean']:.4f} ± {results['accuracy_std']:.4f} "
        f"over seeds {args.seeds} ({results['train_rows']} training rows; tested on {results['test_rows']} rows of "
        f"{results['test_split']})"
    )
    return 0
