"""`score_dataset` and `ScoreTransform` with `task="causal_lm"`: a tiny random Llama with SmolLM2's real tokenizer on
real Alpaca rows; every column float32, each row's value equal to the row's own, computed by hand alone and unpadded
(and its gradient norm by autograd on the row alone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datadiet import ScoreTransform, score_dataset
from datadiet.tasks import get_task

transformers = pytest.importorskip("transformers")

METHODS = ["loss", "perplexity", "el2n", "ifd", "grand"]


@pytest.fixture(scope="module")
def llama(smollm2_tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def row_alone(model, task, row) -> dict[str, float]:
    """The row tokenised alone (no padding), its next-token loss and gradient norm by hand."""
    tokens = task.tokenize(row)
    ids, labels = torch.tensor(tokens["input_ids"]), torch.tensor(tokens["labels"])
    logits = model(input_ids=ids[None]).logits[0]
    trained = labels[1:] != -100
    loss = -logits[:-1][trained].log_softmax(-1).gather(1, ids[1:][trained][:, None]).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return {"loss": loss.item(), "grand": torch.sqrt(sum(g.double().square().sum() for g in grads)).item()}


def test_score_dataset_causal_lm(llama, smollm2_tokenizer, alpaca_rows, tmp_path):
    rows = alpaca_rows.select(range(7))
    scored = score_dataset(
        rows, llama, METHODS, task="causal_lm", tokenizer=smollm2_tokenizer, max_length=128, batch_size=3,
        output_dir=tmp_path / "run",
    )  # fmt: skip
    assert scored.column_names == rows.column_names + METHODS
    assert all(scored.features[name].dtype == "float32" for name in METHODS)
    task = get_task("causal_lm", tokenizer=smollm2_tokenizer, max_length=128)
    for position in (0, 4, 6):
        reference = row_alone(llama, task, rows[position])
        assert scored[position]["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert scored[position]["perplexity"] == pytest.approx(np.exp(reference["loss"]), rel=1e-5)
        assert scored[position]["grand"] == pytest.approx(reference["grand"], rel=1e-4)
    assert np.isfinite(np.asarray(scored["ifd"])).all() and np.isfinite(np.asarray(scored["el2n"])).all()
    # A rerun on the same folder resumes from its shards and gives the same columns.
    again = score_dataset(
        rows, llama, METHODS, task="causal_lm", tokenizer=smollm2_tokenizer, max_length=128, batch_size=3,
        output_dir=tmp_path / "run",
    )  # fmt: skip
    assert again[:]["loss"] == scored[:]["loss"]
    # The same rows through ScoreTransform give the same columns.
    transform = ScoreTransform(llama, ["loss", "ifd"], task="causal_lm", tokenizer=smollm2_tokenizer, max_length=128)
    mapped = rows.map(transform, batched=True, batch_size=4)
    assert np.allclose(mapped["loss"], scored["loss"], rtol=1e-5)
    assert np.allclose(mapped["ifd"], scored["ifd"], rtol=1e-4)


def test_causal_lm_refusals(llama, smollm2_tokenizer, alpaca_rows):
    rows = alpaca_rows.select(range(3))
    with pytest.raises(ValueError, match="Unknown score method 'margin' for task 'causal_lm'"):
        score_dataset(rows, llama, ["margin"], task="causal_lm", tokenizer=smollm2_tokenizer)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        score_dataset(rows, llama, ["loss"], task="causal_lm")
    with pytest.raises(ValueError, match=r"Rows \[1\] have no trained token"):
        long_prompt = rows.map(
            lambda row, i: {"instruction": row["instruction"] * (40 if i == 1 else 1)}, with_indices=True
        )
        score_dataset(long_prompt, llama, ["loss"], task="causal_lm", tokenizer=smollm2_tokenizer, max_length=64)
