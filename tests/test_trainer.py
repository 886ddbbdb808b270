"""DataDietTrainer, DataDietConfig and ScoreCallback on real data (scikit-learn digits, CIFAR-10 rows) with tiny
models: online scores against a recomputation from the logits of the same steps, gradient-accumulation invariance,
stock Trainer + ScoreCallback equivalence, timm classifiers (ViT, text: test_trainer_flows.py), scoring passes and dynamic pruning."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainingArguments

from datadiet.models import ClassifierWrapper
from datadiet.provenance import read_provenance
from datadiet.trainer import DataDietConfig, DataDietTrainer, ScoreCallback, train_proxy_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is several times faster than two on a loaded 2-core machine (the threads
    otherwise spin waiting for each other on 8x10 matrices)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits(num_rows: int) -> Dataset:
    """Real data: the first `num_rows` distinct images of scikit-learn's digits, as 64 features in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    _, first = np.unique(digits.data, axis=0, return_index=True)
    rows = np.sort(first)[:num_rows]
    features = (digits.data[rows] / 16.0).astype(np.float32)
    return Dataset.from_dict({"pixel_values": features, "labels": digits.target[rows]}).with_format("torch")


class _MLP(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class _RecordingMLP(nn.Module):
    """Keeps the inputs and logits of every training forward pass: the independent record the test recomputes the
    online scores from."""

    def __init__(self):
        super().__init__()
        self.mlp = _MLP()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, pixel_values, labels=None):
        logits = self.mlp(pixel_values)
        if self.training:
            self.calls.append((pixel_values.detach().clone(), logits.detach().clone()))
        return {"logits": logits}


def _settings(tmp_path, **overrides) -> dict:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=3,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    settings.update(overrides)
    return settings


def _config(tmp_path, **overrides) -> DataDietConfig:
    return DataDietConfig(**_settings(tmp_path, **overrides))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_online_scores_equal_a_recomputation_from_the_logits_of_the_same_steps(tmp_path):
    data = _digits(48)
    model = _RecordingMLP()
    trainer = DataDietTrainer(model, _config(tmp_path), train_dataset=data)
    trainer.train()

    features = data[:]["pixel_values"].numpy()
    labels = data[:]["labels"].numpy()
    row_of = {row.tobytes(): i for i, row in enumerate(features)}
    num_rows, num_epochs, steps_per_epoch = 48, 3, 6
    assert len(model.calls) == num_epochs * steps_per_epoch
    expected = {name: np.full((num_rows, num_epochs), np.nan) for name in ("loss", "el2n", "margin", "probability")}
    expected["correct"] = np.full((num_rows, num_epochs), np.nan)
    for call, (inputs, logits) in enumerate(model.calls):
        epoch = call // steps_per_epoch
        rows = [row_of[row.numpy().tobytes()] for row in inputs]
        z = logits.double().numpy()
        y = labels[rows]
        p = _softmax(z)
        others = z.copy()
        others[np.arange(len(y)), y] = -np.inf
        expected["loss"][rows, epoch] = -np.log(p[np.arange(len(y)), y])
        expected["el2n"][rows, epoch] = np.linalg.norm(p - np.eye(10)[y], axis=1)
        expected["margin"][rows, epoch] = z[np.arange(len(y)), y] - others.max(axis=1)
        expected["probability"][rows, epoch] = p[np.arange(len(y)), y]
        expected["correct"][rows, epoch] = z.argmax(axis=1) == y
    history = trainer.score_history
    for name, values in expected.items():
        assert not np.isnan(values).any()
        np.testing.assert_allclose(history[name], values, rtol=1e-5, atol=1e-6, err_msg=name)

    scores = trainer.scores
    assert len(scores) == num_rows
    correct, margin, probability = expected["correct"], expected["margin"], expected["probability"]
    forgetting = []
    for row in correct:
        if not row.any():
            forgetting.append(num_epochs)
        else:
            forgetting.append(sum(1 for a, b in zip(row, row[1:]) if a == 1 and b == 0))
    np.testing.assert_allclose(scores["forgetting"], forgetting)
    np.testing.assert_allclose(scores["aum"], margin.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["confidence"], probability.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["variability"], probability.std(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores["correctness"], correct.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(scores["loss"], expected["loss"][:, -1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["el2n"], expected["el2n"][:, -1], rtol=1e-5, atol=1e-6)


def _train_mlp(tmp_path, trainer_class, name, **overrides):
    data = _digits(32)
    model = ClassifierWrapper(_MLP(seed=1))
    settings = _settings(tmp_path / name, num_train_epochs=2, **overrides)
    if trainer_class is Trainer:
        callback = ScoreCallback()
        # The rows come from the sampler, not from the batch. (ClassifierWrapper's forward takes **inputs, which a stock
        # Trainer's column removal cannot see: hence remove_unused_columns=False here, not for the row ids.)
        args = TrainingArguments(**settings, remove_unused_columns=False, label_names=["labels"])
        trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])
        trainer.train()
        return trainer, callback, model
    trainer = trainer_class(model, DataDietConfig(**settings), train_dataset=data)
    trainer.train()
    return trainer, trainer.score_callback, model


def _logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_gradient_accumulation_gives_the_same_losses_and_scores(tmp_path):
    one, one_scores, one_model = _train_mlp(tmp_path, DataDietTrainer, "ga1", per_device_train_batch_size=8)
    four, four_scores, four_model = _train_mlp(
        tmp_path, DataDietTrainer, "ga4", per_device_train_batch_size=2, gradient_accumulation_steps=4
    )
    assert len(_logged_losses(one)) == len(_logged_losses(four)) == 8
    np.testing.assert_allclose(_logged_losses(one), _logged_losses(four), rtol=1e-5)
    for name, history in one_scores.score_history.items():
        np.testing.assert_allclose(history, four_scores.score_history[name], rtol=1e-4, atol=1e-5, err_msg=name)
    for a, b in zip(one_model.parameters(), four_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The stock Trainer, given the same **kwargs model, logs (and steps with) a loss 4x too large at GA=4
    # (transformers #47688): what the comparison above guards against.
    stock, _, _ = _train_mlp(
        tmp_path, Trainer, "stock_ga4", per_device_train_batch_size=2, gradient_accumulation_steps=4
    )
    assert _logged_losses(stock)[0] == pytest.approx(4 * _logged_losses(one)[0], rel=1e-4)


def test_stock_trainer_with_score_callback_gives_the_same_scores(tmp_path):
    ours, ours_callback, _ = _train_mlp(tmp_path, DataDietTrainer, "ours")
    stock, stock_callback, _ = _train_mlp(tmp_path, Trainer, "stock")
    np.testing.assert_allclose(_logged_losses(ours), _logged_losses(stock), rtol=1e-5)
    for name, history in ours_callback.score_history.items():
        np.testing.assert_allclose(history, stock_callback.score_history[name], rtol=1e-4, atol=1e-5, err_msg=name)
    ours_scores, stock_scores = ours.scores, stock_callback.scores
    assert ours_scores.column_names == stock_scores.column_names
    for name in ours_scores.column_names:
        np.testing.assert_allclose(ours_scores[name], stock_scores[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_untrackable_rows_fail_before_or_at_the_first_step(tmp_path):
    data = _digits(16)
    args = TrainingArguments(**_settings(tmp_path, max_steps=2), label_names=["labels"])
    # A streaming set has no positions: refused before training.
    stream = data.to_iterable_dataset()
    trainer = Trainer(ClassifierWrapper(_MLP()), args, train_dataset=stream, callbacks=[ScoreCallback()])
    with pytest.raises(ValueError, match="materialise it first"):
        trainer.train()
    assert trainer.state.global_step == 0
    # A collator that drops examples leaves rows without scores: refused at the first step.

    def drop_last_example(features):
        return torch.utils.data.default_collate(features[:-1])

    trainer = DataDietTrainer(
        ClassifierWrapper(_MLP()), _config(tmp_path, max_steps=2), train_dataset=data, data_collator=drop_last_example
    )
    with pytest.raises(ValueError, match="collator added or dropped"):
        trainer.train()
    assert trainer.state.global_step == 0


# ---- real models on real images and text ----------------------------------------------------------------------------


def _cifar_views(cifar10_train, num_rows: int):
    from torchvision import transforms

    raw = cifar10_train.select(range(num_rows))
    normalize = [transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))]
    augment = transforms.Compose([transforms.RandomHorizontalFlip(), *normalize])
    plain = transforms.Compose(normalize)

    def make(tf):
        def transform(batch):
            # Returns only the model inputs: the row ids must survive anyway.
            return {"pixel_values": [tf(image.convert("RGB")) for image in batch["img"]], "labels": batch["label"]}

        return transform

    return raw, raw.with_transform(make(augment)), raw.with_transform(make(plain))


def _check_scores_for_every_row(trainer, raw, num_epochs: int):
    scores = trainer.scores
    assert len(scores) == len(raw)
    for name in scores.column_names:
        values = np.asarray(scores[name])
        assert np.isfinite(values).all(), name
    for name, history in trainer.score_history.items():
        assert history.shape == (len(raw), num_epochs) and not np.isnan(history).any(), name
    scored = trainer.add_scores(raw)
    assert set(scores.column_names) <= set(scored.column_names) and scored["label"] == raw["label"]
    return scored


def _naive_grad_norms(model, inputs, labels):
    """Per-example gradient norms by a loop over the batch: a `needs="gradients"` score for the scoring passes."""
    norms = []
    for i in range(len(labels)):
        model.zero_grad()
        logits = model(inputs[i : i + 1])
        nn.functional.cross_entropy(logits, labels[i : i + 1]).backward()
        norms.append(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None)))
    return torch.stack(norms)


def test_timm_model_with_set_transform_and_scoring_passes(tmp_path, cifar10_train, tiny_timm, monkeypatch):
    from datadiet.scores import list_scores
    from datadiet.scores.registry import _REGISTRY, ScoreSpec

    monkeypatch.setitem(_REGISTRY, "naive_grad_norm", ScoreSpec("naive_grad_norm", _naive_grad_norms, "gradients"))
    raw, train, plain = _cifar_views(cifar10_train, 48)
    methods = ["el2n", "input_norm", "naive_grad_norm"] + (["grand"] if "grand" in list_scores() else [])
    config = _config(
        tmp_path, num_train_epochs=2, learning_rate=0.01, score_epochs=[0, 2], score_methods=methods
    )  # remove_unused_columns stays True: the images must survive until the transform
    trainer = DataDietTrainer(tiny_timm(10), config, train_dataset=train, scoring_dataset=plain)
    assert isinstance(trainer.model, ClassifierWrapper)
    trainer.train()
    scored = _check_scores_for_every_row(trainer, raw, num_epochs=2)
    for method in methods:
        for epoch in (0, 2):
            assert f"{method}_epoch{epoch}" in scored.column_names
    # The scoring pass is eval-mode on un-augmented inputs: input_norm is exactly the norm of the plain tensors.
    expected_norms = [float(torch.linalg.vector_norm(plain[i]["pixel_values"])) for i in range(len(raw))]
    np.testing.assert_allclose(scored["input_norm_epoch2"], expected_norms, rtol=1e-5)
    # Gradient scores see the model in eval mode after the last epoch, on the un-augmented rows, and leave no
    # gradient behind.
    model = trainer.model.model.eval()
    batch = plain[:]
    expected = _naive_grad_norms(model, torch.stack(batch["pixel_values"]), torch.as_tensor(batch["labels"]))
    np.testing.assert_allclose(scored["naive_grad_norm_epoch2"], expected.detach().numpy(), rtol=1e-4)
    if "grand" in methods:
        # The exact per-example gradient norms of `grand` agree with the loop.
        np.testing.assert_allclose(scored["grand_epoch2"], scored["naive_grad_norm_epoch2"], rtol=1e-3)
    # Training changed the model between the two passes.
    assert not np.allclose(scored["el2n_epoch0"], scored["el2n_epoch2"])
    provenance = read_provenance(scored)["training_dynamics"]
    assert provenance["higher_is_harder"]["aum"] is False and provenance["higher_is_harder"]["forgetting"] is True
    assert provenance["epochs"] == 2


# ---- dynamic pruning ------------------------------------------------------------------------------------------------


def test_dynamic_pruning_skips_only_easy_rows_and_ends_on_full_data(tmp_path):
    data = _digits(96)
    settings = dict(
        num_train_epochs=6, learning_rate=0.1, lr_scheduler_type="linear", logging_strategy="epoch", seed=3
    )
    full = DataDietTrainer(ClassifierWrapper(_MLP()), _config(tmp_path / "full", **settings), train_dataset=data)
    full.train()
    config = _config(
        tmp_path / "pruned", dynamic_pruning=True, dynamic_pruning_ratio=0.5, dynamic_pruning_until=0.7, **settings
    )
    trainer = DataDietTrainer(ClassifierWrapper(_MLP()), config, train_dataset=data)
    trainer.train()

    loss = trainer.score_history["loss"]
    seen = ~np.isnan(loss)
    pruning_epochs = int(0.7 * 6)  # epochs 1 .. 3 prune; 0 has no scores yet; 4 and 5 use the full data
    assert seen[:, 0].all() and seen[:, pruning_epochs:].all()
    logged = [
        entry["dynamic_pruning_skipped_fraction"]
        for entry in trainer.state.log_history
        if "dynamic_pruning_skipped_fraction" in entry
    ]
    assert len(logged) == 6
    for epoch in range(1, pruning_epochs):
        skipped = ~seen[:, epoch]
        assert 0 < skipped.sum() < 96
        assert logged[epoch] == pytest.approx(skipped.mean())
        # Only rows scored easy (last seen loss below the mean) are skipped.
        latest = np.array([row[~np.isnan(row)][-1] for row in loss[:, :epoch]])
        assert (latest[skipped] < latest.mean()).all()
    assert logged[0] == 0 and logged[pruning_epochs:] == [0.0] * (6 - pruning_epochs)
    assert trainer.state.global_step < full.state.global_step
    # The learning-rate schedule follows epochs, not steps: both runs end it at the same point.
    full_lrs = [entry["learning_rate"] for entry in full.state.log_history if "learning_rate" in entry]
    pruned_lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert pruned_lrs[-1] == pytest.approx(full_lrs[-1], abs=1e-9)
    np.testing.assert_allclose(pruned_lrs, full_lrs, rtol=0.1)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_dynamic_pruning_epochs_end_on_whole_optimizer_steps(tmp_path, accumulation):
    data = _digits(100)
    config = _config(
        tmp_path,
        num_train_epochs=4,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        dynamic_pruning=True,
        dynamic_pruning_until=1.0,
        lr_scheduler_type="linear",
    )
    trainer = DataDietTrainer(ClassifierWrapper(_MLP()), config, train_dataset=data)
    trainer.train()
    kept = [entry["kept"] for entry in trainer.pruning_history]
    assert kept[0] == 100 and all(count < 100 for count in kept[1:])
    if accumulation > 1:
        # Pruned epochs keep a whole number of accumulated batches of 8, so no gradient spills into the next epoch.
        assert all(count % 8 == 0 for count in kept[1:])
    # One optimizer step per (possibly partial) batch of 8 rows, every epoch.
    assert trainer.state.global_step == sum(math.ceil(count / 8) for count in kept)
    # The schedule was built for 4 full epochs of 13 steps and still ends at 0.
    assert trainer.lr_scheduler.inner_steps == 4 * 13
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_dynamic_pruning_rescales_kept_easy_examples(tmp_path):
    data = _digits(16)
    config = _config(tmp_path, dynamic_pruning=True, dynamic_pruning_ratio=0.75)
    trainer = DataDietTrainer(ClassifierWrapper(_MLP()), config, train_dataset=data)
    model = trainer.model.train()
    weights = torch.ones(16)
    weights[[1, 4, 5]] = 1 / (1 - 0.75)
    trainer._pruning_weights = weights
    # The first batch of the trainer's own (shuffled) training loader; its rows are found by their images (distinct).
    loader = trainer.get_train_dataloader()
    trainer.score_callback.on_train_begin(trainer.args, trainer.state, trainer.control, train_dataloader=loader)
    batch = next(iter(loader))
    images = data[:]["pixel_values"]
    rows = [int((images == image).all(dim=1).nonzero()) for image in batch["pixel_values"]]
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(8))
    logits = model(pixel_values=batch["pixel_values"])["logits"]
    per_example = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    loss, per_example = loss.detach(), per_example.detach()
    assert float(loss) == pytest.approx(float((per_example * weights[rows]).sum() / 8), rel=1e-6)
    assert float(loss) > float(per_example.mean()) * (1 + 1e-3)


def test_label_smoothing_applies_to_the_training_loss_not_the_tracked_loss(tmp_path):
    data = _digits(16)
    config = _config(tmp_path, label_smoothing_factor=0.2)
    # A wrapped model has no `.config`, which the stock Trainer's label-smoothing setup reads.
    trainer = DataDietTrainer(ClassifierWrapper(_MLP()), config, train_dataset=data)
    assert trainer.args.label_smoothing_factor == 0.2
    model = trainer.model.train()
    # As during train(): the first batch of the trainer's own training loader, recorded.
    loader = trainer.get_train_dataloader()
    trainer.score_callback.on_train_begin(trainer.args, trainer.state, trainer.control, train_dataloader=loader)
    batch = next(iter(loader))
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(8)).detach()
    logits = model(pixel_values=batch["pixel_values"])["logits"].detach()
    smoothed = nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=0.2)
    plain = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    assert float(loss) == pytest.approx(float(smoothed), rel=1e-6)
    assert abs(float(smoothed) - float(plain.mean())) > 1e-3
    recorded = trainer.score_callback._buffer_values[0]["loss"]
    np.testing.assert_allclose(recorded.numpy(), plain.numpy(), rtol=1e-6)


# ---- configuration and proxy training -------------------------------------------------------------------------------


def test_config_validation_and_upcast(tmp_path):
    with pytest.raises(ValueError, match="track_scores has unknown names"):
        DataDietConfig(str(tmp_path), track_scores=["forgeting"])
    with pytest.raises(ValueError, match="Unknown score method"):
        DataDietConfig(str(tmp_path), score_epochs=[1], score_methods=["eln2"])
    with pytest.raises(ValueError, match="dynamic_pruning_ratio"):
        DataDietConfig(str(tmp_path), dynamic_pruning_ratio=1.0)
    with pytest.raises(ValueError, match="max_steps"):
        DataDietConfig(str(tmp_path), dynamic_pruning=True, max_steps=10)
    assert DataDietConfig(str(tmp_path), track_scores="forgetting, aum").track_scores == ["forgetting", "aum"]
    plain = TrainingArguments(str(tmp_path), learning_rate=0.123, gradient_accumulation_steps=3, use_cpu=True)
    trainer = DataDietTrainer(ClassifierWrapper(_MLP()), plain, train_dataset=_digits(8))
    assert isinstance(trainer.args, DataDietConfig)
    assert trainer.args.learning_rate == 0.123 and trainer.args.gradient_accumulation_steps == 3
    assert trainer.args.label_names == ["labels"] and trainer.args.track_scores == list(ScoreCallback().track_scores)


def test_train_proxy_model_returns_the_trained_model_in_eval_mode(tmp_path, cifar10_train, tiny_timm):
    _, train, _ = _cifar_views(cifar10_train, 32)
    model = tiny_timm(10).train()
    before = copy.deepcopy(model.state_dict())
    trained = train_proxy_model(
        model, train, epochs=1, seed=0, batch_size=16, learning_rate=1e-2, output_dir=str(tmp_path / "proxy")
    )
    assert trained is model and not model.training
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    assert any(name.endswith("weight") for name in changed)
    assert not (tmp_path / "proxy").exists() or not any((tmp_path / "proxy").glob("checkpoint-*"))
    # With return_trainer and track_scores, the training scores come back too (for a data map, say).
    again, trainer = train_proxy_model(
        tiny_timm(10), train, epochs=1, seed=0, batch_size=16, return_trainer=True, track_scores=["confidence"]
    )
    assert not again.training and trainer.scores.column_names == ["confidence"] and len(trainer.scores) == 32
    assert all(torch.isfinite(value).all() for value in model.state_dict().values())


def test_fit_with_a_built_preprocessor_trains_as_with_transform_and_columns(tmp_path):
    from datadiet.data import Preprocessor
    from datadiet.trainer.proxy import evaluate_accuracy, fit

    digits = _digits(32).with_format(None)
    raw = Dataset.from_dict({"features": digits["pixel_values"], "label": digits["labels"]})
    preprocessor = Preprocessor(None, input_column="features", kind="array", label_column="label")
    budget = {"max_steps": 3, "seed": 0, "batch_size": 8, "learning_rate": 1e-2, "progress_bar": False}
    by_columns = fit(_MLP(), raw, image_column="features", label_column="label", **budget)
    by_preprocessor = fit(_MLP(), raw, preprocessor=preprocessor, **budget)
    for name, value in by_columns.state_dict().items():
        assert torch.equal(value, by_preprocessor.state_dict()[name]), name
    assert evaluate_accuracy(by_columns, raw, image_column="features") == evaluate_accuracy(
        by_preprocessor, raw, preprocessor=preprocessor
    )
    with pytest.raises(ValueError, match="either preprocessor= or \\['image_column'\\]"):
        fit(_MLP(), raw, preprocessor=preprocessor, image_column="features", **budget)
    with pytest.raises(ValueError, match="exactly one training budget"):
        fit(_MLP(), raw, preprocessor=preprocessor, epochs=1, **budget)


def test_data_map_plot_from_trainer_scores(tmp_path):
    from PIL import Image

    from datadiet.report import plot_data_map

    data = _digits(64)
    trainer = DataDietTrainer(ClassifierWrapper(_MLP()), _config(tmp_path, num_train_epochs=4), train_dataset=data)
    trainer.train()
    scores = trainer.scores
    assert np.ptp(scores["variability"]) > 0 and np.ptp(scores["confidence"]) > 0
    path = plot_data_map(
        scores["confidence"], scores["variability"], tmp_path / "map.png", correctness=scores["correctness"]
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 500
        # Coloured points were drawn (not only the white background and grey axes).
        pixels = np.asarray(image.convert("RGB")).astype(int)
        assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).sum() > 100
    with pytest.raises(ValueError, match="same length"):
        plot_data_map([0.1, 0.2], [0.1], tmp_path / "bad.png")


# ---- distributed ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_gather_every_row_once(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = repo / "tests" / "scripts" / "train_digits.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "src")}
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.npz"), "8"], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # The repository's own config, and a script that does not set use_cpu: DataDietConfig trains data-parallel.
    flags = ["--config_file", str(repo / "recipes" / "accelerate_configs" / "cpu_2proc.yaml")]
    flags += ["--main_process_port", str(port)]
    two = subprocess.run(
        [accelerate, "launch", *flags, str(script), str(tmp_path / "two.npz"), "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert int(single["world_size"]) == 1 and int(double["world_size"]) == 2
    # Data-parallel, not two independent runs: each process steps through half the rows (the global batch of 2 x 4
    # rows), as many steps as one process with batches of 8, half as many as one with batches of 4 (13 a epoch).
    assert int(double["global_step"]) == int(single["global_step"]) == 2 * 7
    # The scores written to output_dir cover every row once.
    assert list(double["on_disk_row_id"]) == list(range(50))
    # 50 rows over 2 processes x 4 per batch: the sampler pads each epoch with wrap-around duplicates...
    assert int(single["forward_rows"]) == 100 and int(double["forward_rows"]) > 100
    # ...which are dropped: every row exactly once per epoch, and the scoring pass covers every row.
    for name in ("loss", "el2n", "margin", "probability", "correct"):
        assert double[f"history_{name}"].shape == (50, 2) and not np.isnan(double[f"history_{name}"]).any()
        # Epoch 0 sees the same weights at each global step of 8 rows in both runs (the padding only changes the
        # last step's gradient, after its rows were recorded).
        np.testing.assert_allclose(
            double[f"history_{name}"][:, 0], single[f"history_{name}"][:, 0], rtol=1e-4, atol=1e-5, err_msg=name
        )
    assert not np.isnan(double["el2n_epoch2"]).any() and double["el2n_epoch2"].shape == (50,)
