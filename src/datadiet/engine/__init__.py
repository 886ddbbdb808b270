"""The scoring engine: runs models over a dataset with accelerate, each row scored exactly once, partial results
kept in `output_dir` so that an interrupted run resumes."""

from .process import get_process_state
from .score import score_dataset
from .store import join_scores, load_scores

__all__ = ["get_process_state", "join_scores", "load_scores", "score_dataset"]
