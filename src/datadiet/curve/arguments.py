"""The arguments of a pruning curve (`CurveArguments`, what `datadiet report curve` reads) and the pruning options of
each strategy in its grid."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arguments import DataArguments, ModelSourceArguments

__all__ = ["MIN_STEPS", "CurveArguments", "check_steps", "strategy_options"]

# Scores the curve knows how to compute from its proxy models (plus `random`, which needs none).
_CURVE_SCORES = ("el2n", "grand", "forgetting", "input_norm", "loss", "margin")

# The one-cycle schedule needs a warm-up and an anneal of at least one step each: with 4 steps and a 25% warm-up
# torch's `OneCycleLR` divides by zero, and with fewer the only steps run at a learning rate near 0.
MIN_STEPS = 5


def check_steps(steps: int, what: str) -> None:
    """Refuse a training run of fewer than `MIN_STEPS` optimiser steps (`what` says where the number came from)."""
    if steps < MIN_STEPS:
        raise ValueError(
            f"{what} gives {steps} training step(s); the one-cycle schedule needs at least {MIN_STEPS}. "
            "Raise max_steps / epochs / scoring_epochs, or lower batch_size."
        )


@dataclass
class CurveArguments(ModelSourceArguments, DataArguments):
    """Arguments of `datadiet report curve`: which data, scores, strategies, keep fractions, seeds and training budget
    a pruning curve covers, and where it writes `runs.jsonl`, `curve.png` and `curve.md`. Every proxy and every run
    starts from the checkpoint `model_name_or_path` (fine-tuned, with a new head for the dataset's classes) when one
    is named, else from a fresh `model_name` (default `datadiet_cifar_net`)."""

    model_name: str | None = field(
        default=None,
        metadata={
            "help": "timm architecture trained from scratch, e.g. datadiet_cifar_net (the default when no "
            "model_name_or_path), datadiet_tiny_net, resnet18, test_resnet."
        },
    )
    model_kwargs: str | None = field(default=None, metadata={"help": "JSON mapping of extra timm model options."})
    proxy_model_name: str | None = field(
        default=None,
        metadata={
            "help": "Score with proxies of this timm architecture trained from scratch, while every run still starts "
            "from model_name_or_path: pretrained and from-scratch proxies compared at the same fine-tuning budget "
            "(default: the proxies start where the runs do)."
        },
    )
    mean: list[float] | None = field(
        default=None, metadata={"help": "Normalisation mean per channel (computed from the training data if unset)."}
    )
    std: list[float] | None = field(
        default=None, metadata={"help": "Normalisation std per channel (computed from the training data if unset)."}
    )
    crop_padding: int = field(default=4, metadata={"help": "Random-crop padding while training (0: no crop)."})
    flip: bool = field(
        default=True, metadata={"help": "Random horizontal flips while training and flip test-time averaging."}
    )
    scores: list[str] = field(
        default_factory=lambda: ["el2n", "grand", "forgetting", "input_norm"],
        metadata={"help": f"Scores to prune by, among {', '.join(_CURVE_SCORES)}; random is always included."},
    )
    strategies: list[str] = field(
        default_factory=lambda: ["hardest", "window", "stratified"],
        metadata={
            "help": "Pruning strategies (see datadiet.selection.list_strategies()); window@0.2 / stratified@0.05 "
            "set that entry's offset / hard_cutoff, so one curve can sweep them."
        },
    )
    keep_fractions: list[float] = field(
        default_factory=lambda: [0.7, 0.5, 0.3], metadata={"help": "Fractions of the training set kept, in (0, 1)."}
    )
    offset: float = field(default=0.1, metadata={"help": "window: fraction of hardest rows skipped."})
    hard_cutoff: float = field(default=0.1, metadata={"help": "stratified: fraction of hardest rows dropped (CCS)."})
    num_bins: int = field(default=50, metadata={"help": "stratified: number of score bins (CCS)."})
    class_balanced: bool = field(default=False, metadata={"help": "Apply every strategy per class."})
    scoring_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3], metadata={"help": "Seeds of the proxy models the scores average over."}
    )
    scoring_epochs: int = field(
        default=1,
        metadata={
            "help": "Epochs the proxy models train before EL2N / GraNd are taken; forgetting counts events over "
            "these epochs (with 1 epoch it reduces to 'misclassified at its one presentation')."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds of every curve point."}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Training budget in optimiser steps, the same for every subset (fair)."}
    )
    epochs: float | None = field(
        default=None, metadata={"help": "Training budget in epochs of each subset (if no max_steps)."}
    )
    batch_size: int = field(default=256, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=0.1, metadata={"help": "Peak learning rate (SGD + Nesterov, OneCycle)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay."})
    label_smoothing: float = field(default=0.2, metadata={"help": "Label smoothing of the training loss."})
    eval_batch_size: int = field(default=1024, metadata={"help": "Batch size for scoring and evaluation."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: torch's)."})
    report_only: bool = field(
        default=False, metadata={"help": "Only rewrite curve.md / curve.png from the finished runs in runs.jsonl."}
    )
    report_every: int = field(default=5, metadata={"help": "Rewrite curve.md / curve.png after every n runs."})
    validation_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of the training split (class-stratified, seeded) as validation rows, "
            "which no proxy and no subset ever trains on: every grid cell is then compared on them, never on the "
            "test split, and selection.json names the chosen cell (0: no validation, runs are tested)."
        },
    )
    validation_seed: int = field(default=0, metadata={"help": "Seed of the validation hold-out."})
    confirm_seeds: list[int] = field(
        default_factory=list,
        metadata={
            "help": "With validation_fraction: train the chosen cell of each keep fraction, random and full on these "
            "fresh seeds and test each once on the test split (in <output_dir>/confirm)."
        },
    )
    confirm_scoring_seeds: list[int] = field(
        default_factory=list,
        metadata={"help": "Seeds of the fresh proxy models the confirm stage prunes by (none of scoring_seeds)."},
    )
    confirmation: bool = field(
        default=False,
        metadata={
            "help": "A pre-registered confirmation of cells chosen beforehand: its report gives their verdicts and "
            "names no 'best' cell (picking among confirmed cells after seeing them would be exploratory again)."
        },
    )
    equivalence_margin: float = field(
        default=0.005,
        metadata={
            "help": "Margin (accuracy, 0.005 = 0.5 pt) within which a subset 'matches full data' (two one-sided t-tests at level 0.05)."
        },
    )
    output_dir: str = field(default="outputs/curve", metadata={"help": "Where runs.jsonl, curve.png, curve.md go."})

    def __post_init__(self):
        super().__post_init__()
        if not self.model_name_or_path:
            self.model_name = self.model_name or "datadiet_cifar_net"
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("Give exactly one training budget: max_steps (fixed steps, fair) or epochs.")
        if self.max_steps is not None:
            check_steps(self.max_steps, "max_steps")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}.")
        unknown = [name for name in self.scores if name not in _CURVE_SCORES]
        if unknown:
            raise ValueError(
                f"Unknown curve score(s) {unknown}: choose among {list(_CURVE_SCORES)} (random is always included)."
            )
        if "random" in self.strategies:
            raise ValueError("Leave 'random' out of strategies: every curve includes it as the baseline.")
        for name in self.strategies:
            strategy_options(name, self)
        bad_keep = [keep for keep in self.keep_fractions if not 0.0 < keep < 1.0]
        if bad_keep or not self.keep_fractions:
            raise ValueError(f"keep_fractions must be non-empty fractions in (0, 1); got {self.keep_fractions}.")
        if not self.seeds or not self.scoring_seeds:
            raise ValueError("seeds and scoring_seeds must each name at least one seed.")
        if self.scoring_epochs < 1:
            raise ValueError(f"scoring_epochs must be >= 1 (scores of trained proxies); got {self.scoring_epochs}.")
        if (self.mean is None) != (self.std is None):
            raise ValueError("Give both mean and std, or neither (then they are computed from the training data).")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1) (e.g. 0.1 holds out 10% of the training split); got "
                f"{self.validation_fraction}."
            )
        if self.confirm_seeds or self.confirm_scoring_seeds:
            if not self.validation_fraction:
                raise ValueError(
                    "confirm_seeds confirm a cell chosen on validation rows: set validation_fraction (e.g. 0.1) too."
                )
            if not self.confirm_seeds or not self.confirm_scoring_seeds:
                raise ValueError("Give both confirm_seeds and confirm_scoring_seeds (fresh proxies for the confirm).")
            reused = sorted(set(self.confirm_seeds) & set(self.seeds))
            reused_proxies = sorted(set(self.confirm_scoring_seeds) & set(self.scoring_seeds))
            if reused or reused_proxies:
                raise ValueError(
                    f"The confirm stage needs fresh seeds: confirm_seeds {reused} / confirm_scoring_seeds "
                    f"{reused_proxies} are also used to choose the cell. Pick seeds outside seeds={self.seeds} and "
                    f"scoring_seeds={self.scoring_seeds}."
                )
        if not 0.0 < self.equivalence_margin < 1.0:
            raise ValueError(
                f"equivalence_margin is an accuracy difference such as 0.005; got {self.equivalence_margin}."
            )


# A strategy of the grid may carry its own value of its parameter, so that one curve compares several offsets (or
# CCS cut-offs) against the same full-data and random runs: "window@0.2" skips the hardest 20%, "stratified@0.05"
# drops the hardest 5% before sampling. A bare name uses the curve's `offset` / `hard_cutoff`.
_STRATEGY_PARAMETER = {"window": "offset", "stratified": "hard_cutoff"}


def strategy_options(name: str, args: CurveArguments) -> tuple[str, dict[str, float]]:
    """The registered strategy and its pruning options for a grid entry such as `"window"` or `"window@0.2"`.

    Example:
    ```python
    >>> from datadiet.curve import CurveArguments, strategy_options
    >>> args = CurveArguments("sklearn-digits", max_steps=100, offset=0.1)
    >>> strategy_options("window@0.2", args)
    ('window', {'offset': 0.2, 'hard_cutoff': 0.1, 'num_bins': 50})

    ```
    """
    from ..selection import list_strategies

    strategy, _, value = name.partition("@")
    if strategy not in list_strategies():
        raise ValueError(f"Unknown pruning strategy {name!r}: choose among {list_strategies()}.")
    options = {"offset": args.offset, "hard_cutoff": args.hard_cutoff, "num_bins": args.num_bins}
    if not value:
        return strategy, options
    parameter = _STRATEGY_PARAMETER.get(strategy)
    if parameter is None:
        raise ValueError(
            f"Strategy {name!r}: only {sorted(_STRATEGY_PARAMETER)} take a value after '@' "
            f"({', '.join(f'{s}@x sets {p}' for s, p in _STRATEGY_PARAMETER.items())})."
        )
    try:
        number = float(value)
    except ValueError:
        raise ValueError(
            f"Strategy {name!r}: the value after '@' must be a fraction such as {strategy}@0.2."
        ) from None
    if not 0.0 <= number < 1.0:
        raise ValueError(f"Strategy {name!r}: {parameter}={number} is outside [0, 1).")
    options[parameter] = number
    return strategy, options
