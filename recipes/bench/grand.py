"""Exact per-example gradient norms (GraNd): time and peak memory of `datadiet.per_example_grad_norms` against
(a) one plain forward+backward of the batch (the floor), (c) `torch.func.vmap(grad)` and (d) a naive per-example
autograd loop, all in eval mode, on CPU.

Models: timm resnet18 (ImageNet stem) at 32x32, batch 64 and 128; a small ViT (timm vit_tiny_patch16_224 at 32x32
with 4x4 patches: 65 tokens, width 192, 12 blocks), batch 64; a tiny BERT (2 layers, width 128, 2 heads, vocabulary
30,522) on padded sequences of up to 128 tokens with an attention mask, batch 64. Random initialisation (weights do
not change the cost); BatchNorm running statistics randomised so that eval mode is not trivial.

Timing: one subprocess per model alternates the four methods over `--repeats` rounds (after one warm-up call each;
the slow baselines (c) and (d) only in the first `--baseline-repeats` rounds), so that load from other processes on
a shared machine hits all of them alike, and reports the median of each. Peak memory: one fresh subprocess per
(model, method) runs the method (twice; the baselines once) and reports its peak resident set size (`ru_maxrss`);
"extra" is that minus the peak of the plain forward+backward, whose process holds the same model and batch. The
exact methods are also checked against each other (max relative difference to the naive loop).

Run from the repository root (`nice` because the cores are shared):

    nice -n 10 .venv/bin/python recipes/bench/grand.py

torch.func.vmap(grad) dominates the run time: on this CPU its per-example convolution weight gradients (a grouped
convolution with one group per example) take minutes per ResNet batch. `--models resnet18_b64 vit_tiny` picks
configurations, `--threads` sets torch's thread count (default: torch's own),
`--output` writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

METHODS = ("plain", "ours", "vmap", "naive")
LABELS = {
    "plain": "(a) plain forward+backward",
    "ours": "(b) datadiet.per_example_grad_norms",
    "vmap": "(c) torch.func.vmap(grad)",
    "naive": "(d) naive per-example loop",
}
CONFIGS = {
    "resnet18_b64": dict(kind="timm", name="resnet18", batch=64),
    "resnet18_b128": dict(kind="timm", name="resnet18", batch=128),
    "vit_tiny": dict(kind="vit", name="vit_tiny_patch16_224", batch=64),
    "bert_tiny": dict(kind="bert", batch=64, seq=128),
}


def build(config: dict, seed: int = 0):
    """The model (eval mode), the batch (tensor or dict) and the labels of one configuration."""
    torch.manual_seed(seed)
    batch = config["batch"]
    if config["kind"] in ("timm", "vit"):
        import timm

        extra = dict(img_size=32, patch_size=4) if config["kind"] == "vit" else {}
        model = timm.create_model(config["name"], pretrained=False, num_classes=10, **extra)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        inputs = torch.randn(batch, 3, 32, 32)
        labels = torch.randint(0, 10, (batch,))
    else:
        import transformers

        bert = transformers.BertConfig(
            vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
            num_labels=2,
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(bert)
        seq = config["seq"]
        input_ids = torch.randint(1000, 30522, (batch, seq))
        attention_mask = torch.ones_like(input_ids)
        lengths = torch.randint(seq // 4, seq + 1, (batch,))
        for row, length in enumerate(lengths.tolist()):
            input_ids[row, length:] = 0
            attention_mask[row, length:] = 0
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        labels = torch.randint(0, 2, (batch,))
    return model.eval(), inputs, labels


def _call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _slice(inputs, i):
    return {k: v[i : i + 1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[i : i + 1]


def run_plain(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(_call(model, inputs), labels).backward()
    model.zero_grad(set_to_none=True)
    return None


def run_ours(model, inputs, labels):
    from datadiet.scores import per_example_grad_norms

    return per_example_grad_norms(model, inputs, labels)


def run_vmap(model, inputs, labels):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of_one(p, x, y):
        x = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
        out = (
            functional_call(model, (p, buffers), kwargs=x)
            if isinstance(x, dict)
            else functional_call(model, (p, buffers), (x,))
        )
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits, y.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, inputs, labels)
    return torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()


def run_naive(model, inputs, labels):
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(labels.shape[0]):
        loss = F.cross_entropy(_call(model, _slice(inputs, i)), labels[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)))
    return torch.stack(norms)


RUNNERS = {"plain": run_plain, "ours": run_ours, "vmap": run_vmap, "naive": run_naive}


def child_time(config_name: str, repeats: int, methods: list[str], baseline_repeats: int) -> dict:
    """Alternate the methods over `repeats` rounds (the slow baselines (c) and (d) in the first `baseline_repeats`
    only); median seconds of each, and the norms each exact method gave."""
    model, inputs, labels = build(CONFIGS[config_name])
    times = {m: [] for m in methods}
    norms, errors = {}, {}
    for method in methods:  # warm-up (first-call allocations, lazy initialisation)
        try:
            out = RUNNERS[method](model, inputs, labels)
            if out is not None:
                norms[method] = out.detach().double().tolist()
        except Exception as error:  # noqa: BLE001 - a baseline that cannot run this model is reported, not fatal
            errors[method] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    for round_ in range(repeats):
        for method in methods:
            if method in errors or (method in ("vmap", "naive") and round_ >= baseline_repeats):
                continue
            start = time.perf_counter()
            RUNNERS[method](model, inputs, labels)
            times[method].append(time.perf_counter() - start)
    return {
        "median_s": {m: statistics.median(t) for m, t in times.items() if t},
        "all_s": times,
        "norms": norms,
        "errors": errors,
    }


def child_memory(config_name: str, method: str) -> dict:
    model, inputs, labels = build(CONFIGS[config_name])
    try:
        for _ in range(1 if method in ("vmap", "naive") else 2):
            RUNNERS[method](model, inputs, labels)
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _spawn(args: list[str], threads: int | None) -> dict:
    command = [sys.executable, __file__, *args] + (["--threads", str(threads)] if threads else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-repeats", type=int, default=2, help="rounds for the slow baselines (c) and (d)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child-time", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_time:
        print(json.dumps(child_time(args.child_time, args.repeats, args.methods, args.baseline_repeats)))
        return
    if args.child_memory:
        print(json.dumps(child_memory(*args.child_memory)))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.repeats} rounds "
        f"({args.baseline_repeats} for the slow baselines), after one warm-up call each"
    )
    results = {}
    for name in args.models:
        timing = _spawn(
            ["--child-time", name, "--repeats", str(args.repeats), "--baseline-repeats", str(args.baseline_repeats)]
            + ["--methods", *args.methods],
            args.threads,
        )
        memory = {m: _spawn(["--child-memory", name, m], args.threads) for m in args.methods}
        results[name] = {"timing": timing, "memory": memory}
        print(f"\n### {name} ({CONFIGS[name]})")
        if "error" in timing:
            print(f"timing run failed: {timing['error']}")
            continue
        median = timing["median_s"]
        reference = timing["norms"].get("naive")
        plain_mb = memory.get("plain", {}).get("peak_rss_mb")
        print("| method | time (s) | × plain | peak RSS (MB) | extra over plain (MB) | max rel. diff to naive |")
        print("|---|---|---|---|---|---|")
        for method in args.methods:
            peak = memory[method].get("peak_rss_mb")
            extra = f"{peak - plain_mb:+.0f}" if peak is not None and plain_mb is not None else "n/a"
            if method in median:
                seconds, ratio = f"{median[method]:.3f}", f"{median[method] / median['plain']:.2f}×"
            else:
                seconds, ratio = "n/a", "failed: " + timing["errors"].get(method, "n/a")[:60]
            diff = "n/a"
            if reference is not None and method in timing["norms"]:
                ours = torch.tensor(timing["norms"][method])
                ref = torch.tensor(reference)
                diff = f"{((ours - ref).abs() / ref).max().item():.1e}"
            peak_text = f"{peak:.0f}" if peak is not None else "n/a"
            print(f"| {LABELS[method]} | {seconds} | {ratio} | {peak_text} | {extra} | {diff} |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
