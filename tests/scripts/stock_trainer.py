"""A stock `transformers.Trainer` with `ScoreCallback`, as a user's training script runs it:

    accelerate launch [launch flags] stock_trainer.py OUTPUT_DIR [--use_cpu]

`accelerate launch --cpu --num_processes 2` starts one process, and under cpu_2proc.yaml a `TrainingArguments` without
`use_cpu=True` (on a machine with no GPU) leaves each of the two processes training alone: the callback must refuse
both, naming the working launches, before any row is recorded. With `--use_cpu` under cpu_2proc.yaml, training runs
data-parallel and the script prints the world size the Trainer saw and the rows scored.
"""

import sys

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainingArguments

from datadiet.models import ClassifierWrapper
from datadiet.trainer import ScoreCallback

torch.set_num_threads(1)
generator = torch.Generator().manual_seed(0)
features = torch.randn(32, 8, generator=generator)
data = Dataset.from_dict({"pixel_values": features, "labels": (features[:, 0] > 0).long()}).with_format("torch")
torch.manual_seed(0)
args = TrainingArguments(
    sys.argv[1], num_train_epochs=2, per_device_train_batch_size=8, report_to=[], save_strategy="no",
    disable_tqdm=True, label_names=["labels"], remove_unused_columns=False, use_cpu="--use_cpu" in sys.argv,
)  # fmt: skip
callback = ScoreCallback(["forgetting", "aum"])
trainer = Trainer(ClassifierWrapper(nn.Linear(8, 2)), args, train_dataset=data, callbacks=[callback])
trainer.train()
scored = callback.add_scores(data)
print(
    f"trained: world size {args.world_size}, process {args.process_index}, rows {len(scored)}, "
    f"forgetting {np.asarray(scored['forgetting']).round(4).tolist()}",
    flush=True,
)
