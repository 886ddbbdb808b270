"""The task layer: the registry, and the `causal_lm` task against its independent references — TRL's own `SFTTrainer`
dataset preparation and collator (the tokens and labels it trains on), and each row's scores computed by hand from the
model's logits on the row alone, unpadded."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from tokenizers import processors

from datadiet.tasks import get_task, list_tasks

transformers = pytest.importorskip("transformers")

# A ChatML template like SmolLM2's, with assistant turns marked for `assistant_only_loss`.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, like grass in spring."},
    ],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
]
PROMPTS = ["The capital of France is", "Translate 'chat' into English:", "List three primes:"]
COMPLETIONS = [" Paris.", " cat", " 2, 3 and 5"]


def tiny_llama(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def sft_prepared(tokenizer, dataset: Dataset, tmp_path, **config) -> tuple[list[dict], object]:
    """What TRL's SFTTrainer trains on: its prepared train dataset (input_ids, labels) and its collator."""
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, **config
    )
    trainer = trl.SFTTrainer(
        model=tiny_llama(len(tokenizer)), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    return [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))], trainer.data_collator


def test_registry():
    assert list_tasks() == ["causal_lm", "image_classification", "text_classification"]
    with pytest.raises(ValueError, match="Valid tasks: causal_lm"):
        get_task("causal-lm")


@pytest.mark.parametrize(
    "rows, config",
    [
        ({"text": ["Once upon a time there was a cat.", "Hello world"]}, {}),
        ({"prompt": PROMPTS, "completion": COMPLETIONS}, {}),
        ({"prompt": PROMPTS, "completion": COMPLETIONS}, {"completion_only_loss": False}),
        ({"prompt": PROMPTS[::2], "completion": COMPLETIONS[::2]}, {"max_length": 7}),
        (
            {"prompt": [c[:1] for c in CONVERSATIONS], "completion": [c[1:2] for c in CONVERSATIONS]},
            {},
        ),
        ({"messages": CONVERSATIONS}, {}),
        ({"messages": CONVERSATIONS}, {"assistant_only_loss": True}),
    ],
    ids=["text", "prompt-completion", "full-loss", "truncated", "conversational", "messages", "assistant-only"],
)
def test_causal_lm_rows_are_what_sft_trainer_trains_on(smollm2_tokenizer, rows, config, tmp_path):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    if config.get("assistant_only_loss"):
        tokenizer.chat_template = GENERATION_TEMPLATE
    prepared, collator = sft_prepared(tokenizer, Dataset.from_dict(rows), tmp_path, **config)
    task = get_task("causal_lm", tokenizer=tokenizer, **config)
    ours = [task.tokenize(dict(zip(rows, values))) for values in zip(*rows.values())]
    assert [row["input_ids"] for row in ours] == [row["input_ids"] for row in prepared]
    assert [row["labels"] for row in ours] == [row["labels"] for row in prepared]
    assert any(label == -100 for row in ours for label in row["labels"]) == (
        "prompt" in rows and config.get("completion_only_loss", True) or bool(config.get("assistant_only_loss"))
    )
    theirs = collator([{"input_ids": row["input_ids"], "labels": row["labels"]} for row in prepared])
    batch = task.collate(rows)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], theirs[key]), key


def test_alpaca_rows_become_prompt_completion(smollm2_tokenizer, alpaca_rows, tmp_path):
    rows = alpaca_rows.select(range(6))
    assert "" in rows["input"] and any(rows["input"])  # rows with and without an input
    task = get_task("causal_lm", tokenizer=smollm2_tokenizer)
    # With a chat template: one user turn (instruction, a blank line, input) and the output as the assistant's turn.
    users = [f"{i}\n\n{x}" if x else i for i, x in zip(rows["instruction"], rows["input"])]
    conversational = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": user}] for user in users],
            "completion": [[{"role": "assistant", "content": output}] for output in rows["output"]],
        }
    )
    prepared, _ = sft_prepared(smollm2_tokenizer, conversational, tmp_path)
    ours = [task.tokenize(row) for row in rows]
    assert [row["labels"] for row in ours] == [row["labels"] for row in prepared]
    # Without one: Stanford Alpaca's prompt.
    plain = copy.deepcopy(smollm2_tokenizer)
    plain.chat_template = None
    text = plain.decode(get_task("causal_lm", tokenizer=plain).tokenize(rows[0])["input_ids"])
    assert text.startswith("Below is an instruction that describes a task") and "### Response:\n" in text


def per_row_reference(model, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Each score by hand for one row alone, unpadded: logits at t predict token t + 1, trained where labels != -100."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()
        trained = labels[1:] != -100
        targets = ids[1:][trained]
        probs = logits[:-1][trained].softmax(-1)
        nll = -probs.log().gather(1, targets[:, None]).squeeze(1)
        onehot = torch.zeros_like(probs)
        onehot[torch.arange(len(targets)), targets] = 1
        el2n = (probs - onehot).norm(dim=1).mean()
        # IFD's response alone: the trained tokens at the start of a sequence (this tokenizer adds no BOS), the first
        # one not predicted.
        alone_logits = model(input_ids=targets[None]).logits[0].double()
        alone_nll = -alone_logits[:-1].log_softmax(-1).gather(1, targets[1:, None]).squeeze(1)
    loss = nll.mean()
    return {
        "loss": loss.item(),
        "perplexity": loss.exp().item(),
        "el2n": el2n.item(),
        "ifd": (loss.exp() / alone_nll.mean().exp()).item(),
    }


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_causal_lm_scores_equal_each_row_alone(smollm2_tokenizer, alpaca_rows, padding_side):
    rows = alpaca_rows.select(range(5))[:]
    task = get_task("causal_lm", tokenizer=smollm2_tokenizer, max_length=96, padding_side=padding_side)
    model = tiny_llama(len(smollm2_tokenizer))
    batch = task.collate(rows)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1 and (lengths == 96).any()  # rows of different lengths, one truncated
    methods = ["loss", "perplexity", "el2n", "ifd"]
    scores = task.score_batch(model, batch, methods)
    for row in range(len(lengths)):
        real = batch["attention_mask"][row] == 1
        reference = per_row_reference(model, batch["input_ids"][row][real], batch["labels"][row][real])
        for method in methods:
            assert scores[method][row].item() == pytest.approx(reference[method], rel=1e-5), (method, row)
    assert all(value.dtype == torch.float32 and value.shape == (5,) for value in scores.values())
    # The model's own loss for one row agrees with the task's per-example loss.
    real = batch["attention_mask"][0] == 1
    own = model(input_ids=batch["input_ids"][0][real][None], labels=batch["labels"][0][real][None]).loss
    assert scores["loss"][0].item() == pytest.approx(own.item(), rel=1e-5)
    tokens = task.score_batch(model, batch, ["loss"], return_token_scores=True)["loss_tokens"]
    assert tokens.shape == (5, batch["input_ids"].shape[1] - 1)
    assert torch.allclose(tokens.nanmean(1), scores["loss"], rtol=1e-5)


def test_causal_lm_grand_and_label_checks(smollm2_tokenizer):
    task = get_task("causal_lm", tokenizer=smollm2_tokenizer)
    model = tiny_llama(len(smollm2_tokenizer))
    assert model.config.num_labels == 2  # a classifier's label check would refuse every token id >= 2
    batch = task.collate({"prompt": PROMPTS, "completion": COMPLETIONS})
    grand = task.score_batch(model, batch, ["grand", "loss"])["grand"]
    assert grand.shape == (3,) and (grand > 0).all()
    batch["labels"][1, -1] = len(smollm2_tokenizer) + 5
    with pytest.raises(ValueError, match=r"outside the model's vocabulary of 49152 at rows \[1\]"):
        task.score_batch(model, batch, ["loss"])
    with pytest.raises(ValueError, match="ifd needs an instruction"):
        task.score_batch(model, task.collate({"text": ["a b c", "d e"]}), ["ifd"])


def test_ifd_refuses_rows_whose_response_alone_predicts_nothing(smollm2_tokenizer, alpaca_rows):
    # SmolLM2's tokenizer adds no BOS: at max_length=64 Alpaca row 5 keeps one trained token, which the response alone
    # cannot predict (its ifd would be 0 / 0 = NaN); rows 2 and 4 keep two and more.
    task = get_task("causal_lm", tokenizer=smollm2_tokenizer, max_length=64)
    model = tiny_llama(len(smollm2_tokenizer))
    rows = alpaca_rows.select([2, 4, 5])[:]
    batch = task.collate(rows, row_ids=[2, 4, 5])
    assert ((batch["labels"][:, 1:] != -100).sum(1) == 1).tolist() == [False, False, True]
    assert task.score_batch(model, batch, ["loss"])["loss"].isfinite().all()  # the other scores are defined
    with pytest.raises(
        ValueError,
        match=r"ifd is undefined for rows \[5\]: each has one trained token after truncation "
        r"to max_length=64, and this tokenizer adds no BOS.*raise max_length, or drop these rows",
    ):
        task.score_batch(model, batch, ["loss", "ifd"], row_ids=[2, 4, 5])
    scores = task.score_batch(model, task.collate(alpaca_rows.select([2, 4])[:]), ["ifd"])["ifd"]
    assert scores.isfinite().all()
    # With a BOS the response alone predicts its one token from it: the row is scored, finite.
    with_bos = copy.deepcopy(smollm2_tokenizer)
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", with_bos.convert_tokens_to_ids("<|im_start|>"))]
    )
    with_bos.bos_token = "<|im_start|>"
    bos_task = get_task("causal_lm", tokenizer=with_bos, max_length=64)
    assert bos_task._adds_bos()
    single = bos_task.collate(alpaca_rows.select([5])[:])
    ifd = bos_task.score_batch(model, single, ["ifd"])["ifd"]
    assert (single["labels"][:, 1:] != -100).sum().item() == 1 and ifd.isfinite().all()


def test_rows_left_without_trained_tokens_are_refused(smollm2_tokenizer):
    task = get_task("causal_lm", tokenizer=smollm2_tokenizer, max_length=4)
    with pytest.raises(ValueError, match=r"Rows \[7\] have no trained token after truncation to max_length=4"):
        task.collate({"prompt": ["a long prompt that fills every token"], "completion": ["x"]}, row_ids=[7])
    with pytest.raises(ValueError, match="rows need `messages`, `prompt` and `completion`"):
        task.detect_format(["sentence", "label"])
