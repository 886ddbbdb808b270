"""`DataDietConfig`: `transformers.TrainingArguments` plus what `DataDietTrainer` tracks, scores and prunes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from ..engine.process import check_process_state
from ..scores.trackers import TRACKED_SCORES

logger = logging.getLogger(__name__)

__all__ = ["DataDietConfig"]

# Quantities that can define which examples dynamic pruning treats as easy (low = easy for both).
_PRUNING_SCORES = ("loss", "el2n")


def _as_list(value) -> list:
    # The command line (HfArgumentParser) and YAML recipes may give a comma-separated string.
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return list(value)


@dataclass
class DataDietConfig(TrainingArguments):
    """[`~transformers.TrainingArguments`] for [`DataDietTrainer`]: every field of `TrainingArguments`, plus the
    per-example scores to track during training, eval-mode scoring passes at chosen epochs, and dynamic pruning.

    One default differs from `TrainingArguments`: `label_names` is `["labels"]`, so that models whose forward takes
    `**kwargs` (a timm model behind `ClassifierWrapper`, say) are evaluated with a loss.

    Args:
        track_scores (`list[str]`, defaults to all): online scores recorded from the training forward passes at no
            extra cost. Any of `loss`, `el2n`, `margin` (value at the last epoch the example was seen), `forgetting`
            (forgetting events, Toneva et al. 2019), `aum` (area under the margin, Pleiss et al. 2020), `confidence`,
            `variability`, `correctness` (data maps, Swayamdipta et al. 2020). An empty list turns tracking off.
        score_epochs (`list[int]`, defaults to `[]`): after which epochs to run an eval-mode scoring pass over the
            training set (e.g. `[20]` for EL2N at epoch 20 as in Paul et al. 2021; `0` scores at initialisation).
        score_methods (`list[str]`, defaults to `["el2n"]`): registered score methods for those passes (`el2n`,
            `grand`, `loss`, `margin`, `entropy`, `input_norm`, ...). Columns are named `<method>_epoch<e>`.
        row_id_column (`str`, defaults to `"datadiet_row_id"`): the key under which the trainer carries each
            example's position in `train_dataset` through the batch. It survives `remove_unused_columns` and is
            removed before the model's forward.
        task (`str`, *optional*): `"causal_lm"` (each row's scores are means over its trained tokens, after the
            label shift) or `"classification"`; by default detected from the model (a transformers `*ForCausalLM` is
            a causal LM).
        dynamic_pruning (`bool`, defaults to `False`): InfoBatch-style dynamic pruning (Qin et al. 2024): each epoch,
            skip with probability `dynamic_pruning_ratio` each example currently scored easy (score below the mean)
            and scale the loss of the kept easy examples by `1 / (1 - ratio)`, so the expected gradient is unchanged.
        dynamic_pruning_ratio (`float`, defaults to 0.5): the probability of skipping an easy example.
        dynamic_pruning_score (`str`, defaults to `"loss"`): the tracked quantity defining easy examples (`loss` or
            `el2n`, at the last epoch the example was seen).
        dynamic_pruning_until (`float`, defaults to 0.875): the fraction of the training epochs during which pruning
            applies; the remaining final epochs use the full data (InfoBatch's annealing, delta = 0.875).
    """

    track_scores: list[str] = field(
        default_factory=lambda: list(TRACKED_SCORES),
        metadata={"help": f"Online scores to track during training, any of {', '.join(TRACKED_SCORES)}."},
    )
    score_epochs: list[int] = field(
        default_factory=list,
        metadata={"help": "Epochs after which to run an eval-mode scoring pass over the training set (0: at init)."},
    )
    score_methods: list[str] = field(
        default_factory=lambda: ["el2n"],
        metadata={"help": "Registered score methods for the scoring passes, e.g. el2n, grand, loss."},
    )
    row_id_column: str = field(
        default="datadiet_row_id",
        metadata={"help": "Batch key carrying each example's position in train_dataset (added by the trainer)."},
    )
    task: str | None = field(
        default=None,
        metadata={"help": "causal_lm or classification; detected from the model when not set."},
    )
    dynamic_pruning: bool = field(
        default=False,
        metadata={"help": "Skip examples currently scored easy each epoch, with an unbiased loss rescaling."},
    )
    dynamic_pruning_ratio: float = field(
        default=0.5, metadata={"help": "Probability of skipping an example scored easy (below the mean score)."}
    )
    dynamic_pruning_score: str = field(
        default="loss", metadata={"help": "Tracked quantity defining easy examples: loss or el2n."}
    )
    dynamic_pruning_until: float = field(
        default=0.875,
        metadata={"help": "Fraction of the epochs during which pruning applies; the final epochs use all the data."},
    )

    def __post_init__(self):
        # Before TrainingArguments resets accelerate's state: a user's own `Accelerator()` that holds one process
        # where the launch started several is refused here, by name, instead of being silently replaced.
        check_process_state()
        if self.label_names is None:
            self.label_names = ["labels"]
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # Several processes launched on a machine without GPU (e.g. recipes/accelerate_configs/cpu_2proc.yaml):
            # without CPU mode each process would set up alone and train on all the data, N independent runs.
            logger.info("Several processes and no GPU: training data-parallel on CPU (use_cpu=True, gloo backend).")
            self.use_cpu = True
        super().__post_init__()
        self.track_scores = _as_list(self.track_scores)
        self.score_methods = _as_list(self.score_methods)
        self.score_epochs = [int(epoch) for epoch in _as_list(self.score_epochs)]
        unknown = [name for name in self.track_scores if name not in TRACKED_SCORES]
        if unknown:
            raise ValueError(
                f"track_scores has unknown names {unknown}; choose among {list(TRACKED_SCORES)} (or [] for none)."
            )
        if any(epoch < 0 for epoch in self.score_epochs):
            raise ValueError(f"score_epochs must be >= 0 (0 scores at initialisation); got {self.score_epochs}.")
        if self.score_epochs:
            from ..scores import get_score_spec

            for method in self.score_methods:
                get_score_spec(method)  # a ValueError listing the valid methods
            if not self.score_methods:
                raise ValueError("score_epochs is set but score_methods is empty: name the methods, e.g. ['el2n'].")
        if not self.row_id_column:
            raise ValueError("row_id_column must be a non-empty column name.")
        from .causal_lm import TASKS

        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)} (or None to detect it); got {self.task!r}.")
        if len(self.label_names) != 1:
            raise ValueError(
                f"DataDietTrainer trains single-label classifiers with one label key; got label_names="
                f"{self.label_names}."
            )
        if not 0.0 <= self.dynamic_pruning_ratio < 1.0:
            raise ValueError(
                f"dynamic_pruning_ratio is a probability in [0, 1) (1 would skip every easy example and make the "
                f"1 / (1 - ratio) rescaling infinite); got {self.dynamic_pruning_ratio}."
            )
        if self.dynamic_pruning_score not in _PRUNING_SCORES:
            raise ValueError(
                f"dynamic_pruning_score must be one of {_PRUNING_SCORES}; got {self.dynamic_pruning_score!r}."
            )
        if not 0.0 < self.dynamic_pruning_until <= 1.0:
            raise ValueError(f"dynamic_pruning_until must be in (0, 1]; got {self.dynamic_pruning_until}.")
        if self.dynamic_pruning and self.max_steps > 0:
            raise ValueError(
                "Dynamic pruning decides per epoch which examples to skip and ends with full-data epochs, so it needs "
                f"an epoch budget: set num_train_epochs and leave max_steps at -1 (got max_steps={self.max_steps})."
            )

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **overrides) -> DataDietConfig:
        """Upcast a plain `TrainingArguments` (its values kept, the datadiet fields at their defaults unless given
        in `overrides`).

        Example:
        ```python
        >>> from transformers import TrainingArguments
        >>> from datadiet.trainer import DataDietConfig
        >>> config = DataDietConfig.from_training_arguments(TrainingArguments("out", learning_rate=0.1))
        >>> config.learning_rate, config.track_scores[:2]
        (0.1, ['loss', 'el2n'])

        ```
        """
        if isinstance(args, cls) and not overrides:
            return args
        values = {f.name: getattr(args, f.name) for f in fields(args) if f.init}
        # `TrainingArguments.__post_init__` turned these into enums or resolved values; give back what it accepts.
        values = {key: getattr(value, "value", value) for key, value in values.items()}
        values.update(overrides)
        return cls(**values)
