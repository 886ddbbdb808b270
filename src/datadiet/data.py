"""`datasets` integration: finding the input and label columns, turning raw rows into model inputs (timm /
torchvision transforms, transformers image processors, tokenizers), `ScoreTransform` for `Dataset.map`, loading data."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Image, Value
from torch import nn

from .loading import BUILT_IN_DATASETS, load_data, load_digits_dataset
from .models import model_name_of, weights_fingerprint
from .provenance import describe_source, record_provenance, register_provenance_finder
from .scores.batch import validate_methods
from .tasks import get_task
from .tasks.classification import Preprocessor

logger = logging.getLogger(__name__)

__all__ = [
    "BUILT_IN_DATASETS",
    "Preprocessor",
    "ScoreTransform",
    "build_image_transform",
    "check_input_channels",
    "column_values",
    "detect_columns",
    "detect_label_column",
    "load_data",
    "load_digits_dataset",
    "keep_classes",
    "label_names_of",
    "num_classes_of",
    "preprocessor_of",
    "training_view",
]


def detect_columns(
    dataset: Dataset,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> tuple[str, str, str]:
    """Find the input column (an `Image` column, else a string column) and the label column (a `ClassLabel`, else a
    column called `label`/`labels`) of `dataset`. Returns `(input_column, kind, label_column)` with `kind` one of
    `"image"`, `"text"`, `"array"`.

    Example:
    ```python
    >>> from datasets import ClassLabel, Dataset, Features, Value
    >>> from datadiet.data import detect_columns
    >>> ds = Dataset.from_dict({"text": ["a", "b"], "y": [0, 1]},
    ...                        features=Features({"text": Value("string"), "y": ClassLabel(names=["n", "p"])}))
    >>> detect_columns(ds)
    ('text', 'text', 'y')

    ```
    """
    features = dataset.features
    for name in (image_column, text_column, label_column):
        if name is not None and name not in features:
            raise ValueError(f"Column {name!r} is not in the dataset; its columns are {list(features)}.")
    label_column = detect_label_column(dataset, label_column)
    if image_column is not None:
        return image_column, "image" if isinstance(features[image_column], Image) else "array", label_column
    if text_column is not None:
        return text_column, "text", label_column
    images = [name for name, feature in features.items() if isinstance(feature, Image)]
    if images:
        return images[0], "image", label_column
    texts = [
        name
        for name, feature in features.items()
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    ]
    if texts:
        return texts[0], "text", label_column
    raise ValueError(
        f"No input column found among {list(features)}: there is no Image column nor a string column. Pass "
        "image_column=... (an Image or array column) or text_column=... ."
    )


def column_values(dataset: Dataset, name: str) -> np.ndarray:
    """The column `name` as one numpy array, read in bulk through Arrow (iterating a `datasets` column row by row is
    orders of magnitude slower on large datasets).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.data import column_values
    >>> column_values(Dataset.from_dict({"x": [1.5, 2.5]}), "x")
    array([1.5, 2.5])

    ```
    """
    if name not in dataset.column_names:
        raise ValueError(f"Column {name!r} is not in the dataset; its columns are {dataset.column_names}.")
    return np.asarray(dataset.select_columns([name]).with_format("arrow")[:][name].to_numpy())


def num_classes_of(dataset: Dataset, label_column: str) -> int:
    """The number of classes: from the `ClassLabel` feature, else the largest label + 1."""
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    return int(column_values(dataset, label_column).max()) + 1


def label_names_of(dataset: Dataset, label_column: str) -> list[str]:
    """The class names: the `ClassLabel`'s, else the labels' numbers as text."""
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(num_classes_of(dataset, label_column))]


def keep_classes(
    dataset: Dataset, classes: Sequence[str | int], label_column: str, *, max_rows: int | None = None
) -> Dataset:
    """The rows of `classes` only (`ClassLabel` names or label ids; the first `max_rows` of them if given),
    relabelled `0..k-1` in the order given, with a `ClassLabel` of their names: e.g. CIFAR-10's classes 5-9 as a
    5-class dataset of its own.

    Example:
    ```python
    >>> from datasets import ClassLabel, Dataset, Features, Value
    >>> from datadiet.data import keep_classes
    >>> features = Features({"x": Value("int64"), "label": ClassLabel(names=["cat", "dog", "fox"])})
    >>> dataset = Dataset.from_dict({"x": [0, 1, 2, 3], "label": [0, 1, 2, 1]}, features=features)
    >>> kept = keep_classes(dataset, ["fox", "dog"], "label")
    >>> kept[:], kept.features["label"].names
    ({'x': [1, 2, 3], 'label': [1, 0, 1]}, ['fox', 'dog'])

    ```
    """
    names = label_names_of(dataset, label_column)
    ids = []
    for name in classes:
        text = str(name)
        if text in names:
            ids.append(names.index(text))
        elif text.isdigit() and int(text) < len(names):
            ids.append(int(text))
        else:
            raise ValueError(
                f"Class {text!r} is not a class of {label_column!r}: name some of {names} or ids 0-{len(names) - 1}."
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"keep_classes names a class twice: {list(classes)}.")
    position = {label: i for i, label in enumerate(ids)}
    kept = dataset.filter(
        lambda labels: [label in position for label in labels], input_columns=label_column, batched=True
    )
    if len(kept) == 0:
        raise ValueError(
            f"No row of this split is in classes {list(classes)} (of {len(dataset)} rows read): read more rows "
            "(max_rows / max_eval_rows count the rows of the kept classes) or name other classes."
        )
    if max_rows is not None:
        kept = kept.select(range(min(max_rows, len(kept))))
    features = kept.features.copy()
    features[label_column] = ClassLabel(names=[names[i] for i in ids])
    return kept.map(
        lambda labels: {label_column: [position[label] for label in labels]},
        input_columns=label_column,
        batched=True,
        features=features,
    )


def detect_label_column(dataset: Dataset, label_column: str | None = None) -> str:
    """The label column: `label_column` if given (checked), else the first `ClassLabel` column, else one named
    `label` or `labels`."""
    features = dataset.features
    if label_column is not None:
        if label_column not in features:
            raise ValueError(f"Column {label_column!r} is not in the dataset; its columns are {list(features)}.")
        return label_column
    candidates = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
    candidates = candidates or [name for name in ("label", "labels") if name in features]
    if not candidates:
        raise ValueError(
            f"No label column found among {list(features)}: there is no ClassLabel column nor one named "
            "'label'/'labels'. Pass label_column=... ."
        )
    return candidates[0]


def preprocessor_of(
    dataset: Dataset,
    preprocessor: Preprocessor | None = None,
    transform: Callable | None = None,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> Preprocessor:
    """`preprocessor` when given (then no transform or column may be), else one built around `transform` from the
    columns of `dataset` (`detect_columns`).

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.data import preprocessor_of
    >>> dataset = Dataset.from_dict({"pixels": [[0.0, 1.0], [1.0, 0.0]], "label": [0, 1]})
    >>> preprocessor = preprocessor_of(dataset, image_column="pixels")
    >>> preprocessor.columns, preprocessor.kind
    (['pixels', 'label'], 'array')

    ```
    """
    if preprocessor is not None:
        given = {"transform": transform, "image_column": image_column, "text_column": text_column}
        given["label_column"] = label_column
        clashing = [name for name, value in given.items() if value is not None]
        if clashing:
            raise ValueError(
                f"Give either preprocessor= or {clashing}, not both: the preprocessor already holds its transform "
                "and columns."
            )
        return preprocessor
    input_column, kind, label_column = detect_columns(
        dataset, image_column=image_column, text_column=text_column, label_column=label_column
    )
    return Preprocessor(transform, input_column=input_column, kind=kind, label_column=label_column)


def check_input_channels(dataset: Dataset, preprocessor: Preprocessor, in_chans: int | None) -> None:
    """Refuse a model built for `in_chans` input channels when `dataset`'s first row, preprocessed, has another number
    (1-channel digits or MNIST through a 3-channel model), saying which `in_chans` to build with. Done before any
    training or scoring, so the mistake costs nothing."""
    if in_chans is None or not isinstance(dataset, Dataset) or len(dataset) == 0 or preprocessor.kind == "text":
        return
    inputs, _ = preprocessor(dataset.select_columns(preprocessor.columns).with_format(None)[:1])
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4 or inputs.shape[1] == in_chans:
        return
    channels = inputs.shape[1]
    raise ValueError(
        f"The images in column {preprocessor.input_column!r} have {channels} channel(s) but the model takes {in_chans}: "
        f"build it with in_chans={channels} (`--in_chans {channels}` on the command line)."
    )


class ScoreTransform:
    """Score a dataset with `dataset.map(ScoreTransform(model, "el2n", ...), batched=True)`.

    The transform adds one float32 column per method. Its fingerprint (what `datasets` caches `map` results under)
    depends on the model's weights, the methods and the preprocessing only, so running it again with the same
    weights hits the cache and different weights do not.

    Provenance: `map` copies the input's metadata and gives the function no say in it, so the transform registers
    itself with `datadiet.provenance.read_provenance` instead; a dataset holding its score columns (mapped in one
    process or several, freshly or from the cache, then pruned) is recognised by recomputing a few rows' scores with
    the model, and `prune`, `save_pruned` and `push_to_hub` record the model and methods in the card, as long as the
    transform was built in the same session (the newest 8 are kept) and the model has not changed since.
    `ScoreTransform(...).apply(dataset)` writes the same provenance into the dataset's own metadata at once, which
    then travels to `save_to_disk` and other sessions.

    Args:
        model: a classifier returning logits (timm, transformers, any `nn.Module`); run in eval mode.
        methods: one score name or several (see `datadiet.scores.list_scores()`).
        transform: per-image callable, transformers image processor, or tokenizer (see `Preprocessor`).
        image_column / text_column / label_column: detected from the features on the first call when not given.
        task: `"causal_lm"` to score a causal LM on instruction / SFT rows (TRL's formats or Alpaca columns) with
            `list_scores("causal_lm")`; `None` for classifiers.
        tokenizer / max_length: the causal LM's tokenizer and `SFTConfig.max_length` (`task="causal_lm"`).

    Example:
    ```python
    >>> import timm
    >>> from datasets import ClassLabel, Dataset, Features, Image
    >>> from PIL import Image as PILImage
    >>> from datadiet import ScoreTransform
    >>> images = [PILImage.new("RGB", (32, 32), color=(i * 40, 0, 0)) for i in range(4)]
    >>> ds = Dataset.from_dict({"img": images, "label": [0, 1, 0, 1]},
    ...                        features=Features({"img": Image(), "label": ClassLabel(names=["a", "b"])}))
    >>> model = timm.create_model("test_resnet", num_classes=2)
    >>> scored = ds.map(ScoreTransform(model, ["el2n", "loss"]), batched=True, batch_size=2)
    >>> scored.column_names
    ['img', 'label', 'el2n', 'loss']
    >>> scored = ScoreTransform(model, ["el2n", "loss"]).apply(ds, batch_size=2)

    ```
    """

    def __init__(
        self,
        model: nn.Module,
        methods: str | Sequence[str] = "el2n",
        *,
        transform: Callable | None = None,
        image_column: str | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
        autocast_dtype: torch.dtype | None = None,
        task: str | None = None,
        tokenizer: Any = None,
        max_length: int | None = 1024,
    ):
        self.model = model
        self.methods = validate_methods(methods, task)
        # A task other than classification (`"causal_lm"`) builds and scores its own batches; see `datadiet.tasks`.
        self.task = get_task(task, tokenizer=tokenizer, max_length=max_length) if task is not None else None
        self.transform = transform
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.autocast_dtype = autocast_dtype
        self._preprocessor: Preprocessor | None = None
        self._recognised: dict[str, bool] = {}  # dataset fingerprint -> whether its score columns are this model's
        register_provenance_finder(self._provenance_of)

    def _classifier_task(self):
        """The `image_classification` / `text_classification` task of this transform's columns (its preprocessor
        built once)."""
        if self._preprocessor is None:
            input_column = self.image_column or self.text_column
            if input_column is None or self.label_column is None:
                raise ValueError(
                    "ScoreTransform needs to know its columns when used outside score_dataset: pass image_column= "
                    "(or text_column=) and label_column=, or call ScoreTransform.for_dataset(dataset, ...)."
                )
            kind = "text" if self.text_column else "image"
            self._preprocessor = Preprocessor(
                self.transform, input_column=input_column, kind=kind, label_column=self.label_column
            )
        name = "text_classification" if self._preprocessor.kind == "text" else "image_classification"
        return get_task(name, preprocessor=self._preprocessor)

    @classmethod
    def for_dataset(cls, dataset: Dataset, model: nn.Module, methods: str | Sequence[str] = "el2n", **kwargs):
        """A `ScoreTransform` whose columns are detected from `dataset`'s features."""
        input_column, kind, label_column = detect_columns(
            dataset,
            image_column=kwargs.pop("image_column", None),
            text_column=kwargs.pop("text_column", None),
            label_column=kwargs.pop("label_column", None),
        )
        columns = {"text_column" if kind == "text" else "image_column": input_column, "label_column": label_column}
        return cls(model, methods, **columns, **kwargs)

    @property
    def provenance(self) -> dict[str, Any]:
        """What the scores come from (the `scoring` provenance a dataset card records): methods, model class, its
        config when it has one, and a fingerprint of its weights."""
        config = getattr(self.model, "config", None)
        return {
            "methods": list(self.methods),
            "model": model_name_of(self.model),
            "model_config": config.to_dict() if hasattr(config, "to_dict") else None,
            "weights_sha256": weights_fingerprint(self.model),
            "input_column": self.image_column or self.text_column,
            "label_column": self.label_column,
        }

    def apply(self, dataset: Dataset, **map_kwargs) -> Dataset:
        """`dataset.map(self, batched=True, **map_kwargs)` with the scoring provenance (and the source) written into
        the result's metadata at once, so that it travels with the dataset to other sessions too."""
        scored = dataset.map(self, batched=True, **map_kwargs)
        return record_provenance(scored, scoring=self.provenance, source=describe_source(dataset))

    def _provenance_of(self, dataset: Dataset) -> dict[str, Any] | None:
        """The scoring provenance of `dataset` if its score columns are this transform's: `Dataset.map` gives the
        function no say in the result's metadata, and a cached or multi-process `map` may not call it at all, so the
        scores are recognised by recomputing those of a few rows with this model (as it is now)."""
        columns = dataset.column_names
        if not isinstance(dataset, Dataset) or len(dataset) == 0 or not all(m in columns for m in self.methods):
            return None
        key = dataset._fingerprint
        if key not in self._recognised:
            rows = dataset.select(range(min(4, len(dataset)))).with_format(None)
            batch = rows[:]
            try:
                recomputed = self(dict(batch))
            except (ValueError, KeyError, TypeError, RuntimeError):  # not data this transform can read
                self._recognised[key] = False
            else:
                tolerance = 1e-2 if self.autocast_dtype is not None else 1e-4
                self._recognised[key] = all(
                    np.allclose(recomputed[m], np.asarray(batch[m], dtype=np.float32), rtol=tolerance, atol=1e-5)
                    for m in self.methods
                )
        if not self._recognised[key]:
            return None
        # The source as far as the dataset tells it (its fingerprint and size are this dataset's, not the source's).
        source = {k: v for k, v in describe_source(dataset).items() if k not in ("fingerprint", "num_rows")}
        return {"scoring": {**self.provenance, "route": "Dataset.map"}, "source": source}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if (
            self.task is None
            and self._preprocessor is None
            and (self.label_column is None or not (self.image_column or self.text_column))
        ):
            # Detect the columns from the batch itself: images are PIL objects, text are strings.
            self._detect_from_batch(batch)
        # Every task the same way: its columns, its collate, its score_batch.
        task = self.task if self.task is not None else self._classifier_task()
        names = task.columns_in(list(batch))
        was_training = self.model.training
        self.model.eval()
        try:
            collated = task.collate({name: batch[name] for name in names if name in batch})
            scores = task.score_batch(self.model, collated, self.methods, autocast_dtype=self.autocast_dtype)
        finally:
            self.model.train(was_training)
        # float32 arrays: Arrow columns of float32 (Python floats would make them float64).
        return {name: values.detach().float().cpu().numpy() for name, values in scores.items()}

    def _detect_from_batch(self, batch: dict[str, list]) -> None:
        for name, values in batch.items():
            first = values[0] if len(values) else None
            if self.label_column is None and name in ("label", "labels"):
                self.label_column = name
            elif not (self.image_column or self.text_column):
                if isinstance(first, str):
                    self.text_column = name
                elif hasattr(first, "getpixel") or isinstance(first, np.ndarray):
                    self.image_column = name
        if self.label_column is None:
            raise ValueError(f"No label column among {list(batch)}: pass label_column=... to ScoreTransform.")

    def __getstate__(self) -> dict:
        # datasets fingerprints `map` by pickling the function (tensors by value): leave out the lazily built
        # preprocessor so that a used and a fresh transform hash the same.
        state = self.__dict__.copy()
        state["_preprocessor"] = None
        state["_recognised"] = {}
        return state


def build_image_transform(
    image_size: int | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augment: bool = False,
    crop_padding: int = 4,
) -> Callable:
    """A per-image transform (PIL -> float CHW tensor): optional resize to `image_size`, optional augmentation
    (random crop with `crop_padding` and horizontal flip, for training only), scaling to [0, 1] and optional
    normalisation. Scoring uses the un-augmented form, as EL2N and GraNd are defined.

    Example:
    ```python
    >>> from PIL import Image
    >>> from datadiet.data import build_image_transform
    >>> build_image_transform(32, mean=[0.5], std=[0.5])(Image.new("L", (8, 8))).shape
    torch.Size([1, 32, 32])

    ```
    """
    from torchvision.transforms import v2

    steps: list = [v2.ToImage()]
    if image_size is not None:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    if augment:
        steps += [
            v2.RandomCrop(image_size or 32, padding=crop_padding, padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
        ]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("Give both mean and std to normalise, or neither.")
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)


def training_view(dataset: Dataset, preprocessor: Preprocessor) -> Dataset:
    """`dataset` formatted for `transformers.Trainer`: each fetched batch becomes `pixel_values` (or the tokenizer's
    outputs) and `labels`, through `preprocessor`. The input dataset is unchanged."""

    def to_features(batch: dict[str, list]) -> dict[str, Any]:
        inputs, labels = preprocessor(batch)
        features = dict(inputs) if isinstance(inputs, dict) else {"pixel_values": inputs}
        return {**features, "labels": labels}

    return dataset.select_columns(preprocessor.columns).with_transform(to_features)
