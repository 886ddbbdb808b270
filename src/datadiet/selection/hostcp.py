"""HOST-CP (Das et al. 2021, "Finding High-Value Training Data Subset through Differentiable Convex Programming"):
online subset selection in which a selection model embeds each incoming mini-batch, a convex subset-selection layer
(cvxpylayers) picks representatives, and the selection model is trained, alternating with the classifier, so that a
step on the selected examples lowers the loss on a validation split carved from the training data.

The published selection problem is a linear program. Its solution is piecewise constant in the distances, so its
gradient is almost zero (median norm of the selection model's gradient on MNIST features: 4e-6 for the LP against 0.25
with `quadratic_weight=0.1`, see `docs/hostcp.md`) and the selection model learns nothing. We add the quadratic term
`quadratic_weight / 2 · ‖Z‖²`, which makes the solution a continuous, piecewise-linear function of the distances.

Needs the `hostcp` extra: `pip install "datadiet[hostcp]"` (cvxpy, cvxpylayers).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..scores.functional import loss as cross_entropy
from .strategies import budget_from_keep, stratified_split

logger = logging.getLogger(__name__)

__all__ = ["HostCPResult", "prune_hostcp", "select_hostcp", "selection_layer"]

# The published code's existing set starts as zero vectors: the distance from a unit-norm embedding to the origin.
_ORIGIN_DISTANCE = 1.0


def _require_cvxpylayers() -> None:
    try:
        import cvxpy  # noqa: F401
        import cvxpylayers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'HOST-CP needs cvxpy and cvxpylayers: pip install "datadiet[hostcp]" (or pip install cvxpy cvxpylayers).'
        ) from error


def selection_layer(batch_size: int, num_existing: int, quadratic_weight: float, solver_args: dict | None = None):
    """The differentiable subset-selection problem of HOST-CP for `batch_size` incoming and `num_existing` already
    selected examples, as a `cvxpylayers.torch.CvxpyLayer` mapping `(D_new [B, B], D_old [B, K], budget [])` to the
    assignment matrices `(Z_new [B, B], Z_old [B, K])`.

    Each incoming example `i` is assigned to representatives (rows of Z sum to 1): incoming examples `j` (cost
    `D_new[i, j]`) or existing ones (cost `D_old[i, k]`), with at most `budget` assignment mass on incoming
    representatives (Das et al. 2021, sec. 4; `Σ Z_new ≤ fraction × B` in their code). The mass an incoming example
    receives, `Z_new[:, j].sum()`, is its value. With `quadratic_weight = 0` this is the published linear program;
    `quadratic_weight > 0` adds `quadratic_weight / 2 · (‖Z_new‖² + ‖Z_old‖²)` so that the solution, and so the
    learning signal, varies smoothly with the distances.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.selection.hostcp import selection_layer
    >>> layer = selection_layer(4, 2, quadratic_weight=0.1)
    >>> d_new = torch.cdist(torch.eye(4), torch.eye(4))
    >>> d_old = torch.ones(4, 2)
    >>> z_new, z_old = layer(d_new, d_old, torch.tensor(2.0))
    >>> round(float(z_new.sum()), 3), (z_new.sum(1) + z_old.sum(1)).round(decimals=3).tolist()
    (2.0, [1.0, 1.0, 1.0, 1.0])

    ```
    """
    _require_cvxpylayers()
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    if quadratic_weight < 0:
        raise ValueError(f"quadratic_weight must be >= 0, got {quadratic_weight}.")
    d_new = cp.Parameter((batch_size, batch_size))
    d_old = cp.Parameter((batch_size, num_existing))
    budget = cp.Parameter(nonneg=True)
    z_new = cp.Variable((batch_size, batch_size), nonneg=True)
    z_old = cp.Variable((batch_size, num_existing), nonneg=True)
    cost = cp.sum(cp.multiply(d_new, z_new)) + cp.sum(cp.multiply(d_old, z_old))
    if quadratic_weight > 0:
        cost = cost + quadratic_weight / 2 * (cp.sum_squares(z_new) + cp.sum_squares(z_old))
    # Z <= 1 (in the published problem) follows from Z >= 0 and rows summing to 1, so it is left out.
    constraints = [cp.sum(z_new, axis=1) + cp.sum(z_old, axis=1) == 1, cp.sum(z_new) <= budget]
    problem = cp.Problem(cp.Minimize(cost), constraints)
    # Clarabel (interior point) gives accurate solutions, hence accurate implicit derivatives.
    args = {"solve_method": "Clarabel", **(solver_args or {})}
    return CvxpyLayer(problem, parameters=[d_new, d_old, budget], variables=[z_new, z_old], solver_args=args)


class _Selector(nn.Module):
    """The selection model: features (optionally with the one-hot label) -> unit-norm embedding. Distances between
    embeddings are the costs of the selection problem; unit norm keeps their scale, hence the effect of the
    quadratic term, fixed."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=-1)


def _default_classifier(in_features: int, num_classes: int, hidden: int) -> nn.Module:
    # The published code trains a small MLP on frozen features (512-384-128-10 on ResNet-18 features).
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@dataclass
class HostCPResult:
    """What `select_hostcp` found.

    Attributes:
        indices: sorted positions (in the input) of the selected rows; `len(indices)` is the budget.
        values: each row's value in the final selection pass (the assignment mass it received as a
            representative, in [0, batch_size]); NaN for validation rows.
        validation_indices: the rows carved out as the validation split (never selected).
        history: per training step, the validation loss after the look-ahead step and the selection model's
            gradient norm.
    """

    indices: np.ndarray
    values: np.ndarray
    validation_indices: np.ndarray
    history: dict[str, list[float]] = field(default_factory=dict)


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype) if not isinstance(x, torch.Tensor) else x.to(dtype)


def _quotas(batch_sizes: list[int], budget: int) -> list[int]:
    """Split `budget` over the batches in proportion to their sizes (cumulative rounding, so the sum is exact)."""
    cumulative = np.round(np.cumsum(batch_sizes) * budget / sum(batch_sizes)).astype(np.int64)
    return np.diff(np.concatenate([[0], cumulative])).tolist()


def select_hostcp(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    keep: float | int,
    *,
    num_classes: int | None = None,
    validation_fraction: float = 0.1,
    epochs: int = 2,
    batch_size: int = 40,
    num_existing: int = 40,
    quadratic_weight: float = 0.1,
    embedding_dim: int = 32,
    hidden_dim: int = 128,
    use_labels: bool = False,
    classifier: nn.Module | None = None,
    classifier_lr: float = 0.1,
    selector_lr: float = 1e-3,
    validation_batch_size: int = 256,
    seed: int = 0,
    solver_args: dict | None = None,
    progress: bool | None = None,
) -> HostCPResult:
    """Select a high-value subset with HOST-CP (Das et al. 2021): online selection through a differentiable convex
    program, the selection model trained against a validation split carved from the training data.

    Rows are split into a validation part (`validation_fraction`, stratified by label, never selected) and a pool.
    For `epochs` passes over the pool in random mini-batches of `batch_size`:

    1. the selection model embeds the batch and the `num_existing` nearest examples selected earlier in the epoch;
    2. the convex layer (`selection_layer`) assigns each incoming example to representatives; example `j`'s value
       `s_j` is the assignment mass it receives, and the batch's quota of highest-value examples joins the
       selected set;
    3. look-ahead: `θ' = θ − lr ∇_θ Σ_j w_j ℓ_j(θ)` with `w = s / Σ s`; the validation loss at `θ'` is
       backpropagated through the convex layer into the selection model, which takes an Adam step;
    4. the classifier takes the step `θ ← θ'` (alternating minimisation).

    A last pass with the trained selection model (no updates) selects the subset: exactly `keep` rows of the pool.

    Args:
        features: `[num_rows, dim]` frozen features of each row (e.g. penultimate-layer embeddings of a proxy model,
            or pixels for MNIST); standardise them first.
        labels: `[num_rows]` class ids.
        keep: a fraction of all rows (validation rows included, so that subsets compare at equal size) or a count.
        num_classes: the number of classes (from the labels when not given).
        validation_fraction: the share of rows carved out for the outer (validation) loss. Never the test split.
        epochs: training passes before the selection pass.
        batch_size / num_existing: the size of the convex problem (`B × B` and `B × K` assignment variables; the
            published code uses 40 × 40, about 0.1-0.5 s per solve on a CPU).
        quadratic_weight: the quadratic regularisation (`0` is the published LP, which gives no learning signal;
            0.01 gives a gradient but learned little in our measurements; 0.1, the default, is the smallest value
            tried that learned clearly, see `docs/hostcp.md`).
        embedding_dim / hidden_dim: sizes of the selection model (and of the default classifier's hidden layer).
        use_labels: feed the one-hot label to the selection model too (not in the paper; lets it learn which
            (input, label) pairs are worth keeping, e.g. to avoid mislabelled rows).
        classifier: the model trained alternately on the selected examples (a module mapping features to logits);
            a one-hidden-layer MLP by default.
        classifier_lr / selector_lr: learning rates of the classifier (SGD, also the look-ahead step) and of the
            selection model (Adam).
        validation_batch_size: validation rows per outer-loss evaluation.
        seed: seeds the split, the batch order and the models' initialisation.
        solver_args: extra arguments for the cvxpylayers solver (diffcp).
        progress: show a progress bar (default: when logging is not redirected).

    Returns:
        `HostCPResult` with the selected `indices` (sorted), each row's `values`, the `validation_indices` and a
        training `history`.

    Example:
    ```python
    >>> import numpy as np
    >>> from datadiet.selection.hostcp import select_hostcp
    >>> rng = np.random.default_rng(0)
    >>> features = rng.normal(size=(120, 5)).astype(np.float32)
    >>> labels = (features[:, 0] > 0).astype(int)
    >>> result = select_hostcp(features, labels, keep=0.25, epochs=1, batch_size=20, num_existing=10)
    >>> len(result.indices), len(np.intersect1d(result.indices, result.validation_indices))
    (30, 0)

    ```
    """
    _require_cvxpylayers()
    features = _as_tensor(features, torch.float32)
    labels = _as_tensor(labels, torch.long)
    if features.ndim != 2:
        raise ValueError(f"features must be [num_rows, dim], got shape {tuple(features.shape)}; flatten them first.")
    num_rows = len(features)
    if len(labels) != num_rows:
        raise ValueError(f"{num_rows} feature rows but {len(labels)} labels.")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} is outside (0, 1).")
    if batch_size < 2 or num_existing < 1 or epochs < 0:
        raise ValueError(
            f"Need batch_size >= 2, num_existing >= 1 and epochs >= 0; got {batch_size}, {num_existing}, {epochs}."
        )
    num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
    budget = budget_from_keep(keep, num_rows)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    validation = stratified_split(labels.numpy(), validation_fraction, rng)
    pool = np.setdiff1d(np.arange(num_rows), validation)
    if budget > len(pool):
        raise ValueError(
            f"keep={keep} asks for {budget} rows but only {len(pool)} are outside the validation split; lower keep "
            "or validation_fraction."
        )

    selector_inputs = features
    if use_labels:
        selector_inputs = torch.cat([features, nn.functional.one_hot(labels, num_classes).float()], dim=1)
    selector = _Selector(selector_inputs.shape[1], hidden_dim, embedding_dim)
    model = classifier if classifier is not None else _default_classifier(features.shape[1], num_classes, hidden_dim)
    selector_optimizer = torch.optim.Adam(selector.parameters(), lr=selector_lr)
    layers: dict[tuple[int, int], Any] = {}

    def layer_for(size: int, existing: int):
        if (size, existing) not in layers:
            layers[(size, existing)] = selection_layer(size, existing, quadratic_weight, solver_args)
        return layers[(size, existing)]

    history: dict[str, list[float]] = {"validation_loss": [], "selector_grad_norm": [], "solve_seconds": []}
    values = np.full(num_rows, np.nan)
    selected: list[int] = []
    for epoch in range(epochs + 1):
        training = epoch < epochs
        order = rng.permutation(pool)
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        quotas = _quotas([len(b) for b in batches], budget)
        selected = []
        selected_embeddings = torch.zeros(0, embedding_dim)
        description = f"HOST-CP epoch {epoch + 1}/{epochs}" if training else "HOST-CP selection pass"
        disable = None if progress is None else not progress
        for rows, quota in tqdm(list(zip(batches, quotas)), desc=description, disable=disable, unit="batch"):
            if len(rows) < 2:  # a lone leftover row: nothing to compare it with
                if quota:
                    selected.extend(rows.tolist())
                    values[rows] = 1.0
                continue
            with torch.set_grad_enabled(training):
                embeddings = selector(selector_inputs[rows])
                d_new = torch.cdist(embeddings, embeddings)
                d_old = _existing_distances(
                    embeddings, selected, selected_embeddings, selector, selector_inputs, num_existing
                )
                start = time.perf_counter()
                z_new, _ = layer_for(len(rows), num_existing)(
                    d_new.double(), d_old.double(), torch.tensor(float(quota), dtype=torch.float64)
                )
                history["solve_seconds"].append(time.perf_counter() - start)
                value = z_new.sum(dim=0).clamp(min=0).float()

            top = torch.topk(value.detach(), quota).indices if quota else torch.zeros(0, dtype=torch.long)
            chosen = rows[top.numpy()]
            selected.extend(chosen.tolist())
            selected_embeddings = torch.cat([selected_embeddings, embeddings.detach()[top]])
            if not training:
                values[rows] = value.detach().numpy()
                continue

            weights = value / value.sum().clamp(min=1e-8)
            validation_rows = rng.choice(validation, size=min(validation_batch_size, len(validation)), replace=False)
            loss, grad_norm = _outer_step(
                model,
                selector,
                selector_optimizer,
                weights,
                features[rows],
                labels[rows],
                features[validation_rows],
                labels[validation_rows],
                classifier_lr,
            )
            history["validation_loss"].append(loss)
            history["selector_grad_norm"].append(grad_norm)

    indices = np.sort(np.asarray(selected, dtype=np.int64))
    logger.info(
        "HOST-CP selected %d of %d rows (%d validation rows held out); median solve %.3f s.",
        len(indices),
        num_rows,
        len(validation),
        float(np.median(history["solve_seconds"])) if history["solve_seconds"] else 0.0,
    )
    return HostCPResult(indices=indices, values=values, validation_indices=np.sort(validation), history=history)


def _existing_distances(
    embeddings: torch.Tensor,
    selected: list[int],
    selected_embeddings: torch.Tensor,
    selector: nn.Module,
    selector_inputs: torch.Tensor,
    num_existing: int,
) -> torch.Tensor:
    """Distances `[B, K]` from the batch to the K selected examples nearest to it (the published code finds them
    with FAISS), embedded by the current selection model so the gradient reaches it through both terms; columns
    beyond the selected set stand for the published code's zero vectors (distance 1 from a unit embedding)."""
    size = len(embeddings)
    d_old = torch.full((size, num_existing), _ORIGIN_DISTANCE)
    if not selected:
        return d_old
    # Nearest by the embeddings stored when they were selected (cheap); exact distances with the current model.
    nearest = torch.cdist(embeddings.detach(), selected_embeddings).min(dim=0).values
    count = min(num_existing, len(selected))
    picked = torch.topk(-nearest, count).indices.numpy()
    neighbours = np.asarray(selected, dtype=np.int64)[picked]
    fresh = selector(selector_inputs[neighbours])
    return torch.cat([torch.cdist(embeddings, fresh), d_old[:, count:]], dim=1)


def _outer_step(
    model: nn.Module,
    selector: nn.Module,
    selector_optimizer: torch.optim.Optimizer,
    weights: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    lr: float,
) -> tuple[float, float]:
    """One alternating-minimisation step (Das et al. 2021, Algorithm 1): the validation loss after a look-ahead SGD
    step on the weighted batch trains the selection model; the classifier then takes that step."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    losses = cross_entropy(functional_call(model, params, (x,)), y)
    # create_graph: the look-ahead weights θ' depend on the selection weights w, through which the validation loss is
    # differentiated (the second-order terms in θ are not needed, θ is not trained by this loss).
    grads = torch.autograd.grad((weights * losses).sum(), list(params.values()), create_graph=True)
    lookahead = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
    validation_loss = nn.functional.cross_entropy(functional_call(model, lookahead, (x_val,)), y_val)
    selector_optimizer.zero_grad()
    validation_loss.backward(inputs=list(selector.parameters()))
    grad_norm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in selector.parameters() if p.grad is not None)))
    selector_optimizer.step()
    with torch.no_grad():
        for param, grad in zip(params.values(), grads):
            param.sub_(lr * grad.detach())
    return float(validation_loss.detach()), grad_norm


def prune_hostcp(
    dataset,
    keep: float | int,
    *,
    features: np.ndarray | torch.Tensor | str,
    label_column: str | None = None,
    **options,
):
    """`dataset` reduced to the rows HOST-CP selects (`select_hostcp`), in their original order, with the selection
    recorded in its provenance.

    Args:
        dataset: a `datasets.Dataset` with a label column.
        keep: a fraction of all rows or a row count.
        features: `[num_rows, dim]` features, or the name of a column holding one vector per row.
        label_column: detected from the features when not given.
        **options: passed to `select_hostcp` (`epochs`, `quadratic_weight`, `seed`, ...).

    Example:
    ```python
    >>> import numpy as np
    >>> from datasets import Dataset
    >>> from datadiet.selection.hostcp import prune_hostcp
    >>> rng = np.random.default_rng(0)
    >>> ds = Dataset.from_dict({"x": rng.normal(size=(100, 4)).tolist(), "label": rng.integers(0, 2, 100).tolist()})
    >>> len(prune_hostcp(ds, keep=0.2, features="x", epochs=0, batch_size=20, num_existing=10))
    20

    ```
    """
    from ..data import detect_label_column
    from ..provenance import record_provenance

    label_column = detect_label_column(dataset, label_column)
    if isinstance(features, str):
        if features not in dataset.column_names:
            raise ValueError(f"Column {features!r} is not in the dataset; its columns are {dataset.column_names}.")
        features = np.asarray(dataset.with_format("numpy")[features], dtype=np.float32)
    labels = np.asarray(dataset.with_format("numpy")[label_column])
    result = select_hostcp(features, labels, keep, **options)
    pruned = dataset.select(result.indices)
    recorded = {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return record_provenance(
        pruned,
        pruning={
            "strategy": "hostcp",
            "keep": keep,
            "rows_before": len(dataset),
            "rows_after": len(pruned),
            **recorded,
        },
    )
