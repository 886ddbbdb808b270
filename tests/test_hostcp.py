"""HOST-CP: the convex selection layer against cvxpy solving the same problem directly, its gradient against finite
differences (and the near-zero gradient of the published LP), and the whole selection on a synthetic problem where
the valuable subset is known."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("cvxpylayers", reason="HOST-CP needs the hostcp extra (cvxpy, cvxpylayers)")

import cvxpy as cp  # noqa: E402

from datadiet.selection.hostcp import prune_hostcp, select_hostcp, selection_layer  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _distances(seed: int, size: int, existing: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    points = torch.nn.functional.normalize(torch.randn(size + existing, 3, generator=generator), dim=1).double()
    return torch.cdist(points[:size], points[:size]), torch.cdist(points[:size], points[size:])


def _solve_directly(d_new: np.ndarray, d_old: np.ndarray, budget: float, weight: float) -> np.ndarray:
    """The published problem written out in cvxpy (with its redundant Z <= 1 bounds), solved without cvxpylayers."""
    z_new, z_old = cp.Variable(d_new.shape), cp.Variable(d_old.shape)
    cost = cp.sum(cp.multiply(d_new, z_new)) + cp.sum(cp.multiply(d_old, z_old))
    cost += weight / 2 * (cp.sum_squares(z_new) + cp.sum_squares(z_old))
    constraints = [
        z_new >= 0, z_new <= 1, z_old >= 0, z_old <= 1,
        cp.sum(z_new, axis=1) + cp.sum(z_old, axis=1) == 1,
        cp.norm(cp.norm(z_new, 1, axis=0), 1) <= budget,
    ]  # fmt: skip
    cp.Problem(cp.Minimize(cost), constraints).solve(solver=cp.CLARABEL)
    return z_new.value


def test_layer_solves_the_selection_problem():
    d_new, d_old = _distances(0, 8, 5)
    layer = selection_layer(8, 5, quadratic_weight=0.1)
    z_new, z_old = layer(d_new, d_old, torch.tensor(3.0, dtype=torch.float64))
    expected = _solve_directly(d_new.numpy(), d_old.numpy(), 3.0, 0.1)
    np.testing.assert_allclose(z_new.numpy(), expected, atol=2e-4)
    torch.testing.assert_close(z_new.sum(1) + z_old.sum(1), torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(z_new.sum()) == pytest.approx(3.0, abs=1e-4)  # the whole budget is used: self-assignment is free


def test_gradient_matches_finite_differences_and_the_lp_has_none():
    d_new, d_old = _distances(1, 6, 4)
    weights = torch.linspace(-1, 1, 6, dtype=torch.float64)
    budget = torch.tensor(2.0, dtype=torch.float64)

    def value(layer, d):
        return (layer(d, d_old, budget)[0].sum(0) * weights).sum()

    qp = selection_layer(6, 4, quadratic_weight=0.1)
    d = d_new.clone().requires_grad_(True)
    value(qp, d).backward()
    gradient = d.grad.clone()
    # Along a random symmetric direction and along the gradient itself.
    random = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for direction in (random + random.T, gradient + gradient.T):
        direction = direction / direction.norm()
        analytic = float((gradient * direction).sum())
        eps = 1e-3
        with torch.no_grad():
            numeric = float(value(qp, d_new + eps * direction) - value(qp, d_new - eps * direction)) / (2 * eps)
        assert analytic == pytest.approx(numeric, rel=0.05, abs=1e-3)
    assert analytic > 0.5  # along the gradient: a real learning signal

    # The published linear program: its solution is piecewise constant in the distances, so no learning signal.
    lp = selection_layer(6, 4, quadratic_weight=0.0)
    d = d_new.clone().requires_grad_(True)
    value(lp, d).backward()
    assert d.grad.norm() < 1e-3 * gradient.norm()


def _redundant_problem(seed: int = 0):
    """150 distinct rows and 150 near-copies of 5 popular rows (30 each): the valuable subset is the distinct rows
    (plus one copy of each popular row); a random 30% subset is about half copies."""
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=(150, 6))
    popular = rng.normal(size=(5, 6))
    copies = np.repeat(popular, 30, axis=0) + 1e-3 * rng.normal(size=(150, 6))
    features = np.concatenate([distinct, copies]).astype(np.float32)
    labels = (features[:, 0] + features[:, 1] > 0).astype(np.int64)
    return features, labels, np.arange(300) >= 150


@pytest.mark.parametrize("epochs", [0, 1])
def test_selects_the_known_valuable_subset(epochs):
    features, labels, is_copy = _redundant_problem()
    result = select_hostcp(features, labels, keep=0.3, epochs=epochs, batch_size=20, num_existing=10, progress=False)
    pool = np.setdiff1d(np.arange(300), result.validation_indices)
    assert len(result.indices) == 90 and len(np.intersect1d(result.indices, result.validation_indices)) == 0
    assert is_copy[pool].mean() > 0.45  # a random subset would be about half copies
    # Once a copy is selected, the others cost nothing to assign to it and are not selected again.
    assert is_copy[result.indices].mean() < 0.2, is_copy[result.indices].mean()
    assert np.isnan(result.values[result.validation_indices]).all()
    assert np.isfinite(result.values[pool]).all()
    if epochs:
        assert len(result.history["validation_loss"]) == len(result.history["selector_grad_norm"]) > 0
        assert np.median(result.history["selector_grad_norm"]) > 1e-4


def test_selection_step_moves_value_from_harmful_to_helpful_rows():
    """One alternating-minimisation step: the selection model's update lowers the validation loss after the
    look-ahead step, and moves selection value from rows whose labels contradict the validation data (a
    subpopulation with flipped labels, identifiable by a feature the classifier does not see) to the others."""
    from torch import nn
    from torch.func import functional_call

    from datadiet.selection.hostcp import _existing_distances, _outer_step, _Selector

    rng = np.random.default_rng(0)
    features = torch.tensor(rng.normal(size=(300, 6)), dtype=torch.float32)
    labels = (features[:, 0] + features[:, 1] > 0).long()
    harmful = features[:, 2] > 0.3
    labels[harmful] = 1 - labels[harmful]
    torch.manual_seed(0)
    selector = _Selector(6, 64, 16)
    classifier = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2))
    layer = selection_layer(20, 10, quadratic_weight=0.1)
    batch, existing, validation = torch.arange(20), list(range(100, 130)), torch.arange(200, 300)

    def values_and_loss(selector, classifier):
        embeddings = selector(features[batch])
        d_old = _existing_distances(
            embeddings, existing, selector(features[existing]).detach(), selector, features, 10
        )
        z_new, _ = layer(torch.cdist(embeddings, embeddings).double(), d_old.double(), torch.tensor(6.0).double())
        value = z_new.sum(0).clamp(min=0).float()
        params = dict(classifier.named_parameters())
        losses = nn.functional.cross_entropy(functional_call(classifier, params, (features[batch],)), labels[batch],
                                             reduction="none")  # fmt: skip
        grads = torch.autograd.grad((value / value.sum() * losses).sum(), list(params.values()))
        lookahead = {name: p - 0.1 * g for (name, p), g in zip(params.items(), grads)}
        loss = nn.functional.cross_entropy(functional_call(classifier, lookahead, (features[validation],)),
                                           labels[validation])  # fmt: skip
        return value.detach(), float(loss.detach())

    before_classifier = copy.deepcopy(classifier)
    value_before, loss_before = values_and_loss(selector, before_classifier)
    embeddings = selector(features[batch])
    d_old = _existing_distances(embeddings, existing, selector(features[existing]).detach(), selector, features, 10)
    z_new, _ = layer(torch.cdist(embeddings, embeddings).double(), d_old.double(), torch.tensor(6.0).double())
    value = z_new.sum(0).clamp(min=0).float()
    optimizer = torch.optim.SGD(selector.parameters(), lr=0.5)
    _outer_step(classifier, selector, optimizer, value / value.sum(), features[batch], labels[batch],
                features[validation], labels[validation], 0.1)  # fmt: skip
    value_after, loss_after = values_and_loss(selector, before_classifier)
    change = value_after - value_before
    assert loss_after < loss_before
    assert change[harmful[batch]].mean() < 0 < change[~harmful[batch]].mean()
    # ... and the classifier took its step on the weighted batch (alternating minimisation).
    assert not all(torch.equal(a, b) for a, b in zip(classifier.parameters(), before_classifier.parameters()))


def test_prune_hostcp_on_a_dataset_and_errors():
    from datasets import Dataset

    from datadiet import read_provenance

    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(100, 6)).astype(np.float32), rng.integers(0, 2, 100)
    ds = Dataset.from_dict({"x": features.tolist(), "label": labels.tolist(), "row": list(range(100))})
    pruned = prune_hostcp(ds, keep=20, features="x", epochs=0, batch_size=20, num_existing=5, seed=1)
    assert len(pruned) == 20 and pruned["row"] == sorted(pruned["row"])
    assert read_provenance(pruned)["pruning"]["strategy"] == "hostcp"
    with pytest.raises(ValueError, match="outside the validation split"):
        select_hostcp(features, labels, keep=0.95, epochs=0)
    with pytest.raises(ValueError, match="flatten"):
        select_hostcp(features.reshape(100, 2, 3), labels, keep=0.1)
