"""`datadiet score`: score a dataset split with K models and save it with the score columns."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import CausalLMArguments, DataArguments, ModelArguments, check_causal_lm_arguments
from ..loading import check_hub_dataset_reachable
from ..validation import check_positive_int
from .parsing import command_line, parse_config

logger = logging.getLogger("datadiet")

__all__ = ["ScoreArguments", "check_causal_lm_score", "less_column", "main", "run_causal_lm_score", "run_score"]


@dataclass
class ScoreArguments(CausalLMArguments, ModelArguments, DataArguments):
    """Arguments of `datadiet score`: score a dataset split with K models and save it with the score columns; with
    `task="causal_lm"`, instruction rows with a pretrained causal LM (and `less` from warm-up checkpoints)."""

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
    target_dataset: str | None = field(
        default=None, metadata={"help": "less: the target rows (a dataset folder, data files' folder or Hub id)."}
    )
    target_split: str = field(default="train", metadata={"help": "less: the split of target_dataset."})
    max_target_rows: int | None = field(default=None, metadata={"help": "less: the first rows of the target split."})
    less_checkpoints: list[str] | None = field(
        default=None,
        metadata={
            "help": "less: the Trainer checkpoint folders of a short warm-up run (peft LoRA adapters + optimizer.pt; "
            "recipes/sft/README.md makes them with TRL), weighted by their learning rates."
        },
    )
    projection_dim: int | None = field(
        default=8192, metadata={"help": "less: dimension of the random projection of the gradients (0: exact)."}
    )
    projection_seed: int = field(default=0, metadata={"help": "less: the projection's seed (recorded)."})
    less_adam: bool = field(
        default=True, metadata={"help": "less: Adam-normalise the rows' gradients with each checkpoint's optimizer."}
    )

    # DataArguments' test-split fields mean nothing to `datadiet score` (it scores one split): left out of its
    # --help, its flags and its recipe keys (init=False), rather than listed and then refused.
    eval_dataset_name: str | None = field(default=None, init=False, repr=False)
    eval_data_files: str | None = field(default=None, init=False, repr=False)
    eval_split: str = field(default="test", init=False, repr=False)
    max_eval_rows: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_hub_dataset_reachable(self.dataset_name, self.data_files or None)  # before seconds of engine imports
        from ..engine.batches import scoring_task
        from ..engine.dynamics import split_methods

        check_causal_lm_arguments(self)
        causal = self.task == "causal_lm"
        if causal and not self.model_name_or_path:
            raise ValueError(
                "--task causal_lm scores with a pretrained causal LM: pass --model_name_or_path <save_pretrained "
                "folder | Hub id | .gguf file> (its tokenizer is read from it too)."
            )
        ModelArguments.__post_init__(self)
        if self.model_weights and self.model_name_or_path:
            raise ValueError(
                "--model_weights loads a weights file into --model_name's architecture; with --model_name_or_path the "
                "checkpoint's weights are loaded already: drop --model_weights."
            )
        check_positive_int("batch_size", self.batch_size)
        less = causal and "less" in self.methods
        if causal:
            check_causal_lm_score(self, less)
        # Before any data is read or model built; the same check as `score_dataset`, done once: the scoring plan
        # takes the checked methods as they are.
        methods = [method for method in self.methods if not (less and method == "less")]
        self.scoring_methods = None
        if methods or not less:
            trains = not self.model_weights
            self.scoring_methods = split_methods(
                methods, self.train_epochs, trains=trains, task=scoring_task(self.task)
            )


def check_causal_lm_score(args: ScoreArguments, less: bool) -> None:
    """What `--task causal_lm` refuses: options of classifiers, several seeds, proxy training, `less` without its
    target rows and checkpoints (or `less` options without `less`)."""
    for name in ("keep_classes", "model_weights", "image_column", "label_column", "mean", "std", "image_size"):
        if getattr(args, name):
            raise ValueError(f"--{name} is an option of classifiers; --task causal_lm does not read it: drop it.")
    if args.train_epochs > 0:
        raise ValueError(
            "--train_epochs > 0 is not supported with --task causal_lm: fine-tune the model with TRL's SFTTrainer "
            "(recipes/sft/README.md), then score the checkpoint (--train_epochs 0)."
        )
    if len(args.seeds) != 1:
        raise ValueError(
            f"--seeds {' '.join(map(str, args.seeds))}: a pretrained causal LM scores once; give one seed (it seeds "
            "fresh LoRA adapters)."
        )
    missing = [name for name in ("target_dataset", "less_checkpoints") if less and not getattr(args, name)]
    if missing:
        raise ValueError(
            f"--methods less needs --{missing[0]}: --target_dataset <rows of the target task> and --less_checkpoints "
            "<warm-up Trainer checkpoint folders> (recipes/sft/README.md shows how to make them)."
        )
    given = [name for name in ("target_dataset", "less_checkpoints", "max_target_rows") if getattr(args, name)]
    if given and not less:
        raise ValueError(f"--{given[0]} is read by --methods less only: add less to --methods, or drop it.")
    if args.projection_dim is not None and args.projection_dim < 0:
        raise ValueError(f"projection_dim must be >= 1, or 0 for exact gradients, got {args.projection_dim}.")


def run_score(args: ScoreArguments, *, command: str | None = None):
    """Load, score and save a dataset as `ScoreArguments` say; returns the scored dataset."""
    if args.task == "causal_lm":
        return run_causal_lm_score(args, command=command or command_line())
    from ..loading import load_data

    max_rows = None if args.keep_classes else args.max_rows  # then the first rows of the kept classes
    dataset = load_data(args.dataset_name, split=args.split, data_files=args.data_files or None, max_rows=max_rows)
    # torch, transformers' Trainer and peft take seconds to import: after the data, so that a dataset that cannot be
    # read (a typo, an unreachable Hub) is refused at once.
    from ..data import Preprocessor, build_image_transform, detect_columns, keep_classes, label_names_of
    from ..engine.plan import plan_scoring
    from ..engine.score import score_planned
    from ..model_sources import ModelSource
    from ..scoring import fit_proxy

    input_column, kind, label_column = detect_columns(
        dataset, image_column=args.image_column, label_column=args.label_column
    )
    if args.keep_classes:
        dataset = keep_classes(dataset, args.keep_classes, label_column, max_rows=args.max_rows)
    # A named checkpoint is loaded (and its loading logged) here, before any row is scored.
    model_init = ModelSource(args, label_names=label_names_of(dataset, label_column))
    image_size, mean, std = model_init.image_settings()
    transform = build_image_transform(image_size, mean=mean, std=std)
    # The one preprocessor of the run: the first model's input channels are checked with it before anything trains,
    # and the proxies train and the loop scores through it.
    preprocessor = Preprocessor(transform, input_column=input_column, kind=kind, label_column=label_column)
    common = dict(
        preprocessor=preprocessor,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        mixed_precision=args.mixed_precision,
        output_dir=Path(args.output_dir) / "partial",
    )
    if args.model_weights:
        from safetensors.torch import load_model

        model = model_init(args.seeds[0])
        load_model(model, args.model_weights)
        plan = plan_scoring(dataset, model, args.scoring_methods, **common)
    else:
        plan = plan_scoring(
            dataset,
            methods=args.scoring_methods,
            model_init=model_init,
            seeds=args.seeds,
            train_epochs=args.train_epochs,
            training_kwargs={"learning_rate": args.learning_rate},
            train_proxy=fit_proxy,
            **common,
        )
    return _save(score_planned(plan), args, dataset, model_init.provenance(), command or command_line())


def _save(scored, args: ScoreArguments, dataset, scoring: dict, command: str):
    """`scored` with its source, scoring and command recorded, saved to `<output_dir>/dataset` by the main process."""
    from accelerate import PartialState

    from ..provenance import record_provenance

    source = {"path": args.dataset_name, "data_files": args.data_files, "split": args.split, "max_rows": args.max_rows}
    if args.task != "causal_lm":
        source["keep_classes"] = args.keep_classes
    source["fingerprint"] = dataset._fingerprint
    scored = record_provenance(scored, source=source, scoring=scoring, steps=[{"command": command}])
    if PartialState().is_main_process:
        scored.save_to_disk(str(Path(args.output_dir) / "dataset"))
        logger.info("Scored dataset saved to %s", Path(args.output_dir) / "dataset")
    return scored


def run_causal_lm_score(args: ScoreArguments, *, command: str):
    """Load the checkpoint, its tokenizer and the rows as `ScoreArguments` say, score them, save the scored dataset to
    `<output_dir>/dataset` and return it."""
    from ..data import load_data
    from ..engine.plan import plan_scoring
    from ..engine.score import score_planned
    from ..language_models import add_adapters, load_tokenizer
    from ..model_sources import load_checkpoint

    less = "less" in args.methods
    methods = [method for method in args.methods if method != "less"]
    dataset = load_data(
        args.dataset_name, split=args.split, data_files=args.data_files or None, max_rows=args.max_rows
    )
    # Targets are read before the model loads, so that a wrong path fails at once.
    targets = load_data(args.target_dataset, split=args.target_split, max_rows=args.max_target_rows) if less else None
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or args.model_name_or_path, gguf_file=args.gguf_file)
    model, report = load_checkpoint(args.model_name_or_path, task="causal_lm", gguf_file=args.gguf_file)
    scoring = {
        "model": args.model_name_or_path,
        **report.provenance(),
        "tokenizer": args.tokenizer_name_or_path or args.model_name_or_path,
    }
    scored = dataset
    if methods:
        model, adapters = add_adapters(
            model,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            target_modules=args.lora_target_modules,
            adapter_name_or_path=args.adapter_name_or_path,
            seed=args.seeds[0],
        )
        plan = plan_scoring(
            dataset,
            model,
            args.scoring_methods,
            task="causal_lm",
            tokenizer=tokenizer,
            max_length=args.max_length,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            mixed_precision=args.mixed_precision,
            output_dir=Path(args.output_dir) / "partial",
        )
        scored = score_planned(plan)
        scoring.update(adapters)
        if hasattr(model, "unload"):  # LESS loads its own adapters from the checkpoints, onto the bare model
            model = model.unload()
    if less:
        scored = less_column(scored, targets, model, tokenizer, args)
    return _save(scored, args, dataset, {**scoring, "task": "causal_lm", "methods": list(args.methods)}, command)


def less_column(dataset, targets, model, tokenizer, args):
    """`dataset` with a `less` column: LESS (Xia et al. 2024) over the LoRA adapters of `args.less_checkpoints`
    (their `adapter_config.json` gives the adapters; a full-weights checkpoint, every parameter), each row's loss and
    batches from the `causal_lm` task, so that they are the rows `score_dataset` scores."""
    from ..tasks import get_task
    from ..tracin.less import LESS

    task = get_task("causal_lm", tokenizer=tokenizer, max_length=args.max_length)
    first = Path(args.less_checkpoints[0])
    if (first / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(first), is_trainable=True)

    def per_example_loss(model, batch):
        return task.per_example_losses(model(**task.model_inputs(batch)).logits, batch)

    scorer = LESS(
        model,
        args.less_checkpoints,
        per_example_loss=per_example_loss,
        adam=args.less_adam,
        projection_dim=args.projection_dim or None,
        seed=args.projection_seed,
        batch_size=args.batch_size,
        collate_fn=task.collate,
        output_dir=Path(args.output_dir) / "less",
    )
    # Extra columns (earlier scores, categories) ride along: the task's collate reads the columns of its format.
    return scorer.with_scores(dataset, {args.target_dataset: targets}, overwrite=args.overwrite)


def main(argv: list[str]) -> int:
    """`datadiet score [--config recipe.yaml] [--flag value ...]`; returns the exit code."""
    epilog = None
    if {"-h", "--help"} & set(argv):  # the lists cost the engine's imports (seconds): only for --help
        from ..engine.dynamics import TRAINING_DYNAMICS
        from ..scores import list_scores

        epilog = (
            f"methods: {', '.join(list_scores())}; from the proxies' training: {', '.join(TRAINING_DYNAMICS)}; with "
            f"--task causal_lm: {', '.join(list_scores('causal_lm'))}, less"
        )
    (args,) = parse_config((ScoreArguments,), argv, epilog=epilog)
    run_score(args, command="datadiet " + shlex.join(["score", *argv]))
    return 0
