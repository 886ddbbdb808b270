"""A user's training script that builds its own `Accelerator` before DataDietTrainer, as many scripts do:

    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml own_accelerator.py OUTPUT_DIR [--cpu]

Without `--cpu` (cpu=False on a machine with no GPU) each of the two processes believes it is alone; datadiet must
refuse it. With `--cpu`, training runs data-parallel and the script prints the world size the Trainer saw.
"""

import sys

import numpy as np
import torch
from accelerate import Accelerator

accelerator = Accelerator(cpu="--cpu" in sys.argv)

from datasets import Dataset  # noqa: E402
from torch import nn  # noqa: E402

from datadiet.models import ClassifierWrapper  # noqa: E402
from datadiet.trainer import DataDietConfig, DataDietTrainer  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
data = Dataset.from_dict(
    {"pixel_values": np.random.default_rng(0).random((32, 8), dtype=np.float32), "labels": np.arange(32) % 2}
).with_format("torch")
config = DataDietConfig(
    output_dir=sys.argv[1], num_train_epochs=1, per_device_train_batch_size=8, report_to=[], save_strategy="no",
    disable_tqdm=True,
)  # fmt: skip
trainer = DataDietTrainer(model=ClassifierWrapper(nn.Linear(8, 2)), args=config, train_dataset=data)
trainer.train()
print(f"trained: world size {trainer.args.world_size}, process {trainer.args.process_index}", flush=True)
