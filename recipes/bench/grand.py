"""Exact per-example gradient norms (GraNd): the time of `datadiet.per_example_grad_norms` as a multiple of one plain
forward+backward of the same batch (the cost of a training step), with the spread over rounds, the machine's load
and the extra peak memory; optionally against a naive per-example autograd loop and `torch.func.vmap(grad)`. All in
eval mode, on CPU.

Configurations: timm resnet18 (ImageNet stem) at 32x32, batch 32, 128 and 256; a small ViT (timm
vit_tiny_patch16_224 at 32x32 with 4x4 patches: 65 tokens, width 192, 12 blocks), batch 64; a tiny BERT (2 layers,
width 128, 2 heads, vocabulary 30,522, built from a config) on padded sequences of 32 to 128 tokens with an
attention mask, batch 64. Random initialisation (weights do not change the cost); BatchNorm running statistics
randomised so that eval mode is not trivial.

Discipline (see `discipline.py`): one subprocess per configuration builds the model once, warms every method up,
then alternates the methods over `--rounds` rounds (order reversed every other round); the ratio to the plain
forward+backward is taken within each round and reported as min / median / max. The torch thread count and the
load average before and after are recorded, and no verdict is printed when the load was above the number of cores
("machine busy: no verdict"). Peak memory: one fresh subprocess per (configuration, method) runs the method twice
and reports its peak resident set size; "extra" is that minus the plain forward+backward's, whose process holds
the same model and batch. The exact methods are checked against the naive loop when it runs.

Run from the repository root, on a quiet machine:

    python recipes/bench/grand.py --output outputs/bench/grand.json

`--models resnet18_b128 vit_tiny_b64` picks configurations, `--methods plain ours naive` adds the naive loop (run
in the first `--baseline-rounds` rounds only), `--threads` sets torch's thread count (default: torch's own).
`--profile resnet18_b128` prints where the time goes instead (see `grand_profile.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import discipline  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

METHODS = ("plain", "ours", "naive", "vmap")
LABELS = {
    "plain": "plain forward+backward",
    "ours": "datadiet.per_example_grad_norms",
    "vmap": "torch.func.vmap(grad)",
    "naive": "naive per-example loop",
}
CONFIGS = {
    "resnet18_b32": dict(kind="timm", name="resnet18", batch=32),
    "resnet18_b128": dict(kind="timm", name="resnet18", batch=128),
    "resnet18_b256": dict(kind="timm", name="resnet18", batch=256),
    "vit_tiny_b64": dict(kind="vit", name="vit_tiny_patch16_224", batch=64),
    "bert_tiny_b64": dict(kind="bert", batch=64, seq=128),
}
# The goals of issue #19: ours / plain (median over rounds), and the extra peak memory at batch 128.
GOALS = {"timm": 1.3, "vit": 1.0, "bert": 1.3}
MEMORY_GOAL_MB = 300
SLOW = ("naive", "vmap")


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


def child_time(config_name: str, rounds: int, methods: list[str], baseline_rounds: int) -> dict:
    """Alternate the methods over `rounds` rounds (the slow baselines in the first `baseline_rounds` only), after one
    warm-up call each; seconds per round of each, and the norms each exact method gave."""
    model, inputs, labels = build(CONFIGS[config_name])
    norms, errors = {}, {}
    for method in methods:  # warm-up (first-call allocations, lazy initialisation)
        try:
            out = RUNNERS[method](model, inputs, labels)
            if out is not None:
                norms[method] = out.detach().double().tolist()
        except Exception as error:  # noqa: BLE001 - a baseline that cannot run this model is reported, not fatal
            errors[method] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    runners = {m: (lambda m=m: RUNNERS[m](model, inputs, labels)) for m in methods if m not in errors}
    times, loads = discipline.alternate(runners, rounds, skip=lambda m, r: m in SLOW and r >= baseline_rounds)
    return {"seconds": times, "norms": norms, "errors": errors, "load_per_round": loads}


def child_memory(config_name: str, method: str) -> dict:
    model, inputs, labels = build(CONFIGS[config_name])
    try:
        for _ in range(1 if method in SLOW else 2):
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


def summarise(name: str, timing: dict, memory: dict, load_before: float, load_after: float, threads: int) -> dict:
    """Ratios to the plain forward+backward per round, their spread, extra peak memory, agreement with the naive
    loop and the verdict of one configuration."""
    config = CONFIGS[name]
    seconds = timing["seconds"]
    reference = timing["norms"].get("naive")
    methods = discipline.method_entries(seconds, memory, "plain")
    for method, entry in methods.items():
        if reference is not None and method in timing["norms"] and method != "naive":
            ours, ref = torch.tensor(timing["norms"][method]), torch.tensor(reference)
            entry["max_rel_diff_to_naive"] = ((ours - ref).abs() / ref).max().item()
    busy = discipline.machine_busy(load_before, load_after, discipline.cores(), threads)
    result = {
        "config": config,
        "threads": threads,
        "cores": discipline.cores(),
        "load_before": load_before,
        "load_after": load_after,
        "busy": busy,
        "methods": methods,
        "errors": timing["errors"],
    }
    ours = methods.get("ours", {})
    if ours.get("ratio", {}).get("median") is not None:
        goal = GOALS[config["kind"]]
        met = ours["ratio"]["median"] <= goal
        if config["batch"] == 128 and ours.get("extra_mb") is not None:
            met = met and ours["extra_mb"] <= MEMORY_GOAL_MB
        result["goal"] = f"median <= {goal}x" + (f", extra <= {MEMORY_GOAL_MB} MB" if config["batch"] == 128 else "")
        result["verdict"] = discipline.verdict(met, busy)
    return result


HEADERS = [
    "configuration", "method", "threads", "rounds", "median s", "× plain min", "× plain median", "× plain max",
    "extra peak MB", "rel. diff to naive", "load before → after", "verdict",
]  # fmt: skip


def table_rows(name: str, result: dict) -> list[list[str]]:
    rows = []
    for method, entry in result["methods"].items():
        naive = f"{entry['max_rel_diff_to_naive']:.1e}" if "max_rel_diff_to_naive" in entry else "n/a"
        verdict = result.get("verdict", "") if method == "ours" else ""
        rows.append(
            [
                name,
                *discipline.table_row(LABELS[method], entry, result, peak_rss=False, extra=[naive], verdict=verdict),
            ]
        )
    for method, error in result["errors"].items():
        rows.append([name, LABELS[method], result["threads"], 0] + ["failed: " + error[:60]] + [""] * 7)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=["plain", "ours"], choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--baseline-rounds", type=int, default=2, help="rounds for the slow baselines")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--profile", choices=list(CONFIGS), default=None, help="profile one configuration instead")
    parser.add_argument("--child-time", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 9 and not (args.child_time or args.profile):
        parser.error(f"--rounds {args.rounds}: at least 9 rounds are needed for a spread worth reporting.")
    if "plain" not in args.methods:
        args.methods = ["plain", *args.methods]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_time:
        print(json.dumps(child_time(args.child_time, args.rounds, args.methods, args.baseline_rounds)))
        return
    if args.child_memory:
        print(json.dumps(child_memory(*args.child_memory)))
        return
    if args.profile:
        from grand_profile import profile

        profile(args.profile, CONFIGS[args.profile], build, rounds=max(3, min(args.rounds, 5)))
        return

    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} threads, {discipline.cores()} cores, CPU; {args.rounds} alternated rounds"
    )
    results = {}
    rows = []
    for name in args.models:
        load_before = discipline.load_average()
        timing = _spawn(
            ["--child-time", name, "--rounds", str(args.rounds), "--baseline-rounds", str(args.baseline_rounds)]
            + ["--methods", *args.methods],
            args.threads,
        )
        load_after = discipline.load_average()
        if "error" in timing:
            print(f"{name}: timing run failed: {timing['error']}")
            continue
        memory = {} if args.no_memory else {m: _spawn(["--child-memory", name, m], args.threads) for m in args.methods}
        results[name] = summarise(name, timing, memory, load_before, load_after, threads)
        results[name]["raw"] = timing
        rows += table_rows(name, results[name])
        if results[name]["busy"]:
            print(f"{name}: {results[name]['busy']}")
    print()
    print(discipline.markdown_table(HEADERS, rows))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
