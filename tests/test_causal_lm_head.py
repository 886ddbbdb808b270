"""The causal-LM scores computed with the output head at the trained positions only, against a direct per-row
computation from the full logits (each row alone, unpadded, float64): tiny GPT-2 and Llama, right and left padding,
completion masks, rows of different lengths; and the fallbacks, for models whose head cannot be hooked or whose
output changes shape when it is, for the forward-only scores and for the exact gradient norms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# The rows (completion masks, different lengths), their padding and the tiny models of the grad-norm tests.
from test_causal_lm_grad_norms import VOCAB, padded, rows, tiny_model
from torch import nn

from datadiet.scores import per_example_grad_norms
from datadiet.scores.batch import score_causal_lm_batch

transformers = pytest.importorskip("transformers")

METHODS = ["loss", "perplexity", "el2n", "ifd"]


class FunctionalHead(nn.Module):
    """A causal LM whose logits come from its embedding matrix through `F.linear`: no output module to hook."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.embed(input_ids)
        hidden = torch.tanh(self.mix(hidden.cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]))
        return {"logits": F.linear(hidden, self.embed.weight)}


class ReshapingHead(FunctionalHead):
    """A causal LM with an output module that reshapes the logits to its input's [B, T, V] afterwards: the hooked
    head's output no longer fits, so the model runs again without the hook."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.calls = 0

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.embed(input_ids)
        hidden = torch.tanh(self.mix(hidden.cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]))
        self.calls += 1
        return {"logits": self.head(hidden).reshape(input_ids.shape[0], input_ids.shape[1], VOCAB)}


def responses(examples, side: str):
    """Each row's trained tokens alone at the start of a sequence (no BOS: the first one is not predicted)."""
    alone = [labels[labels != -100] for _, labels in examples]
    return padded([(ids, torch.cat([torch.tensor([-100]), ids[1:]])) for ids in alone], side)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=ids[None])
    return (output["logits"] if isinstance(output, dict) else output.logits)[0].double()


def reference(model, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scores of one row alone from its full logits, by hand."""
    with torch.no_grad():
        logits = logits_of(model, ids)
        trained = labels[1:] != -100
        targets = labels[1:][trained]
        probs = logits[:-1][trained].softmax(-1)
        nll = -probs.log().gather(1, targets[:, None]).squeeze(1)
        onehot = F.one_hot(targets, VOCAB).double()
        el2n = (probs - onehot).norm(dim=1)
        response = labels[labels != -100]
        alone = -logits_of(model, response)[:-1].log_softmax(-1).gather(1, response[1:, None]).squeeze(1)
    return {
        "loss": nll.mean(),
        "perplexity": nll.mean().exp(),
        "el2n": el2n.mean(),
        "ifd": (nll.mean() - alone.mean()).exp(),
        "loss_tokens": nll,
        "el2n_tokens": el2n,
    }


def score(model, side: str) -> dict[str, torch.Tensor]:
    inputs, labels = padded(rows(), side)
    return score_causal_lm_batch(
        model, inputs, labels, METHODS, response=responses(rows(), side), return_token_scores=True
    )


def check_against_reference(model, side: str) -> None:
    examples = rows()
    inputs, _ = padded(examples, side)
    scores = score(model, side)
    for row, (ids, lab) in enumerate(examples):
        expected = reference(model, ids, lab)
        for method in METHODS:
            assert scores[method][row].item() == pytest.approx(expected[method].item(), rel=1e-5), (method, row)
        for method in ("loss", "el2n"):
            tokens = scores[f"{method}_tokens"][row]
            offset = inputs["input_ids"].shape[1] - len(ids) if side == "left" else 0
            trained = (lab[1:] != -100).nonzero().flatten() + offset
            assert torch.allclose(tokens[trained].double(), expected[f"{method}_tokens"], rtol=1e-5)
            assert tokens.isnan().sum().item() == tokens.numel() - len(trained)  # NaN where not trained


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_scores_from_the_head_at_trained_positions_equal_each_row_alone(kind, side):
    model = tiny_model(kind)
    check_against_reference(model, side)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    score(model, side)
    handle.remove()
    trained = sum(int((lab[1:] != -100).sum()) for _, lab in rows())
    response_predicted = sum(int((lab != -100).sum()) - 1 for _, lab in rows())
    # The head ran on the trained positions only: once for the rows, once for the responses alone.
    assert [tuple(shape[:2]) for shape in seen] == [(1, trained), (1, response_predicted)]


@pytest.mark.parametrize("model_class", [FunctionalHead, ReshapingHead])
def test_models_whose_head_cannot_be_hooked_get_the_full_logits(model_class):
    model = model_class().eval()
    check_against_reference(model, "right")
    if model_class is ReshapingHead:
        model.calls = 0
        score(model, "right")
        assert model.calls == 4  # each of the two forwards ran again without the hook


@pytest.mark.parametrize("model_class", [FunctionalHead, ReshapingHead])
def test_grad_norms_of_models_whose_head_cannot_be_hooked(model_class):
    model = model_class().eval()
    examples = rows()
    inputs, labels = padded(examples, "right")
    ours = per_example_grad_norms(model, inputs, labels, task="causal_lm")
    params = [p for p in model.parameters() if p.requires_grad]
    naive = []
    for ids, lab in examples:
        logits = logits_of(model, ids).float()
        trained = lab[1:] != -100
        loss = F.cross_entropy(logits[:-1][trained], lab[1:][trained])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        naive.append(torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None)))
    naive = torch.stack(naive)
    assert ((ours.double() - naive).abs() / naive).max().item() <= 1e-4
