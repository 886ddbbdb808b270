"""`datadiet demo` on a tiny configuration: every phase labelled, the pruned dataset saved in the Hub layout that
`datasets.load_dataset` reads, with a card whose `datadiet:` block says how it was made (model, source, command)."""

import json

import numpy as np
import yaml
from datasets import load_dataset

from datadiet.cli import main
from datadiet.data import load_digits_dataset


def test_tiny_demo_saves_a_loadable_dataset_with_a_complete_card(tmp_path, capfd):
    argv = ["demo", "--output_dir", str(tmp_path / "demo"), "--max_rows", "64", "--seeds", "0", "1"]
    argv += ["--score_epochs", "0.5", "--train_steps", "2", "--batch_size", "16"]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    for phase in ("[1/5] scoring", "[2/5] pruning", "[3/5] saving", "[4/5] retraining", "[5/5] report"):
        assert phase in out
    # The progress bars say what trains: each proxy, then each retraining set.
    for label in ("Training proxy seed 0 (1 of 2)", "Training proxy seed 1 (2 of 2)", "Training on full (64 rows)"):
        assert label in err
    assert "Training on EL2N hardest 50% (32 rows), seed 0" in err and "Training on random 50% (32 rows)" in err

    folder = tmp_path / "demo" / "pruned_el2n_hardest"
    pruned = load_dataset(str(folder), split="train")
    assert pruned.column_names == ["image", "label", "el2n", "el2n_std"] and len(pruned) == 32
    # The rows are the 64 digits' own (images and labels), not a copy of something else.
    first = load_digits_dataset()["train"].select(range(64))
    pixels = {np.asarray(image).tobytes(): label for image, label in zip(first["image"], first["label"])}
    assert all(pixels[np.asarray(image).tobytes()] == label for image, label in zip(pruned["image"], pruned["label"]))

    card = (folder / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    block = header["datadiet"]
    assert block["scoring"]["model"] == "resnet10t"
    assert block["scoring"]["methods"] == ["el2n"] and block["scoring"]["seeds"] == [0, 1]
    assert block["scoring"]["train_epochs"] == 0.5
    assert block["source"]["path"] == "sklearn-digits" and block["source"]["split"] == "train"
    assert block["command"] == ["datadiet " + " ".join(argv)]
    assert block["pruning"]["by"] == "el2n" and block["pruning"]["strategy"] == "hardest"
    assert block["pruning"]["keep"] == 0.5 and (block["rows_before"], block["rows_after"]) == (64, 32)
    el2n = np.asarray(pruned["el2n"], dtype=np.float64)
    assert block["score_statistics"]["train"]["el2n"]["max"] == float(f"{el2n.max():.6g}")
    assert {"datadiet", "datasets", "torch", "timm"} <= set(block["versions"])
    # The demo command scores and prunes: the card gives no further "then, on the scored dataset" step.
    for missing in ("an unrecorded source", "was not recorded", "ResNet", "then, on the scored dataset"):
        assert missing not in card

    results = json.loads((tmp_path / "demo" / "results.json").read_text())["results"]
    assert [r["rows"] for r in results.values()] == [64, 32, 32]
    # The table says in words where the saved (hardest) half stands against random, and why it is the showcase.
    gap = 100 * (results["EL2N hardest 50%"]["accuracy"] - results["random 50%"]["accuracy"])
    side = f"{-gap:.1f} pt below random" if gap < 0 else f"{gap:.1f} pt above random"
    assert f"Here the hardest half is {side} (1 retraining seed" in out
    assert "the paper's rule, not a recommendation" in out and "--validation_fraction 0.1" in out
    for name in ("el2n_histogram.png", "hardest_16.png", "accuracy.png", "results.txt"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
