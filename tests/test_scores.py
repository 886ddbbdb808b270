"""The forward-pass scores against direct numpy computations, and the registry."""

import numpy as np
import pytest
import torch

from datadiet.scores import el2n, entropy, get_score, get_score_spec, input_norm, list_scores, loss, margin


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(17, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=17)
    return logits, labels


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_el2n_matches_numpy(batch):
    logits, labels = batch
    expected = np.linalg.norm(_softmax(logits.astype(np.float64)) - np.eye(7)[labels], axis=1)
    np.testing.assert_allclose(el2n(torch.from_numpy(logits), torch.from_numpy(labels)), expected, rtol=1e-5)


def test_loss_matches_numpy(batch):
    logits, labels = batch
    expected = -np.log(_softmax(logits.astype(np.float64))[np.arange(17), labels])
    np.testing.assert_allclose(loss(torch.from_numpy(logits), torch.from_numpy(labels)), expected, rtol=1e-5)


def test_margin_matches_numpy(batch):
    logits, labels = batch
    expected = []
    for row, y in zip(logits, labels):
        others = np.delete(row, y)
        expected.append(row[y] - others.max())
    np.testing.assert_allclose(margin(torch.from_numpy(logits), torch.from_numpy(labels)), expected, rtol=1e-6)


def test_entropy_matches_numpy(batch):
    logits, _ = batch
    p = _softmax(logits.astype(np.float64))
    np.testing.assert_allclose(entropy(torch.from_numpy(logits)), -(p * np.log(p)).sum(1), rtol=1e-5, atol=1e-7)


def test_input_norm_matches_numpy():
    x = np.random.default_rng(1).normal(size=(5, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        input_norm(torch.from_numpy(x)), np.sqrt((x.astype(np.float64) ** 2).sum((1, 2, 3))), rtol=1e-6
    )
    with pytest.raises(ValueError, match="tensor inputs"):
        input_norm({"input_ids": torch.zeros(2, 3)})


def test_registry():
    assert {"el2n", "loss", "margin", "entropy", "input_norm"} <= set(list_scores())
    assert get_score("el2n") is el2n
    assert get_score_spec("margin").higher_is_harder is False
    assert get_score_spec("input_norm").needs == "inputs"
    with pytest.raises(
        ValueError, match="Unknown score method 'el3n' \\(did you mean 'el2n'\\?\\). Valid methods: .*el2n"
    ):
        get_score("el3n")
