"""Row attribution that cannot be silently wrong (trainer/row_check.py): real Trainer runs on real digits with learning
rate 0, so that every recorded loss can be recomputed row by row. A collator that reorders a batch, a loss that runs
the model twice and a `compute_loss` that bypasses DataDietTrainer's are refused at the first step; a collator that
passes the row ids through, or an extra forward of one's own, gives the scores of a per-row recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from transformers.data.data_collator import default_data_collator

from datadiet.models import ClassifierWrapper
from datadiet.scores import TrainingDynamics
from datadiet.trainer import DataDietConfig, DataDietTrainer, ScoreCallback, with_row_ids
from datadiet.trainer.row_check import dataset_labels

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_ROWS = 192


@pytest.fixture(scope="module")
def digit_rows(digits):
    """192 real digits as flat float pixels `[192, 64]` and labels."""
    raw = digits["train"].select(range(NUM_ROWS))
    pixels = np.stack([np.asarray(image, dtype=np.float32).reshape(-1) / 255 for image in raw["image"]])
    return torch.from_numpy(pixels), torch.tensor(raw["label"])


@pytest.fixture
def train_dataset(digit_rows):
    pixels, labels = digit_rows
    return Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")


def _model():
    torch.manual_seed(0)
    return ClassifierWrapper(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 10)))


def _per_row_losses(model, digit_rows) -> np.ndarray:
    """The reference: each row's cross-entropy from the wrapped network, one row at a time (learning rate 0)."""
    pixels, labels = digit_rows
    with torch.no_grad():
        return np.array(
            [float(F.cross_entropy(model.model(pixels[i : i + 1]), labels[i : i + 1])) for i in range(len(labels))]
        )


def _settings(tmp_path, **overrides) -> dict:
    settings = dict(
        output_dir=str(tmp_path),
        num_train_epochs=1,
        per_device_train_batch_size=16,
        learning_rate=0.0,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        report_to=[],
        seed=0,
        remove_unused_columns=False,
    )
    settings.update(overrides)
    return settings


def sort_by_label(features):
    return default_data_collator(sorted(features, key=lambda feature: int(feature["labels"])))


def reverse(features):
    return default_data_collator(features[::-1])


def _train(kind, tmp_path, train_dataset, collator=None, trainer_class=None, **overrides):
    """Train one epoch with DataDietTrainer (`kind="trainer"`) or a stock Trainer with ScoreCallback; returns the
    trainer and the recorded loss of each row."""
    if kind == "trainer":
        trainer_class = trainer_class or DataDietTrainer
        args = DataDietConfig(**_settings(tmp_path, **overrides))
        trainer = trainer_class(_model(), args, train_dataset=train_dataset, data_collator=collator)
        trainer.train()
        return trainer, trainer.score_history["loss"][:, 0]
    callback = ScoreCallback()
    args = TrainingArguments(**_settings(tmp_path, label_names=["labels"], **overrides))
    trainer = (trainer_class or Trainer)(
        _model(), args, train_dataset=train_dataset, data_collator=collator, callbacks=[callback]
    )
    trainer.train()
    return trainer, callback.score_history["loss"][:, 0]


@pytest.mark.parametrize("kind", ["trainer", "callback"])
@pytest.mark.parametrize("collator", [sort_by_label, reverse])
def test_a_reordering_collator_is_refused_at_the_first_step(tmp_path, train_dataset, kind, collator):
    with pytest.raises(ValueError, match=rf"^The data collator {collator.__name__} reorders the examples") as error:
        _train(kind, tmp_path, train_dataset, collator)
    assert "with_row_ids(train_dataset)" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("kind", "remove_unused_columns"), [("trainer", False), ("trainer", True), ("callback", False)]
)
def test_a_reordering_collator_that_keeps_the_row_ids_gives_each_rows_own_scores(
    tmp_path, train_dataset, digit_rows, kind, remove_unused_columns
):
    dataset = with_row_ids(train_dataset)
    trainer, recorded = _train(kind, tmp_path, dataset, sort_by_label, remove_unused_columns=remove_unused_columns)
    np.testing.assert_allclose(recorded, _per_row_losses(trainer.model, digit_rows), rtol=0, atol=1e-5)


def test_row_ids_from_other_batches_are_refused(tmp_path, train_dataset):
    def swap_ids(features):
        batch = default_data_collator(features)
        batch["datadiet_row_id"] = (batch["datadiet_row_id"] + 1) % NUM_ROWS
        return batch

    with pytest.raises(
        ValueError, match="are not the rows its sampler yielded .*: the data collator .*swap_ids mixed"
    ):
        _train("trainer", tmp_path, with_row_ids(train_dataset), swap_ids)


def test_an_order_keeping_collator_with_gradient_accumulation_matches_the_per_row_losses(
    tmp_path, train_dataset, digit_rows
):
    # Several micro-batches per optimizer step: one recorded forward each, no false alarm.
    trainer, recorded = _train("trainer", tmp_path, train_dataset, gradient_accumulation_steps=3)
    np.testing.assert_allclose(recorded, _per_row_losses(trainer.model, digit_rows), rtol=0, atol=1e-5)


def test_a_transformed_dataset_is_checked_from_its_label_column_without_decoding(tmp_path, digits):
    raw = digits["train"].shuffle(seed=0).select(range(64))  # an indices mapping over the Arrow table
    decoded = []

    def to_pixels(batch):
        decoded.append(len(batch["image"]))
        pixels = [torch.tensor(np.asarray(image, dtype=np.float32).reshape(-1) / 255) for image in batch["image"]]
        return {"pixel_values": pixels, "labels": batch["label"]}

    dataset = raw.with_transform(to_pixels)
    labels, column = dataset_labels(dataset)
    assert column == "label" and labels.tolist() == raw["label"] and decoded == []
    with pytest.raises(ValueError, match="^The data collator reverse reorders"):
        _train("trainer", tmp_path, dataset, reverse, remove_unused_columns=True)


class ComputeLossTwice(DataDietTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        first = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        second = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return (first + second) / 2


class ExtraForwardOfItsOwn(DataDietTrainer):
    """R-Drop-style: DataDietTrainer's loss once (recorded), a second forward run directly (not recorded)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        inputs = {key: value for key, value in inputs.items() if key != "datadiet_row_id"}
        return (loss + model(**inputs)["loss"]) / 2


class ModelTwice(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return (model(**inputs)["loss"] + model(**inputs)["loss"]) / 2


class BypassingComputeLoss(DataDietTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(**inputs)["loss"]


def test_a_compute_loss_calling_datadiet_compute_loss_twice_is_refused_at_the_first_step(tmp_path, train_dataset):
    args = DataDietConfig(**_settings(tmp_path))
    trainer = ComputeLossTwice(_model(), args, train_dataset=train_dataset)
    with pytest.raises(ValueError, match=r"^ComputeLossTwice.compute_loss called DataDietTrainer.compute_loss twice"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_second_forward_of_ones_own_keeps_the_scores_right(tmp_path, train_dataset, digit_rows):
    trainer, recorded = _train("trainer", tmp_path, train_dataset, trainer_class=ExtraForwardOfItsOwn)
    np.testing.assert_allclose(recorded, _per_row_losses(trainer.model, digit_rows), rtol=0, atol=1e-5)


def test_a_model_run_twice_under_score_callback_is_refused_at_the_first_step(tmp_path, train_dataset):
    with pytest.raises(ValueError, match="^The model ran twice in training mode on one training batch"):
        _train("callback", tmp_path, train_dataset, trainer_class=ModelTwice)


def test_a_compute_loss_bypassing_datadiets_gets_one_message_at_the_first_step(tmp_path, train_dataset):
    args = DataDietConfig(**_settings(tmp_path))
    trainer = BypassingComputeLoss(_model(), args, train_dataset=train_dataset)
    with pytest.raises(ValueError, match=r"^BypassingComputeLoss.compute_loss did not call DataDietTrainer") as error:
        trainer.train()
    assert "super().compute_loss(" in str(error.value) and "track_scores=[] (and dynamic_pruning=False)" in str(
        error.value
    )
    assert trainer.state.global_step == 1


def test_a_bypassing_compute_loss_trains_untracked_with_track_scores_empty(tmp_path, train_dataset):
    args = DataDietConfig(**_settings(tmp_path, track_scores=[]))
    trainer = BypassingComputeLoss(_model(), args, train_dataset=train_dataset)
    trainer.train()
    assert trainer.state.global_step == NUM_ROWS // 16


def test_scores_of_no_recorded_epoch_are_refused_in_words():
    dynamics = TrainingDynamics(3)
    assert np.isnan(dynamics.latest("loss")).all()
    with pytest.raises(ValueError, match="^No epoch of training dynamics was recorded"):
        dynamics.summary(["loss"])
