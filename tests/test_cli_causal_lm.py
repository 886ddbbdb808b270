"""`datadiet score --task causal_lm` end to end on real Alpaca rows with a tiny random Llama (SmolLM2's tokenizer and
chat template): the columns against each row computed alone by hand, `prune` and `push` to a folder that
`load_dataset` reads with a text-generation card, two processes against one, `less` from a real TRL warm-up run
against an autograd reference, and the bad-input refusals."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALPACA, SHARED_DATA, require_shared_data
from datasets import load_dataset, load_from_disk

from datadiet.cli import main
from datadiet.provenance import read_provenance

REPO = Path(__file__).resolve().parents[1]
DOLLY = SHARED_DATA / "instructions" / "dolly_3k"
BIN = Path(sys.executable).parent


def _environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _score_argv(model: Path, output: Path, *extra: str) -> list[str]:
    return [
        *("score", "--task", "causal_lm", "--model_name_or_path", str(model)),
        *("--dataset_name", str(ALPACA.parent), "--max_rows", "6", "--max_length", "96", "--batch_size", "4"),
        *("--output_dir", str(output), *extra),
    ]


def _rows():
    require_shared_data(ALPACA)
    return load_dataset("parquet", data_files=str(ALPACA), split="train").select(range(6))


def _alone(model, tokenizer, row) -> tuple[torch.Tensor, torch.Tensor]:
    """A row tokenised alone as TRL's prompt-completion rows are (chat template; loss on the completion only): the
    logits `[T, V]` and the labels `[T]` (-100 on the prompt)."""
    prompt = [
        {"role": "user", "content": f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]}
    ]
    full = prompt + [{"role": "assistant", "content": row["output"]}]
    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"][:96]
    start = next(
        (i for i, (a, b) in enumerate(zip(prompt_ids["input_ids"], ids)) if a != b), len(prompt_ids["input_ids"])
    )
    labels = torch.tensor([-100] * start + ids[start:])
    return model(input_ids=torch.tensor([ids])).logits[0], labels


def _row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)


@pytest.fixture(scope="module")
def scored(tiny_llama_folder, tmp_path_factory, one_thread):
    output = tmp_path_factory.mktemp("scored")
    argv = _score_argv(tiny_llama_folder, output, "--methods", "loss", "el2n", "ifd", "grand", "--lora_r", "4")
    assert main(argv) == 0
    return output


def test_columns_equal_each_row_computed_alone(scored, tiny_llama_folder):
    import peft
    import transformers

    result = load_from_disk(str(scored / "dataset"))
    assert result.column_names == ["instruction", "input", "output", "loss", "el2n", "ifd", "grand"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval()
    torch.manual_seed(0)  # the adapters the command made with seed 0
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    adapters = [p for p in model.parameters() if p.requires_grad]
    for i, row in enumerate(_rows()):
        logits, labels = _alone(model, tokenizer, row)
        loss = _row_loss(logits, labels)
        trained = labels[1:] != -100
        onehot = torch.nn.functional.one_hot(labels[1:][trained], logits.shape[-1]).float()
        el2n = (logits[:-1][trained].softmax(-1) - onehot).norm(dim=-1).mean()
        grand = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, adapters)]).norm()
        assert result["loss"][i] == pytest.approx(loss.item(), rel=1e-5)
        assert result["el2n"][i] == pytest.approx(el2n.item(), rel=1e-5)
        assert result["grand"][i] == pytest.approx(grand.item(), rel=1e-4)
        assert result["ifd"][i] > 0


def test_prune_and_push_give_a_folder_load_dataset_reads_with_its_card(scored, tiny_llama_folder, tmp_path):
    from huggingface_hub import DatasetCard

    assert main(["prune", "--dataset_name", str(scored), "--by", "ifd", "--keep", "3", "--output_dir",
                 str(tmp_path / "pruned")]) == 0  # fmt: skip
    assert main(["push", "--dataset_path", str(tmp_path / "pruned"), "--output_dir", str(tmp_path / "hub")]) == 0
    loaded = load_dataset(str(tmp_path / "hub"), split="train")
    full = load_from_disk(str(scored / "dataset"))
    assert len(loaded) == 3 and sorted(loaded["ifd"]) == sorted(full["ifd"])[-3:]
    card = DatasetCard.load(tmp_path / "hub" / "README.md").data.to_dict()
    assert card["task_categories"] == ["text-generation"]
    scoring = card["datadiet"]["scoring"]
    weights = (Path(tiny_llama_folder) / "model.safetensors").read_bytes()
    assert scoring["checkpoint_sha256"] == hashlib.sha256(weights).hexdigest()
    template = json.loads((Path(tiny_llama_folder) / "tokenizer_config.json").read_text()).get("chat_template")
    template = template or (Path(tiny_llama_folder) / "chat_template.jinja").read_text()
    assert scoring["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert scoring["max_length"] == 96 and scoring["task"] == "causal_lm"
    assert set(card["datadiet"]["score_definitions"]) == {"loss", "el2n", "ifd", "grand"}
    assert "## What the scores mean" in (tmp_path / "hub" / "README.md").read_text()


@pytest.mark.slow
def test_two_processes_give_the_one_process_columns(scored, tiny_llama_folder, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    config = REPO / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"
    argv = _score_argv(
        tiny_llama_folder, tmp_path / "two", "--methods", "loss", "el2n", "ifd", "grand", "--lora_r", "4"
    )
    run = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", port,
         "-m", "datadiet.cli", *argv],
        env=_environment(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = load_from_disk(str(scored / "dataset")), load_from_disk(str(tmp_path / "two" / "dataset"))
    assert two.column_names == one.column_names
    for column in ("loss", "el2n", "ifd", "grand"):
        np.testing.assert_allclose(two[column], one[column], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--task", "causal_llm"], "Unknown task 'causal_llm' (did you mean 'causal_lm'?)"),
        (["--methods", "ifdd"], "Unknown score method 'ifdd' for task 'causal_lm' (did you mean 'ifd'?)"),
        (["--methods", "margin"], "Valid methods: el2n, grand, ifd, loss, perplexity"),
        (["--methods", "less"], "--methods less needs --target_dataset"),
        (["--methods", "loss", "--less_checkpoints", "x"], "--less_checkpoints is read by --methods less only"),
        (["--seeds", "0", "1"], "give one seed"),
        (["--train_epochs", "1"], "fine-tune the model with TRL's SFTTrainer"),
        (["--lora_r", "4", "--adapter_name_or_path", "x"], "not both"),
    ],
)
def test_bad_input_is_one_line_saying_what_to_type(extra, expected, tmp_path, capsys):
    argv = ["score", "--task", "causal_lm", "--model_name_or_path", "folder", "--dataset_name", "rows", *extra]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and len(error.splitlines()) == 1


def test_causal_lm_options_without_the_task_are_refused(capsys):
    assert main(["score", "--dataset_name", "sklearn-digits", "--lora_r", "8"]) == 2
    assert "pass --task causal_lm" in capsys.readouterr().err
    assert main(["score", "--dataset_name", "sklearn-digits", "--methods", "less"]) == 2
    assert "`datadiet score --task causal_lm --methods less" in capsys.readouterr().err


def _warm_up(model: Path, output: Path) -> list[Path]:
    """Two checkpoints of a real TRL SFTTrainer + LoRA run, by the recipe's own script."""
    run = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "sft" / "sft_lora.py"), "--model_name_or_path", str(model),
         "--dataset_name", str(ALPACA.parent), "--max_train_rows", "8", "--use_peft", "--lora_r", "4",
         "--lora_target_modules", "all-linear", "--max_steps", "2", "--per_device_train_batch_size", "4",
         "--max_length", "96", "--save_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-2",
         "--bf16", "false", "--report_to", "none", "--output_dir", str(output)],
        env=_environment(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return [output / "checkpoint-1", output / "checkpoint-2"]


@pytest.fixture(scope="module")
def warmup(tiny_llama_folder, tmp_path_factory) -> list[Path]:
    require_shared_data(DOLLY / "train-00000-of-00001.parquet")
    return _warm_up(tiny_llama_folder, tmp_path_factory.mktemp("warmup"))


def _less_argv(model: Path, output: Path, checkpoints: list[Path]) -> list[str]:
    return _score_argv(model, output, "--methods", "loss", "less", "--target_dataset", str(DOLLY),
                       "--max_target_rows", "3", "--less_checkpoints", *map(str, checkpoints), "--projection_dim", "0",
                       "--less_adam", "false")  # fmt: skip


def _less_reference(model_folder: Path, checkpoints: list[Path], num_rows: int) -> np.ndarray:
    """LESS without projection or Adam, by hand: each row's and each target's gradient through a per-row autograd
    loop over the adapters of each checkpoint, their cosines averaged over the 3 targets, weighted by the
    checkpoints' learning rates read from `trainer_state.json`."""
    import peft
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_folder)
    targets = load_dataset("parquet", data_files=str(DOLLY / "train-00000-of-00001.parquet"), split="train")
    rates = []
    for folder in checkpoints:
        state = json.loads((folder / "trainer_state.json").read_text())
        rates.append(next(e["learning_rate"] for e in state["log_history"] if e.get("step") == state["global_step"]))
    expected = np.zeros(num_rows)
    for folder, rate in zip(checkpoints, rates):
        base = transformers.AutoModelForCausalLM.from_pretrained(model_folder)
        model = peft.PeftModel.from_pretrained(base, str(folder), is_trainable=True).eval()
        adapters = [p for p in model.parameters() if p.requires_grad]

        def gradient(row, model=model, adapters=adapters):
            loss = _row_loss(*_alone(model, tokenizer, row))
            gradients = torch.autograd.grad(loss, adapters)
            return torch.nn.functional.normalize(torch.cat([g.reshape(-1) for g in gradients]).double(), dim=0)

        target = torch.stack([gradient(r) for r in targets.select(range(3))])
        for i, row in enumerate(_rows().select(range(num_rows))):
            cosines = target @ gradient(row)
            expected[i] += rate / sum(rates) * cosines.mean().item()
    return expected


@pytest.mark.slow
def test_less_from_the_command_equals_an_autograd_reference(tiny_llama_folder, warmup, tmp_path, one_thread):
    assert main(_less_argv(tiny_llama_folder, tmp_path / "less", warmup)) == 0
    result = load_from_disk(str(tmp_path / "less" / "dataset"))
    np.testing.assert_allclose(result["less"], _less_reference(tiny_llama_folder, warmup, 6), rtol=1e-4, atol=1e-6)
    recorded = read_provenance(result)["less"]
    assert (
        recorded["projection_dim"] is None and recorded["adam"] is False and recorded["target_sets"] == {str(DOLLY): 3}
    )


@pytest.mark.slow
def test_less_in_two_processes_equals_the_autograd_reference(tiny_llama_folder, warmup, tmp_path):
    """`accelerate launch` with two processes: each takes a slice of the target rows and one of the two checkpoints'
    feature shards; the summed scores equal the per-row autograd reference, and both checkpoints' shards are on disk."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    config = REPO / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"
    run = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", port,
         "-m", "datadiet.cli", *_less_argv(tiny_llama_folder, tmp_path / "two", warmup)],
        env=_environment(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = load_from_disk(str(tmp_path / "two" / "dataset"))
    np.testing.assert_allclose(result["less"], _less_reference(tiny_llama_folder, warmup, 6), rtol=1e-4, atol=1e-6)
    shards = sorted(p.parent.name for p in (tmp_path / "two" / "less" / "features").glob("*/*.parquet"))
    assert shards == ["checkpoint-0", "checkpoint-1"]
