"""Every dataset recipe folder runs end to end on a tiny slice: score -> prune -> train (timm) -> train (ViT), with
the recipe's own models, transforms and arguments, only the sizes and budgets shrunk."""

import json
from pathlib import Path

import pytest
from conftest import CIFAR10_TRAIN, MNIST_TRAIN
from datasets import load_from_disk

from datadiet.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["digits", "mnist", "cifar10"])
def test_recipe_folder_smoke_runs(folder, tmp_path, monkeypatch):
    needed = {"mnist": MNIST_TRAIN, "cifar10": CIFAR10_TRAIN}.get(folder)
    if needed is not None and not needed.exists():
        pytest.skip(f"shared data file {needed} is absent (the {folder} recipes read ../shared/data)")
    monkeypatch.chdir(REPO)  # recipes give data paths relative to the repository root
    recipes = REPO / "recipes" / folder
    scores, pruned = tmp_path / "scores", tmp_path / "pruned"
    assert (
        main(
            [
                "score",
                "--config",
                str(recipes / "score.yaml"),
                "--max_rows",
                "48",
                "--seeds",
                "0",
                "1",
                "--train_epochs",
                "0.5",
                "--batch_size",
                "16",
                "--output_dir",
                str(scores),
            ]
        )
        == 0
    )
    scored = load_from_disk(str(scores / "dataset"))
    assert len(scored) == 48
    from datadiet import read_provenance

    methods = read_provenance(scored)["scoring"]["methods"]
    assert all(method in scored.column_names for method in methods)
    # A spread over the two seeds for every score that depends on the model; none for a score of the inputs alone.
    with_spread = [method for method in methods if f"{method}_std" in scored.column_names]
    assert with_spread == [method for method in methods if method != "input_norm"]
    assert (
        main(
            [
                "prune",
                "--config",
                str(recipes / "prune.yaml"),
                "--dataset_name",
                str(scores),
                "--output_dir",
                str(pruned),
            ]
        )
        == 0
    )
    kept = load_from_disk(str(pruned))
    assert 0 < len(kept) < 48
    for recipe in ("train_timm.yaml", "train_vit.yaml"):
        out = tmp_path / recipe
        assert (
            main(
                [
                    "train",
                    "--config",
                    str(recipes / recipe),
                    "--dataset_name",
                    str(pruned),
                    "--max_eval_rows",
                    "32",
                    "--max_steps",
                    "2",
                    "--batch_size",
                    "8",
                    "--seeds",
                    "0",
                    "--output_dir",
                    str(out),
                ]
            )
            == 0
        )
        results = json.loads((out / "results.json").read_text())
        assert results["train_rows"] == len(kept) and results["test_rows"] == 32
        assert 0.0 <= results["accuracy_mean"] <= 1.0 and (out / "data_map.png").exists()
