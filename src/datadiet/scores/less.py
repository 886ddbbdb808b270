"""The maths of LESS (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning"): each
example's gradient under any per-example loss, and the Adam update direction a gradient would produce from an
optimizer state. Pure PyTorch; checkpoints, datasets and the score itself are in `datadiet.tracin.less`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .gradients import select_parameters

logger = logging.getLogger(__name__)

__all__ = ["adam_update_direction", "per_example_loss_gradients"]

PerExampleLoss = Callable[[nn.Module, Any], torch.Tensor]


def _linear_owners(model: nn.Module, names: list[str]) -> dict[str, tuple[nn.Linear, str]] | None:
    """`name -> (nn.Linear, "weight" | "bias")` for every chosen parameter, or `None` if one is not a Linear's."""
    owners = {}
    for module_name, module in model.named_modules():
        if type(module) is not nn.Linear:  # a subclass may compute its output otherwise (peft's LoRA Linear does)
            continue
        for kind in ("weight", "bias"):
            full = f"{module_name}.{kind}" if module_name else kind
            if full in names and getattr(module, kind) is not None:
                owners[full] = (module, kind)
    return owners if len(owners) == len(names) else None


def _check_losses(losses: Any, batch_size: int | None) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or losses.ndim != 1 or (batch_size and losses.shape[0] != batch_size):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"per_example_loss must return one loss per row, a tensor of shape [{batch_size or 'B'}]; got {shape}. "
            "Reduce the token losses of each row to one number (e.g. their mean over the trained tokens)."
        )
    return losses


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values())))
    return len(batch)


def _row(batch: Any, i: int) -> Any:
    if isinstance(batch, Mapping):
        return {k: v[i : i + 1] for k, v in batch.items()}
    return batch[i : i + 1]


def _gradients_linear(model, batch, per_example_loss, names, owners) -> torch.Tensor:
    # One forward and one backward to the outputs of the Linear layers that hold the chosen parameters: the gradient of
    # a row's own loss w.r.t. its weight is the sum over its positions of g ⊗ a (output gradient ⊗ layer input), because
    # the other rows' losses do not depend on this row's activations (eval mode: no batch statistics, no dropout).
    modules = {id(module): module for module, _ in owners.values()}
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {key: [] for key in modules}

    def hook(module, inputs, output):
        calls[id(module)].append((inputs[0], output))

    handles = [module.register_forward_hook(hook) for module in modules.values()]
    try:
        losses = _check_losses(per_example_loss(model, batch), _batch_size(batch))
    finally:
        for handle in handles:
            handle.remove()
    flat = [(key, i) for key, found in calls.items() for i in range(len(found))]
    outputs = [calls[key][i][1] for key, i in flat]
    if any(not out.requires_grad for out in outputs):
        raise RuntimeError("a chosen Linear's output does not require grad")
    output_grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    batch_size = losses.shape[0]
    weight_grads: dict[int, torch.Tensor] = {}
    bias_grads: dict[int, torch.Tensor] = {}
    for (key, i), g in zip(flat, output_grads):
        if g is None:
            continue
        a = calls[key][i][0]
        if a.shape[0] != batch_size:
            raise RuntimeError(f"a Linear saw a batch of {a.shape[0]} rows, not {batch_size}")
        a = a.detach().float().reshape(batch_size, -1, a.shape[-1])
        g = g.float().reshape(batch_size, -1, g.shape[-1])
        weight_grads[key] = weight_grads.get(key, 0) + torch.einsum("bto,bti->boi", g, a)
        bias_grads[key] = bias_grads.get(key, 0) + g.sum(1)
    rows = []
    for name in names:
        module, kind = owners[name]
        found = (weight_grads if kind == "weight" else bias_grads).get(id(module))
        shape = (batch_size, getattr(module, kind).numel())
        rows.append(torch.zeros(shape, device=losses.device) if found is None else found.reshape(shape))
    return torch.cat(rows, dim=1)


def _gradients_loop(model, batch, per_example_loss, names) -> torch.Tensor:
    named = dict(model.named_parameters())
    params = [named[name] for name in names]
    rows = []
    for i in range(_batch_size(batch)):
        loss = _check_losses(per_example_loss(model, _row(batch, i)), 1).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)])
        )
    return torch.stack(rows)


def per_example_loss_gradients(
    model: nn.Module,
    batch: Any,
    per_example_loss: PerExampleLoss,
    *,
    parameters: Sequence[str] | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """The gradient of each row's own loss, flattened and concatenated over the trainable parameters in
    `model.named_parameters()` order: a float32 `[batch, num_parameters]` tensor.

    Unlike `per_example_gradients` (logits and class targets), the loss here is any callable
    `per_example_loss(model, batch) -> [B]` that runs the model: for a causal LM, the mean next-token loss over each
    row's trained tokens. Each row's loss must depend on that row only (put the model in eval mode).

    With peft LoRA, the trainable parameters are the adapters' `nn.Linear` weights (`lora_A`, `lora_B`): `"linear"`
    then takes one batched forward and one backward to the layers' outputs, each row's weight gradient being
    `Σ_t g_t a_tᵀ` over its positions (the per-example outer-product identity, Goodfellow 2015). `"loop"` runs one
    backward per row (any parameters); `"auto"` takes `"linear"` when every chosen parameter is a weight or bias of a
    plain `nn.Linear`, the loop otherwise.

    Args:
        model (`nn.Module`): the model, in eval mode.
        batch: what `per_example_loss` takes, usually a dict of `[B, ...]` tensors.
        per_example_loss (`Callable`): `(model, batch) -> losses [B]`.
        parameters (`list[str]`, *optional*): names of the parameters (or modules) to differentiate; every trainable
            parameter (`requires_grad`) by default.
        method (`str`, *optional*, defaults to `"auto"`): `"auto"`, `"linear"` or `"loop"`.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.less import per_example_loss_gradients
    >>> model = torch.nn.Linear(4, 3).eval()
    >>> def loss(model, batch):
    ...     return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
    >>> batch = {"x": torch.randn(5, 4), "y": torch.tensor([0, 1, 2, 0, 1])}
    >>> grads = per_example_loss_gradients(model, batch, loss)
    >>> grads.shape, torch.allclose(grads, per_example_loss_gradients(model, batch, loss, method="loop"), atol=1e-6)
    (torch.Size([5, 15]), True)

    ```
    """
    if method not in ("auto", "linear", "loop"):
        raise ValueError(f"method={method!r} is not one of 'auto', 'linear', 'loop'.")
    names = select_parameters(model, parameters)
    owners = _linear_owners(model, names) if method != "loop" else None
    if method == "linear" and owners is None:
        raise ValueError(
            "method='linear' needs every chosen parameter to be the weight or bias of a plain nn.Linear; use "
            "method='loop' (or 'auto') for other parameters."
        )
    with torch.enable_grad():
        if owners is not None:
            try:
                return _gradients_linear(model, batch, per_example_loss, names, owners)
            except RuntimeError as error:
                if method == "linear":
                    raise
                logger.warning("Per-example gradients one row at a time: %s.", str(error).splitlines()[0][:200])
        return _gradients_loop(model, batch, per_example_loss, names)


def adam_update_direction(
    gradients: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor | float,
    *,
    betas: tuple[float, float] | torch.Tensor = (0.9, 0.999),
    eps: float | torch.Tensor = 1e-8,
) -> torch.Tensor:
    """The direction Adam would move the weights if each row's gradient were the next step's: LESS's `Γ` (Xia et al.
    2024, sec. 3.1),

        m = β₁ m_t + (1 − β₁) g,  v = β₂ v_t + (1 − β₂) g²,
        Γ(g) = (m / (1 − β₁^(t+1))) / (sqrt(v / (1 − β₂^(t+1))) + ε),

    with `m_t = exp_avg`, `v_t = exp_avg_sq` and `t = step` from the optimizer state of a checkpoint, as
    `torch.optim.AdamW` computes its update (without the learning rate and the decoupled weight decay).

    Args:
        gradients (`torch.Tensor`): `[rows, P]` per-example gradients.
        exp_avg, exp_avg_sq (`torch.Tensor`): `[P]` first and second moments of the checkpoint's optimizer.
        step (`torch.Tensor` or `float`): the number of steps taken, a scalar or `[P]` (per parameter).
        betas (`tuple` or `torch.Tensor`, *optional*): `(β₁, β₂)`, or a `[2, P]` tensor of per-parameter values.
        eps (`float` or `torch.Tensor`, *optional*): ε, a scalar or `[P]`.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.less import adam_update_direction
    >>> g = torch.tensor([[1.0, -2.0]])
    >>> direction = adam_update_direction(g, torch.zeros(2), torch.zeros(2), step=0)
    >>> torch.allclose(direction, g.sign())  # Adam's first step moves by the sign of the gradient
    True

    ```
    """
    beta1, beta2 = betas[0], betas[1]
    gradients = gradients.float()
    step = torch.as_tensor(step, dtype=torch.float32, device=gradients.device) + 1
    m = beta1 * exp_avg.float() + (1 - beta1) * gradients
    v = beta2 * exp_avg_sq.float() + (1 - beta2) * gradients.square()
    return (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
