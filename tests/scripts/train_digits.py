"""DataDietTrainer on 50 scikit-learn digits for two epochs, one process or under `accelerate launch` (the config does
not set use_cpu): writes the world size, the optimizer steps, the rows each process forwarded (summed), the score
histories, the scores and the row ids of the scores written to output_dir to an .npz.

    python train_digits.py RESULT.npz PER_DEVICE_BATCH_SIZE
"""

import sys

import numpy as np
import torch
from datasets import Dataset
from sklearn.datasets import load_digits
from torch import nn

from datadiet import load_scores
from datadiet.models import ClassifierWrapper
from datadiet.trainer import DataDietConfig, DataDietTrainer

torch.set_num_threads(1)
output, batch_size = sys.argv[1], int(sys.argv[2])
digits = load_digits()
_, first = np.unique(digits.data, axis=0, return_index=True)
rows = np.sort(first)[:50]
data = Dataset.from_dict(
    {"pixel_values": (digits.data[rows] / 16.0).astype(np.float32), "labels": digits.target[rows]}
).with_format("torch")
torch.manual_seed(0)
model = ClassifierWrapper(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)))
seen = []


def count(module, args, kwargs, out):
    if module.training:
        seen.append(len(out["logits"]))


model.register_forward_hook(count, with_kwargs=True)
config = DataDietConfig(
    output_dir=output + ".out",
    num_train_epochs=2,
    per_device_train_batch_size=batch_size,
    learning_rate=0.05,
    optim="sgd",
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    save_strategy="no",
    disable_tqdm=True,
    logging_strategy="no",
    report_to=[],
    seed=0,
    score_epochs=[2],
    score_methods=["el2n"],
)
trainer = DataDietTrainer(model, config, train_dataset=data)
trainer.train()
total = torch.tensor(sum(seen))
if torch.distributed.is_initialized():
    torch.distributed.all_reduce(total)
if trainer.is_world_process_zero():
    scores = trainer.scores
    np.savez(
        output,
        world_size=trainer.args.world_size,
        global_step=trainer.state.global_step,
        forward_rows=int(total),
        on_disk_row_id=np.asarray(load_scores(output + ".out/scores")["row_id"]),
        **{"history_" + name: values for name, values in trainer.score_history.items()},
        **{name: np.asarray(scores[name]) for name in scores.column_names},
    )
if torch.distributed.is_initialized():  # end cleanly: no communication thread left running at exit
    torch.distributed.destroy_process_group()
