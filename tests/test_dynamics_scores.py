"""The training-dynamics columns of `score_dataset` / `datadiet score` (`forgetting`, `aum`, `confidence`,
`variability`, `correctness`) checked row by row against references that use none of datadiet's tracking code: the
initial model itself (learning rate 0: every presentation gives the initial prediction), and the logits of every
training forward pass as a plain torch forward hook on the test's own model saw them (in one process, or in each of
two `accelerate launch` processes), each attributed to its row by the row's pixel values, never by a sampler index or
a row-id column. What stays datadiet's own is only the convention checked against: a row never classified correctly
counts `num_epochs` forgetting events (finite, so that seeds average), and rows never presented take the median."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_datadiet
from torch import nn

ROWS = 240
FEATURES = 64
NUM_CLASSES = 10
METHODS = ["forgetting", "aum", "confidence", "variability", "correctness"]


@pytest.fixture(scope="module")
def digit_arrays(digits):
    """The first `ROWS` distinct digits of the training split as float32 vectors (an array column `pixels`), so that
    each row's pixels name it unambiguously."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    seen, pixels, labels = set(), [], []
    for image, label in zip(digits["train"]["image"], digits["train"]["label"]):
        vector = (np.asarray(image, dtype=np.float32) / 255.0).reshape(-1)
        if vector.tobytes() in seen:
            continue
        seen.add(vector.tobytes())
        pixels.append(vector)
        labels.append(label)
        if len(pixels) == ROWS:
            break
    features = Features(
        {"pixels": Sequence(Value("float32"), length=FEATURES), "label": ClassLabel(num_classes=NUM_CLASSES)}
    )
    return Dataset.from_dict({"pixels": np.stack(pixels), "label": labels}, features=features)


def _mlp(seed: int) -> nn.Module:
    """A small MLP with neither dropout nor batch norm: its train-mode forward (the one training tracks) is a pure
    function of its weights, so the initial model computes what every learning-rate-0 presentation gives."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def _per_row_quantities(logits: torch.Tensor, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Correct / true-class probability / margin (true logit minus the largest other) of each row, computed here."""
    logits = logits.double()
    labels = torch.as_tensor(labels, dtype=torch.long)
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    return {
        "correct": (logits.argmax(dim=1) == labels).double().numpy(),
        "probability": logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1).numpy(),
        "margin": (true - others).numpy(),
    }


def _hand_scores(presentations: list[list[dict[str, float]]], num_epochs: int) -> dict[str, np.ndarray]:
    """The five scores of each row from its presentations in training order (`[]` for a row never presented: NaN).
    Forgetting (Toneva et al. 2019): correct -> incorrect transitions between consecutive presentations; a row never
    correct counts `num_epochs` (datadiet's documented finite stand-in for "infinitely many")."""
    out = {name: np.full(len(presentations), np.nan) for name in METHODS}
    for row, seen in enumerate(presentations):
        if not seen:
            continue
        correct = [p["correct"] for p in seen]
        probability = np.array([p["probability"] for p in seen])
        events = sum(1 for before, after in zip(correct, correct[1:]) if before == 1 and after == 0)
        out["forgetting"][row] = events if any(correct) else num_epochs
        out["aum"][row] = np.mean([p["margin"] for p in seen])
        out["confidence"][row] = probability.mean()
        out["variability"][row] = probability.std()
        out["correctness"][row] = np.mean(correct)
    return out


def _fill_with_median(values: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), np.median(values[~np.isnan(values)]), values)


def _assert_columns(scored, per_seed: list[dict[str, np.ndarray]]) -> None:
    """Mean over seeds in `<method>`, population std in `<method>_std` (with several seeds), row by row."""
    for name in METHODS:
        stacked = np.stack([scores[name] for scores in per_seed])
        column = np.asarray(scored[name], dtype=np.float64)
        np.testing.assert_allclose(column, stacked.mean(axis=0), rtol=1e-5, atol=1e-6, err_msg=name)
        if len(per_seed) > 1:
            std = np.asarray(scored[f"{name}_std"], dtype=np.float64)
            np.testing.assert_allclose(std, stacked.std(axis=0), rtol=1e-4, atol=1e-6, err_msg=f"{name}_std")


def _score(dataset, model_init, seeds, epochs, batch_size, *, output_dir=None, **training):
    from datadiet import score_dataset

    return score_dataset(
        dataset,
        model_init=model_init,
        methods=METHODS,
        seeds=seeds,
        train_epochs=epochs,
        batch_size=batch_size,
        image_column="pixels",
        training_kwargs=training,
        output_dir=output_dir,
    )


def test_learning_rate_zero_gives_the_initial_models_predictions_at_every_presentation(digit_arrays, one_thread):

    seeds, epochs = [0, 1], 3
    scored = _score(digit_arrays, _mlp, seeds, epochs, batch_size=32, learning_rate=0.0)
    assert scored["label"] == digit_arrays["label"]  # rows kept in their order
    inputs = torch.tensor(np.asarray(digit_arrays["pixels"]), dtype=torch.float32)
    labels = np.asarray(digit_arrays["label"])
    per_seed = []
    for seed in seeds:
        model = _mlp(seed).train()
        with torch.no_grad():
            q = _per_row_quantities(model(inputs), labels)
        right = q["correct"] == 1
        assert 0 < right.sum() < ROWS  # both kinds of rows, so that the never-learned value is checked too
        per_seed.append(
            {
                "forgetting": np.where(right, 0.0, float(epochs)),  # never correct: the never-learned value
                "aum": q["margin"],
                "confidence": q["probability"],
                "variability": np.zeros(ROWS),
                "correctness": q["correct"],
            }
        )
    _assert_columns(scored, per_seed)


class _Recorder:
    """Builds the test's MLPs and records, through a forward hook, every train-mode forward pass: the inputs and the
    logits, per seed. Nothing of datadiet is involved in what is recorded."""

    def __init__(self):
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, seed: int) -> nn.Module:
        model = _mlp(seed)
        calls = self.calls.setdefault(seed, [])

        def hook(module, args, output):
            if module.training:
                calls.append((args[0].detach().float().clone(), output.detach().clone()))

        model.register_forward_hook(hook)
        return model

    def presentations(self, seed: int, dataset) -> tuple[list[list[dict[str, float]]], list[list[int]]]:
        """Each row's quantities in presentation order and the rows of each batch (see `_presentations`)."""
        return _presentations([(i, inputs, logits) for i, (inputs, logits) in enumerate(self.calls[seed])], dataset)


def _presentations(records, dataset) -> tuple[list[list[dict[str, float]]], list[list[int]]]:
    """From `(time, inputs, logits)` of training forward passes: each row's quantities ordered by time, the rows
    found by their pixels; and the rows of each batch."""
    position = {np.asarray(p, dtype=np.float32).tobytes(): i for i, p in enumerate(dataset["pixels"])}
    labels = np.asarray(dataset["label"])
    timed: list[list[tuple[int, dict[str, float]]]] = [[] for _ in range(len(dataset))]
    batches = []
    for time, inputs, logits in records:
        rows = [position[np.asarray(vector, dtype=np.float32).tobytes()] for vector in inputs]
        q = _per_row_quantities(torch.as_tensor(logits), labels[rows])
        for i, row in enumerate(rows):
            timed[row].append((time, {name: float(values[i]) for name, values in q.items()}))
        batches.append(rows)
    per_row = [[quantities for _, quantities in sorted(seen, key=lambda item: item[0])] for seen in timed]
    return per_row, batches


def test_forgetting_of_a_real_training_run_equals_the_count_over_its_recorded_forward_passes(
    digit_arrays, one_thread, tmp_path
):
    """Learning rate > 0, 3 epochs, the Trainer's shuffled sampler, 2 seeds: the very runs whose columns are checked
    are the runs the hook saw (same process, same models). A rerun on the same `output_dir` trains nothing and gives
    the same columns (the scores cached beside the proxy weights)."""
    seeds, epochs, batch_size = [0, 1], 3, 16
    recorder = _Recorder()
    scored = _score(digit_arrays, recorder, seeds, epochs, batch_size, learning_rate=0.02, output_dir=tmp_path)
    per_seed = []
    for seed in seeds:
        per_row, batches = recorder.presentations(seed, digit_arrays)
        assert all(len(seen) == epochs for seen in per_row)  # every row once per epoch
        order = [row for batch in batches for row in batch]
        first, second = order[:ROWS], order[ROWS : 2 * ROWS]
        assert first != list(range(ROWS)) and first != second  # shuffled, and differently each epoch
        expected = _hand_scores(per_row, epochs)
        counts = np.bincount(expected["forgetting"].astype(int), minlength=epochs + 1)
        assert counts[0] > 0 and counts[1] > 0 and counts[epochs] > 0, counts  # learned, forgotten, never learned
        per_seed.append(expected)
    _assert_columns(scored, per_seed)

    rerun = _Recorder()
    resumed = _score(digit_arrays, rerun, seeds, epochs, batch_size, learning_rate=0.02, output_dir=tmp_path)
    assert all(not calls for calls in rerun.calls.values())  # the proxies were loaded, not trained again
    _assert_columns(resumed, per_seed)


def test_rows_a_dropped_last_batch_never_presented_get_the_median(digit_arrays, one_thread):
    """With `dataloader_drop_last`, each epoch leaves out the rows of its last partial batch (a different set each
    epoch): rows presented in some epochs are scored over those, rows presented in none take the median."""
    epochs, batch_size = 2, 50  # 240 = 4 * 50 + 40: 40 rows left out of each epoch
    recorder = _Recorder()
    scored = _score(digit_arrays, recorder, [3], epochs, batch_size, learning_rate=0.02, dataloader_drop_last=True)
    per_row, _ = recorder.presentations(3, digit_arrays)
    presented = np.array([len(seen) for seen in per_row])
    assert presented.sum() == epochs * (ROWS // batch_size) * batch_size
    assert (presented == 0).any() and (presented == 1).any()
    expected = {name: _fill_with_median(values) for name, values in _hand_scores(per_row, epochs).items()}
    _assert_columns(scored, [expected])


def test_the_command_writes_the_forgetting_column_score_dataset_gives(tmp_path, one_thread):
    """`datadiet score --methods forgetting el2n --train_epochs 1` and `score_dataset` with the same arguments (the
    same rows, model, transform, seeds, learning rate) give the same columns."""
    from datadiet import score_dataset
    from datadiet.data import build_image_transform, load_data
    from datadiet.models import build_model

    rows, kwargs = 96, '{"stem_width": 8, "widths": [8, 16, 16]}'
    argv = [
        "score", "--dataset_name", "sklearn-digits", "--max_rows", str(rows), "--model_name", "datadiet_tiny_net",
        "--model_kwargs", kwargs, "--in_chans", "1", "--mean", "0.5", "--std", "0.5", "--methods", "forgetting",
        "el2n", "--train_epochs", "1", "--seeds", "0", "1", "--batch_size", "16", "--learning_rate", "0.01",
        "--output_dir", str(tmp_path / "scored"),
    ]  # fmt: skip
    run = run_datadiet(*argv, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    from_command = load_data(str(tmp_path / "scored" / "dataset"))

    dataset = load_data("sklearn-digits", split="train", max_rows=rows)
    from_python = score_dataset(
        dataset,
        model_init=lambda seed: build_model(
            "datadiet_tiny_net", num_classes=10, in_chans=1, model_kwargs=json.loads(kwargs), seed=seed
        ),
        methods=["forgetting", "el2n"],
        seeds=[0, 1],
        train_epochs=1,
        transform=build_image_transform(mean=[0.5], std=[0.5]),
        batch_size=16,
        training_kwargs={"learning_rate": 0.01},
    )
    assert from_command["label"] == from_python["label"]
    for name in ["forgetting", "forgetting_std", "el2n", "el2n_std"]:
        np.testing.assert_allclose(from_command[name], from_python[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # One epoch: each row is presented once, so forgetting is 0 (correct then) or 1 (the never-learned value) for
    # each seed; the mean of two is 0, 0.5 or 1, and rows of each kind are there.
    assert set(np.unique(from_python["forgetting"]).tolist()) == {0.0, 0.5, 1.0}


@pytest.mark.slow
def test_two_processes_give_the_forgetting_their_recorded_forward_passes_give(digit_arrays, tmp_path):
    """Under a real two-process `accelerate launch`, each process's hook sees its half of every batch; the rows of
    both halves, put in epoch order, give the scores the main process writes. 224 rows = 7 batches of 2 x 16: no
    row padded in twice."""
    from pathlib import Path

    rows, epochs, batch_size, seeds = 224, 3, 16, [0, 1]
    dataset = digit_arrays.select(range(rows))
    dataset.save_to_disk(str(tmp_path / "data"))
    script = Path(__file__).resolve().parent / "scripts" / "score_dynamics.py"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    flags += ["--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    argv = [str(script), str(tmp_path / "data"), str(tmp_path / "result"), str(epochs), str(batch_size)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    environment["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    run = subprocess.run(
        [accelerate, "launch", *flags, *argv, *map(str, seeds)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = tmp_path / "result"
    with np.load(result / "scores.npz") as stored:
        assert int(stored["world"]) == 2
        columns = {name: stored[name] for name in stored.files if name != "world"}
    per_seed = []
    for seed in seeds:
        records = []
        for rank in range(2):
            with np.load(result / f"rank-{rank}-seed-{seed}.npz") as recorded:
                sizes, inputs, logits = recorded["batches"], recorded["inputs"], recorded["logits"]
            assert (sizes == batch_size).all() and len(sizes) == epochs * rows // (2 * batch_size)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            per_epoch = len(sizes) // epochs
            for call, (start, size) in enumerate(zip(starts, sizes)):
                records.append((call // per_epoch, inputs[start : start + size], logits[start : start + size]))
        per_row, _ = _presentations(records, dataset)
        assert all(len(seen) == epochs for seen in per_row)  # each row once per epoch, on one process or the other
        per_seed.append(_hand_scores(per_row, epochs))
    _assert_columns(columns, per_seed)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
