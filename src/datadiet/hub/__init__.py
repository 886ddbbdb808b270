"""Pruned datasets (or their scores alone) to a local folder or the Hugging Face Hub, in the layout
`Dataset.push_to_hub` produces, with a dataset card recording how they were made."""

from .push import push_to_hub
from .save import save_pruned

__all__ = ["push_to_hub", "save_pruned"]
