"""Tasks: what a row is and what a model's output means. One registry (`register_task`, `get_task`, `list_tasks`),
one module per task: `image_classification`, `text_classification`, `causal_lm`. Every scoring path asks the task
instead of re-deriving batches, masks or label checks.

A task object has:

- `name` (`str`): its registry name, also the `task` of its scores in `datadiet.scores.list_scores(task)`;
- `collate(rows, ...) -> batch`: raw rows (a `dict` of column lists, as `Dataset[...]` gives them) to one batch
  (`dict` of tensors, with `labels`); for `causal_lm`, TRL's formats tokenised and masked as `SFTTrainer` does,
  truncated to `max_length` and padded;
- `loss_mask(batch) -> [B, T] bool`: the trained positions (classification: one per example; causal LM: the
  positions whose next token is trained on, after the shift);
- `per_token_losses(logits, batch) -> (values [B, T], mask [B, T])` and `per_example(values, mask) -> [B]` (the mean
  over each example's trained positions); `per_example_losses(logits, batch) -> [B]` composes them;
- `check_labels(labels, num_outputs, row_ids=None)`: class ids within the classes, or token ids within the
  vocabulary (`-100` ignored); never one for the other;
- `score_batch(model, batch, methods, *, row_ids=None, autocast_dtype=None, ...) -> dict[str, Tensor [B]]`: the
  task's scores on one collated batch;
- `fingerprint() -> str`: what the batches depend on, for caches and resumable runs.

A new task is one module here, decorated with `@register_task("name")`, and its scores registered with
`@register_score(name, task="name")` in `datadiet.scores` (its `loss` score is also what `per_example_grad_norms`
differentiates). What still names `"causal_lm"` outside this folder, and would need the new task's case: the trainer's
task resolution and per-token tracking (`datadiet.trainer.causal_lm`, `callback`), `score_dataset`'s batches
(`datadiet.engine.batches.task_batches`) and methods (`engine.dynamics`), the card's metadata (`datadiet.hub.card`)
and the command's tokenizer loading (`datadiet.cli.score`).
"""

from . import causal_lm, image_classification, text_classification
from .causal_lm import CausalLMTask
from .classification import ClassificationTask, Preprocessor
from .image_classification import ImageClassificationTask
from .registry import check_task_name, get_task, list_tasks, register_task
from .text_classification import TextClassificationTask

__all__ = [
    "CausalLMTask",
    "ClassificationTask",
    "ImageClassificationTask",
    "Preprocessor",
    "TextClassificationTask",
    "causal_lm",
    "check_task_name",
    "get_task",
    "image_classification",
    "list_tasks",
    "register_task",
    "text_classification",
]
