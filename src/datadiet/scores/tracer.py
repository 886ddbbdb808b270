"""The tracer behind `per_example_grad_norms`: a `TorchFunctionMode` that watches every operation touching a trainable
parameter during one forward pass and assembles each example's squared gradient norm in the backward pass."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .layer_rules import LAYER_OPS, LayerCall, as_float, backward_rule

__all__ = ["PerExampleGradTracer", "Tracked"]

logger = logging.getLogger(__name__)

_NOT_HANDLED = object()


def _tensor_methods(*names: str) -> set:
    found = set()
    for name in names:
        for owner in (torch, torch.Tensor, torch._C.TensorBase):
            if hasattr(owner, name):
                found.add(getattr(owner, name))
    return found


# Elementwise broadcasting ops: a parameter broadcast along the batch can be given one copy per example.
_ELEMENTWISE = _tensor_methods(
    "add", "sub", "mul", "div", "true_divide", "add_", "sub_", "mul_", "div_",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__",
)  # fmt: skip
# Ops that repeat a parameter along a new leading batch dimension (a class token expanded to the batch).
_BATCH_EXPAND = _tensor_methods("expand", "expand_as", "broadcast_to", "repeat")


def _is_inplace(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or name.startswith("__i")


@dataclass(eq=False)
class Tracked:
    """A trainable parameter, or a tensor computed from parameters only (e.g. a reshaped layer-scale gamma)."""

    tensor: torch.Tensor
    is_param: bool
    name: str = ""
    uses: int = 0
    alias: torch.Tensor | None = None  # parameters: a detached alias requiring grad, root of derived tensors' graphs

    def differentiable(self) -> torch.Tensor:
        if not self.is_param:
            return self.tensor
        if self.alias is None:
            self.alias = self.tensor.detach().requires_grad_(True)
        return self.alias


@dataclass(eq=False)
class _FallbackCall:
    func: Callable
    spec: object
    leaves: list
    tracked: list[tuple[int, Tracked]]
    batched: list[int]
    versions: list[tuple[torch.Tensor, int]]
    grad: torch.Tensor | None = None


class PerExampleGradTracer(TorchFunctionMode):
    """Watches every op that touches a trainable parameter during one forward pass and collects, during the backward
    pass, each example's squared gradient norm (see `datadiet.scores.grad_norms`)."""

    def __init__(self, batch_size: int, params: dict[str, nn.Parameter], constants: set[int]):
        super().__init__()
        self.batch_size = batch_size
        self.tracked: dict[int, Tracked] = {id(p): Tracked(p, True, name) for name, p in params.items()}
        self.param_entries = list(self.tracked.values())
        self.constants = constants  # ids of the model's buffers and frozen parameters
        self.sq_norms: torch.Tensor | None = None
        self.per_example_grads: dict[int, tuple[Tracked, torch.Tensor]] = {}
        self.substitutes: list[tuple[torch.Tensor, Tracked, bool]] = []
        self.fallbacks: list[_FallbackCall] = []
        self.anchors: dict[tuple, torch.Tensor] = {}
        self.conv1d_stack: list[nn.Module] = []

    # ----------------------------------------------------------------------------------------------- forward pass
    def enter_conv1d(self, module: nn.Module, args) -> None:
        self.conv1d_stack.append(module)

    def exit_conv1d(self, module: nn.Module, args, output) -> None:
        self.conv1d_stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._touches_tracked(args, kwargs) or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func in LAYER_OPS:
            out = self._layer_op(func, args, kwargs)
            if out is not _NOT_HANDLED:
                return out
        if func is torch.addmm and self.conv1d_stack:
            out = self._conv1d_op(args, kwargs)
            if out is not _NOT_HANDLED:
                return out
        if func in _BATCH_EXPAND and args and self._entry(args[0]) is not None:
            out = self._batch_expand_op(func, args, kwargs)
            if out is not _NOT_HANDLED:
                return out
        flat, spec = tree_flatten((args, kwargs))
        tracked, batched = self._roles(func, flat)
        if not batched:
            return self._derived_op(func, flat, spec, tracked)
        if func in _ELEMENTWISE:
            out = self._elementwise_op(func, flat, spec, tracked, batched)
            if out is not _NOT_HANDLED:
                return out
        return self._fallback_op(func, flat, spec, tracked, batched)

    def _touches_tracked(self, args, kwargs) -> bool:
        tracked = self.tracked
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                if id(value) in tracked:
                    return True
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, torch.Tensor) and id(item) in tracked:
                        return True
        return False

    def _entry(self, value) -> Tracked | None:
        entry = self.tracked.get(id(value)) if isinstance(value, torch.Tensor) else None
        return entry if entry is not None and entry.tensor is value else None

    def _is_batched(self, value, func) -> bool:
        """Whether `value` is an activation with the batch as its first dimension. Activations that carry gradient
        but not the batch first would make the per-example split wrong, so they are refused."""
        if not isinstance(value, torch.Tensor) or id(value) in self.constants or self._entry(value) is not None:
            return False
        if value.ndim >= 1 and value.shape[0] == self.batch_size:
            return True
        if value.requires_grad:
            raise ValueError(
                f"per_example_grad_norms needs the batch as the first dimension of every activation that meets a "
                f"trainable parameter, but {getattr(func, '__name__', func)} received an activation of shape "
                f"{tuple(value.shape)} for a batch of {self.batch_size}. Time-major layouts (e.g. nn.Transformer or "
                "nn.MultiheadAttention with batch_first=False) and statistics pooled over the batch are not supported."
            )
        return False

    def _roles(self, func, flat: list) -> tuple[list[tuple[int, Tracked]], list[int]]:
        tracked, batched = [], []
        for i, value in enumerate(flat):
            entry = self._entry(value)
            if entry is not None:
                tracked.append((i, entry))
            elif self._is_batched(value, func):
                batched.append(i)
        return tracked, batched

    def _anchor(self, like: torch.Tensor) -> torch.Tensor:
        # Outputs of the first layers do not require grad (inputs never do, and parameters are switched off); adding
        # a zero scalar that does gives them a gradient without computing any parameter gradient.
        key = (like.dtype, like.device)
        if key not in self.anchors:
            self.anchors[key] = torch.zeros((), dtype=like.dtype, device=like.device, requires_grad=True)
        return self.anchors[key]

    def _watch(self, out: torch.Tensor, hook: Callable) -> torch.Tensor:
        if not out.requires_grad:
            out = out + self._anchor(out)

        # A tensor hook receives the gradient of the tensor as it was *before* any later in-place op (e.g. an
        # inplace ReLU right after a convolution), which is the gradient the layer's parameters see.
        def on_grad(grad):
            hook(grad)

        out.register_hook(on_grad)
        return out

    def _layer_op(self, func, args, kwargs):
        kind, bind = LAYER_OPS[func]
        bound = bind(args, kwargs)
        x = bound["input"]
        if self._entry(x) is not None or not self._is_batched(x, func):
            return _NOT_HANDLED
        if kind == "embedding" and x.is_floating_point():
            return _NOT_HANDLED
        weight, bias = self._entry(bound.get("weight")), self._entry(bound.get("bias"))
        if weight is None and bias is None:
            return _NOT_HANDLED  # a parameter sits in another slot (e.g. as running statistics): handle generically
        if kind == "batch_norm" and bound["training"]:
            raise ValueError(
                "per_example_grad_norms found a BatchNorm using batch statistics (track_running_stats=False, or "
                "called with training=True): each example's gradient then depends on the whole batch, so per-example "
                "gradient norms are not defined. Use a model whose BatchNorm layers track running statistics."
            )
        for entry in (weight, bias):
            if entry is not None:
                entry.uses += 1
        flat, spec = tree_flatten((args, kwargs))
        call_args, call_kwargs = tree_unflatten([v.detach() if self._entry(v) is not None else v for v in flat], spec)
        out = func(*call_args, **call_kwargs)
        options = {k: v for k, v in bound.items() if k not in ("input", "weight", "bias")}
        if kind == "conv":
            options["weight_shape"] = tuple(bound["weight"].shape)
        elif kind == "embedding":
            options["num_embeddings"] = bound["weight"].shape[0]
        record = LayerCall(kind, x.detach(), x._version, weight, bias, options)
        return self._watch(out, lambda grad: self._layer_backward(record, grad))

    def _conv1d_op(self, args, kwargs):
        # transformers' Conv1D computes addmm(bias, x.view(-1, in), weight) with weight [in, out] on rows that are
        # the batch-major flattening of [B, T, in]; seen only while such a module runs.
        module = self.conv1d_stack[-1]
        if len(args) != 3 or kwargs or args[2] is not module.weight:
            return _NOT_HANDLED
        bias, x, weight = args
        weight_entry, bias_entry = self._entry(weight), self._entry(bias)
        if weight_entry is None or self._entry(x) is not None or x.ndim != 2 or x.shape[0] % self.batch_size:
            return _NOT_HANDLED
        for entry in (weight_entry, bias_entry):
            if entry is not None:
                entry.uses += 1
        out = torch.addmm(bias.detach() if bias_entry else bias, x, weight.detach())
        record = LayerCall("linear", x.detach(), x._version, weight_entry, bias_entry, {"transposed": True})
        return self._watch(out, lambda grad: self._layer_backward(record, grad))

    def _derived_op(self, func, flat, spec, tracked):
        # An op on parameters (and constants) only, e.g. gamma.reshape(1, -1, 1, 1), a position-embedding lookup of
        # fixed ids, weight standardisation: run it with a graph back to the parameters so that per-example gradients
        # of its result can be mapped back exactly later.
        for i, entry in tracked:
            flat[i] = entry.differentiable()
        args, kwargs = tree_unflatten(flat, spec)
        with torch.enable_grad():
            out = func(*args, **kwargs)
        derived = [
            t
            for t in tree_flatten(out)[0]
            if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()
        ]
        for t in derived:
            if id(t) not in self.tracked:
                self.tracked[id(t)] = Tracked(t, False, f"{getattr(func, '__name__', func)}(...)")
        if derived:
            for _, entry in tracked:
                entry.uses += 1
        return out

    def _substitute(self, entry: Tracked, padded: tuple[int, ...]) -> torch.Tensor:
        """A leaf holding one copy of `entry` per example (padded to `padded`, whose first size is 1 or the batch), so
        that autograd returns per-example gradients for it directly."""
        entry.uses += 1
        base = entry.tensor.detach().reshape(padded)
        expand = padded[0] != self.batch_size or entry.tensor.ndim != len(padded)
        leaf = base.expand(self.batch_size, *padded[1:]) if expand else base
        leaf.requires_grad_(True)
        self.substitutes.append((leaf, entry, expand))
        return leaf

    def _batch_expand_op(self, func, args, kwargs):
        entry = self._entry(args[0])
        source = entry.tensor
        name = getattr(func, "__name__", "")
        sizes = args[1:] if len(args) > 1 else tuple(kwargs.get("size", kwargs.get("shape", ())))
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        if name == "expand_as":
            sizes = tuple(args[1].shape)
        if not sizes or not isinstance(sizes[0], int) or sizes[0] != self.batch_size or len(sizes) < source.ndim:
            return _NOT_HANDLED
        padded = (1,) * (len(sizes) - source.ndim) + tuple(source.shape)
        if padded[0] != 1:
            return _NOT_HANDLED
        leaf = self._substitute(entry, padded)
        if name == "repeat":
            return leaf.repeat(1, *sizes[1:])
        return leaf.expand(*sizes)

    def _elementwise_op(self, func, flat, spec, tracked, batched):
        shapes = [tuple(v.shape) for v in flat if isinstance(v, torch.Tensor)]
        try:
            out_shape = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            return _NOT_HANDLED
        n = len(out_shape)
        if n == 0 or out_shape[0] != self.batch_size or any(flat[i].ndim != n for i in batched):
            return _NOT_HANDLED
        if _is_inplace(func) and tracked[0][0] == 0:
            return _NOT_HANDLED
        for _, entry in tracked:
            padded = (1,) * (n - entry.tensor.ndim) + tuple(entry.tensor.shape)
            if padded[0] not in (1, self.batch_size):
                return _NOT_HANDLED
        for i, entry in tracked:
            flat[i] = self._substitute(entry, (1,) * (n - entry.tensor.ndim) + tuple(entry.tensor.shape))
        args, kwargs = tree_unflatten(flat, spec)
        return func(*args, **kwargs)

    def _fallback_op(self, func, flat, spec, tracked, batched):
        # Any other op mixing parameters with activations: keep what is needed to redo it per example with
        # torch.func (vmap over the batch of a vector-Jacobian product with respect to the parameters).
        inplace = _is_inplace(func)
        if inplace and tracked[0][0] == 0:
            raise ValueError(
                f"per_example_grad_norms does not support {getattr(func, '__name__', func)} modifying a trainable "
                "parameter in place during the forward pass."
            )
        saved = list(flat)
        for i in batched:
            saved[i] = flat[i].detach().clone() if inplace else flat[i].detach()
        for i, entry in tracked:
            saved[i] = entry.tensor.detach()
            entry.uses += 1
        call = list(flat)
        for i, entry in tracked:
            call[i] = entry.tensor.detach()
        args, kwargs = tree_unflatten(call, spec)
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != self.batch_size:
            raise ValueError(
                f"per_example_grad_norms cannot split {name} by example: it mixes a trainable parameter with "
                "activations and does not return one tensor with the batch as its first dimension."
            )
        logger.debug("per-example gradients of %s computed with the torch.func fallback", name)
        record = _FallbackCall(
            func=func,
            spec=spec,
            leaves=saved,
            tracked=tracked,
            batched=batched,
            versions=[] if inplace else [(flat[i], flat[i]._version) for i in batched],
        )

        self.fallbacks.append(record)

        def keep(grad):
            record.grad = grad

        return self._watch(out, keep)

    # ---------------------------------------------------------------------------------------------- backward pass
    def add_sq(self, sq: torch.Tensor) -> None:
        """Add per-example squared norms `[B]` to the running total."""
        sq = sq.to(torch.float32 if sq.device.type == "mps" else torch.float64)  # MPS has no float64
        self.sq_norms = sq if self.sq_norms is None else self.sq_norms + sq.to(self.sq_norms.device)

    def accumulate(self, entry: Tracked, grads: torch.Tensor) -> None:
        """Add per-example gradients of `entry` (`[B, *shape]`), to be squared once all its uses are summed."""
        grads = grads.reshape(self.batch_size, *entry.tensor.shape)
        key = id(entry.tensor)
        if key in self.per_example_grads:
            grads = self.per_example_grads[key][1] + grads
        self.per_example_grads[key] = (entry, grads)

    def exclusive(self, entry: Tracked | None) -> bool:
        """Whether `entry` is a parameter used by exactly one op."""
        # A parameter used by exactly one op: its squared norm can be added directly (ghost form allowed); otherwise
        # its per-example gradients are summed over all uses first.
        return entry is not None and entry.is_param and entry.uses == 1

    def emit(self, entry: Tracked | None, grads: Callable[[], torch.Tensor]) -> None:
        """Add the per-example gradients `grads()` of `entry`: as squared norms when it is exclusive, else summed."""
        if entry is None:
            return
        value = grads()
        if self.exclusive(entry):
            self.add_sq(value.flatten(1).square().sum(1))
        else:
            self.accumulate(entry, value)

    def _layer_backward(self, record: LayerCall, grad: torch.Tensor) -> None:
        a = record.input
        if a is None:
            return
        if a._version != record.version:
            raise RuntimeError(
                f"The input of a {record.kind} layer was modified in place after the layer used it, so its per-example "
                "gradient cannot be computed from it. Avoid in-place ops on a tensor after it has gone into a layer."
            )
        record.input = None
        with torch.no_grad():
            backward_rule(record.kind)(self, record, a, grad)

    def _fallback_grads(self, record: _FallbackCall) -> list[torch.Tensor]:
        for tensor, version in record.versions:
            if tensor._version != version:
                raise RuntimeError(
                    f"An input of {getattr(record.func, '__name__', record.func)} was modified in place after use, so "
                    "its per-example gradient cannot be recomputed."
                )
        tracked_values = tuple(entry.tensor.detach() for _, entry in record.tracked)
        batched_values = tuple(record.leaves[i] for i in record.batched)
        clone = _is_inplace(record.func)

        def one_example(values, example, grad):
            def run(*params):
                leaves = list(record.leaves)
                for (i, _), value in zip(record.tracked, params):
                    leaves[i] = value
                for i, value in zip(record.batched, example):
                    value = value.unsqueeze(0)
                    leaves[i] = value.clone() if clone else value
                args, kwargs = tree_unflatten(leaves, record.spec)
                return record.func(*args, **kwargs)

            _, vjp = torch.func.vjp(run, *values)
            return vjp(grad.unsqueeze(0))

        per_example = torch.func.vmap(one_example, in_dims=(None, 0, 0))(tracked_values, batched_values, record.grad)
        return list(per_example)

    def finish(self, total_loss: torch.Tensor) -> torch.Tensor:
        """Run the backward pass and return each example's squared gradient norm, shape `[B]` (float64)."""
        B = self.batch_size
        leaves = [leaf for leaf, _, _ in self.substitutes] + list(self.anchors.values())
        if total_loss.requires_grad and leaves:
            grads = torch.autograd.grad(total_loss, leaves, allow_unused=True)
        else:
            grads = [None] * len(leaves)
        with torch.no_grad():
            for (_, entry, expand), grad in zip(self.substitutes, grads):
                if grad is None:
                    continue
                if expand:
                    self.accumulate(entry, grad)
                else:
                    # The tracked tensor already had the batch size first: row i only meets example i.
                    rows = grad.new_zeros(B, *grad.shape)
                    index = torch.arange(B, device=grad.device)
                    rows[index, index] = grad
                    self.accumulate(entry, rows)
            for record in (record for record in self.fallbacks if record.grad is not None):
                for (_, entry), value in zip(record.tracked, self._fallback_grads(record)):
                    self.accumulate(entry, value)
        derived = [(entry, value) for entry, value in self.per_example_grads.values() if not entry.is_param]
        roots = [entry for entry in self.param_entries if entry.alias is not None]
        if derived and roots:
            # Per-example gradients of tensors computed from parameters, mapped back through that computation for
            # each example at once (is_grads_batched vmaps the backward over the leading dimension).
            mapped = torch.autograd.grad(
                [entry.tensor for entry, _ in derived],
                [entry.alias for entry in roots],
                grad_outputs=[value.to(entry.tensor.dtype) for entry, value in derived],
                is_grads_batched=True,
                allow_unused=True,
            )
            for entry, value in zip(roots, mapped):
                if value is not None:
                    self.accumulate(entry, value)
        with torch.no_grad():
            for entry, value in self.per_example_grads.values():
                if entry.is_param:
                    self.add_sq(as_float(value).flatten(1).square().sum(1))
        unseen = [entry.name for entry in self.param_entries if entry.uses == 0]
        if unseen:
            logger.debug("trainable parameters never used in the forward pass (zero gradient): %s", unseen)
        if self.sq_norms is None:
            return torch.zeros(B, dtype=torch.float64, device=total_loss.device)
        return self.sq_norms
