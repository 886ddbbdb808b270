"""Per-example loss gradients (flattened over the trainable parameters), the seeded random projector of TracIn-RP, and
the registered TracIn self-influence score of one model. Pure PyTorch."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .functional import loss as cross_entropy
from .grad_norms import per_example_grad_norms
from .logits import forward_logits, unwrap_logits
from .registry import register_score

logger = logging.getLogger(__name__)

__all__ = [
    "RandomProjector",
    "per_example_cross_entropy",
    "per_example_gradients",
    "select_parameters",
    "tracin_self_influence",
]

Inputs = torch.Tensor | dict[str, torch.Tensor]


def per_example_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example, shape `[B]`: TracIn's default loss (`datadiet.scores.loss`)."""
    return cross_entropy(logits, targets)


@register_score("tracin_self_influence", needs="gradients")
def tracin_self_influence(model: nn.Module, inputs: Inputs, labels: torch.Tensor) -> torch.Tensor:
    """Self-influence of each example under ONE model: `‖∇_θ ℓ(f(x), y)‖²` over all trainable parameters, i.e.
    TracIn's `Σ_c η_c ‖∇ℓ(w_c, z)‖²` (Pruthi et al. 2020, eq. 3 with z' = z) for a single checkpoint and a learning
    rate of 1. This is what `score_dataset(..., methods=["tracin_self_influence"])` computes; the sum over the
    checkpoints of a training run, weighted by their learning rates, is `TracIn(model, checkpoints).self_influence`.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores import tracin_self_influence
    >>> model = torch.nn.Linear(4, 3)
    >>> tracin_self_influence(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).shape
    torch.Size([5])

    ```
    """
    return per_example_grad_norms(model, inputs, labels).pow(2)


def select_parameters(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Names of the trainable parameters to differentiate: all of them, or those under the given module/parameter
    names."""
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters (every parameter has requires_grad=False).")
    if layers is None:
        return trainable
    if isinstance(layers, str):
        layers = [layers]
    chosen, unmatched = set(), []
    for layer in layers:
        matched = [name for name in trainable if name == layer or name.startswith(layer + ".")]
        if not matched:
            unmatched.append(layer)
        chosen.update(matched)
    if unmatched:
        modules = sorted({name.split(".")[0] for name in trainable})
        raise ValueError(
            f"layers {unmatched} match no trainable parameter of the model. Give module or parameter names such as "
            f"{modules[:8]} (see `model.named_parameters()`)."
        )
    return [name for name in trainable if name in chosen]


def _per_example_gradients_vmap(
    model: nn.Module,
    inputs: Inputs,
    targets: torch.Tensor,
    names: list[str],
    loss_fn: Callable,
    chunk_size: int | None,
) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters())
    params = {name: named[name].detach() for name in names}
    frozen = {name: p.detach() for name, p in named.items() if name not in params}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def example_loss(params, x, y):
        # One example at a time, as a batch of one: with the model in eval mode (BatchNorm on running statistics,
        # no dropout) the loss of an example does not depend on the other rows of the batch.
        x = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
        state = (params, frozen, buffers)
        output = (
            functional_call(model, state, kwargs=x) if isinstance(x, dict) else functional_call(model, state, (x,))
        )
        return loss_fn(unwrap_logits(output), y.unsqueeze(0)).sum()

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, targets)
    return torch.cat([grads[name].reshape(len(targets), -1) for name in names], dim=1)


def _per_example_gradients_loop(
    model: nn.Module, inputs: Inputs, targets: torch.Tensor, names: list[str], loss_fn: Callable
) -> torch.Tensor:
    named = dict(model.named_parameters())
    params = [named[name] for name in names]
    rows = []
    for i in range(len(targets)):
        x = {k: v[i : i + 1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[i : i + 1]
        loss = loss_fn(forward_logits(model, x), targets[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def per_example_gradients(
    model: nn.Module,
    inputs: Inputs,
    targets: torch.Tensor,
    *,
    parameters: Sequence[str] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The loss gradient of each example, flattened and concatenated over the trainable parameters in
    `model.named_parameters()` order: a `[batch, num_parameters]` tensor.

    Put the model in eval mode first: in train mode BatchNorm mixes the rows of a batch and the "per-example"
    gradient is not one. Every trainable parameter counts, BatchNorm's and LayerNorm's included.

    Args:
        model: a module returning logits (or a `ModelOutput` / tuple whose first item is the logits).
        inputs: a batch tensor (passed positionally) or a dict of batch tensors (passed as keywords).
        targets: class indices, shape `[batch]`.
        parameters: the names of the parameters to differentiate (module names select all their parameters);
            `None` is every trainable parameter.
        loss_fn: `loss_fn(logits, targets) -> per-example losses`; cross-entropy by default.
        method: `"vmap"` (`torch.func.vmap(grad(...))`), `"loop"` (one backward per example) or `"auto"` (vmap, and
            the loop for models that vmap cannot run).
        chunk_size: examples per vmap chunk, to bound memory.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores import per_example_gradients
    >>> model = torch.nn.Linear(4, 3).eval()
    >>> per_example_gradients(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).shape
    torch.Size([5, 15])

    ```
    """
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method={method!r} is not one of 'auto', 'vmap', 'loop'.")
    names = select_parameters(model, parameters)
    loss_fn = loss_fn or per_example_cross_entropy
    if method == "loop":
        return _per_example_gradients_loop(model, inputs, targets, names, loss_fn)
    try:
        return _per_example_gradients_vmap(model, inputs, targets, names, loss_fn, chunk_size)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
        if method == "vmap":
            raise
        logger.warning("vmap could not run %s (%s); computing per-example gradients one example at a time.",
                       type(model).__name__, str(error).splitlines()[0][:200])  # fmt: skip
        return _per_example_gradients_loop(model, inputs, targets, names, loss_fn)


class RandomProjector:
    """A seeded random linear map `R: R^P -> R^d` with `E[(Rg)·(Rg')] = g·g'` (Johnson-Lindenstrauss), so projected
    gradient dot products are unbiased estimates of the exact ones (Pruthi et al. 2020, sec. 3.2, TracIn-RP).

    `gaussian` draws R with N(0, 1/d) entries (the paper's choice; P·d floats in memory). `countsketch` hashes each
    coordinate to one of d buckets with a random sign (Charikar et al. 2002): O(P) memory and time, the same
    variance to first order, for models whose P·d Gaussian matrix would not fit.

    Args:
        num_parameters (`int`): P, the length of the gradients projected.
        dim (`int`): d, the projected dimension.
        kind (`str`, *optional*, defaults to `"gaussian"`): `"gaussian"` or `"countsketch"`.
        seed (`int`, *optional*, defaults to 0): the seed of R; equal seeds give equal maps.
        max_bytes (`int`, *optional*, defaults to 2 GiB): refuse Gaussian matrices larger than this.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.gradients import RandomProjector
    >>> RandomProjector(1000, 16, "countsketch", seed=0)(torch.randn(3, 1000)).shape
    torch.Size([3, 16])

    ```
    """

    def __init__(
        self, num_parameters: int, dim: int, kind: str = "gaussian", seed: int = 0, max_bytes: int = 2 * 2**30
    ):
        if kind not in ("gaussian", "countsketch"):
            raise ValueError(f"projection={kind!r} is not one of 'gaussian', 'countsketch'.")
        if dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {dim}.")
        generator = torch.Generator().manual_seed(seed)
        self.kind, self.dim = kind, dim
        if kind == "gaussian":
            needed = num_parameters * dim * 4
            if needed > max_bytes:
                raise ValueError(
                    f"A Gaussian projection of {num_parameters:,} parameters to {dim} dimensions needs "
                    f"{needed / 2**30:.1f} GiB. Use projection='countsketch' (O(P) memory), a smaller "
                    "projection_dim, or restrict the gradients to some layers with layers=[...]."
                )
            self.matrix = torch.randn(num_parameters, dim, generator=generator) / math.sqrt(dim)
        else:
            self.bucket = torch.randint(0, dim, (num_parameters,), generator=generator)
            self.sign = torch.randint(0, 2, (num_parameters,), generator=generator).float().mul_(2).sub_(1)

    def __call__(self, gradients: torch.Tensor) -> torch.Tensor:
        """Project `[rows, P]` gradients to `[rows, d]` (float32, on the CPU)."""
        gradients = gradients.float().cpu()
        if self.kind == "gaussian":
            return gradients @ self.matrix
        out = torch.zeros(len(gradients), self.dim)
        return out.index_add_(1, self.bucket, gradients * self.sign)
