"""The `datadiet` command: recipes parse, YAML + flag overrides, score/prune end to end on real CIFAR-10."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datadiet.cli import main
from datadiet.cli.parsing import parse_config
from datadiet.cli.prune import PruneArguments
from datadiet.cli.score import ScoreArguments
from datadiet.cli.train import TrainArguments
from datadiet.curve import CurveArguments
from datadiet.curve.sft import SFTCurveArguments

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate_configs" not in p.parts)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_parses(recipe):
    kind = recipe.stem.split("_")[0]
    arguments = {"score": ScoreArguments, "prune": PruneArguments, "train": TrainArguments, "curve": CurveArguments}
    arguments["study"] = SFTCurveArguments  # recipes/sft/study.yaml: the SFT curve (`datadiet report sft-curve`)
    if kind not in arguments:
        pytest.fail(f"{recipe} is not a score/prune/train/curve/study recipe; teach this test how to parse it")
    (parsed,) = parse_config((arguments[kind],), ["--config", str(recipe)])
    assert parsed.output_dir == yaml.safe_load(recipe.read_text())["output_dir"]


def test_flags_override_the_recipe_and_unknown_keys_fail(tmp_path):
    recipe = tmp_path / "score.yaml"
    recipe.write_text("dataset_name: x\nmethods: [el2n, loss]\nbatch_size: 64\nmodel_kwargs: {drop_rate: 0.1}\n")
    (args,) = parse_config((ScoreArguments,), ["--config", str(recipe), "--batch_size", "8"])
    assert args.batch_size == 8 and args.methods == ["el2n", "loss"] and args.model_kwargs == '{"drop_rate": 0.1}'
    recipe.write_text("dataset_name: x\nbatch_sise: 64\n")
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['batch_sise'\]"):
        parse_config((ScoreArguments,), ["--config", str(recipe)])
    with pytest.raises(ValueError, match="no_such_flag"):
        parse_config((ScoreArguments,), ["--dataset_name", "x", "--no_such_flag", "1"])


def test_cli_el2n_on_cifar10_equals_a_direct_computation(cifar10_train, tmp_path, capsys):
    from datasets import load_from_disk
    from safetensors.torch import save_model

    from datadiet.models import build_model

    subset = cifar10_train.select(range(2000))
    subset.save_to_disk(str(tmp_path / "slice"))
    model = build_model("test_resnet", num_classes=10, seed=123).eval()
    save_model(model, str(tmp_path / "weights.safetensors"))
    code = main(
        [
            "score",
            "--config",
            str(REPO / "recipes/cifar10/score.yaml"),
            "--dataset_name",
            str(tmp_path / "slice"),
            "--data_files",
            "",
            "--model_name",
            "test_resnet",
            "--model_weights",
            str(tmp_path / "weights.safetensors"),
            "--methods",
            "el2n",
            "--seeds",
            "0",
            "--output_dir",
            str(tmp_path / "scores"),
        ]
    )
    assert code == 0
    scored = load_from_disk(str(tmp_path / "scores" / "dataset"))
    # Direct computation: numpy decode + normalise, the model in one batch, numpy softmax.
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    images = np.stack([np.asarray(img, dtype=np.float64) / 255.0 for img in subset["img"]])
    x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in x.split(500)]).double().numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = np.linalg.norm(probs - np.eye(10)[np.asarray(subset["label"])], axis=1)
    np.testing.assert_allclose(np.asarray(scored["el2n"]), expected, atol=1e-5, rtol=0)

    code = main(
        [
            "prune",
            "--config",
            str(REPO / "recipes/cifar10/prune.yaml"),
            "--dataset_name",
            str(tmp_path / "scores"),
            "--output_dir",
            str(tmp_path / "pruned"),
        ]
    )
    assert code == 0
    pruned = load_from_disk(str(tmp_path / "pruned"))
    assert len(pruned) == 1000
    from datadiet import read_provenance

    steps = [step["command"] for step in read_provenance(pruned)["steps"]]
    assert steps[1].startswith("datadiet prune --config")
    assert (
        len(steps) == 2
        and steps[0].startswith("datadiet score --config")
        and read_provenance(pruned)["pruning"]["keep"] == 0.5
    )
    # class_balanced window: in every class, the hardest 10% are skipped and the next 50% kept.
    labels = np.asarray(subset["label"])
    kept_scores = np.asarray(pruned["el2n"])
    for c in range(10):
        ranked = np.sort(expected[labels == c])[::-1]
        skip = int(round(0.1 * len(ranked)))
        kept_c = np.sort(kept_scores[np.asarray(pruned["label"]) == c])[::-1]
        np.testing.assert_allclose(kept_c, ranked[skip : skip + len(kept_c)], atol=1e-6)


def test_a_score_run_detects_builds_and_checks_each_thing_once(tmp_path):
    """A `datadiet score` run training two proxies detects the columns, builds the preprocessor, checks the input
    channels and checks the methods once each (calls counted by the interpreter's profiler; nothing replaced)."""
    import sys
    import threading
    from collections import Counter

    from datasets import load_from_disk

    from datadiet.data import Preprocessor, check_input_channels, detect_columns
    from datadiet.engine.dynamics import split_methods

    watched = {f.__code__: f.__qualname__ for f in (detect_columns, Preprocessor.__init__, check_input_channels)}
    watched[split_methods.__code__] = "split_methods"
    calls = Counter()

    def count(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            calls[watched[frame.f_code]] += 1

    argv = ["score", "--dataset_name", "sklearn-digits", "--max_rows", "48", "--model_name", "test_resnet"]
    argv += ["--in_chans", "1", "--seeds", "0", "1", "--train_epochs", "1", "--methods", "el2n", "forgetting"]
    sys.setprofile(count)
    threading.setprofile(count)
    try:
        code = main([*argv, "--batch_size", "16", "--output_dir", str(tmp_path)])
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    assert code == 0
    assert calls == dict.fromkeys(watched.values(), 1)
    scored = load_from_disk(str(tmp_path / "dataset"))
    assert scored.column_names == ["image", "label", "el2n", "el2n_std", "forgetting", "forgetting_std"]
    # The classification tasks' names check the classifiers' methods, as `score_dataset` does.
    assert ScoreArguments("x", task="image_classification", methods=["el2n"]).scoring_methods == (["el2n"], [])


def test_cli_reports_bad_input_as_an_error_message(tmp_path, capsys):
    assert (
        main(
            [
                "score",
                "--dataset_name",
                str(tmp_path / "missing.parquet"),
                "--data_files",
                str(tmp_path / "missing.parquet"),
            ]
        )
        == 2
    )
    assert "Data file(s) not found" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["score", "--help"], "--methods"),
        (["prune", "--help"], "--strategy"),
        (["push", "--help"], "--repo_id"),
        (["train", "--help"], "--max_steps"),
        (["demo", "--help"], "--retrain_seeds"),
        (["report", "curve", "--help"], "--keep_fractions"),
        (["report", "hist", "--help"], "--columns"),
    ],
)
def test_every_subcommand_dispatches(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert flag in capsys.readouterr().out
    for usage in (["--help"], ["report", "--help"]):
        assert main(usage) == 0
    assert "curve" in capsys.readouterr().out


def test_python_dash_m_entry_points_run_the_command():
    import subprocess
    import sys

    for module in ("datadiet", "datadiet.cli"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True)
        assert "usage: datadiet <command>" in result.stdout


def test_shared_argument_fields_keep_each_command_s_order_and_defaults():
    from dataclasses import fields

    data = ["dataset_name", "data_files", "split", "eval_dataset_name", "eval_data_files", "eval_split"]
    data += ["max_rows", "max_eval_rows", "image_column", "label_column"]
    model = ["model_name", "model_library", "model_kwargs", "in_chans", "image_size", "mean", "std"]
    # results.json and summary.json write the arguments in field order: it must not move (new fields may come in
    # between: the classes kept, and the checkpoint a model starts from).
    new = ["keep_classes", "model_name_or_path", "checkpoint_file", "gguf_file", "proxy_model_name"]
    train_fields = [f.name for f in fields(TrainArguments)][:21]
    assert [name for name in train_fields if name not in new] == data + model and set(new[:4]) <= set(train_fields)
    curve_fields = [f.name for f in fields(CurveArguments)][:19]
    assert [name for name in curve_fields if name not in new] == data + ["model_name", "model_kwargs", "mean", "std"]
    assert CurveArguments("x", max_steps=10).model_name == "datadiet_cifar_net"
    assert ScoreArguments("x").model_name == TrainArguments("x", epochs=1).model_name == "resnet18"
    with pytest.raises(ValueError, match="model_library"):
        TrainArguments("x", epochs=1, model_library="keras")
    # `datadiet score` scores one split: the test-split fields are neither flags nor recipe keys there.
    split_only = ["dataset_name", "data_files", "split", "max_rows", "image_column", "label_column"]
    assert [f.name for f in fields(ScoreArguments) if f.init][:6] == split_only
    with pytest.raises(TypeError, match="eval_split"):
        ScoreArguments("x", eval_split="validation")
    with pytest.raises(ValueError, match="eval_split"):
        parse_config((ScoreArguments,), ["--dataset_name", "x", "--eval_split", "validation"])
