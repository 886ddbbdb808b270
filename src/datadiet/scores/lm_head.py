"""A causal LM's logits at the positions a score reads only: its output head (`get_output_embeddings()`, the
`[V, H]` projection that is a large share of a small model's compute) applied to the hidden states of the trained
positions instead of all of them, then the softmax over those only. Pure PyTorch.

How: a forward pre-hook on the output head replaces its input, the final hidden states `[B, T, H]`, by the states of
the positions `t` whose next token is trained on (`labels[:, t + 1] != -100`). Whatever the model does to the head's
output afterwards (a final logit softcapping, a cast to float32) still runs, on those rows. When the head cannot be
hooked (no `get_output_embeddings()`, a head computed without calling that module, a head called on another shape),
the full logits `[B, T, V]` are computed as before and the same positions gathered from them; when the model fails
or returns another shape after the hook replaced its head's input, it runs again without the hook. Either way, the
values are those of the full logits at the same positions.
"""

from __future__ import annotations

import torch
from torch import nn

from .logits import forward_logits

__all__ = ["HeadNotSeparable", "logits_at_trained_positions", "output_head", "trained_slots"]


class HeadNotSeparable(RuntimeError):
    """The hooked head gave an output of another shape than expected (raised when no second forward is allowed)."""


def trained_slots(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's trained positions, in order, padded to the largest count K: `(index, valid)`, both `[B, K]`;
    `index[b, k]` is row b's k-th position with `mask[b, t]` True, or 0 where `valid` is False.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.lm_head import trained_slots
    >>> index, valid = trained_slots(torch.tensor([[False, True, True], [True, False, False]]))
    >>> index.tolist(), valid.tolist()
    ([[1, 2], [0, 0]], [[True, True], [True, False]])

    ```
    """
    counts = mask.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    # A stable sort puts each row's trained positions first, in order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device) < counts[:, None]
    return order.masked_fill(~valid, 0), valid


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head, `model.get_output_embeddings()`, when it is a module; else `None`."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    return head if isinstance(head, nn.Module) else None


def _gather(full: torch.Tensor, mask: torch.Tensor, packed: bool) -> torch.Tensor:
    """The logits `[B, T, V]` at the positions of `mask` `[B, T-1]`: `[N, V]` packed, else `[B, K, V]`."""
    B, T1 = mask.shape
    if full.ndim != 3 or tuple(full.shape[:2]) != (B, T1 + 1):
        raise ValueError(
            f"A causal LM's logits must be [B, T, V] for inputs of [B, T] = [{B}, {T1 + 1}]; got logits "
            f"{tuple(full.shape)}."
        )
    shifted = full[:, :-1]
    if packed:
        return shifted[mask.to(full.device)]
    index, _ = trained_slots(mask.to(full.device))
    return shifted.gather(1, index[..., None].expand(-1, -1, full.shape[-1]))


def logits_at_trained_positions(
    model: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor, *, packed: bool, rerun: bool = True
) -> torch.Tensor:
    """The logits of `model` on `inputs` at the positions `t` where `mask` `[B, T-1]` is True (the positions whose
    next token is trained on, `labels[:, 1:] != -100`), with the output head applied only there.

    Args:
        model (`nn.Module`): a causal LM called as `model(**inputs)`, returning `[B, T, V]` logits.
        inputs (`dict`): its inputs, `[B, T]` tensors (without `labels`).
        mask (`torch.Tensor`): `[B, T-1]` bool, the positions to compute.
        packed (`bool`): return `[N, V]`, the N positions in row-major order (`mask.nonzero()`), or `[B, K, V]`,
            row b's positions first, in order, then padding (see `trained_slots`), which keeps the batch first for
            per-example gradients.
        rerun (`bool`, *optional*, defaults to `True`): when the hooked forward fails or gives another shape, run the
            model again without the hook; with `False`, raise `HeadNotSeparable` instead (a caller recording the
            forward, e.g. a per-example gradient tracer, then starts again with `model(**inputs)` itself).

    Example:
    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from datadiet.scores.lm_head import logits_at_trained_positions
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> ids = torch.randint(0, 32, (2, 6))
    >>> mask = torch.tensor([[False, False, True, True, True], [False, True, True, True, True]])
    >>> picked = logits_at_trained_positions(model, {"input_ids": ids}, mask, packed=True)
    >>> torch.allclose(picked, model(input_ids=ids).logits[:, :-1][mask], atol=1e-6)
    True

    ```
    """
    B, T1 = mask.shape
    head = output_head(model)
    if packed:
        rows, cols = mask.nonzero(as_tuple=True)
        expected = (1, len(rows))
    else:
        index, _ = trained_slots(mask)
        expected = (B, index.shape[1])
    replaced = []

    def pick(module, args):
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if hidden is None or hidden.ndim != 3 or tuple(hidden.shape[:2]) != (B, T1 + 1):
            return None  # not the final hidden states of this batch: the head runs on them unchanged
        replaced.append(True)
        if packed:
            picked = hidden[rows.to(hidden.device), cols.to(hidden.device)].unsqueeze(0)
        else:
            picked = hidden.gather(1, index.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))
        return (picked, *args[1:])

    handle = head.register_forward_pre_hook(pick) if head is not None else None
    failure: Exception | None = None
    try:
        logits = forward_logits(model, inputs)
    except Exception as error:  # after the hook changed the head's input: the model may need the full shape
        if not replaced:
            raise
        logits, failure = None, error
    finally:
        if handle is not None:
            handle.remove()
    if not replaced:
        return _gather(logits, mask, packed)
    if len(replaced) == 1 and logits is not None and logits.ndim == 3 and tuple(logits.shape[:2]) == expected:
        return logits.squeeze(0) if packed else logits  # a view: its backward copies nothing
    if not rerun:
        raise HeadNotSeparable(
            f"The output head of {type(model).__name__} cannot be applied to the trained positions alone."
        ) from failure
    return _gather(forward_logits(model, inputs), mask, packed)
