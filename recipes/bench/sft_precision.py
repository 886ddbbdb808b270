"""How close the exact per-example LoRA grad norms and the naive batch-size-1 loop (both float32) are to the same
naive loop run in float64, on the SFT bench's batch (SmolLM2-135M, LoRA r = 16, 8 x 256 Alpaca tokens, after one
training step so that every adapter has a gradient). The bench (`sft.py`) compares the exact norms with the float32
naive loop only; this says which of the two is nearer the float64 values.

    python recipes/bench/sft_precision.py --output outputs/bench/sft_precision.json

Any other flag is the bench's (`--model tiny --batch_size 3 --max_length 48` for the test's tiny Llama).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sft  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None)
    args, bench_argv = parser.parse_known_args(argv)
    output = args.output
    state = sft.build(sft.parse_args(bench_argv))  # the bench's model and batch (SmolLM2 by default)
    sft.RUNNERS["train"](state)
    model, batch = state["model"], state["batch"]
    model.eval()
    ours32 = sft.RUNNERS["grand"](state).double()
    naive32 = sft.naive_norms(model, batch, torch.float32)
    model.double()
    reference = sft.naive_norms(model, batch, torch.float64)
    ours64 = sft.RUNNERS["grand"](state).double()
    result = {
        "rows": state["rows"],
        "reference": "naive batch-size-1 loop, model and loss in float64",
        "max_rel_diff": {
            "exact norms (float32) vs reference": float(((ours32 - reference).abs() / reference).max()),
            "naive loop (float32) vs reference": float(((naive32 - reference).abs() / reference).max()),
            "exact norms (float32) vs naive loop (float32)": float(((ours32 - naive32).abs() / naive32).max()),
            "exact norms (float64) vs reference": float(((ours64 - reference).abs() / reference).max()),
        },
    }
    print(json.dumps(result, indent=2))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
