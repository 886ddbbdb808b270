"""Training dynamics of causal LMs: a user's real `trl.SFTTrainer` script (peft LoRA, a tiny random Llama, SmolLM2's
real tokenizer, real Alpaca rows) unchanged except `callbacks=[ScoreCallback()]`, and `DataDietTrainer` on plain
transformers causal-LM training. Each row's recorded loss is checked against that row's own loss computed in the test:
the row alone through the trainer's collator, then the model's own loss (transformers' `ForCausalLMLoss`)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset

from datadiet.tasks.causal_lm import alpaca_to_prompt_completion
from datadiet.trainer import DataDietConfig, DataDietTrainer, ScoreCallback

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

ROWS = 10
# A prompt longer than MAX_LENGTH tokens: SFTTrainer truncates the row to its prompt and drops it.
LONG_PROMPT = "Repeat after me: " + "the quick brown fox jumps over the lazy dog " * 20
MAX_LENGTH = 96


def tiny_llama(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def user_dataset(alpaca_rows, kind: str) -> Dataset:
    """Alpaca rows in one of TRL's formats; the prompt-completion set has a row SFTTrainer drops (position 3)."""
    rows = [dict(row) for row in alpaca_rows.select(range(ROWS))]
    if kind == "prompt_completion":
        rows[3] = {**rows[3], "instruction": LONG_PROMPT, "input": ""}
        return Dataset.from_list([alpaca_to_prompt_completion(row, conversational=True) for row in rows])
    if kind == "messages":
        pairs = [alpaca_to_prompt_completion(row, conversational=True) for row in rows]
        return Dataset.from_list([{"messages": pair["prompt"] + pair["completion"]} for pair in pairs])
    pairs = [alpaca_to_prompt_completion(row, conversational=False) for row in rows]
    return Dataset.from_list([{"text": pair["prompt"] + pair["completion"]} for pair in pairs])


def sft_config(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True, bf16=False, learning_rate=0.0,
        num_train_epochs=2, per_device_train_batch_size=4, max_length=MAX_LENGTH, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    return trl.SFTConfig(**{**options, **overrides})


def lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


@pytest.mark.parametrize("kind", ["prompt_completion", "messages", "text"])
def test_sft_trainer_records_each_rows_own_loss(smollm2_tokenizer, alpaca_rows, kind, tmp_path, caplog):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    dataset = user_dataset(alpaca_rows, kind)
    # The user's script, with one change: the callback.
    callback = ScoreCallback()
    trainer = trl.SFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=sft_config(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora(),
        callbacks=[callback],
    )
    with caplog.at_level(logging.WARNING, logger="datadiet"):
        trainer.train()
    history = callback.score_history["loss"]
    assert history.shape == (ROWS, 2)

    # The reference: each of the user's rows found in SFTTrainer's prepared rows by its own text (TRL keeps the
    # user's columns), alone through the trainer's collator, then the model's own loss (not the fused head).
    prepared = trainer.train_dataset
    key = {"prompt_completion": "prompt", "messages": "messages", "text": "text"}[kind]
    model = trainer.model.eval()
    dropped = []
    for row in range(ROWS):
        matches = [i for i, value in enumerate(prepared[key]) if value == dataset[row][key]]
        if kind == "text":  # SFTTrainer appended the EOS token to the text
            matches = [i for i, value in enumerate(prepared[key]) if value == dataset[row][key] + tokenizer.eos_token]
        if not matches:
            dropped.append(row)
            assert np.isnan(history[row]).all()
            continue
        (position,) = matches
        example = prepared[position]
        batch = trainer.data_collator([{"input_ids": example["input_ids"], "labels": example["labels"]}])
        with torch.no_grad():
            reference = model(**batch).loss.item()
        np.testing.assert_allclose(history[row], [reference, reference], rtol=1e-5, err_msg=f"row {row}")
    assert dropped == ([3] if kind == "prompt_completion" else [])
    if dropped:
        assert "SFTTrainer dropped 1 of the 10 rows" in caplog.text and "rows [3]" in caplog.text

    # The columns go on the user's dataset; the fused head gives no logits, so no EL2N / margin / AUM by default.
    scored = callback.add_scores(dataset)
    assert scored.column_names == [
        *dataset.column_names, "loss", "forgetting", "confidence", "variability", "correctness"
    ]  # fmt: skip
    np.testing.assert_allclose(np.asarray(scored["loss"], dtype=np.float64), history[:, 1], rtol=1e-6)
    probability = callback.score_history["probability"]
    kept = [row for row in range(ROWS) if row not in dropped]
    assert ((probability[kept] > 0) & (probability[kept] < 1)).all()


def test_sft_refusals(smollm2_tokenizer, alpaca_rows, tmp_path):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    dataset = user_dataset(alpaca_rows, "text")
    packed = trl.SFTTrainer(
        model=tiny_llama(len(tokenizer)), args=sft_config(tmp_path, packing=True), train_dataset=dataset,
        processing_class=tokenizer, callbacks=[ScoreCallback()],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"packing=True\) merges rows into packed sequences"):
        packed.train()
    padding_free = trl.SFTTrainer(
        model=tiny_llama(len(tokenizer)), args=sft_config(tmp_path, padding_free=True, max_length=None),
        train_dataset=dataset, processing_class=tokenizer, callbacks=[ScoreCallback()],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"padding_free=True\) flattens each batch"):
        padding_free.train()
    # Scores the fused LM head cannot give, asked for by name, fail at the first batch.
    asked = trl.SFTTrainer(
        model=tiny_llama(len(tokenizer)), args=sft_config(tmp_path), train_dataset=dataset,
        processing_class=tokenizer, callbacks=[ScoreCallback(["loss", "aum"])],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"track_scores \['aum'\] need the model's logits"):
        asked.train()
    # A collator that reorders the rows of a batch is caught by their tokens at the first step.
    collator = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    reordered = trl.SFTTrainer(
        model=tiny_llama(len(tokenizer)), args=sft_config(tmp_path), train_dataset=dataset,
        processing_class=tokenizer, data_collator=lambda examples: collator(examples[::-1]),
        callbacks=[ScoreCallback()],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"A training batch's tokens are not those of the rows its sampler yielded"):
        reordered.train()


def test_data_diet_trainer_trains_a_causal_lm(smollm2_tokenizer, alpaca_rows, tmp_path):
    """Plain transformers causal-LM training: tokenised text, transformers' own collator, default track_scores."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    texts = list(user_dataset(alpaca_rows, "text")["text"])
    dataset = Dataset.from_dict(tokenizer(texts, truncation=True, max_length=MAX_LENGTH))
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    model = tiny_llama(len(tokenizer))
    config = DataDietConfig(
        str(tmp_path / "ddt"), num_train_epochs=2, per_device_train_batch_size=4, learning_rate=0.0, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = DataDietTrainer(model, config, train_dataset=dataset, data_collator=collator)
    assert trainer.task == "causal_lm"
    trainer.train()
    assert trainer.scores.column_names == [
        "loss", "el2n", "margin", "forgetting", "aum", "confidence", "variability", "correctness"
    ]  # fmt: skip
    history = trainer.score_history
    model.eval()
    for row in range(ROWS):
        batch = collator([{"input_ids": dataset[row]["input_ids"]}])
        with torch.no_grad():
            logits = model(**batch).logits.float()
            reference = model(**batch).loss.item()
        np.testing.assert_allclose(history["loss"][row], [reference, reference], rtol=1e-5, err_msg=f"row {row}")
        # Token accuracy and mean target probability, by hand from the row alone.
        targets = batch["labels"][0, 1:]
        trained = targets != -100
        probs = logits[0, :-1][trained].softmax(-1)
        accuracy = (probs.argmax(-1) == targets[trained]).float().mean().item()
        assert history["correct"][row, 0] == float(accuracy >= 0.5)
        true_prob = probs.gather(1, targets[trained][:, None]).mean().item()
        np.testing.assert_allclose(history["probability"][row, 0], true_prob, rtol=1e-5)
    # The training loss is the model's own loss over the batch's trained tokens (counted after the shift).
    batch = collator([dataset[row] for row in range(4)])
    model.train()
    (samples,), count = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert int(count) == int(batch["labels"][:, 1:].ne(-100).sum())
    loss = trainer.compute_loss(model, dict(samples), num_items_in_batch=count)
    np.testing.assert_allclose(loss.item(), model(**batch).loss.item(), rtol=1e-5)


@pytest.mark.slow
def test_two_processes_give_the_one_process_columns(smollm2_tokenizer, tmp_path):
    """The SFT script with ScoreCallback, one process and a real `accelerate launch` of two CPU processes: the same
    per-row columns, in the user's row order, the dropped row NaN in both."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ALPACA, require_shared_data

    require_shared_data(ALPACA)
    repo = Path(__file__).resolve().parents[1]
    script = repo / "tests" / "scripts" / "sft_rows.py"
    smollm2_tokenizer.save_pretrained(tmp_path / "tokenizer")  # read in a second, not rebuilt from the GGUF file
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(repo / "src"))
    arguments = [str(tmp_path / "tokenizer"), str(ALPACA), "12"]
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.npz"), *arguments], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = ["--config_file", str(repo / "recipes" / "accelerate_configs" / "cpu_2proc.yaml")]
    two = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", *flags, "--main_process_port", str(port),
         str(script), str(tmp_path / "two.npz"), *arguments],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert int(single["world_size"]) == 1 and int(double["world_size"]) == 2
    for name in ("loss", "probability"):
        assert single[name].shape == double[name].shape == (12, 2)
        assert np.isnan(double[name][3]).all() and not np.isnan(np.delete(double[name], 3, axis=0)).any()
        np.testing.assert_allclose(double[name], single[name], rtol=1e-5, err_msg=name)
