"""`load_data` on what datadiet writes: the output_dir of `datadiet score` gives its scored dataset, never the
partial score shards beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from datadiet.cli import main
from datadiet.data import load_data

REPO = Path(__file__).resolve().parents[1]


def test_load_data_on_a_score_output_dir_gives_the_scored_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    output_dir = tmp_path / "scores"
    argv = [
        "score", "--config", "recipes/digits/score.yaml", "--model_name", "datadiet_tiny_net", "--seeds", "0",
        "--train_epochs", "0", "--methods", "el2n", "grand", "--max_rows", "300", "--output_dir", str(output_dir),
    ]  # fmt: skip
    assert main(argv) == 0
    assert (output_dir / "partial").is_dir()  # the shards that load_data must not return

    loaded = load_data(str(output_dir))
    saved = load_from_disk(str(output_dir / "dataset"))
    assert len(loaded) == 300
    assert loaded.column_names == ["image", "label", "el2n", "grand"]
    assert loaded["label"] == saved["label"]
    np.testing.assert_array_equal(np.asarray(loaded["el2n"]), np.asarray(saved["el2n"]))

    shutil.rmtree(output_dir / "dataset")  # as after an interrupted run
    with pytest.raises(ValueError, match="partial score shards .* rerun the same command"):
        load_data(str(output_dir))
