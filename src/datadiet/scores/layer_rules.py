"""Per-layer rules of the exact per-example gradient norms: the layer operations handled in closed form (linear,
convolutions, embeddings, normalisation layers) and how each adds its examples' squared norms. Pure PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LAYER_OPS",
    "LayerCall",
    "as_float",
    "backward_rule",
    "conv_rule_choice",
    "conv_weight_sq_norms",
    "linear_rule_choice",
    "matmul_sq_norms",
]

# Temporary memory one layer's norm computation may take at once; larger work is split into groups of examples.
_WORKSPACE_BYTES = 256 * 2**20


def _bind(names: tuple[str, ...], defaults: dict) -> Callable:
    """A binder mapping `(args, kwargs)` of a torch function to a dict of its arguments by name."""

    def bind(args: tuple, kwargs: dict) -> dict:
        bound = dict(defaults)
        bound.update(zip(names, args))
        bound.update(kwargs)
        return bound

    return bind


# The layer operations whose per-example gradients are computed in closed form, with their argument names.
LAYER_OPS: dict[Callable, tuple[str, Callable]] = {
    F.linear: ("linear", _bind(("input", "weight", "bias"), {"bias": None})),
    torch.conv1d: (
        "conv",
        _bind(
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        ),
    ),
    torch.conv2d: (
        "conv",
        _bind(
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        ),
    ),
    F.embedding: (
        "embedding",
        _bind(
            ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
            {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False},
        ),
    ),
    F.layer_norm: (
        "layer_norm",
        _bind(("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}),
    ),
    F.group_norm: (
        "group_norm",
        _bind(("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}),
    ),
    F.batch_norm: (
        "batch_norm",
        _bind(
            ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        ),
    ),
    F.instance_norm: (
        "instance_norm",
        _bind(
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
    LAYER_OPS[F.rms_norm] = ("rms_norm", _bind(("input", "normalized_shape", "weight", "eps"), {"eps": None}))


def as_float(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 at least: norms are accumulated in float32 or float64, whatever precision the model runs in."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _example_chunks(batch_size: int, bytes_per_example: float):
    """Slices of the batch small enough for the per-example workspace to fit in `_WORKSPACE_BYTES`."""
    step = max(1, int(_WORKSPACE_BYTES // max(bytes_per_example, 1)))
    for start in range(0, batch_size, step):
        yield slice(start, min(start + step, batch_size))


@dataclass(eq=False)
class LayerCall:
    """One call of a layer operation on a batch: its kind, its (detached) input and the tracked weight and bias."""

    kind: str
    input: torch.Tensor | None
    version: int
    weight: Any  # the tracer's entry of the weight, or None
    bias: Any  # the tracer's entry of the bias, or None
    options: dict = field(default_factory=dict)


def linear_rule(tracer, record: LayerCall, a: torch.Tensor, g: torch.Tensor) -> None:
    """Linear layers (and transformers' Conv1D): the ghost or the materialised form, whichever is cheaper."""
    B = tracer.batch_size
    a = as_float(a).reshape(B, -1, a.shape[-1])
    g = as_float(g).reshape(B, -1, g.shape[-1])
    tracer.emit(record.bias, lambda: g.sum(1))
    if record.weight is None:
        return
    if tracer.exclusive(record.weight):
        tracer.add_sq(matmul_sq_norms(a, g))
        return
    gw = torch.bmm(a.transpose(1, 2), g) if record.options.get("transposed") else torch.bmm(g.transpose(1, 2), a)
    tracer.accumulate(record.weight, gw)


def conv_rule(tracer, record: LayerCall, a: torch.Tensor, g: torch.Tensor) -> None:
    """conv1d / conv2d: the input padded explicitly, then the ghost or the materialised weight gradient."""
    opts = record.options
    weight_shape = opts["weight_shape"]
    a, g = as_float(a), as_float(g)
    if a.ndim == 3:  # conv1d as a conv2d of height 1
        a, g = a.unsqueeze(2), g.unsqueeze(2)
        weight_shape = (*weight_shape[:2], 1, weight_shape[2])
        stride, dilation = (1, _single(opts["stride"])), (1, _single(opts["dilation"]))
        padding = opts["padding"] if isinstance(opts["padding"], str) else (0, _single(opts["padding"]))
    else:
        stride, dilation, padding = _pair(opts["stride"]), _pair(opts["dilation"]), opts["padding"]
        padding = padding if isinstance(padding, str) else _pair(padding)
    a = _pad_for_conv(a, weight_shape[2:], dilation, padding)
    tracer.emit(record.bias, lambda: g.sum((2, 3)))
    if record.weight is None:
        return
    groups = opts["groups"]
    if tracer.exclusive(record.weight):
        tracer.add_sq(conv_weight_sq_norms(a, g, weight_shape, stride, dilation, groups))
    else:
        tracer.accumulate(record.weight, _conv_weight_grads(a, g, weight_shape, stride, dilation, groups))


def embedding_rule(tracer, record: LayerCall, ids: torch.Tensor, g: torch.Tensor) -> None:
    """Embeddings: the rows of each example's own tokens, repeated tokens summed, `padding_idx` left out."""
    opts = record.options
    B, V = tracer.batch_size, opts["num_embeddings"]
    ids = ids.reshape(B, -1).long()
    g = as_float(g).reshape(B, ids.shape[1], -1)
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
    if tracer.exclusive(record.weight):
        sq = summed.square().sum(1)
        tracer.add_sq(torch.zeros(B, dtype=sq.dtype, device=sq.device).index_add_(0, unique // V, sq))
    else:
        dense = summed.new_zeros(B * V, summed.shape[1]).index_add_(0, unique, summed)
        tracer.accumulate(record.weight, dense)


def norm_rule(tracer, record: LayerCall, a: torch.Tensor, g: torch.Tensor) -> None:
    """LayerNorm / RMSNorm / GroupNorm / InstanceNorm / BatchNorm (eval mode): Σ g·x̂ and Σ g per example."""
    # y = x̂·w + b elementwise, so ∂ℓ/∂w = Σ g·x̂ and ∂ℓ/∂b = Σ g over the positions sharing each parameter; x̂ is
    # recomputed by the same op without its affine parameters (BatchNorm: running statistics, eval mode).
    opts, kind = record.options, record.kind
    a, g = as_float(a), as_float(g)
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
            xhat = F.instance_norm(a, opts["running_mean"], opts["running_var"], None, None, False, 0.0, opts["eps"])
    tracer.emit(record.weight, lambda: (g * xhat).sum(reduce) if reduce else g * xhat)
    tracer.emit(record.bias, lambda: g.sum(reduce) if reduce else g)


_RULES: dict[str, Callable] = {"linear": linear_rule, "conv": conv_rule, "embedding": embedding_rule}


def backward_rule(kind: str) -> Callable:
    """The rule `rule(tracer, record, a, g)` that adds the per-example gradients of a layer call of this `kind` to
    `tracer` (a `PerExampleGradTracer`: its `batch_size`, `emit`, `exclusive`, `add_sq` and `accumulate`), from the
    layer input `a` and output gradient `g`; normalisation layers share one rule."""
    return _RULES.get(kind, norm_rule)


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


# Relative costs, in multiply-adds of a batched matrix product, of gathering one element of the convolution patches
# (a strided copy) and of one strided add: memory-bound work that the multiply-add counts alone miss by far. Measured
# on a 2-core x86 CPU with `python recipes/bench/grand.py --profile resnet18_b128` (see docs/bench.md).
_GATHER_COST = 50
_STRIDED_ADD_COST = 10
# The same for one element of a materialised per-example weight gradient, written by a matrix product whose inner
# dimension (the positions T) is short, then squared and summed.
_OUTPUT_COST = 64


def linear_rule_choice(T: int, d_in: int, d_out: int) -> str:
    """`"ghost"` or `"materialised"`: the cheaper way to a linear layer's per-example weight-gradient norms for `T`
    positions per example, by multiply-adds: ghost T²(d_in + d_out), materialised T·d_in·d_out plus the d_in·d_out
    elements of each example's gradient written and squared (weighted by their measured cost)."""
    return "ghost" if T * T * (d_in + d_out) < (T + _OUTPUT_COST) * d_in * d_out else "materialised"


def matmul_sq_norms(a: torch.Tensor, g: torch.Tensor, rule: str | None = None) -> torch.Tensor:
    """‖Σ_t g_t a_tᵀ‖² per example for `a` `[B, T, d_in]` and `g` `[B, T, d_out]` (a linear layer's weight gradient),
    by the ghost form ⟨aaᵀ, ggᵀ⟩ or the materialised gradient: `rule` (`"ghost"`, `"materialised"`, or None to choose
    by `linear_rule_choice`)."""
    B, T, d_in = a.shape
    d_out = g.shape[2]
    if T == 1 and rule is None:
        return a.square().sum((1, 2)) * g.square().sum((1, 2))
    out = a.new_empty(B)
    if (rule or linear_rule_choice(T, d_in, d_out)) == "ghost":
        for s in _example_chunks(B, 8 * T * T):
            out[s] = (torch.bmm(a[s], a[s].transpose(1, 2)) * torch.bmm(g[s], g[s].transpose(1, 2))).sum((1, 2))
    else:
        # The gradient or its transpose, whichever has the fewer rows: a product with a short, wide output runs about
        # twice as fast on CPU (a LoRA B matrix, 16 -> 1536, T = 256: 21 ms against 42 ms for batch 8).
        for s in _example_chunks(B, 4 * d_in * d_out):
            gw = torch.bmm(a[s].transpose(1, 2), g[s]) if d_in < d_out else torch.bmm(g[s].transpose(1, 2), a[s])
            out[s] = gw.square().sum((1, 2))
    return out


def conv_rule_choice(
    T: int, in_channels: int, kernel_size: int, out_channels: int, groups: int = 1, padded_positions: int = 0
) -> str:
    """The cheapest way to a convolution's per-example weight-gradient norms, for `T` output positions,
    K = in_channels·kernel_size (kernel_size = kh·kw) and `padded_positions` = Hp·Wp of the padded input, counting
    multiply-adds (memory-bound gathers and adds weighted by their measured cost):

    - `"materialised"`: the per-example gradient, T·K·O, after gathering the T·K patch elements, plus its K·O
      elements written and squared;
    - `"ghost"`: ⟨PPᵀ, GGᵀ⟩ from the patches P, T²(K + O), after the same gather;
    - `"input_gram"`: the same ghost norm, with the patch Gram PPᵀ summed from kh·kw shifted blocks of the padded
      input's own Gram matrix instead of gathering patches: (Hp·Wp)²·C + T²·O, plus kh·kw·T² strided adds.

    Grouped convolutions are always materialised."""
    if groups != 1:
        return "materialised"
    K = in_channels * kernel_size
    gather = _GATHER_COST * T * K
    costs = {
        "materialised": (T + _OUTPUT_COST) * K * out_channels + gather,
        "ghost": T * T * (K + out_channels) + gather,
    }
    if padded_positions:
        costs["input_gram"] = (
            padded_positions**2 * in_channels + T * T * out_channels + _STRIDED_ADD_COST * kernel_size * T * T
        )
    return min(costs, key=costs.get)


def conv_weight_sq_norms(a, g, weight_shape, stride, dilation, groups, rule: str | None = None) -> torch.Tensor:
    """Squared norms of per-example conv2d weight gradients (`a` already padded), by `rule` (`"materialised"`,
    `"ghost"`, `"input_gram"`, or None to choose by `conv_rule_choice`)."""
    B, _, Hp, Wp = a.shape
    out_channels, in_per_group, kh, kw = weight_shape
    T = g.shape[2] * g.shape[3]
    K = in_per_group * kh * kw * groups
    rule = (
        "materialised" if groups != 1 else rule or conv_rule_choice(T, in_per_group, kh * kw, out_channels, 1, Hp * Wp)
    )
    result = a.new_empty(B)
    if rule == "materialised":
        for s in _example_chunks(B, 4 * (T * K + out_channels * K / groups)):
            grads = _conv_weight_grads(a[s], g[s], weight_shape, stride, dilation, groups)
            result[s] = grads.flatten(1).square().sum(1)
    elif rule == "ghost":
        for s in _example_chunks(B, 4 * (T * K + 2 * T * T)):
            patches = _patches(a[s], (kh, kw), stride, dilation)
            grad_out = g[s].flatten(2)  # [b, O, T]
            grad_gram = torch.bmm(grad_out.transpose(1, 2), grad_out)
            result[s] = (torch.bmm(patches, patches.transpose(1, 2)) * grad_gram).sum((1, 2))
    else:
        for s in _example_chunks(B, 4 * ((Hp * Wp) ** 2 + 2 * T * T)):
            result[s] = _input_gram_sq_norms(a[s], g[s], (kh, kw), stride, dilation)
    return result


def _input_gram_sq_norms(a, g, kernel, stride, dilation) -> torch.Tensor:
    """The ghost norm ⟨PPᵀ, GGᵀ⟩ of a convolution without gathering its patches P: patch t holds the padded input at
    positions p(t) + δ over the kernel offsets δ, so (PPᵀ)[t, s] = Σ_δ (AAᵀ)[p(t) + δ, p(s) + δ], with A the padded
    input as [positions, channels]: one Gram matrix of the input, then kh·kw strided blocks of it added."""
    B, C, Hp, Wp = a.shape
    Ho, Wo = g.shape[2], g.shape[3]
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    flat = a.reshape(B, C, Hp * Wp)
    gram = torch.bmm(flat.transpose(1, 2), flat).view(B, Hp, Wp, Hp, Wp)
    patch_gram = a.new_zeros(B, Ho, Wo, Ho, Wo)
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (Ho - 1) + 1, sh)
        for j in range(kw):
            cols = slice(j * dw, j * dw + sw * (Wo - 1) + 1, sw)
            patch_gram += gram[:, rows, cols, rows, cols]
    grad_out = g.reshape(B, -1, Ho * Wo)
    grad_gram = torch.bmm(grad_out.transpose(1, 2), grad_out)
    return (patch_gram.view(B, Ho * Wo, Ho * Wo) * grad_gram).sum((1, 2))


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
