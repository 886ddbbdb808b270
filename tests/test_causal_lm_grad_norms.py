"""Exact per-example gradient norms of causal LMs against an independent reference: each row alone, unpadded, through
the model, its next-token loss over its trained tokens computed by hand from the logits, and `torch.autograd.grad`
over the trainable parameters. Tiny Llama (RoPE, RMSNorm, SiLU, tied embeddings), GPT-2 (Conv1D, learned positions)
and Qwen2 (q/k/v biases), with and without peft LoRA, right and left padding, completion masks, rows of different
lengths. float32, max relative error 1e-4."""

from __future__ import annotations

import pytest
import torch

from datadiet.scores import per_example_grad_norms

transformers = pytest.importorskip("transformers")

RTOL = 1e-4
VOCAB = 61
LENGTHS = [9, 5, 12, 7]  # rows of different lengths
PROMPTS = [3, 2, 6, 1]  # untrained prompt tokens at the start of each row (completion-only loss)


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, **common,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.Qwen2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False, **common,
        )  # fmt: skip
        model = transformers.Qwen2ForCausalLM(config)
    # Random init leaves some parameters at constants (norm weights at 1, biases at 0): perturb them all so that
    # every rule sees a generic value.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


def with_lora(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    targets = ["c_attn", "c_proj", "c_fc"] if kind == "gpt2" else "all-linear"
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config).eval()


def rows() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for length, prompt in zip(LENGTHS, PROMPTS):
        ids = torch.randint(3, VOCAB, (length,), generator=generator)
        ids[2] = ids[4] = 7  # a repeated token: its embedding row gets the sum of two gradients
        labels = ids.clone()
        labels[:prompt] = -100
        out.append((ids, labels))
    return out


def padded(examples, side: str):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        where = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[row, where], labels[row, where], attention_mask[row, where] = ids, lab, 1
    # Left padding moves each row's positions: give them explicitly, as generation does (GPT-2 learns absolute ones).
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}, labels


def row_alone_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The row's own next-token loss, by hand: logits at t predict token t + 1; mean over trained targets."""
    logits = model(input_ids=ids[None]).logits[0]
    targets = labels[1:]
    trained = targets != -100
    log_probs = logits[:-1].float().log_softmax(-1)
    return -log_probs[trained].gather(1, targets[trained][:, None]).mean()


def naive_norms(model, examples) -> torch.Tensor:
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    norms = []
    for ids, labels in examples:
        grads = torch.autograd.grad(row_alone_loss(model, ids, labels), params, allow_unused=True)
        norms.append(torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None)))
    return torch.stack(norms)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("lora", [False, True], ids=["all-parameters", "lora"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_per_example_grad_norms_equal_each_row_alone(kind, lora, side):
    model = tiny_model(kind)
    if lora:
        model = with_lora(model, kind)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in name for name in trainable)
    examples = rows()
    inputs, labels = padded(examples, side)
    ours = per_example_grad_norms(model, inputs, labels, task="causal_lm")
    reference = naive_norms(model, examples)
    assert (reference > 0).all()
    relative = ((ours.double() - reference).abs() / reference).max().item()
    assert relative <= RTOL, f"{kind} lora={lora} {side}: max relative error {relative:.2e}"
    assert all(p.grad is None for p in model.parameters())


def test_the_loss_is_the_models_own_next_token_loss():
    # The reference above is written by hand; check it against transformers' own loss for a row alone.
    model = tiny_model("llama")
    ids, labels = rows()[0]
    own = model(input_ids=ids[None], labels=labels[None]).loss
    assert torch.allclose(row_alone_loss(model, ids, labels), own, rtol=1e-6)


def test_token_level_logits_without_a_task_are_refused():
    model = tiny_model("gpt2")
    inputs, labels = padded(rows(), "right")
    with pytest.raises(ValueError, match="task='causal_lm'"):
        per_example_grad_norms(model, inputs, labels)


def test_trained_token_nll_has_cross_entropys_values_and_gradient():
    from datadiet.scores.causal_lm import trained_token_nll

    torch.manual_seed(0)
    logits = (torch.randn(70, 11, dtype=torch.float64) * 4).requires_grad_(True)  # 70 rows: two chunks of 64
    targets = torch.randint(0, 11, (70,))
    targets[::5] = -100
    weights = torch.rand(70, dtype=torch.float64)
    ours = trained_token_nll(logits, targets)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="none", ignore_index=-100)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), logits)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-12)
    assert grad[::5].abs().sum() == 0


def test_trained_token_nll_keeps_its_precision_where_the_model_is_confident():
    # Rows whose target holds nearly all the probability (a fine-tuned model's usual case): the loss and its gradient
    # are tiny, and float32 must still give them to a relative 1e-5 of a float64 reference.
    from datadiet.scores.causal_lm import trained_token_nll

    torch.manual_seed(0)
    logits = torch.randn(40, 5000, dtype=torch.float64) * 2 + 5
    targets = torch.randint(0, 5000, (40,))
    logits[torch.arange(40), targets] += 20  # p_y from 0.997 to 1 − 1e-10: float64 holds the rest exactly enough
    logits = logits.float().double()  # the same float32 logits for both: only the computation's error is compared
    weights = torch.rand(40, dtype=torch.float64)
    reference = logits.clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(reference, targets, reduction="none")
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), reference)
    ours = logits.float().requires_grad_(True)
    values = trained_token_nll(ours, targets)
    (grad,) = torch.autograd.grad((values * weights.float()).sum(), ours)
    assert expected.max() < 1e-2  # the regime of the test: every row confident (F.cross_entropy in float32 is 18% off)
    assert ((values.double() - expected).abs() / expected).max() < 1e-5
    assert ((grad.double() - expected_grad).norm(dim=1) / expected_grad.norm(dim=1)).max() < 1e-5


def test_a_task_without_a_registered_loss_is_refused_saying_what_to_pass():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"task='image_classification' has no registered per-example loss.*task=None"):
        per_example_grad_norms(model, torch.randn(2, 3), torch.tensor([0, 1]), task="image_classification")
