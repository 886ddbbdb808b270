"""DataDietTrainer and ScoreCallback in users' own flows, each a real Trainer run on a tiny model: transformers'
image-classification example (a collator keeping only the model inputs, gradient accumulation, evaluation each
epoch), the text flow with `DataCollatorWithPadding` and default arguments, stopping and resuming from a checkpoint,
and the scores written to `<output_dir>/scores/`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from datadiet import load_scores
from datadiet.models import ClassifierWrapper
from datadiet.trainer import DataDietConfig, DataDietTrainer, ScoreCallback

pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(tmp_path, **overrides) -> dict:
    settings = dict(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        learning_rate=0.01,
        optim="sgd",
        lr_scheduler_type="constant",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        report_to=[],
        seed=0,
    )
    settings.update(overrides)
    return settings


def _assert_same_scores(first, second, atol=1e-5):
    assert first.column_names == second.column_names
    for name in first.column_names:
        np.testing.assert_allclose(np.asarray(first[name]), np.asarray(second[name]), rtol=0, atol=atol, err_msg=name)


def _assert_every_row_scored(trainer, num_rows: int, num_epochs: int):
    scores = trainer.scores
    assert len(scores) == num_rows
    for name in scores.column_names:
        assert np.isfinite(np.asarray(scores[name])).all(), name
    for name, history in trainer.score_history.items():
        assert history.shape == (num_rows, num_epochs) and not np.isnan(history).any(), name


# ---- transformers' image-classification example --------------------------------------------------------------------


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def test_image_classification_example_flow_scores_every_row_as_the_default_collator(tmp_path, cifar10_train):
    from torchvision import transforms

    raw = cifar10_train.select(range(64)).rename_column("img", "image")
    normalize = transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    train_transforms = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])

    # As examples/pytorch/image-classification/run_image_classification.py: the transform adds `pixel_values` to the
    # raw columns, the collator keeps only `pixel_values` and `labels`, remove_unused_columns=False.
    def preprocess_train(example_batch):
        example_batch["pixel_values"] = [train_transforms(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example["label"] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    # The same rows through the default collator: a transform returning the model inputs only.
    def inputs_only(example_batch):
        pixel_values = [train_transforms(image.convert("RGB")) for image in example_batch["image"]]
        return {"pixel_values": pixel_values, "labels": example_batch["label"]}

    settings = dict(gradient_accumulation_steps=2, eval_strategy="epoch", score_epochs=[1], score_methods=["el2n"])
    example = DataDietTrainer(
        _tiny_vit(),
        DataDietConfig(**_settings(tmp_path / "example", remove_unused_columns=False, **settings)),
        train_dataset=raw.with_transform(preprocess_train),
        eval_dataset=raw.select(range(16)).with_transform(preprocess_train),
        data_collator=collate_fn,
    )
    example.train()
    default = DataDietTrainer(
        _tiny_vit(),
        DataDietConfig(**_settings(tmp_path / "default", **settings)),
        train_dataset=raw.with_transform(inputs_only),
        eval_dataset=raw.select(range(16)).with_transform(inputs_only),
    )
    default.train()
    assert example.state.global_step == default.state.global_step == 2 * 64 // 16
    assert sum("eval_loss" in entry for entry in example.state.log_history) == 2
    _assert_every_row_scored(example, 64, num_epochs=2)
    assert "el2n_epoch1" in example.scores.column_names
    _assert_same_scores(example.scores, default.scores)


# ---- text: DataCollatorWithPadding with default arguments -------------------------------------------------------------


def _text_data(tmp_path):
    from transformers import AutoTokenizer

    positive, negative = ["good", "great", "fine", "happy"], ["bad", "awful", "sad", "poor"]
    neutral = ["the", "film", "was", "and", "very", "plot"]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *positive, *negative, *neutral]
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    # A tokenizer as users load one (BertTokenizerFast(vocab_file=...) ignores the file in transformers 5).
    tokenizer = AutoTokenizer.from_pretrained(str(folder), tokenizer_type="bert")
    assert tokenizer("good film")["input_ids"] == [2, 5, 14, 3]
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for i in range(64):
        label = i % 2
        sentence = list(rng.choice(neutral, size=rng.integers(2, 7))) + [rng.choice(positive if label else negative)]
        rng.shuffle(sentence)
        texts.append(" ".join(sentence))
        labels.append(label)
    # The usual text flow: the raw `text` column stays; default remove_unused_columns drops it before collation.
    tokenized = Dataset.from_dict({"text": texts, "label": labels}).map(
        lambda batch: tokenizer(batch["text"], truncation=True), batched=True
    )
    return tokenizer, tokenized, len(words)


def _tiny_bert(vocab_size: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def test_text_flow_with_padding_collator_under_both_trainers(tmp_path):
    from transformers import DataCollatorWithPadding

    tokenizer, tokenized, vocab_size = _text_data(tmp_path)
    collator = DataCollatorWithPadding(tokenizer)
    ours = DataDietTrainer(
        _tiny_bert(vocab_size),
        DataDietConfig(**_settings(tmp_path / "ours", learning_rate=0.05)),
        train_dataset=tokenized,
        data_collator=collator,
        processing_class=tokenizer,
    )
    ours.train()
    _assert_every_row_scored(ours, 64, num_epochs=2)
    # float32 columns on the user's dataset, and a model card tagged datadiet.
    scored = ours.add_scores(tokenized)
    assert {scored.features[name].dtype for name in ours.scores.column_names} == {"float32"}
    ours.create_model_card()
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "- datadiet" in card.split("---")[1]
    callback = ScoreCallback()
    stock = Trainer(
        _tiny_bert(vocab_size),
        TrainingArguments(**_settings(tmp_path / "stock", learning_rate=0.05)),
        train_dataset=tokenized,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    stock.train()
    history = callback.score_history
    assert history["loss"].shape == (64, 2) and not np.isnan(history["loss"]).any()
    # Two independent trainings (BERT computes its own loss under the stock Trainer) agree row by row.
    for name, values in ours.score_history.items():
        np.testing.assert_allclose(values, history[name], rtol=1e-4, atol=1e-5, err_msg=name)
    _assert_same_scores(ours.scores, callback.scores, atol=1e-4)


# ---- checkpoints: stop, resume, scores on disk ---------------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class _StopAfterEpoch(TrainerCallback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch >= self.epoch:
            control.should_training_stop = True


def _digits(num_rows: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = (digits.data[:num_rows] / 16.0).astype(np.float32)
    return Dataset.from_dict({"pixel_values": features, "labels": digits.target[:num_rows]}).with_format("torch")


def test_stop_and_resume_continues_the_score_history(tmp_path):
    data = _digits(64)
    settings = dict(num_train_epochs=3, learning_rate=0.1, save_strategy="epoch", score_epochs=[0, 1, 3])
    settings["score_methods"] = ["el2n"]

    def trainer(folder, callbacks=None):
        config = DataDietConfig(**_settings(tmp_path / folder, **settings))
        return DataDietTrainer(ClassifierWrapper(_MLP()), config, train_dataset=data, callbacks=callbacks)

    whole = trainer("whole")
    whole.train()
    stopped = trainer("stopped", callbacks=[_StopAfterEpoch(2)])
    stopped.train()
    assert stopped.score_history["loss"].shape == (64, 2)
    resumed = trainer("stopped")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == whole.state.global_step == 24
    for name, history in resumed.score_history.items():
        assert history.shape == (64, 3), name
        np.testing.assert_allclose(history[:, :2], whole.score_history[name][:, :2], rtol=0, atol=1e-5, err_msg=name)
    # Forgetting, AUM and the scoring passes of epochs 0, 1 (before the stop) and 3 (after) cover all three epochs.
    _assert_same_scores(resumed.scores, whole.scores)
    assert {"el2n_epoch0", "el2n_epoch1", "el2n_epoch3", "forgetting", "aum"} <= set(resumed.scores.column_names)
    # The scores are on disk in the keyed layout, every row.
    on_disk = load_scores(tmp_path / "stopped" / "scores")
    assert list(on_disk["row_id"]) == list(range(64))
    for name in resumed.scores.column_names:
        np.testing.assert_array_equal(np.asarray(on_disk[name]), np.asarray(resumed.scores[name]), err_msg=name)


@pytest.mark.parametrize("stop", ["epoch_end", "mid_epoch"])
def test_stop_and_resume_under_dynamic_pruning_keeps_the_same_plan(tmp_path, stop):
    # Pruned epochs are shorter than the Trainer's count of steps per epoch (8 here: 64 rows, batch 8), so the epoch
    # to resume in comes from the saved plan; its rows and loss weights are planned again from the restored losses.
    data = _digits(64)
    settings = dict(num_train_epochs=4, learning_rate=0.1, dynamic_pruning=True, dynamic_pruning_ratio=0.5)
    settings.update(dynamic_pruning_until=0.75, save_strategy="steps", save_steps=5)
    if stop == "epoch_end":
        settings.update(save_strategy="epoch")

    def trainer(folder, callbacks=None):
        config = DataDietConfig(**_settings(tmp_path / folder, **settings))
        return DataDietTrainer(ClassifierWrapper(_MLP()), config, train_dataset=data, callbacks=callbacks)

    whole = trainer("whole")
    whole.train()
    steps = [entry["steps"] for entry in whole.pruning_history]
    assert steps[0] == 8 and min(steps) < 8  # some epochs were pruned
    stopper = _StopAfterEpoch(2) if stop == "epoch_end" else _StopAtStep(15)  # 15: inside the third epoch
    trainer("stopped", callbacks=[stopper]).train()
    resumed = trainer("stopped")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.pruning_history == whole.pruning_history
    assert resumed.state.global_step == whole.state.global_step == sum(steps)
    # Rows skipped in an epoch have no record there (NaN), in both runs alike.
    for name, history in resumed.score_history.items():
        np.testing.assert_allclose(history, whole.score_history[name], rtol=0, atol=1e-5, err_msg=name)
    _assert_same_scores(resumed.scores, whole.scores)


# ---- timm checkpoints ------------------------------------------------------------------------------------------------


def test_timm_checkpoint_loads_back_with_timm_alone(tmp_path, cifar10_train, tiny_timm):
    import json

    import timm
    from torchvision import transforms

    to_tensor = transforms.ToTensor()

    def inputs_only(batch):
        return {"pixel_values": [to_tensor(image.convert("RGB")) for image in batch["img"]], "labels": batch["label"]}

    train = cifar10_train.select(range(32)).with_transform(inputs_only)
    config = DataDietConfig(**_settings(tmp_path / "out", save_strategy="epoch"))
    trainer = DataDietTrainer(tiny_timm(10), config, train_dataset=train)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    images = torch.stack([train[i]["pixel_values"] for i in range(4)])
    network = trainer.model.model.eval()
    with torch.no_grad():
        expected = network(images)
    for folder in (tmp_path / "final", tmp_path / "out" / "checkpoint-8"):
        assert json.loads((folder / "config.json").read_text())["architecture"] == "test_resnet"
        # timm alone, no datadiet: from the folder (timm reads its config.json), and from the architecture's name and
        # the file (the overlay's num_classes keeps the trained classifier instead of a new one).
        file = str(folder / "model.safetensors")
        for loaded in (
            timm.create_model(f"local-dir:{folder}", pretrained=True),
            timm.create_model(
                "test_resnet", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=file, num_classes=10)
            ),
        ):
            with torch.no_grad():
                torch.testing.assert_close(loaded.eval()(images), expected)
    # And back into the trainer: resuming loads the checkpoint's weights (strictly) and continues.
    resumed = DataDietTrainer(
        tiny_timm(10, seed=1),
        DataDietConfig(**_settings(tmp_path / "out", save_strategy="epoch")),
        train_dataset=train,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.state.global_step == 8 and resumed.score_history["loss"].shape == (32, 2)
    np.testing.assert_allclose(resumed.score_history["loss"], trainer.score_history["loss"], rtol=0, atol=1e-5)


def test_score_transform_columns_are_float32_and_reach_the_card(cifar10_train, tiny_timm, tmp_path):
    import yaml

    from datadiet import ScoreTransform
    from datadiet.hub import save_pruned

    rows = cifar10_train.select(range(8))
    transform = ScoreTransform.for_dataset(rows, tiny_timm(10), ["el2n", "loss"])
    assert rows.map(transform, batched=True, batch_size=4).features["el2n"].dtype == "float32"
    scored = transform.apply(rows, batch_size=4)
    assert scored.features["el2n"].dtype == scored.features["loss"].dtype == "float32"
    folder = save_pruned(scored, tmp_path / "card", source="uoft-cs/cifar10")
    metadata = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert metadata["task_categories"] == ["image-classification"]
    assert metadata["source_datasets"] == ["uoft-cs/cifar10"]
    assert "uoft-cs/cifar10" in metadata["pretty_name"]
    scoring = metadata["datadiet"]["scoring"]
    assert scoring["model"] == "test_resnet" and scoring["methods"] == ["el2n", "loss"]  # the timm architecture


class _StopAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_from_a_checkpoint_in_the_middle_of_an_epoch(tmp_path):
    data = _digits(64)
    settings = dict(num_train_epochs=3, learning_rate=0.1, save_strategy="steps", save_steps=4)

    def trainer(folder, callbacks=None):
        config = DataDietConfig(**_settings(tmp_path / folder, **settings))
        return DataDietTrainer(ClassifierWrapper(_MLP()), config, train_dataset=data, callbacks=callbacks)

    whole = trainer("whole")
    whole.train()
    trainer("stopped", callbacks=[_StopAtStep(12)]).train()  # 8 steps an epoch: half-way through the second
    resumed = trainer("stopped")
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-12"))
    # The second epoch's rows seen before the checkpoint keep their records; the rest are recorded after it.
    for name, history in resumed.score_history.items():
        assert history.shape == (64, 3) and not np.isnan(history).any(), name
        np.testing.assert_allclose(history, whole.score_history[name], rtol=0, atol=1e-5, err_msg=name)
