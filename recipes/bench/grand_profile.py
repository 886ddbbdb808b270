"""Where the time of `per_example_grad_norms` goes, against a plain forward+backward of the same batch: run by
`python recipes/bench/grand.py --profile resnet18_b128` (any configuration of grand.py).

Prints three tables:
1. The plain forward+backward by layer kind (conv, linear, norms, attention, other), from torch.profiler's self CPU
   time of the aten ops.
2. `per_example_grad_norms` split into the forward pass under the tracer, the backward pass without the per-layer
   rules, and the per-layer rules by kind; the tracing overhead is the traced forward minus a plain forward with
   autograd on (alternated over rounds, medians).
3. For every linear / convolution call (grouped by shape): the time of each per-layer rule (ghost norm from the
   patches, ghost norm from the input's Gram matrix, materialised per-example gradient) on the call's own input and
   output gradient, the fastest, and the one the cost model (`conv_rule_choice`, `linear_rule_choice`) picks.
The per-layer rules are timed by wrapping the tracer's `backward_rule` for the profiled calls only.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from discipline import markdown_table

import datadiet.scores.tracer as tracer_module
from datadiet.scores import per_example_grad_norms
from datadiet.scores.layer_rules import (
    conv_rule_choice,
    conv_weight_sq_norms,
    linear_rule_choice,
    matmul_sq_norms,
)
from datadiet.scores.tracer import PerExampleGradTracer

KINDS = {
    "conv": ("conv", "convolution"),
    "linear": ("addmm", "aten::mm", "linear", "matmul", "aten::bmm", "baddbmm"),
    "norms": ("norm",),
    "attention": ("scaled_dot_product", "softmax", "attention"),
    "embedding": ("embedding",),
}


def _kind_of_op(name: str) -> str:
    for kind, keys in KINDS.items():
        if any(key in name for key in keys):
            return kind
    return "other"


def _kind_of_rule(kind: str) -> str:
    return {"conv": "conv", "linear": "linear", "embedding": "embedding"}.get(kind, "norms")


def _call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _plain(model, inputs, labels):
    F.cross_entropy(_call(model, inputs), labels).backward()
    model.zero_grad(set_to_none=True)


class _Collect:
    """A stand-in for the tracer in the rule timings: every parameter exclusive, squared norms kept."""

    def __init__(self, batch_size):
        self.batch_size = batch_size

    def exclusive(self, entry):
        return entry is not None

    def emit(self, entry, grads):
        if entry is not None:
            grads()

    def add_sq(self, sq):
        pass

    def accumulate(self, entry, grads):
        pass


def _time(fn, repeats=3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _weight_shapes(record, a, g, B):
    """(rule choice, description, {rule: fn}) of a linear / conv call, from its input and gradient."""
    if record.kind == "linear":
        a3 = a.float().reshape(B, -1, a.shape[-1])
        g3 = g.float().reshape(B, -1, g.shape[-1])
        T, d_in, d_out = a3.shape[1], a3.shape[2], g3.shape[2]
        rules = {rule: (lambda rule=rule: matmul_sq_norms(a3, g3, rule)) for rule in ("ghost", "materialised")}
        return linear_rule_choice(T, d_in, d_out), f"linear T={T} in={d_in} out={d_out}", rules
    opts = record.options
    weight_shape = opts["weight_shape"]
    if a.ndim != 4 or isinstance(opts["padding"], str):
        return None
    stride, dilation, padding = (tuple(opts[k]) if isinstance(opts[k], (tuple, list)) else (opts[k],) * 2
                                 for k in ("stride", "dilation", "padding"))  # fmt: skip
    padded = F.pad(a.float(), (padding[1], padding[1], padding[0], padding[0]))
    groups = opts["groups"]
    T = g.shape[2] * g.shape[3]
    description = (
        f"conv {weight_shape[1] * groups}→{weight_shape[0]} k{weight_shape[2]} s{stride[0]} g{groups} "
        f"T={T} (in {a.shape[2]}x{a.shape[3]})"
    )

    def run(rule):
        return lambda: conv_weight_sq_norms(padded, g.float(), weight_shape, stride, dilation, groups, rule)

    rules = {"materialised": run("materialised")}
    if groups == 1:
        rules.update(ghost=run("ghost"), input_gram=run("input_gram"))
    positions = padded.shape[2] * padded.shape[3]
    choice = conv_rule_choice(
        T, weight_shape[1], weight_shape[2] * weight_shape[3], weight_shape[0], groups, positions
    )
    return choice, description, rules


def profile(config_name: str, config: dict, build, rounds: int = 3) -> None:
    """Where the time of `per_example_grad_norms` goes on the configuration `config` (named `config_name`), whose
    model and batch `build(config)` makes."""
    model, inputs, labels = build(config)
    print(f"## Profile of {config_name} ({config}), {torch.get_num_threads()} threads\n")

    # 1. The plain forward+backward by layer kind.
    _plain(model, inputs, labels)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _plain(model, inputs, labels)
    by_kind = defaultdict(float)
    for event in prof.key_averages():
        by_kind[_kind_of_op(event.key)] += event.self_cpu_time_total / 1e3
    total = sum(by_kind.values())
    print("### Plain forward+backward, self CPU time by layer kind (torch.profiler)\n")
    rows = [[kind, f"{ms:.1f}", f"{ms / total:.0%}"] for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    print(markdown_table(["layer kind", "ms", "share"], rows + [["total", f"{total:.1f}", "100%"]]))

    # 2. per_example_grad_norms split into traced forward, backward, rules by kind.
    rule_ms = defaultdict(float)
    calls = []
    original_rule, original_finish = tracer_module.backward_rule, PerExampleGradTracer.finish
    finish_s = []

    def timed_rule(kind):
        rule = original_rule(kind)

        def run(tracer, record, a, g):
            start = time.perf_counter()
            rule(tracer, record, a, g)
            rule_ms[_kind_of_rule(kind)] += (time.perf_counter() - start) * 1e3
            if kind in ("linear", "conv") and record.weight is not None:
                calls.append((record, a, g))

        return run

    def timed_finish(self, total_loss):
        start = time.perf_counter()
        out = original_finish(self, total_loss)
        finish_s.append(time.perf_counter() - start)
        return out

    def traced_forward():
        constants = {id(buffer) for buffer in model.buffers()}
        tracer = PerExampleGradTracer(labels.shape[0], dict(model.named_parameters()), constants)
        for param in model.parameters():
            param.requires_grad_(False)
        try:
            with torch.enable_grad(), tracer:
                _call(model, inputs)
        finally:
            for param in model.parameters():
                param.requires_grad_(True)

    def plain_forward():
        with torch.enable_grad():
            _call(model, inputs)

    times = defaultdict(list)
    runners = {
        "plain forward+backward": lambda: _plain(model, inputs, labels),
        "plain forward (autograd on)": plain_forward,
        "forward under the tracer": traced_forward,
        "per_example_grad_norms": lambda: per_example_grad_norms(model, inputs, labels),
    }
    for fn in runners.values():
        fn()
    for round_ in range(rounds):
        for name, fn in runners.items() if round_ % 2 == 0 else reversed(runners.items()):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    tracer_module.backward_rule, PerExampleGradTracer.finish = timed_rule, timed_finish
    try:
        start = time.perf_counter()
        per_example_grad_norms(model, inputs, labels)
        instrumented = (time.perf_counter() - start) * 1e3
    finally:
        tracer_module.backward_rule, PerExampleGradTracer.finish = original_rule, original_finish
    finish_ms = finish_s[0] * 1e3
    rules_total = sum(rule_ms.values())
    plain_total = medians["plain forward+backward"]
    print(
        f"\n### per_example_grad_norms, medians of {rounds} alternated rounds (ms; rules from one instrumented run)\n"
    )
    rows = [[name, f"{ms:.1f}", f"{ms / plain_total:.2f}×"] for name, ms in medians.items()]
    rows.append(["tracing overhead (traced − plain forward)",
                 f"{medians['forward under the tracer'] - medians['plain forward (autograd on)']:.1f}", ""])  # fmt: skip
    rows.append(["instrumented run: forward under the tracer", f"{instrumented - finish_ms:.1f}", ""])
    rows.append(["instrumented run: backward without the rules", f"{finish_ms - rules_total:.1f}", ""])
    for kind, ms in sorted(rule_ms.items(), key=lambda kv: -kv[1]):
        rows.append([f"instrumented run: {kind} rules", f"{ms:.1f}", f"{ms / plain_total:.2f}×"])
    print(markdown_table(["part", "ms", "× plain forward+backward"], rows))

    # 3. Ghost vs materialised per linear / conv shape.
    seen = {}
    for record, a, g in calls:
        shapes = _weight_shapes(record, a, g, labels.shape[0])
        if shapes is None:
            continue
        choice, description, rules = shapes
        if description in seen:
            seen[description][0] += 1
            continue
        ms = {rule: _time(fn) * 1e3 for rule, fn in rules.items()}
        seen[description] = [1, ms, min(ms, key=ms.get), choice]
    print("\n### Per-layer rules on each linear / convolution call's own input and gradient (ms, median of 3)\n")
    names = ["ghost", "input_gram", "materialised"]
    rows = [
        [description, count, *(f"{ms[n]:.2f}" if n in ms else "n/a" for n in names), fastest, choice,
         "yes" if fastest == choice else "NO"]
        for description, (count, ms, fastest, choice) in seen.items()
    ]  # fmt: skip
    print(markdown_table(["layer (shape)", "calls", *names, "fastest", "cost model", "agree"], rows))
