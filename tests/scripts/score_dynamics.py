"""`score_dataset` with training-dynamics methods, one process or under `accelerate launch`: each process records,
through a plain forward hook on its own MLP, the inputs and logits of every train-mode forward pass
(`RESULT/rank-<i>-seed-<s>.npz`), and the main process writes the score columns (`RESULT/scores.npz`).

    python score_dynamics.py DATA_DIR RESULT_DIR EPOCHS PER_DEVICE_BATCH_SIZE SEED [SEED ...]
"""

import sys
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from torch import nn

from datadiet import score_dataset
from datadiet.engine import get_process_state

METHODS = ["forgetting", "aum", "confidence", "variability", "correctness"]

torch.set_num_threads(1)
data, result, epochs, batch_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
seeds = [int(seed) for seed in sys.argv[5:]]
calls: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}


def model_init(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    recorded = calls.setdefault(seed, [])

    def hook(module, args, output):
        if module.training:
            recorded.append((args[0].detach().float().numpy().copy(), output.detach().float().numpy().copy()))

    model.register_forward_hook(hook)
    return model


training = {"train_epochs": epochs, "training_kwargs": {"learning_rate": 0.02}}
scored = score_dataset(load_from_disk(data), model_init=model_init, methods=METHODS, seeds=seeds, **training,
                       batch_size=batch_size, image_column="pixels")  # fmt: skip
state = get_process_state()  # the processes datadiet set up (CPU, gloo)
result.mkdir(parents=True, exist_ok=True)
for seed, recorded in calls.items():
    np.savez(
        result / f"rank-{state.process_index}-seed-{seed}.npz",
        inputs=np.concatenate([inputs for inputs, _ in recorded]),
        logits=np.concatenate([logits for _, logits in recorded]),
        batches=np.array([len(inputs) for inputs, _ in recorded]),
    )
if state.is_main_process:
    names = [name for name in scored.column_names if name.split("_std")[0] in METHODS]
    np.savez(result / "scores.npz", world=state.num_processes, **{name: np.asarray(scored[name]) for name in names})
