"""A new user's mistakes: each answered by one line that says what is wrong and what to type instead, the same from
the `datadiet` command (no traceback, exit 2) and from Python; and the results that used to be silently wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset

from datadiet import prune, score_dataset
from datadiet.cli import main
from datadiet.cli.parsing import parse_config
from datadiet.cli.push import PushArguments
from datadiet.cli.train import TrainArguments, run_train
from datadiet.data import load_data
from datadiet.models import build_model
from datadiet.provenance import record_provenance


def cli_error(argv: list[str], capsys) -> str:
    """Run `datadiet argv`, check it failed the way a user should see it (exit 2, one line on stderr naming the
    command, no traceback) and return the message after `error: `."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"datadiet {argv[0]}")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0].split(": error: ", 1)[1]


def python_error(function, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        function(*args, **kwargs)
    return str(info.value)


@pytest.fixture(scope="module")
def digits_slice(tmp_path_factory, digits):
    """120 rows of the real digits' training split saved with `save_to_disk`, their source recorded as datadiet's
    `score` records it."""
    folder = tmp_path_factory.mktemp("digits") / "slice"
    subset = record_provenance(digits["train"].select(range(120)), source={"path": "sklearn-digits", "split": "train"})
    subset.save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def scored_folder(tmp_path_factory, digits):
    """200 digits rows with an `el2n`-like score column (the pixel sum, a real per-row number), saved."""
    folder = tmp_path_factory.mktemp("scored") / "scored"
    subset = digits["train"].select(range(200))
    pixels = np.stack([np.asarray(image, dtype=np.float64) for image in subset["image"]])
    subset.add_column("el2n", (pixels.sum(axis=(1, 2)) / 1e4).tolist()).save_to_disk(str(folder))
    return folder


# --- No silent wrong results -----------------------------------------------------------------------------------


def test_train_without_a_test_split_is_refused_naming_the_source(digits_slice, tmp_path, capsys):
    # Before: the training rows were evaluated and printed as "test accuracy" (test_rows == train_rows).
    argv = ["train", "--dataset_name", str(digits_slice), "--max_steps", "5", "--in_chans", "1"]
    message = cli_error(argv + ["--output_dir", str(tmp_path / "train")], capsys)
    assert "--eval_dataset_name sklearn-digits --eval_split test" in message
    args = TrainArguments(str(digits_slice), max_steps=5, in_chans=1, output_dir=str(tmp_path / "train"))
    assert python_error(run_train, args) == message
    assert not (tmp_path / "train" / "results.json").exists()
    # The test split named as the training split is refused too.
    message = cli_error(
        ["train", "--dataset_name", "sklearn-digits", "--eval_split", "train", "--epochs", "1"], capsys
    )
    assert "The test split is the training data" in message and "--eval_dataset_name" in message


def test_train_with_a_test_split_says_which_in_results(digits_slice, tmp_path, capsys):
    output = tmp_path / "train"
    argv = ["train", "--dataset_name", str(digits_slice), "--eval_dataset_name", "sklearn-digits"]
    argv += ["--model_name", "test_resnet", "--in_chans", "1", "--max_steps", "5", "--batch_size", "32"]
    assert main(argv + ["--output_dir", str(output)]) == 0
    assert "tested on 450 rows of sklearn-digits (test)" in capsys.readouterr().out
    results = json.loads((output / "results.json").read_text())
    assert (results["train_rows"], results["test_rows"], results["test_split"]) == (120, 450, "sklearn-digits (test)")


@pytest.mark.parametrize("keep", ["1.5", "2.7", "0", "-0.2"])
def test_keep_outside_its_range_fails_alike_in_the_command_and_in_python(scored_folder, keep, capsys):
    message = cli_error(["prune", "--dataset_name", str(scored_folder), "--keep", keep], capsys)
    assert message == python_error(prune, load_data(str(scored_folder)), "el2n", float(keep))
    assert "a fraction such as 0.5" in message


def test_a_whole_row_count_keeps_that_many_rows_in_both(scored_folder, tmp_path):
    dataset = load_data(str(scored_folder))
    assert (
        main(["prune", "--dataset_name", str(scored_folder), "--keep", "40", "--output_dir", str(tmp_path / "p")]) == 0
    )
    from_command = load_data(str(tmp_path / "p"))
    assert len(from_command) == len(prune(dataset, "el2n", 40)) == len(prune(dataset, "el2n", 40.0)) == 40
    assert from_command["el2n"] == prune(dataset, "el2n", 40)["el2n"]


@pytest.mark.parametrize("by", ["label", "image"])
def test_pruning_by_a_column_that_is_not_a_score_is_refused(scored_folder, by, capsys):
    # Before: "label" pruned by the class ids; "image" raised TypeError: float() argument must be ... not 'dict'.
    message = cli_error(["prune", "--dataset_name", str(scored_folder), "--by", by], capsys)
    assert message == python_error(prune, load_data(str(scored_folder)), by, 0.5)
    assert "prune by a score column: el2n" in message


def test_a_window_or_cut_that_leaves_too_few_rows_is_refused(scored_folder, capsys):
    # Before: offset=0.8 with keep=0.5 silently used offset 0.5.
    argv = ["prune", "--dataset_name", str(scored_folder), "--strategy", "window", "--offset", "0.8", "--keep", "0.5"]
    message = cli_error(argv, capsys)
    dataset = load_data(str(scored_folder))
    assert message == python_error(prune, dataset, "el2n", 0.5, strategy="window", offset=0.8)
    assert "Lower the offset to at most 0.5, or keep at most 0.2" in message
    # As a row count: 160 of 200 rows skipped, 100 asked for.
    assert "offset" in python_error(prune, dataset, "el2n", 100, strategy="window", offset=0.8)
    assert "hard_cutoff" in python_error(prune, dataset, "el2n", 0.5, strategy="stratified", hard_cutoff=0.6)
    # At the limit it is allowed, and skips exactly the hardest `offset`.
    kept = prune(dataset, "el2n", 0.5, strategy="window", offset=0.5)
    ranked = np.sort(np.asarray(dataset["el2n"]))[::-1]
    np.testing.assert_allclose(np.sort(kept["el2n"])[::-1], ranked[100:200])


def test_a_split_a_single_split_folder_does_not_hold_is_refused(digits_slice, capsys):
    # Before: `--split test` was ignored and the training rows were scored.
    message = cli_error(["score", "--dataset_name", str(digits_slice), "--split", "test", "--in_chans", "1"], capsys)
    assert message == python_error(load_data, str(digits_slice), split="test")
    assert "holds a single split (train)" in message and "leave out --split" in message


# --- Every mistake answered with its fix -------------------------------------------------------------------------


def test_one_channel_images_through_a_three_channel_model(digits_slice, digits, tmp_path, capsys):
    # Before: RuntimeError: Given groups=1, weight of size [64, 3, 7, 7], expected input[64, 1, 8, 8] ...
    argv = ["score", "--dataset_name", str(digits_slice), "--model_name", "test_resnet"]
    message = cli_error(argv + ["--output_dir", str(tmp_path / "s")], capsys)
    assert "have 1 channel(s) but the model takes 3" in message and "`--in_chans 1`" in message
    model = build_model("test_resnet", num_classes=10, seed=0)
    message = python_error(score_dataset, digits["train"].select(range(8)), model)
    assert "build it with in_chans=1" in message
    # A model built as the message says scores.
    model = build_model("test_resnet", num_classes=10, in_chans=1, seed=0)
    assert len(score_dataset(digits["train"].select(range(8)), model)["el2n"]) == 8


def test_an_unknown_model_name_suggests_the_closest(digits_slice, tmp_path, capsys):
    argv = ["score", "--dataset_name", str(digits_slice), "--model_name", "resnet99", "--in_chans", "1"]
    message = cli_error(argv + ["--output_dir", str(tmp_path / "s")], capsys)
    assert message.startswith("Unknown timm model 'resnet99': did you mean resnet50") and "resnet18" in message
    assert "datadiet_tiny_nett" in python_error(build_model, "datadiet_tiny_nett", num_classes=3)
    assert "did you mean datadiet_tiny_net" in python_error(build_model, "datadiet_tiny_nett", num_classes=3)


def test_a_broken_recipe_names_its_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "score.yaml"
    recipe.write_text("dataset_name: sklearn-digits\nmethods: [el2n, loss\nbatch_size: 64\n")
    message = cli_error(["score", "--config", str(recipe)], capsys)
    assert message.startswith(f"{recipe}:3:") and "not valid YAML" in message


def test_a_batch_size_of_zero(digits, capsys):
    # Before: range() arg 3 must not be zero.
    message = cli_error(["score", "--dataset_name", "sklearn-digits", "--batch_size", "0"], capsys)
    assert message == "batch_size must be a whole number >= 1, got 0: e.g. batch_size=64."
    assert cli_error(["train", "--dataset_name", "sklearn-digits", "--epochs", "1", "--batch_size", "0"], capsys) == (
        message
    )
    model = build_model("test_resnet", num_classes=10, in_chans=1, seed=0)
    assert python_error(score_dataset, digits["train"].select(range(8)), model, batch_size=0) == message


def test_a_split_a_dataset_does_not_have_names_the_splits(capsys):
    # Before: KeyError: 'validation'.
    message = cli_error(["score", "--dataset_name", "sklearn-digits", "--split", "validation"], capsys)
    assert message == python_error(load_data, "sklearn-digits", split="validation")
    assert "its splits are ['train', 'test']: pass --split train" in message


def test_a_wrong_path_or_a_misspelt_name_says_what_was_tried(tmp_path, capsys):
    # Before: FileNotFoundError deep in datasets; "sklearn-digit" waited on the Hub, then ConnectionError.
    missing = tmp_path / "scores" / "datasett"
    (tmp_path / "scores" / "dataset").mkdir(parents=True)
    message = cli_error(["prune", "--dataset_name", str(missing)], capsys)
    assert message == python_error(load_data, str(missing))
    assert f"no folder {str(missing)!r}" in message and "'sklearn-digits'" in message
    assert f"there is {str(tmp_path / 'scores' / 'dataset')!r}" in message
    message = cli_error(["score", "--dataset_name", "sklearn-digit"], capsys)
    assert message.endswith("did you mean 'sklearn-digits'?")
    # A Hub id form, offline: the local cache is tried, then the same kind of answer.
    message = python_error(load_data, "someone/not-a-cached-dataset")
    assert "not in the local cache (offline" in message and "'sklearn-digits'" in message


def test_an_empty_saved_dataset(tmp_path, capsys):
    # Before: IndexError inside load_from_disk.
    Dataset.from_dict({"el2n": []}).save_to_disk(str(tmp_path / "empty"))
    message = cli_error(["prune", "--dataset_name", str(tmp_path / "empty")], capsys)
    assert message == python_error(load_data, str(tmp_path / "empty"))
    assert "holds an empty dataset (0 rows)" in message
    (tmp_path / "nothing").mkdir()
    assert "no dataset in it" in cli_error(["prune", "--dataset_name", str(tmp_path / "nothing")], capsys)


def test_mistakes_of_the_same_kind_in_other_commands(scored_folder, tmp_path, capsys):
    Dataset.from_dict({"el2n": []}).save_to_disk(str(tmp_path / "empty"))
    message = cli_error(
        ["push", "--dataset_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")], capsys
    )
    assert "holds an empty dataset (0 rows)" in message
    message = cli_error(["report", "hist", "--dataset_name", str(scored_folder), "--columns", "image"], capsys)
    assert message == "Column(s) ['image'] are not score columns of the dataset: pass --columns with some of ['el2n']."
    message = cli_error(["report", "hist", "--dataset_name", str(scored_folder), "--bins", "0"], capsys)
    assert message.startswith("bins must be a whole number >= 1")
    # An unknown score method is refused before any data is read (the dataset name here does not exist).
    message = cli_error(["score", "--dataset_name", str(tmp_path / "nothing"), "--methods", "el2nn"], capsys)
    assert message.startswith("Unknown score method 'el2nn'. Did you mean 'el2n'? Valid methods: el2n,")


def test_a_refused_launch_is_one_clean_line(digits_slice, tmp_path, monkeypatch, capsys):
    # The launch checks' message, once, without a traceback (WORLD_SIZE without a launcher is one of them).
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    argv = ["score", "--dataset_name", str(digits_slice), "--in_chans", "1", "--model_name", "test_resnet"]
    message = cli_error(argv + ["--output_dir", str(tmp_path / "s")], capsys)
    assert "WORLD_SIZE=2" in message and "torchrun --nproc_per_node 2" in message


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="its splits are"):
        main(["score", "--dataset_name", "sklearn-digits", "--split", "validation", "--debug"])


# --- --help ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "listed"),
    [
        (["score", "--help"], "methods: el2n, entropy, grand, input_norm, loss, margin"),
        (["prune", "--help"], "strategies: easiest, hardest, random, stratified, window"),
        (["report", "curve", "--help"], "--keep_fractions"),
    ],
)
def test_help_shows_the_subcommand_its_config_and_its_choices(argv, listed, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr().out
    command = " ".join(a for a in argv if a != "--help")
    assert out.startswith(f"usage: datadiet {command} [-h]")
    assert "--config RECIPE.yaml" in out and listed in out


def test_boolean_flags_take_no_value():
    (args,) = parse_config((PushArguments,), ["--dataset_path", "d", "--output_dir", "o", "--private"])
    assert args.private is True
    (args,) = parse_config((PushArguments,), ["--dataset_path", "d", "--output_dir", "o"])
    assert args.private is False


# --- Deterministic scores get no spread ----------------------------------------------------------------------------


def test_a_score_of_the_inputs_alone_has_no_std_column(digits, tmp_path):
    # Before: `input_norm_std` was a column of zeros.
    subset = digits["train"].select(range(16))
    common = dict(
        methods=["el2n", "input_norm"],
        model_init=lambda seed: build_model("test_resnet", num_classes=10, in_chans=1, seed=seed),
        seeds=[0, 1],
    )
    pixels = np.stack([np.asarray(image, dtype=np.float64).ravel() / 255 for image in subset["image"]])
    # In memory, and streamed through the resumable shards (the other place the spread over seeds is taken).
    stream = subset.add_column("row_id", list(range(16))).to_iterable_dataset()
    for scored in (
        score_dataset(subset, **common),
        score_dataset(stream, row_id_column="row_id", output_dir=tmp_path / "stream", **common).sort("row_id"),
    ):
        assert "el2n_std" in scored.column_names and "input_norm_std" not in scored.column_names
        assert np.asarray(scored["el2n_std"]).max() > 0
        np.testing.assert_allclose(scored["input_norm"], np.linalg.norm(pixels, axis=1), rtol=1e-5)


def test_prune_from_a_selection_uses_the_cell_chosen_on_validation_rows(scored_folder, tmp_path, capsys):
    # A selection.json as `datadiet report curve --validation_fraction ...` writes it, with two keep fractions.
    chosen = [
        {
            "score": "el2n",
            "strategy": "window@0.1",
            "prune": {"by": "el2n", "keep": 0.3, "strategy": "window", "offset": 0.1},
        },
        {"score": "el2n", "strategy": "hardest", "prune": {"by": "el2n", "keep": 0.6, "strategy": "hardest"}},
    ]
    selection = tmp_path / "curve" / "selection.json"
    selection.parent.mkdir()
    selection.write_text(json.dumps({"evaluated_on": "validation", "chosen": chosen}))
    output = tmp_path / "pruned"
    argv = ["prune", "--dataset_name", str(scored_folder), "--from_selection", str(selection.parent)]
    argv += ["--output_dir", str(output)]
    assert main([*argv, "--keep", "0.3"]) == 0
    # Reference: the 200 scores sorted from the hardest, the hardest 10% (20 rows) skipped, the next 30% (60) kept.
    values = np.asarray(load_data(str(scored_folder))["el2n"])
    expected = np.sort(values)[::-1][20:80]
    assert sorted(load_data(str(output))["el2n"]) == sorted(expected.tolist())
    # Two keep fractions and none named: which one is ambiguous. A flag that contradicts the selection is refused.
    assert "pass --keep with one of them" in cli_error(argv, capsys)
    message = cli_error([*argv, "--keep", "0.3", "--strategy", "easiest"], capsys)
    assert message.startswith("--strategy easiest conflicts with") and "chose strategy=window" in message
