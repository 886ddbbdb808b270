"""Training-dynamics trackers (pure numpy/torch): forgetting events on scripted correctness sequences, AUM, data-map
statistics and the per-epoch history bookkeeping, each checked against a plain-Python reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datadiet.scores import (
    TrainingDynamics,
    area_under_margin,
    confidence,
    correctness,
    forgetting_events,
    training_quantities,
    variability,
)

NAN = float("nan")


def _reference_forgetting(sequence: list[float], never_learned: float) -> float:
    """Toneva et al. (2019) counted the way the paper describes it: walk the presentations in order, skipping the
    epochs where the example was not presented."""
    presented = [value for value in sequence if not math.isnan(value)]
    if not presented:
        return NAN
    if not any(value == 1 for value in presented):
        return never_learned
    return float(sum(1 for before, after in zip(presented, presented[1:]) if before == 1 and after == 0))


SCRIPTED = [
    ([0, 1, 1, 1, 1, 1], 0.0),  # learned once, never forgotten ("unforgettable")
    ([1, 0, 1, 0, 1, 0], 3.0),  # forgotten three times
    ([0, 0, 1, 0, 0, 1], 1.0),  # incorrect -> incorrect is not an event
    ([1, NAN, 0, 1, NAN, NAN], 1.0),  # a skipped epoch is stepped over: 1 -> (skip) -> 0 counts once
    ([1, NAN, 1, NAN, 1, 0], 1.0),
    ([0, 0, 0, 0, 0, 0], 6.0),  # never learned: ranks above any learned example
    ([NAN, 0, NAN, 0, NAN, NAN], 6.0),  # never learned, even when presented only twice
    ([NAN] * 6, NAN),  # never presented
]


def test_forgetting_events_on_scripted_sequences():
    history = np.array([sequence for sequence, _ in SCRIPTED], dtype=float)
    got = forgetting_events(history)
    expected = np.array([count for _, count in SCRIPTED])
    np.testing.assert_array_equal(got, expected)
    reference = np.array([_reference_forgetting(list(row), never_learned=6.0) for row in history])
    np.testing.assert_array_equal(got, reference)


def test_never_learned_examples_rank_as_most_forgotten():
    rng = np.random.default_rng(0)
    history = (rng.random((200, 9)) < 0.6).astype(float)
    history[:5] = 0.0  # never learned
    counts = forgetting_events(history)
    # A learned example can be forgotten at most num_epochs // 2 times, strictly below the never-learned value.
    assert counts[5:].max() <= 9 // 2
    assert (counts[:5] == 9).all()
    assert set(np.argsort(-counts, kind="stable")[:5]) == set(range(5))
    np.testing.assert_array_equal(forgetting_events(history, never_learned=np.inf)[:5], np.inf)


def test_forgetting_events_random_histories_match_reference():
    rng = np.random.default_rng(1)
    history = (rng.random((300, 12)) < 0.7).astype(float)
    history[rng.random(history.shape) < 0.25] = NAN
    reference = np.array([_reference_forgetting(list(row), never_learned=12.0) for row in history])
    np.testing.assert_array_equal(forgetting_events(history), reference)


def test_aum_and_data_map_statistics_match_per_row_reference():
    rng = np.random.default_rng(2)
    margins = rng.normal(size=(50, 7))
    probabilities = rng.random((50, 7))
    correct = (rng.random((50, 7)) < 0.5).astype(float)
    for array in (margins, probabilities, correct):
        array[rng.random(array.shape) < 0.2] = NAN
    for i in range(50):
        m = [v for v in margins[i] if not math.isnan(v)]
        p = [v for v in probabilities[i] if not math.isnan(v)]
        c = [v for v in correct[i] if not math.isnan(v)]
        assert area_under_margin(margins)[i] == pytest.approx(sum(m) / len(m))
        mean_p = sum(p) / len(p)
        assert confidence(probabilities)[i] == pytest.approx(mean_p)
        assert variability(probabilities)[i] == pytest.approx(math.sqrt(sum((v - mean_p) ** 2 for v in p) / len(p)))
        assert correctness(correct)[i] == pytest.approx(sum(c) / len(c))


def test_statistics_of_rows_never_seen_are_nan_without_warnings():
    history = np.array([[NAN, NAN], [1.0, 3.0]])
    with np.errstate(all="raise"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            values = [area_under_margin(history), confidence(history), variability(history), correctness(history)]
    for value in values:
        assert np.isnan(value[0]) and np.isfinite(value[1])


def test_training_quantities_match_a_numpy_reference():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 5, generator=generator) * 3
    labels = torch.randint(0, 5, (16,), generator=generator)
    got = training_quantities(logits, labels)
    z = logits.double().numpy()
    y = labels.numpy()
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(5)[y]
    others = np.where(onehot == 1, -np.inf, z)
    expected = {
        "loss": -np.log(p[np.arange(16), y]),
        "el2n": np.sqrt(((p - onehot) ** 2).sum(axis=1)),
        "margin": z[np.arange(16), y] - others.max(axis=1),
        "probability": p[np.arange(16), y],
        "correct": (z.argmax(axis=1) == y).astype(float),
    }
    for name, values in expected.items():
        np.testing.assert_allclose(got[name].numpy(), values, rtol=1e-5, atol=1e-6, err_msg=name)


def test_training_dynamics_bookkeeping():
    dynamics = TrainingDynamics(num_rows=4)
    # Epoch 0: row 2 appears twice (wrap-around padding of a distributed sampler): the first value is kept.
    dynamics.add_epoch([2, 0, 1, 3, 2], {"loss": [0.5, 1.0, 2.0, 3.0, 9.0], "correct": [1, 0, 1, 0, 0]})
    # Epoch 1: rows 1 and 3 skipped (dynamic pruning).
    dynamics.add_epoch([0, 2], {"loss": [0.25, 0.75], "correct": [1, 0]})
    loss = dynamics.history("loss")
    assert loss.shape == (4, 2)
    np.testing.assert_array_equal(loss[:, 0], [1.0, 2.0, 0.5, 3.0])
    np.testing.assert_array_equal(np.isnan(loss[:, 1]), [False, True, False, True])
    # Quantities not given are NaN, but every history has the same length.
    assert dynamics.history("margin").shape == (4, 2) and np.isnan(dynamics.history("margin")).all()
    np.testing.assert_array_equal(dynamics.latest("loss"), [0.25, 2.0, 0.75, 3.0])
    summary = dynamics.summary(["loss", "forgetting", "correctness"])
    np.testing.assert_array_equal(summary["loss"], [0.25, 2.0, 0.75, 3.0])
    np.testing.assert_array_equal(summary["forgetting"], [0.0, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(summary["correctness"], [0.5, 1.0, 0.5, 0.0])


def test_training_dynamics_rejects_bad_input():
    dynamics = TrainingDynamics(num_rows=3)
    with pytest.raises(ValueError, match="Row ids must lie in"):
        dynamics.add_epoch([0, 3], {"loss": [1.0, 2.0]})
    with pytest.raises(ValueError, match="Unknown quantities"):
        dynamics.add_epoch([0], {"accuracy": [1.0]})
    with pytest.raises(ValueError, match="values for"):
        dynamics.add_epoch([0, 1], {"loss": [1.0]})
    with pytest.raises(ValueError, match="Unknown tracked scores"):
        dynamics.summary(["grand"])
