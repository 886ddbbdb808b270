"""The `image_classification` task: images (or arrays) and class ids, through `Preprocessor`."""

from __future__ import annotations

from .classification import ClassificationTask
from .registry import register_task

__all__ = ["ImageClassificationTask"]


@register_task("image_classification")
class ImageClassificationTask(ClassificationTask):
    """Images (an `Image` column) or arrays, and class ids; `transform` is a per-image callable (timm / torchvision) or
    a transformers image processor; `None` scales images to [0, 1], CHW.

    Example:
    ```python
    >>> from PIL import Image
    >>> from datadiet.tasks import get_task
    >>> task = get_task("image_classification", input_column="img", label_column="label")
    >>> batch = task.collate({"img": [Image.new("RGB", (4, 4))] * 2, "label": [0, 1]})
    >>> tuple(batch["inputs"].shape), batch["labels"].tolist()
    ((2, 3, 4, 4), [0, 1])

    ```
    """

    kind = "image"
