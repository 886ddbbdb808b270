"""`datadiet push`: save a scored or pruned dataset with its card to a folder and/or the Hugging Face Hub."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .parsing import parse_config

__all__ = ["PushArguments", "main", "run_push"]


@dataclass
class PushArguments:
    """Arguments of `datadiet push`: publish a scored or pruned dataset saved with `Dataset.save_to_disk`."""

    dataset_path: str | None = field(
        default=None, metadata={"help": "Folder written by `Dataset.save_to_disk` (a Dataset or a DatasetDict)."}
    )
    repo_id: str | None = field(
        default=None, metadata={"help": "Hub dataset repository to push to, e.g. `me/cifar10-el2n-keep50`."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Local folder to write the same files to (works offline)."}
    )
    scores_only: bool = field(
        default=False, metadata={"help": "Publish only the row id and score columns, not the data."}
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier save in a non-empty `output_dir`."})

    def __post_init__(self):
        if not self.dataset_path:
            raise ValueError("dataset_path is required: the folder written by `Dataset.save_to_disk`.")
        if not self.repo_id and not self.output_dir:
            raise ValueError("Nothing to do: give repo_id (push to the Hub), output_dir (write locally), or both.")


def run_push(args: PushArguments) -> dict[str, Any]:
    """Load `args.dataset_path` and write it to `args.output_dir` and/or push it to `args.repo_id`.

    Returns:
        `dict`: `{"output_dir": Path | None, "commit": CommitInfo | None}`.

    Example:
    ```python
    >>> import tempfile
    >>> from datasets import Dataset
    >>> from datadiet.cli.push import PushArguments, run_push
    >>> folder = tempfile.mkdtemp()
    >>> Dataset.from_dict({"text": ["a", "b"], "label": [0, 1], "el2n": [0.2, 0.8]}).save_to_disk(f"{folder}/pruned")
    >>> result = run_push(PushArguments(dataset_path=f"{folder}/pruned", output_dir=f"{folder}/pruned-hub"))
    >>> sorted(path.name for path in result["output_dir"].iterdir()), result["commit"]
    (['README.md', 'data', 'score_histogram.png'], None)

    ```
    """
    from ..loading import load_saved
    from ..validation import check_hub_reachable

    if args.repo_id and not args.output_dir and not _offline():
        # Before the seconds of importing the hub layer and reading the data (push_to_hub checks again).
        check_hub_reachable(
            "write the same files locally with save_pruned(dataset, folder) / `datadiet push --output_dir FOLDER`."
        )
    from ..hub import push_to_hub, save_pruned

    if not Path(args.dataset_path).is_dir():
        raise ValueError(f"dataset_path={args.dataset_path!r} is not a folder; pass a `Dataset.save_to_disk` folder.")
    dataset = load_saved(args.dataset_path)
    result: dict[str, Any] = {"output_dir": None, "commit": None}
    if args.output_dir:
        result["output_dir"] = save_pruned(
            dataset, args.output_dir, scores_only=args.scores_only, repo_id=args.repo_id, overwrite=args.overwrite
        )
    if args.repo_id:
        result["commit"] = push_to_hub(
            dataset, args.repo_id, private=args.private or None, revision=args.revision, scores_only=args.scores_only
        )
    return result


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def main(argv: list[str]) -> int:
    """`datadiet push [--config recipe.yaml] [--flag value ...]`; returns the exit code."""
    (args,) = parse_config((PushArguments,), argv)
    run_push(args)
    return 0
