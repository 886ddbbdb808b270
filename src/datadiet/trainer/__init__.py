"""`DataDietTrainer(Trainer)` with its `DataDietConfig(TrainingArguments)`, and `ScoreCallback` for a stock `Trainer`:
per-example scores tracked during training, scoring passes at chosen epochs, dynamic pruning."""

from .callback import ScoreCallback
from .config import DataDietConfig
from .proxy import train_proxy_model
from .trainer import DataDietTrainer
from .views import RowIdDataset, with_row_ids

__all__ = ["DataDietConfig", "DataDietTrainer", "RowIdDataset", "ScoreCallback", "train_proxy_model", "with_row_ids"]
