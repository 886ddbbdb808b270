"""Pruned datasets (or their scores alone) to the Hugging Face Hub in one commit, with their dataset card; the
arguments and runner of `datadiet push`."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from ..validation import check_hub_reachable
from .save import DATA_DIR, save_pruned

logger = logging.getLogger(__name__)

__all__ = ["push_to_hub"]


def push_to_hub(
    dataset: Dataset | DatasetDict,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    scores_only: bool = False,
    commit_message: str | None = None,
    create_pr: bool = False,
    **kwargs: Any,
):
    """Push `dataset` (pruned, or its scores alone) to the Hub dataset repository `repo_id` with its dataset card.

    The files are those `save_pruned` writes (built in a temporary folder), uploaded in one commit with
    `huggingface_hub.HfApi.upload_folder`; Parquet shards left in `data/` by an earlier push are deleted in the same
    commit, so the repository holds exactly this dataset. The token is handed to `HfApi` only: it is never written to
    a file or a log.

    Args:
        dataset (`Dataset` or `DatasetDict`):
            The dataset to push.
        repo_id (`str`):
            The dataset repository, `"user/name"`; created if missing.
        token (`str`, *optional*):
            A Hub token with write access; by default the one from `hf auth login` or `HF_TOKEN`.
        private (`bool`, *optional*):
            Visibility of a repository created here (an existing repository keeps its own).
        revision (`str`, *optional*):
            The branch to push to (created if missing); `main` by default.
        scores_only (`bool`, *optional*, defaults to `False`):
            Push only the row id and score columns (see `save_pruned`).
        commit_message (`str`, *optional*):
            The commit message.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request instead of committing to the branch.
        kwargs:
            Passed to `save_pruned` (`provenance`, `source`, `command`, `score_columns`, `pretty_name`, ...).

    Returns:
        `huggingface_hub.CommitInfo`: the commit.

    Example (the push itself needs the network and a Hub token with write access, so it is not run as a doctest):
    ```python
    >>> from datasets import Dataset
    >>> from datadiet import prune
    >>> from datadiet.hub import push_to_hub
    >>> scored = Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1], "el2n": [0.1, 0.9, 0.4, 0.7]})
    >>> pruned = prune(scored, "el2n", keep=0.5)
    >>> push_to_hub(pruned, "me/my-dataset-el2n-keep50", private=True)  # doctest: +SKIP

    ```
    """
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repository id; use 'user/name' (letters, digits, -_.).")
    from huggingface_hub import constants

    # Fail before building the files: with offline mode on, every HfApi call would raise after that work.
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            "HF_HUB_OFFLINE is set, so nothing can be pushed. Unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to push, "
            "or write the same files locally with save_pruned(dataset, folder) / `datadiet push --output_dir`."
        )
    check_hub_reachable(
        "write the same files locally with save_pruned(dataset, folder) / `datadiet push --output_dir FOLDER`."
    )
    for reserved in ("folder", "overwrite"):
        if reserved in kwargs:
            raise ValueError(
                f"push_to_hub builds its own folder: drop {reserved}= (use save_pruned to write locally)."
            )
    with tempfile.TemporaryDirectory(prefix="datadiet-push-") as tmp:
        folder = save_pruned(dataset, Path(tmp) / "repo", scores_only=scores_only, repo_id=repo_id, **kwargs)
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        what = "scores" if scores_only else "pruned dataset"
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="dataset",
            revision=revision,
            commit_message=commit_message or f"Upload {what} with datadiet",
            create_pr=create_pr,
            delete_patterns=[f"{DATA_DIR}/*.parquet"],
        )
    logger.info("Pushed the %s to https://huggingface.co/datasets/%s", what, repo_id)
    return commit
