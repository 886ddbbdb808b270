"""Exact per-example gradient norms over all trainable parameters (GraNd, Paul et al. 2021, eq. 3) at about the cost
of one training step, for timm, transformers and plain PyTorch classifiers. Pure PyTorch.

How it works. One forward pass runs under a `TorchFunctionMode` that sees every operation touching a trainable
parameter, and one backward pass computes only the gradients with respect to activations (the parameters are
switched to `requires_grad=False` for the pass, so the weight-gradient GEMMs of a training step are never run).
Each example's squared gradient norm is then assembled per operation from the layer input `a` and the output
gradient `g` of that example:

- linear / convolution weights: either the "ghost" form ‖gᵀa‖² = ⟨aaᵀ, ggᵀ⟩ (Goodfellow 2015; Li et al. 2022,
  "ghost clipping"), or the materialised per-example weight gradient, whichever is cheaper for the layer;
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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..models import unwrap_logits
from .registry import register_score

__all__ = ["per_example_grad_norms", "grand"]

logger = logging.getLogger(__name__)

# Temporary memory one layer's norm computation may take at once; larger work is split into groups of examples.
_WORKSPACE_BYTES = 256 * 2**20

_NOT_HANDLED = object()


def _positional(names: tuple[str, ...], defaults: dict) -> Callable:
    """A binder mapping `(args, kwargs)` of a torch function to a dict of its arguments by name."""

    def bind(args: tuple, kwargs: dict) -> dict:
        bound = dict(defaults)
        bound.update(zip(names, args))
        bound.update(kwargs)
        return bound

    return bind


# The layer operations whose per-example gradients are computed in closed form, with their argument names.
_LAYER_OPS: dict[Callable, tuple[str, Callable]] = {
    F.linear: ("linear", _positional(("input", "weight", "bias"), {"bias": None})),
    torch.conv1d: (
        "conv",
        _positional(
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        ),
    ),
    torch.conv2d: (
        "conv",
        _positional(
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        ),
    ),
    F.embedding: (
        "embedding",
        _positional(
            ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
            {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False},
        ),
    ),
    F.layer_norm: (
        "layer_norm",
        _positional(
            ("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}
        ),
    ),
    F.group_norm: (
        "group_norm",
        _positional(("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}),
    ),
    F.batch_norm: (
        "batch_norm",
        _positional(
            ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        ),
    ),
    F.instance_norm: (
        "instance_norm",
        _positional(
            ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
            {
                "running_mean": None,
                "running_var": None,
                "weight": None,
                "bias": None,
                "use_input_stats": True,
                "momentum": 0.1,
                "eps": 1e-5,
            },
        ),
    ),
}
if hasattr(F, "rms_norm"):
    _LAYER_OPS[F.rms_norm] = ("rms_norm", _positional(("input", "normalized_shape", "weight", "eps"), {"eps": None}))


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


def _float(t: torch.Tensor) -> torch.Tensor:
    # Norms are accumulated in float32 at least, whatever precision the model runs in.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _example_chunks(batch_size: int, bytes_per_example: float):
    """Slices of the batch small enough for the per-example workspace to fit in `_WORKSPACE_BYTES`."""
    step = max(1, int(_WORKSPACE_BYTES // max(bytes_per_example, 1)))
    for start in range(0, batch_size, step):
        yield slice(start, min(start + step, batch_size))


@dataclass(eq=False)
class _Tracked:
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
class _LayerCall:
    kind: str
    input: torch.Tensor | None
    version: int
    weight: _Tracked | None
    bias: _Tracked | None
    options: dict = field(default_factory=dict)


@dataclass(eq=False)
class _FallbackCall:
    func: Callable
    spec: object
    leaves: list
    tracked: list[tuple[int, _Tracked]]
    batched: list[int]
    versions: list[tuple[torch.Tensor, int]]
    grad: torch.Tensor | None = None


class _PerExampleGradTracer(TorchFunctionMode):
    """Watches every op that touches a trainable parameter during one forward pass and collects, during the backward
    pass, each example's squared gradient norm (see the module docstring)."""

    def __init__(self, batch_size: int, params: dict[str, nn.Parameter], constants: set[int]):
        super().__init__()
        self.batch_size = batch_size
        self.tracked: dict[int, _Tracked] = {id(p): _Tracked(p, True, name) for name, p in params.items()}
        self.param_entries = list(self.tracked.values())
        self.constants = constants  # ids of the model's buffers and frozen parameters
        self.sq_norms: torch.Tensor | None = None
        self.per_example_grads: dict[int, tuple[_Tracked, torch.Tensor]] = {}
        self.substitutes: list[tuple[torch.Tensor, _Tracked, bool]] = []
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
        if func in _LAYER_OPS:
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

    def _entry(self, value) -> _Tracked | None:
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

    def _roles(self, func, flat: list) -> tuple[list[tuple[int, _Tracked]], list[int]]:
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
        kind, bind = _LAYER_OPS[func]
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
        record = _LayerCall(kind, x.detach(), x._version, weight, bias, options)
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
        record = _LayerCall("linear", x.detach(), x._version, weight_entry, bias_entry, {"transposed": True})
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
                self.tracked[id(t)] = _Tracked(t, False, f"{getattr(func, '__name__', func)}(...)")
        if derived:
            for _, entry in tracked:
                entry.uses += 1
        return out

    def _substitute(self, entry: _Tracked, padded: tuple[int, ...]) -> torch.Tensor:
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
    def _add_sq(self, sq: torch.Tensor) -> None:
        sq = sq.to(torch.float32 if sq.device.type == "mps" else torch.float64)  # MPS has no float64
        self.sq_norms = sq if self.sq_norms is None else self.sq_norms + sq.to(self.sq_norms.device)

    def _accumulate(self, entry: _Tracked, grads: torch.Tensor) -> None:
        grads = grads.reshape(self.batch_size, *entry.tensor.shape)
        key = id(entry.tensor)
        if key in self.per_example_grads:
            grads = self.per_example_grads[key][1] + grads
        self.per_example_grads[key] = (entry, grads)

    def _exclusive(self, entry: _Tracked | None) -> bool:
        # A parameter used by exactly one op: its squared norm can be added directly (ghost form allowed); otherwise
        # its per-example gradients are summed over all uses first.
        return entry is not None and entry.is_param and entry.uses == 1

    def _emit(self, entry: _Tracked | None, grads: Callable[[], torch.Tensor]) -> None:
        if entry is None:
            return
        value = grads()
        if self._exclusive(entry):
            self._add_sq(value.flatten(1).square().sum(1))
        else:
            self._accumulate(entry, value)

    def _layer_backward(self, record: _LayerCall, grad: torch.Tensor) -> None:
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
            backward = getattr(self, f"_backward_{record.kind}", None) or self._backward_norm
            backward(record, a, grad)

    def _backward_linear(self, record: _LayerCall, a: torch.Tensor, g: torch.Tensor) -> None:
        B = self.batch_size
        a = _float(a).reshape(B, -1, a.shape[-1])
        g = _float(g).reshape(B, -1, g.shape[-1])
        self._emit(record.bias, lambda: g.sum(1))
        if record.weight is None:
            return
        if self._exclusive(record.weight):
            self._add_sq(_matmul_sq_norms(a, g))
            return
        gw = torch.bmm(a.transpose(1, 2), g) if record.options.get("transposed") else torch.bmm(g.transpose(1, 2), a)
        self._accumulate(record.weight, gw)

    def _backward_conv(self, record: _LayerCall, a: torch.Tensor, g: torch.Tensor) -> None:
        opts = record.options
        weight_shape = opts["weight_shape"]
        a, g = _float(a), _float(g)
        if a.ndim == 3:  # conv1d as a conv2d of height 1
            a, g = a.unsqueeze(2), g.unsqueeze(2)
            weight_shape = (*weight_shape[:2], 1, weight_shape[2])
            stride, dilation = (1, _single(opts["stride"])), (1, _single(opts["dilation"]))
            padding = opts["padding"] if isinstance(opts["padding"], str) else (0, _single(opts["padding"]))
        else:
            stride, dilation, padding = _pair(opts["stride"]), _pair(opts["dilation"]), opts["padding"]
            padding = padding if isinstance(padding, str) else _pair(padding)
        a = _pad_for_conv(a, weight_shape[2:], dilation, padding)
        self._emit(record.bias, lambda: g.sum((2, 3)))
        if record.weight is None:
            return
        groups = opts["groups"]
        if self._exclusive(record.weight):
            self._add_sq(_conv_weight_sq_norms(a, g, weight_shape, stride, dilation, groups))
        else:
            self._accumulate(record.weight, _conv_weight_grads(a, g, weight_shape, stride, dilation, groups))

    def _backward_embedding(self, record: _LayerCall, ids: torch.Tensor, g: torch.Tensor) -> None:
        opts = record.options
        B, V = self.batch_size, opts["num_embeddings"]
        ids = ids.reshape(B, -1).long()
        g = _float(g).reshape(B, ids.shape[1], -1)
        example = torch.arange(B, device=ids.device).unsqueeze(1).expand_as(ids)
        keep = torch.ones_like(ids, dtype=torch.bool)
        if opts["padding_idx"] is not None:
            padding_idx = opts["padding_idx"] if opts["padding_idx"] >= 0 else opts["padding_idx"] + V
            keep = ids != padding_idx  # the padding row never receives gradient (nn.Embedding docs)
        keys = (example * V + ids)[keep]
        rows = g[keep]
        unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        summed = rows.new_zeros(unique.shape[0], rows.shape[1]).index_add_(0, inverse, rows)
        if opts["scale_grad_by_freq"]:
            # torch scales by the inverse frequency of each id in the batch; an example's own loss sees its own ids.
            summed = summed / counts.unsqueeze(1).to(summed.dtype)
        if self._exclusive(record.weight):
            sq = summed.square().sum(1)
            self._add_sq(torch.zeros(B, dtype=sq.dtype, device=sq.device).index_add_(0, unique // V, sq))
        else:
            dense = summed.new_zeros(B * V, summed.shape[1]).index_add_(0, unique, summed)
            self._accumulate(record.weight, dense)

    def _backward_norm(self, record: _LayerCall, a: torch.Tensor, g: torch.Tensor) -> None:
        # y = x̂·w + b elementwise, so ∂ℓ/∂w = Σ g·x̂ and ∂ℓ/∂b = Σ g over the positions sharing each parameter; x̂ is
        # recomputed by the same op without its affine parameters (BatchNorm: running statistics, eval mode).
        opts, kind = record.options, record.kind
        a, g = _float(a), _float(g)
        if kind in ("layer_norm", "rms_norm"):
            reduce = tuple(range(1, a.ndim - len(tuple(opts["normalized_shape"]))))
            if kind == "layer_norm":
                xhat = F.layer_norm(a, opts["normalized_shape"], None, None, opts["eps"])
            else:
                xhat = F.rms_norm(a, opts["normalized_shape"], None, opts["eps"])
        else:
            reduce = tuple(range(2, a.ndim))
            if kind == "group_norm":
                xhat = F.group_norm(a, opts["num_groups"], None, None, opts["eps"])
            elif kind == "batch_norm":
                xhat = F.batch_norm(a, opts["running_mean"], opts["running_var"], None, None, False, 0.0, opts["eps"])
            elif opts["use_input_stats"]:  # instance norm: each example's own statistics
                xhat = F.instance_norm(a, None, None, None, None, True, 0.0, opts["eps"])
            else:
                xhat = F.instance_norm(
                    a, opts["running_mean"], opts["running_var"], None, None, False, 0.0, opts["eps"]
                )
        self._emit(record.weight, lambda: (g * xhat).sum(reduce) if reduce else g * xhat)
        self._emit(record.bias, lambda: g.sum(reduce) if reduce else g)

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
                    self._accumulate(entry, grad)
                else:
                    # The tracked tensor already had the batch size first: row i only meets example i.
                    rows = grad.new_zeros(B, *grad.shape)
                    index = torch.arange(B, device=grad.device)
                    rows[index, index] = grad
                    self._accumulate(entry, rows)
            for record in (record for record in self.fallbacks if record.grad is not None):
                for (_, entry), value in zip(record.tracked, self._fallback_grads(record)):
                    self._accumulate(entry, value)
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
                    self._accumulate(entry, value)
        with torch.no_grad():
            for entry, value in self.per_example_grads.values():
                if entry.is_param:
                    self._add_sq(_float(value).flatten(1).square().sum(1))
        unseen = [entry.name for entry in self.param_entries if entry.uses == 0]
        if unseen:
            logger.debug("trainable parameters never used in the forward pass (zero gradient): %s", unseen)
        if self.sq_norms is None:
            return torch.zeros(B, dtype=torch.float64, device=total_loss.device)
        return self.sq_norms


def _single(value) -> int:
    return value[0] if isinstance(value, (tuple, list)) else int(value)


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])
    return (int(value), int(value))


def _pad_for_conv(a, kernel, dilation, padding) -> torch.Tensor:
    """Zero-pad the input explicitly, so that the per-example computations below all use padding 0."""
    if padding == "valid":
        return a
    if padding == "same":
        pads = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]  # the same split as torch's conv with padding="same"
        return F.pad(a, pads)
    if padding[0] == 0 and padding[1] == 0:
        return a
    return F.pad(a, (padding[1], padding[1], padding[0], padding[0]))


def _patches(a: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """The receptive fields of a padded input, `[B, T, C·kh·kw]`, as a strided view (about twice as fast as F.unfold
    on CPU) then one copy."""
    a = a.contiguous()
    B, C, H, W = a.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    sB, sC, sH, sW = a.stride()
    view = a.as_strided((B, Ho, Wo, C, kh, kw), (sB, sH * sh, sW * sw, sC, sH * dh, sW * dw))
    return view.reshape(B, Ho * Wo, C * kh * kw)


def _matmul_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t a_tᵀ‖² per example for `a` `[B, T, d_in]` and `g` `[B, T, d_out]` (a linear layer's weight gradient),
    choosing by cost between the ghost form ⟨aaᵀ, ggᵀ⟩ (cost T²(d_in + d_out)) and the materialised gradient
    (cost T·d_in·d_out)."""
    B, T, d_in = a.shape
    d_out = g.shape[2]
    if T == 1:
        return a.square().sum((1, 2)) * g.square().sum((1, 2))
    out = a.new_empty(B)
    if T * (d_in + d_out) < d_in * d_out:
        for s in _example_chunks(B, 8 * T * T):
            out[s] = (torch.bmm(a[s], a[s].transpose(1, 2)) * torch.bmm(g[s], g[s].transpose(1, 2))).sum((1, 2))
    else:
        for s in _example_chunks(B, 4 * d_in * d_out):
            out[s] = torch.bmm(g[s].transpose(1, 2), a[s]).square().sum((1, 2))
    return out


def _conv_weight_sq_norms(a, g, weight_shape, stride, dilation, groups) -> torch.Tensor:
    """Squared norms of per-example conv2d weight gradients (`a` already padded), ghost or materialised by cost."""
    B = a.shape[0]
    out_channels, in_per_group, kh, kw = weight_shape
    T = g.shape[2] * g.shape[3]
    K = in_per_group * kh * kw * groups
    ghost_cost = T * T * (K + out_channels) + T * K
    materialised_cost = T * K * out_channels / groups
    if groups != 1 or materialised_cost <= ghost_cost:
        result = a.new_empty(B)
        for s in _example_chunks(B, 4 * (T * K + out_channels * K / groups)):
            grads = _conv_weight_grads(a[s], g[s], weight_shape, stride, dilation, groups)
            result[s] = grads.flatten(1).square().sum(1)
        return result
    result = a.new_empty(B)
    for s in _example_chunks(B, 4 * (T * K + 2 * T * T)):
        patches = _patches(a[s], (kh, kw), stride, dilation)
        grad_out = g[s].flatten(2)  # [b, O, T]
        result[s] = (torch.bmm(patches, patches.transpose(1, 2)) * torch.bmm(grad_out.transpose(1, 2), grad_out)).sum(
            (1, 2)
        )
    return result


def _conv_weight_grads(a, g, weight_shape, stride, dilation, groups) -> torch.Tensor:
    """Per-example conv2d weight gradients `[B, O, C/groups, kh, kw]` (`a` already padded)."""
    B = a.shape[0]
    out_channels, in_per_group, kh, kw = weight_shape
    if in_per_group * (out_channels // groups) <= 64:
        # Depthwise and narrow grouped convolutions: the weight gradient of one convolution with one group per
        # (example, group) is fast here, unlike for wide groups where it is orders of magnitude slower on CPU.
        weight = a.new_empty(1).expand(B * out_channels, in_per_group, kh, kw)
        grads = torch.ops.aten.convolution_backward(
            g.reshape(1, B * out_channels, *g.shape[2:]),
            a.reshape(1, B * a.shape[1], *a.shape[2:]),
            weight,
            None,
            list(stride),
            [0, 0],
            list(dilation),
            False,
            [0, 0],
            B * groups,
            [False, True, False],
        )[1]
        return grads.reshape(B, *weight_shape)
    patches = _patches(a, (kh, kw), stride, dilation)  # [B, T, C·kh·kw], channels outermost
    T = patches.shape[1]
    grad_out = g.reshape(B, groups, out_channels // groups, T)
    if groups == 1:
        return torch.bmm(grad_out[:, 0], patches).reshape(B, *weight_shape)
    patches = patches.reshape(B, T, groups, in_per_group * kh * kw)
    return torch.einsum("bgot,btgk->bgok", grad_out, patches).reshape(B, *weight_shape)


def _split_batch(inputs, start: int, stop: int, batch_size: int):
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    return {
        key: value[start:stop]
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch_size
        else value
        for key, value in inputs.items()
    }


def _per_example_losses(logits: torch.Tensor, targets: torch.Tensor, loss_fn: Callable | None) -> torch.Tensor:
    """Each example's own loss, shape `[B]`, whatever the reduction of `loss_fn`."""
    B = targets.shape[0]
    if loss_fn is None:
        if logits.ndim == 2:
            return F.cross_entropy(logits.float(), targets.long(), reduction="none")
        # Token-level logits [B, ..., C]: an example's loss is the mean over its own labelled positions (-100 ignored),
        # as transformers computes it for a batch of one.
        per_position = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.long().reshape(-1),
            reduction="none",
            ignore_index=-100,
        ).reshape(B, -1)
        counted = (targets.reshape(B, -1) != -100).sum(1).clamp(min=1)
        return per_position.sum(1) / counted
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
        targets: the labels, `[B]` (or `[B, ...]` for token-level logits, `-100` ignored).
        loss_fn: `loss_fn(logits, targets)`, returning per-example losses `[B]` or a scalar; a scalar loss is
            evaluated on each example alone, so each norm is that of the example's own loss whatever the reduction.
            Defaults to cross-entropy.
        chunk_size: if set, the batch is processed in pieces of at most this many examples, to bound memory.

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
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of examples, got {chunk_size}.")
    if chunk_size is not None and chunk_size < batch_size:
        return torch.cat(
            [
                per_example_grad_norms(
                    model,
                    _split_batch(inputs, start, min(start + chunk_size, batch_size), batch_size),
                    targets[start : start + chunk_size],
                    loss_fn,
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

    modes = {module: module.training for module in model.modules()}
    flags = [(param, param.requires_grad) for param in params.values()]
    handles = []
    tracer = _PerExampleGradTracer(batch_size, params, constants)
    try:
        model.eval()
        for param in params.values():
            param.requires_grad_(False)
        for module in model.modules():
            if _is_conv1d(module):
                handles.append(module.register_forward_pre_hook(tracer.enter_conv1d))
                handles.append(module.register_forward_hook(tracer.exit_conv1d))
        with torch.enable_grad():
            with tracer:
                output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            logits = unwrap_logits(output)
            if logits.shape[0] != batch_size:
                raise ValueError(
                    f"The model returned logits of shape {tuple(logits.shape)} for {batch_size} examples."
                )
            losses = _per_example_losses(logits, targets.to(logits.device), loss_fn)
            sq_norms = tracer.finish(losses.sum())
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes.items():
            module.training = training
    return sq_norms.clamp(min=0).sqrt().to(torch.float32)


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
