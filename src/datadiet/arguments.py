"""The argument dataclasses that the commands and the pruning curve share: which data to read (`DataArguments`) and
which classifier to build (`ModelArguments`). No argv parsing here: `datadiet.cli` parses them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DataArguments", "ModelArguments"]


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


@dataclass
class ModelArguments:
    """A freshly initialised classifier: a timm architecture or a transformers model type, and its input
    normalisation (see `datadiet.models.model_init_from_arguments`).

    Example:
    ```python
    >>> from datadiet.arguments import ModelArguments
    >>> ModelArguments(model_name="test_resnet", in_chans=1).model_library
    'timm'

    ```
    """

    model_name: str = field(default="resnet18", metadata={"help": "timm architecture or transformers model type."})
    model_library: str = field(default="timm", metadata={"help": "'timm' or 'transformers'."})
    model_kwargs: str | None = field(default=None, metadata={"help": "JSON (or YAML mapping) of model options."})
    in_chans: int = field(default=3, metadata={"help": "Input channels (1 for MNIST / digits)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize images to this size."})
    mean: list[float] | None = field(default=None, metadata={"help": "Normalisation mean per channel."})
    std: list[float] | None = field(default=None, metadata={"help": "Normalisation std per channel."})

    def __post_init__(self):
        if self.model_library not in ("timm", "transformers"):
            raise ValueError(f"model_library must be 'timm' or 'transformers', got {self.model_library!r}.")
