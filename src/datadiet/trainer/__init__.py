"""`DataDietTrainer(Trainer)` with its `DataDietConfig(TrainingArguments)`, and `ScoreCallback` for a stock `Trainer`:
per-example scores tracked during training, scoring passes at chosen epochs, dynamic pruning."""

from .callback import RowIdDataset, ScoreCallback, with_row_ids
from .config import DataDietConfig
from .proxy import train_proxy_model
from .trainer import DataDietTrainer

__all__ = ["DataDietConfig", "DataDietTrainer", "RowIdDataset", "ScoreCallback", "train_proxy_model", "with_row_ids"]
