"""Exact per-example gradient norms over all trainable parameters (GraNd, Paul et al. 2021, eq. 3) at about the cost
of one training step, for timm, transformers and plain PyTorch classifiers. Pure PyTorch.

How it works. One forward pass runs under a `TorchFunctionMode` that sees every operation touching a trainable
parameter, and one backward pass computes only the gradients with respect to activations (the parameters are
switched to `requires_grad=False` for the pass, so the weight-gradient GEMMs of a training step are never run).
Each example's squared gradient norm is then assembled per operation from the layer input `a` and the output
gradient `g` of that example:

- linear / convolution weights: either the "ghost" form ‖gᵀa‖² = ⟨aaᵀ, ggᵀ⟩ (Goodfellow 2015; Li et al. 2022,
  "ghost clipping"; for a convolution, a = its patches, whose Gram matrix can also be summed from shifted blocks of
  the padded input's own Gram matrix without gathering them), or the materialised per-example weight gradient,
  whichever is cheaper for the layer's shapes (`layer_rules.conv_rule_choice`, `layer_rules.linear_rule_choice`);
- embeddings: the rows of the example's own tokens, repeated tokens summed and `padding_idx` left out;
- LayerNorm / RMSNorm / GroupNorm / InstanceNorm / BatchNorm in eval mode: Σ g·x̂ and Σ g per example;
- any other use of a parameter (class tokens, position embeddings, layer-scale gammas, weights computed from
  parameters such as weight standardisation, unknown ops): exactly, either by giving the parameter its own copy per
  example where it is broadcast along the batch, or by a `torch.func` per-example vector-Jacobian product of that
  single operation. Gradients of tensors computed from parameters are mapped back to the parameters exactly.

A parameter used in several places (tied weights, a module called twice) gets its per-example gradients summed over
the uses before the norm is taken, so it is counted once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .causal_lm import IGNORE_INDEX, per_example_mean, trained_token_nll
from .lm_head import HeadNotSeparable, logits_at_trained_positions, output_head, trained_slots
from .logits import slice_batch, unwrap_logits
from .registry import get_score, get_score_spec, register_score
from .tracer import PerExampleGradTracer

__all__ = ["per_example_grad_norms", "grand", "causal_lm_grand"]


def _per_example_losses(
    logits: torch.Tensor, targets: torch.Tensor, loss_fn: Callable | None, task: str | None
) -> torch.Tensor:
    """Each example's own loss, shape `[B]`, whatever the reduction of `loss_fn`; without `loss_fn`, the `loss` score
    registered for `task` (a classifier's cross-entropy, a causal LM's mean next-token NLL over the trained tokens)."""
    B = targets.shape[0]
    if loss_fn is None:
        if task is None and not (logits.ndim == 2 and targets.ndim == 1):
            raise ValueError(
                f"Token-level logits {tuple(logits.shape)} with targets {tuple(targets.shape)}: say how targets align "
                "with the logits. For a causal language model pass task='causal_lm' (targets are the input ids with "
                "untrained positions set to -100, shifted by one here), or pass loss_fn= returning one loss per example."
            )
        return get_score("loss", task)(logits, targets)
    losses = loss_fn(logits, targets)
    if not isinstance(losses, torch.Tensor):
        raise ValueError(f"loss_fn must return a tensor, got {type(losses).__name__}.")
    if losses.shape == (B,):
        return losses
    if losses.ndim == 0:
        # A reduced loss: call it on each example alone, so that a mean reduction does not divide by the batch size.
        return torch.stack([loss_fn(logits[i : i + 1], targets[i : i + 1]).reshape(()) for i in range(B)])
    raise ValueError(
        f"loss_fn returned a tensor of shape {tuple(losses.shape)}; it must return one loss per example (shape "
        f"[{B}]) or a scalar."
    )


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2-style Conv1D, recognised without importing transformers: a linear layer with its weight
    # stored as [in, out].
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2


def per_example_grad_norms(
    model: nn.Module,
    inputs: torch.Tensor | dict[str, torch.Tensor],
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    chunk_size: int | None = None,
    task: str | None = None,
) -> torch.Tensor:
    """The exact L2 norm of each example's loss gradient over all trainable parameters, ‖∇_θ ℓ(f(x_i), y_i)‖₂ — the
    GraNd score of Paul et al. (2021, eq. 3) — at about the cost of one forward and one backward pass of the batch.

    The model runs in eval mode (BatchNorm uses its running statistics, as in the paper's code); its train/eval modes
    and `requires_grad` flags are restored afterwards and no `.grad` is left behind. Frozen parameters
    (`requires_grad=False`) are excluded, tied parameters are counted once.

    Args:
        model: a classifier: timm, transformers or any `nn.Module`. A tensor input is passed positionally
            (`model(inputs)`), a dict as keywords (`model(**inputs)`, any `labels` key dropped); the logits are the
            output itself, its `.logits`, or its first item. The batch must be the first dimension of activations.
        inputs: the batch, a tensor `[B, ...]` or a dict of tensors (e.g. `input_ids`, `attention_mask`).
        targets: the labels, `[B]`; for `task="causal_lm"`, `[B, T]` token ids with untrained positions `-100`.
        loss_fn: `loss_fn(logits, targets)`, returning per-example losses `[B]` or a scalar; a scalar loss is
            evaluated on each example alone, so each norm is that of the example's own loss whatever the reduction.
            Defaults to cross-entropy.
        chunk_size: if set, the batch is processed in pieces of at most this many examples, to bound memory.
        task: the task whose registered `loss` score (`get_score("loss", task)`) is each example's loss; `None` for
            classifiers (cross-entropy). `"causal_lm"` for a causal language model: each row's loss is the mean over
            its trained tokens of the next-token NLL (logits at t against targets at t + 1), the loss `SFTTrainer`
            trains the row on alone; its output head then runs at the trained positions only. Token-level logits
            without a task (and without `loss_fn`) are refused: how targets align is not guessed.

    Returns:
        `torch.Tensor` of shape `[B]` (float32): each example's gradient norm.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores import per_example_grad_norms
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> norms = per_example_grad_norms(model, x, y)
    >>> loss = torch.nn.functional.cross_entropy(model(x[:1]), y[:1])
    >>> reference = torch.cat([p.flatten() for p in torch.autograd.grad(loss, list(model.parameters()))]).norm()
    >>> torch.allclose(norms[0], reference, rtol=1e-4)
    True

    ```
    """
    if not isinstance(targets, torch.Tensor) or targets.ndim == 0:
        raise ValueError(
            "targets must be a tensor with the batch as its first dimension, e.g. class ids of shape [B]."
        )
    batch_size = targets.shape[0]
    if isinstance(inputs, dict):
        inputs = {key: value for key, value in inputs.items() if key != "labels"}
        batched = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch_size]
        if not batched:
            raise ValueError(
                f"None of the inputs {sorted(inputs)} has the batch size {batch_size} as first dimension."
            )
    elif isinstance(inputs, torch.Tensor):
        if inputs.ndim == 0 or inputs.shape[0] != batch_size:
            raise ValueError(
                f"inputs has shape {tuple(inputs.shape)} but targets has {batch_size} rows; the batch must be the "
                "first dimension of both."
            )
    else:
        raise ValueError(f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}.")
    if torch.is_inference_mode_enabled():
        raise ValueError("per_example_grad_norms needs autograd: call it outside torch.inference_mode().")
    if task is not None:
        try:
            get_score_spec("loss", task)  # the task's registered per-example loss
        except ValueError as error:
            raise ValueError(
                f"task={task!r} has no registered per-example loss ({error}) Leave task=None for classifiers, or pass "
                "task='causal_lm' for a causal language model."
            ) from None
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of examples, got {chunk_size}.")
    if chunk_size is not None and chunk_size < batch_size:
        return torch.cat(
            [
                per_example_grad_norms(
                    model,
                    slice_batch(inputs, start, min(start + chunk_size, batch_size), batch_size),
                    targets[start : start + chunk_size],
                    loss_fn,
                    task=task,
                )
                for start in range(0, batch_size, chunk_size)
            ]
        )

    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            params[name] = param
    if not params:
        raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
    constants = {id(t) for t in model.parameters() if id(t) not in seen} | {id(t) for t in model.buffers()}

    # A causal LM's loss reads the logits at the trained positions only: its output head runs there alone (exact, see
    # `lm_head`); when it cannot be, the full logits are computed and the loss takes the same positions from them.
    # Packed positions `[1, N]` when the head has no trainable parameter (a LoRA model's), else `[B, K]`, batch first.
    head_positions = None
    if task == "causal_lm" and loss_fn is None and isinstance(inputs, dict) and targets.ndim == 2:
        head = output_head(model)
        head_positions = "padded" if head is not None and any(id(p) in seen for p in head.parameters()) else "packed"
    try:
        sq_norms = _traced_sq_norms(model, inputs, targets, loss_fn, task, params, constants, head_positions)
    except HeadNotSeparable:
        sq_norms = _traced_sq_norms(model, inputs, targets, loss_fn, task, params, constants, None)
    return sq_norms.clamp(min=0).sqrt().to(torch.float32)


def _trained_position_losses(logits, targets, mask, packed: bool) -> torch.Tensor:
    """Each row's mean next-token NLL from the logits at its trained positions (`[N, V]` packed or `[B, K, V]`)."""
    if packed:
        nll = trained_token_nll(logits, targets[:, 1:][mask])
        per_token = nll.new_zeros(mask.shape).masked_scatter(mask, nll)
        return per_example_mean(per_token, mask)
    index, valid = trained_slots(mask)
    slot_targets = targets[:, 1:].gather(1, index).masked_fill(~valid, IGNORE_INDEX)
    nll = trained_token_nll(logits.flatten(0, 1), slot_targets.flatten())
    return per_example_mean(nll.view(slot_targets.shape), valid)


def _traced_sq_norms(model, inputs, targets, loss_fn, task, params, constants, head_positions) -> torch.Tensor:
    """One traced forward and backward: each example's squared gradient norm (float64), model modes, `requires_grad`
    flags and hooks restored afterwards."""
    batch_size = targets.shape[0]
    modes = {module: module.training for module in model.modules()}
    flags = [(param, param.requires_grad) for param in params.values()]
    handles = []
    tracer = PerExampleGradTracer(batch_size, params, constants)
    try:
        model.eval()
        for param in params.values():
            param.requires_grad_(False)
        for module in model.modules():
            if _is_conv1d(module):
                handles.append(module.register_forward_pre_hook(tracer.enter_conv1d))
                handles.append(module.register_forward_hook(tracer.exit_conv1d))
        with torch.enable_grad():
            if head_positions:
                mask = targets[:, 1:] != IGNORE_INDEX
                packed = head_positions == "packed"
                with tracer:
                    logits = logits_at_trained_positions(model, inputs, mask, packed=packed, rerun=False)
                losses = _trained_position_losses(logits, targets.to(logits.device), mask.to(logits.device), packed)
            else:
                with tracer:
                    output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
                logits = unwrap_logits(output)
                if logits.shape[0] != batch_size:
                    raise ValueError(
                        f"The model returned logits of shape {tuple(logits.shape)} for {batch_size} examples."
                    )
                losses = _per_example_losses(logits, targets.to(logits.device), loss_fn, task)
            return tracer.finish(losses.sum())
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes.items():
            module.training = training


@register_score("grand", needs="gradients")
def grand(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """GraNd (Paul et al. 2021, eq. 3): the norm of each example's loss gradient over all trainable parameters, model
    in eval mode, cross-entropy loss. Averaged over independently initialised models by the scoring engine; at
    initialisation Kirsch (2023) found it tracks `input_norm`. Shape `[B]`.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores import get_score
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    >>> get_score("grand")(model, torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])).shape
    torch.Size([4])

    ```
    """
    return per_example_grad_norms(model, inputs, labels)


@register_score("grand", needs="gradients", task="causal_lm")
def causal_lm_grand(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """GraNd for a causal LM: the exact norm of the gradient of each row's next-token loss (mean over its trained
    tokens, see `causal_lm_loss`) over the trainable parameters, read from `requires_grad` (with a peft LoRA model,
    the adapters only), model in eval mode (dropout off). Shape `[B]`.

    Example:
    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from datadiet.scores import get_score
    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(config)
    >>> ids = torch.randint(0, 32, (2, 6))
    >>> get_score("grand", task="causal_lm")(model, {"input_ids": ids}, ids).shape
    torch.Size([2])

    ```
    """
    return per_example_grad_norms(model, inputs, labels, task="causal_lm")
