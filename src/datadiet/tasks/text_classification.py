"""The `text_classification` task: text and class ids, tokenised with the model's tokenizer."""

from __future__ import annotations

from .classification import ClassificationTask
from .registry import register_task

__all__ = ["TextClassificationTask"]


@register_task("text_classification")
class TextClassificationTask(ClassificationTask):
    """A text column and class ids; `transform` is the model's tokenizer (padding to the longest row, truncation to
    `max_length`); the model is a `*ForSequenceClassification` returning `[B, C]` logits."""

    kind = "text"
