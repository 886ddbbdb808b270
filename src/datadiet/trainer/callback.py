"""`ScoreCallback`: per-example training dynamics (loss, EL2N, margin, correctness at every epoch, and the forgetting,
AUM and data-map scores derived from them) recorded from a `transformers.Trainer`'s training forward passes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainerCallback

from ..engine.process import check_trainer_processes
from ..provenance import record_provenance
from ..scores.trackers import (
    TRACKED_QUANTITIES,
    TRACKED_SCORES,
    TRACKED_SCORES_HIGHER_IS_HARDER,
    TrainingDynamics,
)
from .batch_indices import record_batch_indices
from .causal_lm import NEEDS_LOGITS, TokenReference, check_rows_separable, resolve_task, source_rows, task_class
from .checkpoint import checkpoint_folder, dynamics_from_history, load_checkpoint_state, save_checkpoint_state
from .row_check import RowCheck, collator_name, dataset_labels
from .views import DEFAULT_ROW_ID_COLUMN

logger = logging.getLogger(__name__)

__all__ = ["ScoreCallback", "add_score_columns", "all_gather_objects"]

# The file names of the score state in a Trainer checkpoint folder.
DYNAMICS_STATE = "datadiet_dynamics"
EPOCH_BUFFER_STATE = "datadiet_epoch_buffer_rank{rank}"


def all_gather_objects(obj) -> list:
    """`obj` from every process, in process order (a list of one item outside distributed training).

    Example:
    ```python
    >>> from datadiet.trainer.callback import all_gather_objects
    >>> all_gather_objects({"rows": 3})
    [{'rows': 3}]

    ```
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()
        if world_size > 1:
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, obj)
            return gathered
    return [obj]


class ScoreCallback(TrainerCallback):
    """Records per-example training dynamics from the training forward passes of a stock `transformers.Trainer`, at
    no extra forward pass: at every epoch each example's cross-entropy loss, EL2N, margin, probability of the true
    class and correctness, from which it derives forgetting events (Toneva et al. 2019; examples never learned rank
    as the most forgotten, see [`~datadiet.scores.forgetting_events`]), AUM (Pleiss et al. 2020) and the data-map
    confidence, variability and correctness (Swayamdipta et al. 2020).

    The values come from the model in training mode, on the augmented inputs it is trained on, at the step where the
    example is seen (as in those papers), not from a separate eval-mode pass.

    A causal LM (a transformers `*ForCausalLM`, also behind peft, or `task="causal_lm"`) is tracked per row over its
    trained tokens, after the label shift (see [`~datadiet.scores.trackers.sequence_training_quantities`]): the mean
    token loss, the mean probability of the target tokens, correctness as token accuracy >= 0.5, and token EL2N and
    margin where the forward gives logits. Under TRL's `SFTTrainer` (whose fused LM head gives per-token
    log-probabilities instead of logits) add `callbacks=[ScoreCallback()]` and nothing else: the rows are those of the
    dataset given to `SFTTrainer`, mapped back from its tokenised copy (rows it drops get NaN, see
    [`~datadiet.trainer.causal_lm.source_rows`]), each batch's tokens checked against its rows; packing and
    padding-free batches are refused.

    Each example is known by its position in the training set, read from the indices the training data loader's
    sampler yields in this process (see [`~datadiet.trainer.batch_indices.BatchIndexRecorder`]), so that
    `with_transform` and `remove_unused_columns` work and the batch need carry no row id. Each batch is checked
    against those rows (see [`~datadiet.trainer.row_check.RowCheck`]): a data collator that reorders examples raises
    an error naming it, unless the batch carries the row ids of [`with_row_ids`] (then they attribute each example
    exactly, whatever the order); so does a batch on which the model runs twice in training mode, or not at all. The
    model is hooked at the start of training and needs the labels under `label_name` in its forward call. Under
    distributed training the records of all processes are gathered at the end of every epoch and the sampler's
    wrap-around duplicates dropped by row id. Each checkpoint holds the recorded history, restored by
    `trainer.train(resume_from_checkpoint=...)`.

    Args:
        track_scores: the summary scores `scores` returns (see [`DataDietConfig`]); all by default.
        row_id_column: a batch key removed before the model's forward call, if present: the row ids of
            [`with_row_ids`], which then say each example's row (a stock Trainer keeps the key with
            `remove_unused_columns=False`).
        label_name: the batch key holding the labels.
        task: `"causal_lm"` or `"classification"`; by default detected from the model when training begins.

    Example (a toy model and data, two epochs; `trainer.train()` prints its final metrics;
    `remove_unused_columns=False` is for `ClassifierWrapper`, whose forward takes `**inputs`, not for the rows, which
    come from the sampler):
    ```python
    >>> import tempfile, torch
    >>> from datasets import Dataset
    >>> from transformers import Trainer, TrainingArguments
    >>> from datadiet.models import ClassifierWrapper
    >>> from datadiet.trainer import ScoreCallback
    >>> train_dataset = Dataset.from_dict({"pixel_values": torch.randn(16, 4), "labels": [0, 1] * 8})
    >>> train_dataset = train_dataset.with_format("torch")
    >>> callback = ScoreCallback(["forgetting", "aum"])
    >>> args = TrainingArguments(tempfile.mkdtemp(), num_train_epochs=2, per_device_train_batch_size=8, report_to=[],
    ...                          label_names=["labels"], remove_unused_columns=False)
    >>> trainer = Trainer(ClassifierWrapper(torch.nn.Linear(4, 2)), args, train_dataset=train_dataset,
    ...                   callbacks=[callback])
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> callback.add_scores(train_dataset).column_names
    ['pixel_values', 'labels', 'forgetting', 'aum']

    ```

    A causal LM (a tiny random Llama on rows of 5 random tokens, trained on every token):
    ```python
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                      num_attention_heads=1)
    >>> tokens = torch.randint(0, 16, (6, 5))
    >>> train_dataset = Dataset.from_dict({"input_ids": tokens, "labels": tokens})
    >>> callback = ScoreCallback(["loss", "confidence"])
    >>> args = TrainingArguments(tempfile.mkdtemp(), num_train_epochs=2, per_device_train_batch_size=3, report_to=[],
    ...                          use_cpu=True)
    >>> _ = Trainer(LlamaForCausalLM(config), args, train_dataset=train_dataset, callbacks=[callback]).train()
    ... # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> callback.score_history["loss"].shape, callback.scores.column_names
    ((6, 2), ['loss', 'confidence'])

    ```
    """

    def __init__(
        self,
        track_scores: Sequence[str] = TRACKED_SCORES,
        *,
        row_id_column: str = DEFAULT_ROW_ID_COLUMN,
        label_name: str = "labels",
        task: str | None = None,
    ):
        unknown = [name for name in track_scores if name not in TRACKED_SCORES]
        if unknown:
            raise ValueError(f"Unknown track_scores {unknown}; choose among {list(TRACKED_SCORES)}.")
        resolve_task(task, None)  # refuses an unknown task now
        self.task = task
        # The task of the training run (`task`, or detected from the model when training begins).
        self._task = task
        # Scores asked for by name are an error where the model's output cannot give them; the default set drops them.
        self._explicit_scores = track_scores is not TRACKED_SCORES
        self._unavailable: set[str] = set()
        # The user's row of each training row (SFTTrainer's prepared copy); None: the same position.
        self._source: np.ndarray | None = None
        self.track_scores = list(track_scores)
        self.row_id_column = row_id_column
        self.label_name = label_name
        self.dynamics: TrainingDynamics | None = None
        self.epoch = -1
        # DataDietTrainer feeds `record` from its `compute_loss` and turns the forward hooks off.
        self._record_from_hooks = True
        # DataDietTrainer turns recording on even without tracked scores when dynamic pruning needs the losses.
        self._always_record = False
        self._hooks: list = []
        self._pending = None
        self._rows: RowCheck | None = None
        # The compute_loss that feeds `record` (DataDietTrainer's), named in errors; None: the forward hooks do.
        self._caller: str | None = None
        # The checkpoint a resumed training restores the history from (DataDietTrainer sets it; a stock Trainer's
        # resumed checkpoint is found as <output_dir>/checkpoint-<global_step>).
        self.resume_folder = None
        # (epochs completed, optimizer steps into the next) when the Trainer counts epochs differently (dynamic
        # pruning's shorter epochs); None: from the global step and the full epoch's length.
        self.resume_position = None
        self._resumed_buffer = None
        self._in_training = False
        self._reset_buffer()

    # ---- recording -------------------------------------------------------------------------------------------------

    @property
    def recording(self) -> bool:
        return self._in_training and (bool(self.track_scores) or self._always_record)

    def _reset_buffer(self) -> None:
        self._buffer_ids: list[torch.Tensor] = []
        self._buffer_values: list[dict[str, torch.Tensor]] = []

    def record(self, row_ids: torch.Tensor, output, labels: torch.Tensor) -> None:
        """Record one training micro-batch: `row_ids` `[B]` and the model's `output` (its logits, or the output
        object) with the `labels`: a classifier's logits `[B, C]` and integer labels `[B]`, or a causal LM's logits
        `[B, T, V]` (or TRL's fused LM head output) and labels `[B, T]`. Values stay on the device until the end of
        the epoch (no synchronisation per step)."""
        if not self.recording:
            return
        if not torch.is_tensor(row_ids):
            row_ids = torch.as_tensor(row_ids)
        values = task_class(self._task or "classification").tracked_quantities(output, labels)
        if (
            self._task == "causal_lm"
            and not torch.is_tensor(output)
            and getattr(output, "log_probs", None) is not None
        ):
            self._unavailable = set(NEEDS_LOGITS)
            asked = [name for name in self.track_scores if name in NEEDS_LOGITS]
            if asked and self._explicit_scores:
                raise ValueError(
                    f"track_scores {asked} need the model's logits, which TRL's fused LM head (SFTTrainer) does not "
                    "build: track loss, forgetting, confidence, variability or correctness, and score el2n "
                    "afterwards with datadiet.score_dataset(..., task='causal_lm')."
                )
        self._buffer_ids.append(row_ids.detach().reshape(-1))
        self._buffer_values.append(values)

    def _commit_epoch(self) -> None:
        """Gather this epoch's records from every process into `self.dynamics` (one new epoch of history)."""
        if self.dynamics is None or not self.recording:
            self._reset_buffer()
            return
        ids, values = self._buffered()
        # The position of each record's micro-batch in this process's epoch.
        order = np.concatenate([np.full(len(batch), i) for i, batch in enumerate(self._buffer_ids)] or [np.zeros(0)])
        self._reset_buffer()
        gathered = all_gather_objects((ids, order, values))
        all_ids = np.concatenate([part[0] for part in gathered])
        if all_ids.size == 0:
            return
        # A row recorded twice in an epoch is a distributed sampler's wrap-around padding, which comes after the
        # genuine record on whichever process: order by micro-batch position so that the earliest record is kept.
        first_in_time = np.argsort(np.concatenate([part[1] for part in gathered]), kind="stable")
        all_values = {name: np.concatenate([part[2][name] for part in gathered]) for name in TRACKED_QUANTITIES}
        self.dynamics.add_epoch(all_ids[first_in_time], {k: v[first_in_time] for k, v in all_values.items()})

    # ---- forward hooks (stock Trainer) -----------------------------------------------------------------------------

    def next_row_ids(self, labels: torch.Tensor, row_ids=None, *, input_ids=None, attention_mask=None):
        """The rows of the next training micro-batch, whose `labels` (and `row_ids`, when the batch carries them; a
        causal LM's `input_ids` and `attention_mask`) are given, checked against the sampler's rows; None when
        nothing is recorded. They are rows of the user's dataset: for `SFTTrainer`, whose training set is its own
        prepared copy, mapped back through it (see [`~datadiet.trainer.causal_lm.source_rows`])."""
        if not self.recording:
            return None
        if self._rows is None:
            raise ValueError("ScoreCallback saw a training batch before training began: add it to the Trainer.")
        rows = self._rows.rows(labels, row_ids, input_ids=input_ids, attention_mask=attention_mask)
        if self._source is not None:
            rows = torch.as_tensor(self._source[rows.numpy()], dtype=torch.long)
        return rows

    def _pre_hook(self, module, args, kwargs):
        # A row id from `with_row_ids` is never a model input: remove it whether training or evaluating.
        batch_row_ids = kwargs.pop(self.row_id_column, None)
        if not module.training or not self.recording:
            return args, kwargs
        labels = kwargs.get(self.label_name)
        if labels is None:
            raise ValueError(
                f"ScoreCallback needs the labels in the model's forward call under {self.label_name!r}; the batch "
                f"has {sorted(kwargs)}. (A stock Trainer removes them when label_smoothing_factor > 0 or "
                "compute_loss_func is set: use DataDietTrainer then.)"
            )
        row_ids = self.next_row_ids(
            labels, batch_row_ids, input_ids=kwargs.get("input_ids"), attention_mask=kwargs.get("attention_mask")
        )
        self._pending = (row_ids, labels)
        return args, kwargs

    def _post_hook(self, module, args, kwargs, output):
        if self._pending is not None:
            row_ids, labels = self._pending
            self._pending = None
            self.record(row_ids, output, labels)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---- Trainer events --------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if train_dataloader is None:
            raise ValueError(
                "ScoreCallback needs the Trainer's training data loader: add it to a Trainer's callbacks."
            )
        # Refuses a launch whose processes each train alone (or one started for several) before anything is recorded.
        check_trainer_processes(args.world_size)
        # Refuses a training set whose rows cannot be known (a streaming one), with the fix.
        indices = record_batch_indices(train_dataloader)
        tracking = bool(self.track_scores) or self._always_record
        dataset = train_dataloader.dataset
        self._task = resolve_task(self.task, model)
        self._unavailable = set()
        labels, label_column, tokens = None, None, None
        if self._task == "causal_lm":
            check_rows_separable(args, dataset)
            self._source, num_rows = source_rows(dataset, args)
            tokens = TokenReference.from_dataset(dataset) if tracking else None
        else:
            self._source, num_rows = None, len(dataset)
            labels, label_column = dataset_labels(dataset, self.label_name) if tracking else (None, None)
        self._rows = RowCheck(
            indices,
            labels,
            label_column,
            collator=collator_name(train_dataloader),
            caller=self._caller,
            row_id_column=self.row_id_column,
            tokens=tokens,
        )
        self.dynamics = TrainingDynamics(num_rows)
        self.epoch = -1
        self._in_training = True
        self._reset_buffer()
        self._remove_hooks()
        if state.global_step > 0:
            self._resume(args, state, len(train_dataloader), num_rows)
        if self._record_from_hooks and model is not None:
            self._hooks = [
                model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                model.register_forward_hook(self._post_hook, with_kwargs=True),
            ]

    def _resume(self, args, state, num_batches: int, num_rows: int) -> None:
        """Continue from the checkpoint of `state.global_step`: its history, its epoch and, mid-epoch, the records
        of the epoch so far; the batches the resumed epoch skips unread are not expected."""
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = max(num_batches // accumulation + int(num_batches % accumulation > 0), 1)
        epochs_trained, steps = self.resume_position or divmod(state.global_step, steps_per_epoch)
        self.epoch = epochs_trained - 1
        if not args.ignore_data_skip:
            self._rows.indices.skip_next(steps * accumulation)
        folder = self.resume_folder or checkpoint_folder(args.output_dir, state.global_step)
        stored = load_checkpoint_state(folder, DYNAMICS_STATE)
        if stored is None:
            logger.warning(
                "The checkpoint %s holds no training-dynamics state (saved without ScoreCallback?): the score history "
                "restarts at epoch %d and covers only the epochs trained from now on.",
                folder,
                epochs_trained,
            )
            return
        history, meta = stored
        if meta["num_rows"] != num_rows:
            raise ValueError(
                f"The checkpoint {folder} recorded {meta['num_rows']} training rows but the training set has "
                f"{num_rows}: resume with the training set it was trained on."
            )
        self.dynamics = dynamics_from_history(history, num_rows)
        if self.dynamics.num_epochs != epochs_trained:
            raise ValueError(
                f"The checkpoint {folder} holds {self.dynamics.num_epochs} epochs of scores but the Trainer resumes "
                f"after {epochs_trained}: it was saved with another batch size or number of processes."
            )
        rank = args.process_index
        self._resumed_buffer = load_checkpoint_state(folder, EPOCH_BUFFER_STATE.format(rank=rank))

    def on_save(self, args, state, control, **kwargs):
        if self.dynamics is None:
            return
        folder = checkpoint_folder(args.output_dir, state.global_step)
        if state.is_world_process_zero:
            history = {name: self.dynamics.history(name) for name in TRACKED_QUANTITIES}
            save_checkpoint_state(folder, DYNAMICS_STATE, history, {"num_rows": self.dynamics.num_rows})
        # This process's records of the epoch in progress (a checkpoint saved mid-epoch).
        ids, values = self._buffered()
        save_checkpoint_state(folder, EPOCH_BUFFER_STATE.format(rank=args.process_index), {"ids": ids, **values}, {})

    def _buffered(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if not self._buffer_ids:
            return np.zeros(0, dtype=np.int64), {name: np.zeros(0, np.float32) for name in TRACKED_QUANTITIES}
        ids = torch.cat(self._buffer_ids).cpu().numpy()
        values = {
            name: torch.cat([batch[name] for batch in self._buffer_values]).cpu().numpy()
            for name in TRACKED_QUANTITIES
        }
        return ids, values

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch += 1
        self._reset_buffer()
        self._rows.reset()
        if self._resumed_buffer is not None:
            arrays, _ = self._resumed_buffer
            self._resumed_buffer = None
            if len(arrays["ids"]):
                self._buffer_ids.append(torch.as_tensor(arrays["ids"]))
                self._buffer_values.append({name: torch.as_tensor(arrays[name]) for name in TRACKED_QUANTITIES})

    def on_substep_end(self, args, state, control, **kwargs):
        if self.recording:
            self._rows.end_batch()

    def on_step_end(self, args, state, control, **kwargs):
        if self.recording:
            self._rows.end_batch()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._commit_epoch()

    def on_train_end(self, args, state, control, **kwargs):
        # Records of an epoch cut short (max_steps reached mid-epoch) are committed by on_epoch_end already; anything
        # left was recorded outside an epoch.
        if self._buffer_ids:
            self._commit_epoch()
        self._in_training = False
        self._remove_hooks()

    # ---- results ---------------------------------------------------------------------------------------------------

    def _check_trained(self) -> TrainingDynamics:
        if self.dynamics is None:
            raise ValueError("No training dynamics yet: train first (the callback fills them during `train()`).")
        return self.dynamics

    @property
    def score_history(self) -> dict[str, np.ndarray]:
        """Per-epoch histories, `{quantity: [num_rows, num_epochs] array}` for `loss`, `el2n`, `margin`,
        `probability` (of the true class) and `correct`; NaN where an example was not seen that epoch. For a causal
        LM each is the row's mean over its trained tokens (`probability` of the target tokens; `correct` is token
        accuracy >= 0.5), rows in the order of the dataset given to the Trainer (to `SFTTrainer`: before its
        preparation), NaN for rows `SFTTrainer` dropped and, under its fused LM head, for `el2n` and `margin`."""
        dynamics = self._check_trained()
        return {name: dynamics.history(name) for name in TRACKED_QUANTITIES}

    @property
    def scores(self) -> Dataset:
        """A `datasets.Dataset` with one float32 column per tracked score, row `i` for training example `i`."""
        dynamics = self._check_trained()
        names = [name for name in self.track_scores if name not in self._unavailable]
        summary = dynamics.summary(names)
        return Dataset.from_dict({name: values.astype(np.float32) for name, values in summary.items()})

    def add_scores(self, dataset: Dataset, *, history: bool = False) -> Dataset:
        """`dataset` (the training set, same rows in the same order) with the tracked score columns added (replacing
        columns of the same names) and, when `history=True`, one `<quantity>_history` list column per tracked
        quantity. The columns' orientation (whether higher is harder) is recorded in the provenance."""
        return add_score_columns(dataset, self.scores, self.score_history if history else None, self.dynamics)


def add_score_columns(
    dataset: Dataset,
    scores: Dataset,
    history: dict[str, np.ndarray] | None,
    dynamics: TrainingDynamics | None,
    extra_provenance: dict | None = None,
) -> Dataset:
    """`dataset` (the training set) with the columns of `scores` added, replacing columns of the same names, and the
    training-dynamics provenance recorded.

    Args:
        dataset (`datasets.Dataset`): the training set, same rows in the same order as `scores`.
        scores (`datasets.Dataset`): one column per score.
        history (`dict[str, np.ndarray]`, *optional*): per-epoch histories `{quantity: [num_rows, num_epochs]}`,
            added as `<quantity>_history` list columns.
        dynamics (`TrainingDynamics`, *optional*): the tracker the scores come from (its number of epochs goes into
            the provenance).
        extra_provenance (`dict`, *optional*): more provenance entries.

    Example:
    ```python
    >>> from datasets import Dataset
    >>> from datadiet.trainer.callback import add_score_columns
    >>> dataset = Dataset.from_dict({"x": [1, 2]})
    >>> add_score_columns(dataset, Dataset.from_dict({"forgetting": [0.0, 2.0]}), None, None).column_names
    ['x', 'forgetting']

    ```
    """
    if len(dataset) != len(scores):
        raise ValueError(
            f"The dataset has {len(dataset)} rows but the scores cover {len(scores)} training rows: pass the training "
            "set itself (same rows, same order)."
        )
    columns = {name: np.asarray(values, dtype=np.float32) for name, values in scores.with_format("numpy")[:].items()}
    if history is not None:
        columns.update({f"{name}_history": [row.tolist() for row in values] for name, values in history.items()})
    clashing = [name for name in columns if name in dataset.column_names]
    if clashing:
        logger.warning("Replacing the existing columns %s with the training scores.", clashing)
        dataset = dataset.remove_columns(clashing)
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    orientation = {
        name: TRACKED_SCORES_HIGHER_IS_HARDER[name] for name in scores.column_names if name in TRACKED_SCORES
    }
    return record_provenance(
        dataset,
        training_dynamics={
            "columns": list(columns),
            "epochs": dynamics.num_epochs if dynamics is not None else 0,
            "higher_is_harder": orientation,
            **(extra_provenance or {}),
        },
    )
