"""The argument dataclasses that the commands and the pruning curve share: which data to read (`DataArguments`) and
which classifier to build (`ModelArguments`). No argv parsing here: `datadiet.cli` parses them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "CausalLMArguments",
    "DataArguments",
    "ModelArguments",
    "ModelSourceArguments",
    "check_causal_lm_arguments",
    "check_model_source",
]


@dataclass
class DataArguments:
    """The training split a command reads and, for the commands that test a model, the test split.

    Example:
    ```python
    >>> from datadiet.arguments import DataArguments
    >>> args = DataArguments("sklearn-digits", max_rows=100)
    >>> args.split, args.eval_split, args.max_rows
    ('train', 'test', 100)

    ```
    """

    dataset_name: str = field(
        metadata={"help": "The data: a save_to_disk folder, a dataset folder, 'sklearn-digits', or a Hub id."}
    )
    data_files: str | None = field(default=None, metadata={"help": "Data file(s) (Parquet, CSV, JSON) of `split`."})
    split: str = field(default="train", metadata={"help": "Split to read: the one scored, or the training split."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Test data (default: dataset_name)."})
    eval_data_files: str | None = field(default=None, metadata={"help": "Data file(s) of the test split."})
    eval_split: str = field(default="test", metadata={"help": "Test split name."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first rows of `split` (a slice)."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Use only the first rows of the test split."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (detected when not given)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (detected when not given)."})
    keep_classes: list[str] | None = field(
        default=None,
        metadata={
            "help": "Keep only these classes (ClassLabel names or ids) in the training and test splits, relabelled "
            "0..k-1 in the order given (e.g. 5 6 7 8 9: CIFAR-10's last five classes as a task of its own); max_rows "
            "and max_eval_rows then count rows of these classes."
        },
    )


@dataclass
class ModelSourceArguments:
    """Where a model's weights come from: a pretrained checkpoint (`model_name_or_path`, fine-tuned from), or an
    architecture trained from scratch (`model_name`), never both. Shared by every command that builds a model and by
    the pruning curve; `datadiet.model_sources.ModelSource` builds from it.

    Example:
    ```python
    >>> from datadiet.arguments import ModelSourceArguments
    >>> ModelSourceArguments(model_name_or_path="resnet10t", checkpoint_file="model.safetensors").model_name is None
    True

    ```
    """

    model_name: str | None = field(
        default=None, metadata={"help": "An architecture trained from scratch: timm name or transformers model type."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained checkpoint to start from: a save_pretrained (transformers) or save_for_hf (timm) "
            "folder, a Hub id, a timm name with its tag (resnet18.a1_in1k, hf-hub:..., local-dir:...), a weights file "
            "with a timm config.json beside it, or a .gguf file. Its head is replaced, and logged, when the dataset's "
            "classes differ."
        },
    )
    checkpoint_file: str | None = field(
        default=None,
        metadata={
            "help": "A timm weights file of the architecture named by model_name_or_path (pretrained_cfg_overlay)."
        },
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "The .gguf file inside the folder or Hub repository model_name_or_path."}
    )

    def __post_init__(self):
        check_model_source(self)


def check_model_source(args) -> None:
    """The one validation of a model source (`model_name` / `model_name_or_path` / `checkpoint_file` / `gguf_file`),
    for the commands, the curve and the Python API."""
    if args.model_name and args.model_name_or_path:
        raise ValueError(
            f"Name either --model_name {args.model_name} (an architecture trained from scratch) or "
            f"--model_name_or_path {args.model_name_or_path} (a checkpoint to start from), not both."
        )
    for name in ("checkpoint_file", "gguf_file"):
        if getattr(args, name) and not args.model_name_or_path:
            raise ValueError(
                f"--{name} is read with --model_name_or_path (the checkpoint it belongs to): pass it too."
            )
    if args.checkpoint_file and args.gguf_file:
        raise ValueError("Give --checkpoint_file (a timm weights file) or --gguf_file (a causal LM), not both.")


@dataclass
class ModelArguments(ModelSourceArguments):
    """The classifier a command builds: a checkpoint or an architecture from scratch (see `ModelSourceArguments`),
    its input channels and its input size and normalisation (the checkpoint's image processor / pretrained_cfg when
    they are not given).

    Example:
    ```python
    >>> from datadiet.arguments import ModelArguments
    >>> ModelArguments(model_name="test_resnet", in_chans=1).model_library
    'timm'
    >>> ModelArguments().model_name
    'resnet18'

    ```
    """

    model_library: str | None = field(
        default=None,
        metadata={"help": "'timm' (default) or 'transformers'; read from the checkpoint when one is named."},
    )
    model_kwargs: str | None = field(default=None, metadata={"help": "JSON (or YAML mapping) of model options."})
    in_chans: int = field(default=3, metadata={"help": "Input channels (1 for MNIST / digits)."})
    image_size: int | None = field(
        default=None, metadata={"help": "Resize images to this size (default: the checkpoint's, if it fixes one)."}
    )
    mean: list[float] | None = field(
        default=None, metadata={"help": "Normalisation mean per channel (default: the checkpoint's, if any)."}
    )
    std: list[float] | None = field(
        default=None, metadata={"help": "Normalisation std per channel (default: the checkpoint's, if any)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.model_library not in (None, "timm", "transformers"):
            raise ValueError(f"model_library must be 'timm' or 'transformers', got {self.model_library!r}.")
        if not self.model_name_or_path:
            self.model_name = self.model_name or "resnet18"
            self.model_library = self.model_library or "timm"


@dataclass
class CausalLMArguments:
    """How a causal LM scores instruction / SFT rows (`task="causal_lm"`): its tokenizer, `max_length`, and the
    peft LoRA adapters whose parameters `grand` is over (fresh ones made with `lora_r`, or a trained adapter folder).
    Without adapters, `grand` is over every parameter of the model.

    Example:
    ```python
    >>> from datadiet.arguments import CausalLMArguments
    >>> CausalLMArguments(task="causal_lm", lora_r=16).lora_target_modules
    ['all-linear']

    ```
    """

    task: str | None = field(
        default=None,
        metadata={
            "help": "What a row is: causal_lm (instruction / SFT rows in TRL's formats or Alpaca's, scored by a causal "
            "LM), or image_classification / text_classification (the default, detected from the columns)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "causal_lm: the tokenizer (default: model_name_or_path's own)."}
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "causal_lm: rows truncated to their first max_length tokens (SFTConfig's)."}
    )
    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "causal_lm: add fresh peft LoRA adapters of this rank (seeded by the first seed), so that grand is "
            "over the adapters only; without adapters grand is over every parameter."
        },
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "causal_lm: LoRA alpha (default 2 * lora_r)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "causal_lm: the modules given adapters (peft's target_modules; all-linear by default)."},
    )
    adapter_name_or_path: str | None = field(
        default=None, metadata={"help": "causal_lm: a trained peft adapter folder to score with (instead of lora_r)."}
    )

    def __post_init__(self):
        check_causal_lm_arguments(self)


def check_causal_lm_arguments(args) -> None:
    """The one validation of `CausalLMArguments`' fields: the task's name, and the causal-LM options only with it."""
    from .tasks import check_task_name

    if args.task is not None:
        check_task_name(args.task)
    given = [name for name in ("tokenizer_name_or_path", "lora_r", "lora_alpha", "adapter_name_or_path")
             if getattr(args, name) is not None]  # fmt: skip
    if given and args.task != "causal_lm":
        raise ValueError(f"--{given[0]} is an option of causal LMs: pass --task causal_lm too (or drop it).")
    if args.lora_r is not None and args.lora_r < 1:
        raise ValueError(f"lora_r must be a rank >= 1 (e.g. --lora_r 16), got {args.lora_r}.")
    if args.lora_r is not None and args.adapter_name_or_path:
        raise ValueError("Give --lora_r (fresh adapters) or --adapter_name_or_path (trained ones), not both.")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens (one predicted from another), got {args.max_length}.")
