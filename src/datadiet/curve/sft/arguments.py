"""`SFTCurveArguments`: what the SFT curve (`datadiet report sft-curve`) trains, on which rows, and how it is judged."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...validation import check_positive_int

__all__ = ["SFTCurveArguments"]


@dataclass
class SFTCurveArguments:
    """Arguments of the SFT curve: LoRA fine-tunes of a causal LM on subsets of a scored pool, compared by held-out
    mean completion-token loss (lower is better) on validation rows while choosing, and on the test and OOD rows in
    the confirm stage.

    Example:
    ```python
    >>> from datadiet.curve.sft import SFTCurveArguments
    >>> args = SFTCurveArguments("pool", validation_dataset="validation", model_name_or_path="model",
    ...                          scores=["ifd"], scoring_seeds=[0], seeds=[1, 2, 3], max_steps=10)
    >>> args.strategies, args.keep_fractions
    (['hardest', 'easiest'], [0.1])

    ```
    """

    dataset_name: str = field(
        metadata={
            "help": "The scored pool: a save_to_disk or dataset folder with Alpaca (or prompt/completion) rows and "
            "one column per score (e.g. from `datadiet score --task causal_lm`)."
        }
    )
    validation_dataset: str | None = field(
        default=None, metadata={"help": "Validation rows (for choosing; see `datadiet split`). Required."}
    )
    test_dataset: str | None = field(
        default=None, metadata={"help": "Test rows, read only by the confirm stage (see `datadiet split`)."}
    )
    ood_dataset: str | None = field(
        default=None, metadata={"help": "Out-of-distribution rows (e.g. Dolly), read only by the confirm stage."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A causal LM folder, a .gguf file, or a folder with --gguf_file. Required."}
    )
    gguf_file: str | None = field(default=None, metadata={"help": "The GGUF file inside model_name_or_path."})
    scores: list[str] = field(
        default_factory=list, metadata={"help": "Score columns of the pool to prune by (random and full always run)."}
    )
    strategies: list[str] = field(
        default_factory=lambda: ["hardest", "easiest"],
        metadata={"help": "prune strategies: hardest keeps the highest scores, easiest the lowest (measure both)."},
    )
    keep_fractions: list[float] = field(default_factory=lambda: [0.1], metadata={"help": "Fractions of the pool."})
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3], metadata={"help": "Training seeds while choosing."})
    scoring_seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "The seeds the pool's scores were made with (recorded; no training seed may reuse one)."},
    )
    confirm_seeds: list[int] = field(
        default_factory=list,
        metadata={"help": "Fresh seeds for the confirm stage: the chosen cell, random and full, tested once."},
    )
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps of every run (subsets and full pool)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (linear decay, no warm-up)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "LoRA target modules (peft's 'all-linear')."}
    )
    max_length: int = field(default=256, metadata={"help": "Tokens per row (SFTConfig.max_length; longer rows cut)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the held-out loss."})
    max_eval_rows: int | None = field(
        default=None, metadata={"help": "Use only the first rows of each held-out set (all by default)."}
    )
    equivalence_margin: float = field(
        default=0.01, metadata={"help": "Loss margin (nats) within which a subset 'matches the full pool' (TOST)."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (None: torch's default)."})
    report_only: bool = field(default=False, metadata={"help": "Only rewrite the reports from runs.jsonl."})
    output_dir: str = field(default="outputs/sft_curve", metadata={"help": "Where runs.jsonl and curve.md go."})

    def __post_init__(self):
        from ...selection import list_strategies

        for name in ("validation_dataset", "model_name_or_path"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required (see `datadiet report sft-curve --help`).")
        for name in ("max_steps", "per_device_train_batch_size", "lora_r", "lora_alpha", "max_length"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("eval_batch_size", self.eval_batch_size)
        if self.max_eval_rows is not None:
            check_positive_int("max_eval_rows", self.max_eval_rows)
        allowed = [name for name in list_strategies() if name != "random"]
        unknown = [name for name in self.strategies if name not in allowed]
        if unknown:
            raise ValueError(f"Unknown strategies {unknown}: choose among {allowed} (random always runs).")
        if "random" in self.scores or "full" in self.scores:
            raise ValueError("Leave random and full out of scores: every SFT curve runs them as baselines.")
        bad_keep = [keep for keep in self.keep_fractions if not 0.0 < keep < 1.0]
        if bad_keep or not self.keep_fractions:
            raise ValueError(f"keep_fractions must be non-empty fractions in (0, 1); got {self.keep_fractions}.")
        if not self.seeds:
            raise ValueError("seeds must name at least one training seed.")
        overlap = sorted(set(self.scoring_seeds) & (set(self.seeds) | set(self.confirm_seeds)))
        if overlap:
            raise ValueError(
                f"Seeds {overlap} made the scores (scoring_seeds={self.scoring_seeds}) and train a run too: pick "
                "training seeds and confirm seeds outside scoring_seeds."
            )
        reused = sorted(set(self.confirm_seeds) & set(self.seeds))
        if reused:
            raise ValueError(
                f"confirm_seeds {reused} also chose the cell: the confirm stage needs fresh seeds outside seeds={self.seeds}."
            )
        if self.confirm_seeds and not self.test_dataset:
            raise ValueError("confirm_seeds test the chosen cell once on test rows: pass --test_dataset too.")
        if not 0.0 < self.lora_dropout < 1.0 and self.lora_dropout != 0.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}.")
        if not self.equivalence_margin > 0:
            raise ValueError(
                f"equivalence_margin is a loss difference in nats such as 0.01; got {self.equivalence_margin}."
            )
