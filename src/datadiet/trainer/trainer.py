"""`DataDietTrainer`: a drop-in `transformers.Trainer` that records every training example's scores as it trains,
runs eval-mode scoring passes at chosen epochs, and can prune the data dynamically (InfoBatch)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import has_length

from ..engine.process import get_process_state
from ..models import ClassifierWrapper
from ..scores.logits import unwrap_logits
from .callback import ScoreCallback, add_score_columns
from .causal_lm import resolve_task, task_class
from .checkpoint import checkpoint_folder, load_trainer_state, save_trainer_state, write_final_scores
from .config import DataDietConfig
from .dynamic import DynamicPruning, DynamicPruningSampler, EpochProgressScheduler, resume_position
from .scoring_pass import score_rows
from .timm_checkpoint import TimmCheckpoints, is_timm_model
from .views import TransformedView, has_transform

logger = logging.getLogger(__name__)

__all__ = ["DataDietTrainer"]


class _EpochHooks(TrainerCallback):
    """Calls back into the trainer at epoch boundaries (after its `ScoreCallback`, which is registered first)."""

    def __init__(self, trainer: DataDietTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.trainer._on_train_begin(train_dataloader)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._on_epoch_begin()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._on_epoch_end()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._on_train_end()

    def on_save(self, args, state, control, **kwargs):
        self.trainer._on_save()


class DataDietTrainer(TimmCheckpoints, DynamicPruning, Trainer):
    """A drop-in [`~transformers.Trainer`] for classifiers that tracks every training example's scores as it trains,
    from the training forward passes (no extra pass): per epoch the loss, EL2N, margin and correctness, and from
    them forgetting events, AUM and data-map confidence / variability / correctness. It can also run eval-mode
    scoring passes at chosen epochs (EL2N or GraNd at epoch 20, say) and prune the data dynamically (InfoBatch).

    Same constructor as `Trainer` (a plain `TrainingArguments` is upcast to [`DataDietConfig`]) plus
    `scoring_dataset`. Differences from a stock `Trainer`:

    - the training loss is the cross-entropy computed here from the logits (with `label_smoothing_factor`), summed
      and divided by the number of examples in the whole accumulated batch, so that gradient accumulation gives the
      same losses and gradients as one large batch whatever the model's forward signature (the stock Trainer
      inflates them for models whose forward takes `**kwargs`, transformers #47688);
    - each batch's rows are the indices the sampler yields, checked against its labels (or its row ids, see
      [`~datadiet.trainer.row_check.RowCheck`]): a `data_collator` keeps the examples' order or passes the row ids of
      [`with_row_ids`] through, and a `compute_loss` override calls this one once per training batch;
    - a `set_transform` training set works with `remove_unused_columns=True` (unused keys go after the transform);
    - checkpoints hold the score state, which `train(resume_from_checkpoint=...)` restores; after `train()` the
      scores are also in `<output_dir>/scores/` (`datadiet.load_scores` reads them);
    - a timm model is wrapped in [`~datadiet.models.ClassifierWrapper`] (`pixel_values` / `labels` in, loss and
      logits out) and saved as timm saves it; model cards carry the `datadiet` tag.

    After `train()`, `trainer.scores` is a `datasets.Dataset` aligned with `train_dataset` (one column per score),
    `trainer.score_history` holds the per-epoch histories, and `trainer.add_scores(train_dataset)` returns the
    dataset with the columns added.

    Args:
        scoring_dataset (`datasets.Dataset`, *optional*): the rows of `train_dataset`, in the same order, preprocessed
            without augmentation, for the eval-mode scoring passes of `score_epochs` (defaults to `train_dataset`).

    Example (a tiny timm model on random images, two epochs with an EL2N scoring pass after the first; on real data,
    say, `num_train_epochs=200, score_epochs=[20]`; `trainer.train()` prints its final metrics):
    ```python
    >>> import tempfile, timm, torch
    >>> from datasets import Dataset
    >>> from datadiet.trainer import DataDietConfig, DataDietTrainer
    >>> images = torch.randn(16, 3, 16, 16)
    >>> train_dataset = Dataset.from_dict({"pixel_values": images, "labels": [0, 1] * 8}).with_format("torch")
    >>> config = DataDietConfig(tempfile.mkdtemp(), num_train_epochs=2, per_device_train_batch_size=8, report_to=[],
    ...                         score_epochs=[1], score_methods=["el2n"])
    >>> trainer = DataDietTrainer(timm.create_model("test_resnet", num_classes=2), config, train_dataset=train_dataset)
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> trainer.scores.column_names
    ['loss', 'el2n', 'margin', 'forgetting', 'aum', 'confidence', 'variability', 'correctness', 'el2n_epoch1']

    ```
    """

    _tag_names = ["datadiet"]
    # `compute_loss` divides by the number of examples of the whole accumulated batch (`num_items_in_batch`).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: DataDietConfig | Any | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        *,
        scoring_dataset=None,
    ):
        if args is None:
            args = DataDietConfig(output_dir="tmp_trainer")
        elif not isinstance(args, DataDietConfig):
            args = DataDietConfig.from_training_arguments(args)
        if args.dynamic_pruning and compute_loss_func is not None:
            raise ValueError(
                "Dynamic pruning reweights each example's loss, which a custom compute_loss_func cannot receive: "
                "drop compute_loss_func or set dynamic_pruning=False."
            )
        if model is not None and is_timm_model(model):
            logger.info("Wrapping the timm model %s in ClassifierWrapper.", type(model).__name__)
            model = ClassifierWrapper(model)
        # Label smoothing is applied in `compute_loss`; the stock constructor's LabelSmoother setup reads
        # `model.config`, which a wrapped timm / torchvision model does not have.
        label_smoothing = args.label_smoothing_factor
        args.label_smoothing_factor = 0.0
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                model_init=model_init,
                compute_loss_func=compute_loss_func,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            )
        finally:
            args.label_smoothing_factor = label_smoothing
        get_process_state()  # refuses a launch giving one process, or N each training on all data (as scoring does)
        # The loss is computed here from the logits; the model is never asked to normalise it.
        self.model_accepts_loss_kwargs = False
        self.scoring_dataset = scoring_dataset
        self.task = resolve_task(args.task, self.model)
        # The task's losses, output checks and trained-item counts (static: no tokenizer or columns needed here).
        self._task_class = task_class(self.task)
        if self.task == "causal_lm" and args.score_epochs:
            raise ValueError(
                "score_epochs runs classification scoring passes; for a causal LM score the rows after training with "
                "datadiet.score_dataset(dataset, model, task='causal_lm', ...) and leave score_epochs empty."
            )
        if self.task == "causal_lm" and label_smoothing > 0:
            raise ValueError(
                "label_smoothing_factor > 0 is not supported for a causal LM in DataDietTrainer (its loss is each "
                "row's mean token NLL): set label_smoothing_factor=0."
            )
        self.score_callback = ScoreCallback(
            args.track_scores, row_id_column=args.row_id_column, label_name=args.label_names[0], task=self.task
        )
        self.score_callback._record_from_hooks = False
        self.score_callback._caller = f"{type(self).__name__}.compute_loss"
        self.score_callback._always_record = args.dynamic_pruning
        self.add_callback(self.score_callback)
        self.add_callback(_EpochHooks(self))
        self.scoring_columns: dict[str, np.ndarray] = {}
        self.pruning_history: list[dict[str, float]] = []
        self._pruning_sampler: DynamicPruningSampler | None = None
        self._pruning_weights: torch.Tensor | None = None
        self._steps_per_epoch = 1

    # ---- data -------------------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if isinstance(self.model, ClassifierWrapper) and self.model.input_name not in self._signature_columns:
            self._signature_columns.append(self.model.input_name)
        if self.args.row_id_column not in self._signature_columns:  # `with_row_ids`'s ids: exact rows
            self._signature_columns.append(self.args.row_id_column)

    def _map_style(self, dataset, description: str):
        if not has_length(dataset):
            raise ValueError(
                "DataDietTrainer needs a map-style training set with a length (each example is tracked by its "
                f"position); got {type(dataset).__name__}."
            )
        if hasattr(dataset, "column_names") and hasattr(dataset, "remove_columns") and not has_transform(dataset):
            # No transform: unused columns can go before reading (cheaper than after, in the collator).
            dataset = self._remove_unused_columns(dataset, description=description)
        return dataset

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, **kwargs):
        if has_transform(dataset) and self.args.remove_unused_columns:
            dataset = TransformedView(dataset)
        return super()._get_dataloader(
            dataset=dataset,
            description=description,
            batch_size=batch_size,
            sampler_fn=sampler_fn,
            is_training=is_training,
            **kwargs,
        )

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("DataDietTrainer: training requires a train_dataset.")
        return self._get_dataloader(
            dataset=self._map_style(self.train_dataset, "Training"),
            description="Training",
            batch_size=self._train_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, train_dataset=None):
        if not self.args.dynamic_pruning:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._pruning_sampler = DynamicPruningSampler(len(dataset), seed)
        return self._pruning_sampler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        label_name = self.args.label_names[0]
        if num_items_in_batch is None and batch_samples and label_name in batch_samples[0]:
            # The examples of the whole accumulated batch (all processes), so that `compute_loss` can divide the
            # summed loss by it: gradient accumulation then equals one large batch.
            # The task's trained items: examples, or a causal LM's target tokens after the shift (as transformers
            # counts them).
            loss_mask = self._task_class.loss_mask
            num_items_in_batch = sum(int(loss_mask({"labels": batch[label_name]}).sum()) for batch in batch_samples)
            num_items_in_batch = torch.tensor(num_items_in_batch, device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_items_in_batch = self.accelerator.gather(num_items_in_batch).sum()
        return batch_samples, num_items_in_batch

    # ---- loss and tracking ------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        batch_row_ids = inputs.pop(self.args.row_id_column, None)
        label_name = self.args.label_names[0]
        labels = inputs.pop(label_name, None)
        if labels is None:
            raise ValueError(
                f"DataDietTrainer found no {label_name!r} in the batch (keys: {sorted(inputs)}). Name the label "
                f"column {label_name!r} (or 'label', which the default collator renames) or set label_names."
            )
        outputs = model(**inputs)
        logits = unwrap_logits(outputs)
        self._task_class.check_outputs(logits, labels)
        training = model.training
        row_ids = None
        if training:
            row_ids = self.score_callback.next_row_ids(
                labels, batch_row_ids, input_ids=inputs.get("input_ids"), attention_mask=inputs.get("attention_mask")
            )
        if row_ids is not None:
            self.score_callback.record(row_ids, logits, labels)

        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        else:
            # The task's one cross-entropy per trained item, [B, items] (a classifier's one class per example, a
            # causal LM's trained tokens) and its mask; summed over the trained items and divided by their number.
            per_item, mask = self._task_class.per_token_losses(
                logits, {"labels": labels}, label_smoothing=self.args.label_smoothing_factor
            )
            if training and self._pruning_weights is not None and row_ids is not None:
                # InfoBatch (Qin et al. 2024, eq. 3): kept easy examples count 1 / (1 - ratio) times, so that the
                # expected gradient over the random skipping equals the full-data gradient.
                weights = self._pruning_weights[row_ids.to(self._pruning_weights.device)].to(per_item.device)
                per_item = per_item * weights[:, None]
            if num_items_in_batch is None:
                loss = per_item.sum() / mask.sum().clamp(min=1)
            else:
                loss = per_item.sum() / num_items_in_batch
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    # DDP averages the gradients over processes; the count already covers all of them.
                    loss = loss * self.accelerator.num_processes
        if training and self.compute_loss_func is None and num_items_in_batch is None:
            raise ValueError("Internal error: training without num_items_in_batch; please report it.")
        if not return_outputs:
            return loss
        return loss, _with_loss(outputs, loss, logits)

    # ---- epoch events (called by _EpochHooks) -----------------------------------------------------------------------

    def _on_train_begin(self, train_dataloader) -> None:
        self.scoring_columns = {}
        self.pruning_history = []
        self._pruning_weights = None
        num_batches = len(train_dataloader) if train_dataloader is not None and has_length(train_dataloader) else 1
        accumulation = self.args.gradient_accumulation_steps
        self._steps_per_epoch = max(num_batches // accumulation + int(num_batches % accumulation > 0), 1)
        if isinstance(self.lr_scheduler, EpochProgressScheduler):
            self.lr_scheduler.steps_per_epoch = self._steps_per_epoch
        if self.state.global_step > 0:
            self._restore_state()
        elif 0 in self.args.score_epochs:
            self._scoring_pass(0)

    def _on_epoch_begin(self) -> None:
        if self.args.dynamic_pruning:
            self._plan_epoch(self.score_callback.epoch)

    def _on_epoch_end(self) -> None:
        completed = self.score_callback.epoch + 1
        if completed in self.args.score_epochs:
            self._scoring_pass(completed)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume, trial):
        epochs, batches = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume, trial
        )
        stored = load_trainer_state(resume) if resume is not None and self.args.dynamic_pruning else None
        # Pruned epochs are shorter than the Trainer counts them: resume where the saved plan says training stopped.
        position = resume_position(stored[1], self.state.global_step) if stored else None
        if position is not None:
            accumulation = 0 if self.args.ignore_data_skip else self.args.gradient_accumulation_steps
            epochs, batches = position[0], position[1] * accumulation
        self.score_callback.resume_position = position
        return epochs, batches

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # The folder `train(resume_from_checkpoint=...)` resumes from, where the score state is restored from.
        self.score_callback.resume_folder = resume_from_checkpoint
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def create_model_card(self, *args, tags=None, **kwargs):
        tags = [tags] if isinstance(tags, str) else list(tags or [])  # transformers 5 no longer reads _tag_names
        return super().create_model_card(*args, tags=tags + [t for t in self._tag_names if t not in tags], **kwargs)

    def _on_save(self) -> None:
        if self.state.is_world_process_zero:
            folder = checkpoint_folder(self._get_output_dir(None), self.state.global_step)
            save_trainer_state(folder, self.scoring_columns, self.pruning_history)

    def _restore_state(self) -> None:
        """The scoring-pass columns and pruning history of the checkpoint training resumes from (the online scores'
        history is restored by the ScoreCallback)."""
        folder = self.score_callback.resume_folder or checkpoint_folder(self.args.output_dir, self.state.global_step)
        stored = load_trainer_state(folder)
        if stored is None:
            logger.warning("The checkpoint %s has no DataDietTrainer state: earlier scoring passes are lost.", folder)
            return
        self.scoring_columns, self.pruning_history = stored

    def _on_train_end(self) -> None:
        missing = sorted(
            set(self.args.score_epochs) - {int(name.rsplit("_epoch", 1)[1]) for name in self.scoring_columns}
        )
        if missing:
            logger.warning("Training ended before the scoring passes of epochs %s: they were not run.", missing)
        if self.pruning_history:
            skipped = float(np.mean([entry["skipped_fraction"] for entry in self.pruning_history]))
            logger.info("Dynamic pruning skipped %.1f%% of the example presentations overall.", 100 * skipped)
        self._pruning_weights = None
        if self.args.should_save and (self.score_callback.track_scores or self.scoring_columns):
            write_final_scores(self.args.output_dir, self.scores, seed=self.args.seed)

    # ---- eval-mode scoring passes -----------------------------------------------------------------------------------

    def _scoring_pass(self, epoch: int) -> None:
        """Score every row of the scoring set with `score_methods`, model in eval mode; columns `<method>_epoch<e>`."""
        dataset = self.scoring_dataset if self.scoring_dataset is not None else self.train_dataset
        if len(dataset) != len(self.train_dataset):
            raise ValueError(
                f"scoring_dataset has {len(dataset)} rows but train_dataset {len(self.train_dataset)}: it must hold "
                "the same rows in the same order."
            )
        loader = self._get_dataloader(
            dataset=self._map_style(dataset, "Scoring"),
            description="Scoring",
            batch_size=self.args.eval_batch_size,
            sampler_fn=self._get_eval_sampler,
        )
        columns = score_rows(
            self.model,
            loader,
            self.args.score_methods,
            num_rows=len(dataset),
            label_name=self.args.label_names[0],
            prepare=self._prepare_inputs,
            drop_keys=[self.args.row_id_column],
        )
        for name, column in columns.items():
            self.scoring_columns[f"{name}_epoch{epoch}"] = column
        scored = int(np.isfinite(next(iter(columns.values()))).sum()) if columns else 0
        logger.info("Scored %d rows with %s after epoch %d.", scored, self.args.score_methods, epoch)

    # ---- results ----------------------------------------------------------------------------------------------------

    @property
    def score_history(self) -> dict[str, np.ndarray]:
        """Per-epoch histories `{quantity: [num_rows, num_epochs]}` of `loss`, `el2n`, `margin`, `probability` (of the
        true class) and `correct`, NaN where an example was not seen (skipped by dynamic pruning)."""
        return self.score_callback.score_history

    @property
    def scores(self):
        """A `datasets.Dataset` aligned with `train_dataset`: one float32 column per tracked score (`track_scores`)
        and per scoring-pass column (`<method>_epoch<e>`)."""
        from datasets import Dataset

        columns = {}
        if self.score_callback.track_scores:
            scores = self.score_callback.scores
            columns = scores.with_format("numpy")[:]  # whole columns (not a row-by-row `Column` per name)
        columns.update(self.scoring_columns)
        if not columns:
            raise ValueError(
                "No scores: train first, with track_scores (online scores) or score_epochs (scoring passes) set."
            )
        return Dataset.from_dict(columns)

    def add_scores(self, dataset, *, history: bool = False):
        """`dataset` (the training set: same rows, same order) with the columns of `scores` added, replacing columns of
        the same names, and with `history=True` one `<quantity>_history` list column per tracked quantity.

        Example (then prune by a tracked score):
        ```python
        >>> import tempfile, torch
        >>> from datasets import Dataset
        >>> from datadiet import prune
        >>> from datadiet.models import ClassifierWrapper
        >>> from datadiet.trainer import DataDietConfig, DataDietTrainer
        >>> train_dataset = Dataset.from_dict({"pixel_values": torch.randn(10, 4), "labels": [0, 1] * 5})
        >>> train_dataset = train_dataset.with_format("torch")
        >>> config = DataDietConfig(tempfile.mkdtemp(), num_train_epochs=2, report_to=[], track_scores=["forgetting"])
        >>> trainer = DataDietTrainer(ClassifierWrapper(torch.nn.Linear(4, 2)), config, train_dataset=train_dataset)
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> train_dataset = trainer.add_scores(train_dataset)
        >>> train_dataset.column_names, len(prune(train_dataset, by="forgetting", keep=0.7))
        (['pixel_values', 'labels', 'forgetting'], 7)

        ```
        """
        provenance = {
            "trainer": "DataDietTrainer",
            "seed": self.args.seed,
            "num_train_epochs": self.args.num_train_epochs,
            "score_epochs": self.args.score_epochs,
            "score_methods": self.args.score_methods,
            "dynamic_pruning": self.args.dynamic_pruning,
        }
        history_arrays = self.score_history if history else None
        return add_score_columns(dataset, self.scores, history_arrays, self.score_callback.dynamics, provenance)


def _with_loss(outputs, loss: torch.Tensor, logits: torch.Tensor):
    """The model outputs with `loss` first, the shape `Trainer.prediction_step` expects."""
    if isinstance(outputs, dict):
        outputs["loss"] = loss
        return outputs
    if isinstance(outputs, (tuple, list)):
        return (loss, *outputs)
    return {"loss": loss, "logits": logits}
