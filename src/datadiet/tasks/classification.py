"""Classification tasks' shared parts: `Preprocessor` (raw rows -> model inputs and class ids, for images, arrays and
tokenised text) and `ClassificationTask`, what `image_classification` and `text_classification` register."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models import as_model_inputs, num_labels_of
from ..scores.batch import check_class_labels, score_batch
from ..scores.functional import loss as cross_entropy
from ..scores.logits import unwrap_logits
from ..scores.trackers import training_quantities

__all__ = ["ClassificationTask", "Preprocessor"]


def _is_tokenizer(transform: Any) -> bool:
    return hasattr(transform, "pad_token_id") and hasattr(transform, "batch_decode")


def _is_image_processor(transform: Any) -> bool:
    return hasattr(transform, "model_input_names") and hasattr(transform, "preprocess")


def _default_image_to_tensor(image: Any) -> torch.Tensor:
    # uint8 HWC (or HW) -> float CHW in [0, 1]; what torchvision's ToTensor does, without the PIL round trip.
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(np.array(array.transpose(2, 0, 1)))  # a writable copy in CHW order
    return tensor.float().div_(255.0) if tensor.dtype == torch.uint8 else tensor.float()


class Preprocessor:
    """Turns a batch of raw rows (`dict` of column lists, as `Dataset.__getitem__` / `map(batched=True)` give them)
    into `(inputs, labels)`: `inputs` is a float tensor for images and arrays, or a dict of tensors from a tokenizer
    or an image processor.

    Args:
        transform: `None` (images scaled to [0, 1], CHW), a callable applied to each image (a timm
            `create_transform` or torchvision transform), a transformers image processor, or a tokenizer.
        input_column / kind / label_column: as returned by `detect_columns`.
        max_length: truncation length for tokenizers.
    """

    def __init__(
        self,
        transform: Callable | None,
        *,
        input_column: str,
        kind: str,
        label_column: str,
        max_length: int | None = None,
    ):
        self.transform = transform
        self.input_column = input_column
        self.kind = kind
        self.label_column = label_column
        self.max_length = max_length
        if kind == "text" and not _is_tokenizer(transform):
            raise ValueError(
                f"Column {input_column!r} holds text: pass the model's tokenizer as transform= "
                "(e.g. AutoTokenizer.from_pretrained(...))."
            )

    @property
    def columns(self) -> list[str]:
        return [self.input_column, self.label_column]

    def inputs(self, values: Sequence) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.kind == "text":
            return dict(
                self.transform(
                    list(values), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
            )
        if self.transform is not None and _is_image_processor(self.transform):
            return self.transform(images=list(values), return_tensors="pt")["pixel_values"]
        if self.kind == "image":
            transform = self.transform or _default_image_to_tensor
            return torch.stack([transform(image) for image in values])
        if self.transform is not None:
            return torch.stack([self.transform(value) for value in values])
        return torch.as_tensor(np.asarray(values), dtype=torch.float32)

    def labels(self, values: Sequence) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), dtype=torch.long)

    def __call__(self, batch: dict[str, list]) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
        return self.inputs(batch[self.input_column]), self.labels(batch[self.label_column])

    def fingerprint(self) -> str:
        """A stable description of the preprocessing, for caches and resumable runs."""
        return f"{self.kind}:{self.input_column}:{self.label_column}:{self.max_length}:{_describe(self.transform)}"


def _describe(transform: Any) -> str:
    if transform is None:
        return "none"
    if hasattr(transform, "to_json_string"):  # transformers image processors and tokenizers' configs
        return type(transform).__name__ + ":" + transform.to_json_string()
    if hasattr(transform, "name_or_path"):
        return f"{type(transform).__name__}:{transform.name_or_path}:{len(transform)}"
    return repr(transform)


class ClassificationTask:
    """A classifier's task: a row is an input (image, array or text) and a class id; the model returns logits `[B, C]`;
    each example's loss is the cross-entropy of its class; labels must lie in `[0, C)`. Rows become a batch through
    `Preprocessor`, the path every classification score has always taken.

    Args:
        transform (*optional*): per-image callable, transformers image processor, or tokenizer (see `Preprocessor`).
        input_column (`str`): the image / array / text column.
        label_column (`str`): the class-id column.
        max_length (`int`, *optional*): truncation length for tokenizers.
        preprocessor (`Preprocessor`, *optional*): a preprocessor already built (columns detected), used as it is
            instead of the four arguments above.
    """

    name = "classification"
    kind = "image"

    def __init__(
        self,
        transform: Callable | None = None,
        *,
        input_column: str | None = None,
        label_column: str | None = None,
        max_length: int | None = None,
        preprocessor: Preprocessor | None = None,
    ):
        if preprocessor is not None:
            transform, input_column, label_column = (
                preprocessor.transform,
                preprocessor.input_column,
                preprocessor.label_column,
            )
            max_length = preprocessor.max_length
        self.transform = transform
        self.input_column, self.label_column, self.max_length = input_column, label_column, max_length
        self._preprocessor = preprocessor

    def preprocessor(self) -> Preprocessor:
        """The `Preprocessor` of this task's columns and transform, built once."""
        if self._preprocessor is None:
            if self.input_column is None or self.label_column is None:
                raise ValueError(f"The {self.name} task needs its columns: pass input_column= and label_column=.")
            self._preprocessor = Preprocessor(
                self.transform,
                input_column=self.input_column,
                kind=self.kind,
                label_column=self.label_column,
                max_length=self.max_length,
            )
        return self._preprocessor

    @property
    def columns(self) -> list[str]:
        """The columns a batch is built from: the input and the label column."""
        return self.preprocessor().columns

    def columns_in(self, names: Sequence[str]) -> list[str]:
        """The columns this task reads (its input and label columns, whatever `names` holds)."""
        return self.columns

    def collate(self, rows: dict[str, list], row_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """Rows (a `dict` of column lists) -> `{"inputs": tensor or dict of tensors, "labels": [B]}` (`row_ids` is
        taken for the tasks' common signature; a classifier's rows are checked when scored)."""
        inputs, labels = self.preprocessor()(rows)
        return {"inputs": inputs, "labels": labels}

    def fingerprint(self) -> str:
        """The preprocessing's fingerprint (`Preprocessor.fingerprint`), for caches and resumable runs."""
        return self.preprocessor().fingerprint()

    # Outputs -> per-example quantities (no columns or transform needed: the trainer calls these on the class) ---

    @staticmethod
    def loss_mask(batch: dict[str, Any]) -> torch.Tensor:
        """Every example has one trained position: `[B, 1]` of True."""
        return torch.ones(len(batch["labels"]), 1, dtype=torch.bool, device=batch["labels"].device)

    @staticmethod
    def per_token_losses(
        logits: torch.Tensor, batch: dict[str, Any], *, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-entropy of each example's class, `[B, 1]` (with `label_smoothing`, as `Trainer` smooths), and its
        mask."""
        labels = batch["labels"].to(logits.device)
        losses = cross_entropy(logits, labels, label_smoothing=label_smoothing)[:, None]
        return losses, ClassificationTask.loss_mask({"labels": labels})

    @staticmethod
    def per_example(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[B, 1]` -> `[B]`."""
        return values[:, 0]

    @staticmethod
    def check_outputs(logits: torch.Tensor, labels: torch.Tensor) -> None:
        """A single-label classifier's training forward: logits `[B, C]`, integer labels `[B]`."""
        if logits.ndim != 2 or labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(
                "DataDietTrainer tracks single-label classifiers (or causal LMs, task='causal_lm'): logits of shape "
                f"[batch, classes] and integer labels of shape [batch]; got logits {tuple(logits.shape)} and labels "
                f"{tuple(labels.shape)} ({labels.dtype})."
            )

    @staticmethod
    def tracked_quantities(output, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-example quantities recorded while training (see [`~datadiet.scores.training_quantities`]) from a
        training forward's output (logits `[B, C]`, or an output object holding them) and labels `[B]`."""
        return training_quantities(unwrap_logits(output), labels)

    def per_example_losses(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Each example's cross-entropy `[B]`."""
        return self.per_example(*self.per_token_losses(logits, batch))

    def check_labels(self, labels: torch.Tensor, num_classes: int, row_ids: Sequence[int] | None = None) -> None:
        check_class_labels(labels, num_classes, range(len(labels)) if row_ids is None else row_ids)

    def score_batch(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        methods: Sequence[str],
        *,
        row_ids: Sequence[int] | None = None,
        num_classes: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """`datadiet.scores.score_batch` on a collated batch (on the model's device): the inputs adapted to the model
        (`pixel_values=` for a transformers image model), the labels checked against `num_classes` (by default the
        model's own number of labels)."""
        inputs = batch["inputs"]
        return score_batch(
            model,
            as_model_inputs(model, inputs),
            batch["labels"],
            methods,
            input_tensor=inputs if isinstance(inputs, torch.Tensor) else None,
            row_ids=row_ids,
            num_classes=num_labels_of(model) if num_classes is None else num_classes,
            autocast_dtype=autocast_dtype,
        )
