"""`datadiet score`: score a dataset split with K models and save it with the score columns."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import DataArguments, ModelArguments
from ..loading import check_hub_dataset_reachable
from ..validation import check_positive_int
from .parsing import command_line, parse_config

logger = logging.getLogger("datadiet")

__all__ = ["ScoreArguments", "main", "run_score"]


@dataclass
class ScoreArguments(ModelArguments, DataArguments):
    """Arguments of `datadiet score`: score a dataset split with K models and save it with the score columns."""

    methods: list[str] = field(
        default_factory=lambda: ["el2n"],
        metadata={
            "help": "Scores to compute; forgetting, aum, confidence, variability and correctness come from the "
            "proxies' own training (train_epochs >= 1)."
        },
    )
    model_weights: str | None = field(
        default=None, metadata={"help": "A safetensors file of trained weights to score with (then one seed)."}
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "One independently trained model each."})
    train_epochs: float = field(default=0, metadata={"help": "Epochs each model trains before scoring (0: at init)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the scoring models."})
    batch_size: int = field(default=128, metadata={"help": "Rows per forward pass."})
    mixed_precision: str | None = field(default=None, metadata={"help": "'bf16' for bfloat16 autocast."})
    output_dir: str = field(default="outputs/scores", metadata={"help": "The scored dataset (save_to_disk)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace existing score columns."})

    # DataArguments' test-split fields mean nothing to `datadiet score` (it scores one split): left out of its
    # --help, its flags and its recipe keys (init=False), rather than listed and then refused.
    eval_dataset_name: str | None = field(default=None, init=False, repr=False)
    eval_data_files: str | None = field(default=None, init=False, repr=False)
    eval_split: str = field(default="test", init=False, repr=False)
    max_eval_rows: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_hub_dataset_reachable(self.dataset_name, self.data_files or None)  # before seconds of engine imports
        from ..engine.dynamics import split_methods

        super().__post_init__()
        if self.model_weights and self.model_name_or_path:
            raise ValueError(
                "--model_weights loads a weights file into --model_name's architecture; with --model_name_or_path the "
                "checkpoint's weights are loaded already: drop --model_weights."
            )
        check_positive_int("batch_size", self.batch_size)
        # Before any data is read or model built; the same check as `score_dataset`.
        split_methods(self.methods, self.train_epochs, trains=not self.model_weights)


def run_score(args: ScoreArguments, *, command: str | None = None):
    """Load, score and save a dataset as `ScoreArguments` say; returns the scored dataset."""
    from ..loading import load_data

    max_rows = None if args.keep_classes else args.max_rows  # then the first rows of the kept classes
    dataset = load_data(args.dataset_name, split=args.split, data_files=args.data_files or None, max_rows=max_rows)
    # torch, transformers' Trainer and peft take seconds to import: after the data, so that a dataset that cannot be
    # read (a typo, an unreachable Hub) is refused at once.
    from ..data import (
        Preprocessor,
        build_image_transform,
        check_input_channels,
        detect_columns,
        keep_classes,
        label_names_of,
    )
    from ..engine import score_dataset
    from ..model_sources import ModelSource
    from ..provenance import record_provenance

    input_column, kind, label_column = detect_columns(
        dataset, image_column=args.image_column, label_column=args.label_column
    )
    if args.keep_classes:
        dataset = keep_classes(dataset, args.keep_classes, label_column, max_rows=args.max_rows)
    # A named checkpoint is loaded (and its loading logged) here, before any row is scored.
    model_init = ModelSource(args, label_names=label_names_of(dataset, label_column))
    image_size, mean, std = model_init.image_settings()
    transform = build_image_transform(image_size, mean=mean, std=std)
    preprocessor = Preprocessor(transform, input_column=input_column, kind=kind, label_column=label_column)
    check_input_channels(dataset, preprocessor, args.in_chans)  # before any model is trained

    common = dict(
        methods=args.methods,
        transform=transform,
        image_column=args.image_column,
        label_column=args.label_column,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        mixed_precision=args.mixed_precision,
        output_dir=Path(args.output_dir) / "partial",
    )
    if args.model_weights:
        from safetensors.torch import load_model

        model = model_init(args.seeds[0])
        load_model(model, args.model_weights)
        scored = score_dataset(dataset, model, **common)
    else:
        scored = score_dataset(
            dataset,
            model_init=model_init,
            seeds=args.seeds,
            train_epochs=args.train_epochs,
            training_kwargs={"learning_rate": args.learning_rate},
            **common,
        )
    scored = record_provenance(
        scored,
        source={
            "path": args.dataset_name,
            "data_files": args.data_files,
            "split": args.split,
            "max_rows": args.max_rows,
            "keep_classes": args.keep_classes,
            "fingerprint": dataset._fingerprint,
        },
        scoring=model_init.provenance(),
        steps=[{"command": command or command_line()}],
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        scored.save_to_disk(str(Path(args.output_dir) / "dataset"))
        logger.info("Scored dataset saved to %s", Path(args.output_dir) / "dataset")
    return scored


def main(argv: list[str]) -> int:
    """`datadiet score [--config recipe.yaml] [--flag value ...]`; returns the exit code."""
    epilog = None
    if {"-h", "--help"} & set(argv):  # the lists cost the engine's imports (seconds): only for --help
        from ..engine.dynamics import TRAINING_DYNAMICS
        from ..scores import list_scores

        epilog = f"methods: {', '.join(list_scores())}; from the proxies' training: {', '.join(TRAINING_DYNAMICS)}"
    (args,) = parse_config((ScoreArguments,), argv, epilog=epilog)
    run_score(args, command="datadiet " + shlex.join(["score", *argv]))
    return 0
