"""The `datadiet` command: `score`, `prune`, `push`, `train`, `report` and `demo`, each reading a recipe YAML
(`--config`) whose values are defaults that command-line flags override (TRL / alignment-handbook style). The same
entry points run under `accelerate launch -m datadiet.cli ...`."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

logger = logging.getLogger("datadiet")

__all__ = ["PruneArguments", "ScoreArguments", "main", "parse_config", "run_prune", "run_score"]


def parse_config(dataclass_types: tuple, argv: list[str]) -> tuple:
    """Parse `argv` into instances of `dataclass_types`: `--config recipe.yaml` sets defaults, flags override them.
    A YAML key or flag that no dataclass knows is an error (a typo must not be silently ignored)."""
    import yaml
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types)
    argv = list(argv)
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a path to a recipe YAML.")
        config_path = argv[position + 1]
        del argv[position : position + 2]
        if not Path(config_path).exists():
            raise ValueError(f"Recipe {config_path!r} not found.")
        values = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"Recipe {config_path!r} must be a YAML mapping of argument names to values.")
        known = {f.name for cls in dataclass_types for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown key(s) {unknown} in {config_path!r}. Valid keys: {sorted(known)}.")
        # Mappings (e.g. model_kwargs) travel as JSON strings, like their command-line form.
        values = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in values.items()}
        parser.set_defaults(**values)
        # HfArgumentParser marks fields without defaults as required; a recipe may provide them.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)


@dataclass
class ScoreArguments:
    """Arguments of `datadiet score`: score a dataset split with K models and save it with the score columns."""

    dataset_name: str = field(metadata={"help": "A save_to_disk folder, a dataset folder, or a Hub id."})
    data_files: str | None = field(default=None, metadata={"help": "Data file(s) (Parquet, CSV, JSON) to load."})
    split: str = field(default="train", metadata={"help": "Split to score."})
    max_rows: int | None = field(default=None, metadata={"help": "Score only the first rows (a slice)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (detected when not given)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (detected when not given)."})
    methods: list[str] = field(default_factory=lambda: ["el2n"], metadata={"help": "Scores to compute."})
    model_name: str = field(default="resnet18", metadata={"help": "timm architecture or transformers model type."})
    model_library: str = field(default="timm", metadata={"help": "'timm' or 'transformers'."})
    model_kwargs: str | None = field(default=None, metadata={"help": "JSON (or YAML mapping) of model options."})
    model_weights: str | None = field(
        default=None, metadata={"help": "A safetensors file of trained weights to score with (then one seed)."}
    )
    in_chans: int = field(default=3, metadata={"help": "Input channels (1 for MNIST / digits)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize images to this size."})
    mean: list[float] | None = field(default=None, metadata={"help": "Normalisation mean per channel."})
    std: list[float] | None = field(default=None, metadata={"help": "Normalisation std per channel."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "One independently trained model each."})
    train_epochs: float = field(default=0, metadata={"help": "Epochs each model trains before scoring (0: at init)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the scoring models."})
    batch_size: int = field(default=128, metadata={"help": "Rows per forward pass."})
    mixed_precision: str | None = field(default=None, metadata={"help": "'bf16' for bfloat16 autocast."})
    output_dir: str = field(default="outputs/scores", metadata={"help": "The scored dataset (save_to_disk)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace existing score columns."})


@dataclass
class PruneArguments:
    """Arguments of `datadiet prune`: keep a subset of a scored dataset and save it."""

    dataset_name: str = field(metadata={"help": "A scored dataset (the output_dir of `datadiet score`)."})
    by: str | None = field(default="el2n", metadata={"help": "Score column to prune by."})
    keep: float = field(default=0.5, metadata={"help": "Fraction in (0, 1], or a row count if > 1."})
    strategy: str = field(default="hardest", metadata={"help": "hardest, easiest, random, window, stratified."})
    offset: float = field(default=0.0, metadata={"help": "window: fraction of hardest rows to skip."})
    class_balanced: bool = field(default=False, metadata={"help": "Apply the strategy per class."})
    hard_cutoff: float = field(default=0.0, metadata={"help": "stratified: fraction of hardest rows dropped."})
    seed: int = field(default=0, metadata={"help": "Seed of the random draws."})
    output_dir: str = field(default="outputs/pruned", metadata={"help": "The pruned dataset (save_to_disk)."})


def run_score(args: ScoreArguments, *, command: str | None = None):
    """Load, score and save a dataset as `ScoreArguments` say; returns the scored dataset."""
    from .data import build_image_transform, detect_columns, load_data, num_classes_of
    from .engine import score_dataset
    from .models import model_init_from_arguments
    from .provenance import record_provenance

    dataset = load_data(
        args.dataset_name, split=args.split, data_files=args.data_files or None, max_rows=args.max_rows
    )
    _, _, label_column = detect_columns(dataset, image_column=args.image_column, label_column=args.label_column)
    model_init = model_init_from_arguments(args, num_classes_of(dataset, label_column))
    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None

    transform = build_image_transform(args.image_size, mean=args.mean, std=args.std)
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
            "fingerprint": dataset._fingerprint,
        },
        scoring={"model": args.model_name, "model_library": args.model_library, "model_kwargs": model_kwargs},
        steps=[{"command": command or _command_line()}],
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        scored.save_to_disk(str(Path(args.output_dir) / "dataset"))
        logger.info("Scored dataset saved to %s", Path(args.output_dir) / "dataset")
    return scored


def run_prune(args: PruneArguments, *, command: str | None = None):
    """Load a scored dataset, prune it and save it; returns the pruned dataset."""
    from .data import load_data
    from .provenance import record_provenance
    from .selection import prune

    dataset = load_data(args.dataset_name)
    keep = int(args.keep) if args.keep > 1 else args.keep
    pruned = prune(
        dataset,
        args.by,
        keep,
        strategy=args.strategy,
        offset=args.offset,
        class_balanced=args.class_balanced,
        seed=args.seed,
        hard_cutoff=args.hard_cutoff,
    )
    pruned = record_provenance(pruned, steps=[{"command": command or _command_line()}])
    pruned.save_to_disk(args.output_dir)
    logger.info("Kept %d of %d rows; saved to %s", len(pruned), len(dataset), args.output_dir)
    return pruned


def _command_line() -> str:
    return "datadiet " + shlex.join(sys.argv[1:])


def _dataset_folder(path: str) -> str:
    # `datadiet score` saves the scored dataset under <output_dir>/dataset; accept either folder.
    return str(Path(path) / "dataset") if (Path(path) / "dataset" / "state.json").exists() else path


_USAGE = """usage: datadiet <command> [--config recipe.yaml] [--flag value ...]

commands:
  score   score a dataset (EL2N, GraNd, ...) and save it with score columns
  prune   keep a subset of a scored dataset
  push    save a pruned dataset with its card to a folder or the Hub
  train   train a fresh model on a dataset and report test accuracy
  report  plots: `report curve` (pruning curves), `report hist` (score histograms)
  demo    the whole chain on scikit-learn's digits (no download)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "score":
            (args,) = parse_config((ScoreArguments,), rest)
            run_score(args, command="datadiet " + shlex.join(argv))
        elif command == "prune":
            (args,) = parse_config((PruneArguments,), rest)
            args.dataset_name = _dataset_folder(args.dataset_name)
            run_prune(args, command="datadiet " + shlex.join(argv))
        elif command == "push":
            from .hub import PushArguments, run_push

            (args,) = parse_config((PushArguments,), rest)
            run_push(args)
        elif command == "train":
            from .train import TrainArguments, run_train

            (args,) = parse_config((TrainArguments,), rest)
            results = run_train(args)
            print(
                f"test accuracy {results['accuracy_mean']:.4f} ± {results['accuracy_std']:.4f} "
                f"over seeds {args.seeds} ({results['train_rows']} training rows)"
            )
        elif command == "report":
            from .report import report_main

            return report_main(rest)
        elif command == "demo":
            from .demo import DemoArguments, run_demo

            (args,) = parse_config((DemoArguments,), rest)
            run_demo(args)
        else:
            print(f"Unknown command {command!r}.\n\n{_USAGE}", file=sys.stderr)
            return 2
    except ValueError as error:
        print(f"datadiet {command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        _end_processes()
    return 0


def _end_processes() -> None:
    """Tear down the process group a multi-process launch set up, so that no communication thread is still running
    when the interpreter exits (that can abort a process with "terminate called without an active exception")."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
