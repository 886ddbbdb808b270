"""Per-example scores of a causal language model over the tokens it is trained on (the completion / assistant tokens
left in `labels`, after the next-token shift): `loss`, `perplexity`, token-level `el2n` and `ifd`. Pure PyTorch.

Conventions, as transformers and TRL's `SFTTrainer` compute a causal-LM loss: the logit at position t predicts the
token at position t + 1, so the targets are `labels[:, 1:]` against `logits[:, :-1]`; positions whose label is `-100`
(prompt, padding, non-assistant turns) are not trained on and take no part in any score. A row's value is the mean
over its own trained tokens, the loss `SFTTrainer` computes for that row alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layer_rules import as_float
from .registry import register_score

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_el2n",
    "causal_lm_loss",
    "causal_lm_perplexity",
    "ifd",
    "next_token_targets",
    "per_token_cross_entropy",
    "per_example_mean",
    "per_token_predictions",
    "trained_token_nll",
    "trained_token_scores",
]

IGNORE_INDEX = -100


def next_token_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The label shift of a causal LM: `(logits[:, :-1], labels[:, 1:], mask)` with `mask` the trained positions
    (`labels[:, 1:] != -100`), shapes `[B, T-1, V]`, `[B, T-1]`, `[B, T-1]`.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.causal_lm import next_token_targets
    >>> _, targets, mask = next_token_targets(torch.zeros(1, 3, 5), torch.tensor([[-100, 4, 2]]))
    >>> targets.tolist(), mask.tolist()
    ([[4, 2]], [[True, True]])

    ```
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"A causal LM's logits must be [B, T, V] and its labels [B, T] with the same B and T; got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    targets = labels[:, 1:].long()
    return logits[:, :-1], targets, targets != IGNORE_INDEX


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's next-token negative log-likelihood, `-log softmax(logits[:, t])[labels[:, t + 1]]`, in float32,
    and the mask of trained positions; both `[B, T-1]`, the NLL zero where the mask is False. This is the one
    per-token cross-entropy of datadiet's causal-LM path."""
    _, targets, mask = next_token_targets(logits, labels)
    # The targets padded at the end with -100 instead of the logits sliced (as transformers' ForCausalLMLoss does): the
    # [B, T, V] logits are read through a view, never copied, and their gradient is not scattered into a fresh buffer.
    padded = F.pad(targets, (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), padded.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    ).reshape(padded.shape)
    return nll[:, :-1], mask


def trained_token_scores(
    logits: torch.Tensor, targets: torch.Tensor, *, el2n: bool = True, chunk_rows: int = 64
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next-token NLL and token EL2N of logits already taken at the trained positions (`[N, V]` against
    `targets` `[N]`, e.g. from `datadiet.scores.lm_head.logits_at_trained_positions`), from one log-softmax per row:
    NLL = −log p_y and EL2N = ‖p − onehot(y)‖₂ = √(Σ_{v≠y} p_v² + (1 − p_y)²), float32 `[N]` each (EL2N `None` unless
    `el2n`). The sum leaves p_y out instead of subtracting it (√(Σ_v p_v² − 2 p_y + 1) cancels to nothing when p_y is
    near 1). Rows are processed `chunk_rows` at a time: temporaries small enough for the allocator to reuse.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.causal_lm import trained_token_scores
    >>> nll, el2n = trained_token_scores(torch.zeros(1, 2), torch.tensor([0]))
    >>> round(nll.item(), 4), round(el2n.item(), 4)  # log 2 and ‖(0.5, 0.5) − (1, 0)‖₂
    (0.6931, 0.7071)

    ```
    """
    nll = logits.new_empty(len(targets), dtype=torch.float32)
    token_el2n = logits.new_empty(len(targets), dtype=torch.float32) if el2n else None
    targets = targets.long()
    for start in range(0, len(targets), chunk_rows):
        part = slice(start, start + chunk_rows)
        log_probs = logits[part].float().log_softmax(dim=-1)
        true_log_prob = log_probs.gather(-1, targets[part, None])
        nll[part] = -true_log_prob.squeeze(-1)
        if el2n:
            others = log_probs.exp_().scatter_(-1, targets[part, None], 0.0)
            miss = torch.expm1(true_log_prob.squeeze(-1))  # p_y − 1, exact near p_y = 1
            token_el2n[part] = torch.linalg.vector_norm(others, dim=-1).hypot(miss)
    return nll, token_el2n


class _TrainedTokenNLL(torch.autograd.Function):
    """−log softmax(z)[y] per row of `[N, V]` logits, and its gradient (softmax(z) − onehot(y), scaled per row) written
    in one pass; rows are processed `chunk_rows` at a time so that the temporaries stay small. Each row keeps its
    largest logit m and s = log Σ exp(z − m) apart (log p_v = (z_v − m) − s, exact near p_y = 1, where m + s would
    round at the logits' magnitude), s by log1p of the other tokens' mass, and the target's gradient is
    expm1(log p_y) = p_y − 1: exact where p_y is near 1, a confident model's usual case."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        top = logits.new_empty(logits.shape[0])
        log_sum = logits.new_empty(logits.shape[0])
        for start in range(0, logits.shape[0], chunk_rows):
            part = logits[start : start + chunk_rows]
            largest, where = part.max(dim=-1, keepdim=True)
            top[start : start + chunk_rows] = largest.squeeze(-1)
            # s = log(1 + Σ_{v ≠ argmax} exp(z_v − m)) by log1p: exact when the other tokens' mass is tiny.
            others = (part - largest).exp_().scatter_(-1, where, 0.0)
            log_sum[start : start + chunk_rows] = others.sum(dim=-1).log1p_()
        true_log_prob = (logits.gather(-1, safe[:, None]).squeeze(-1) - top) - log_sum
        ctx.save_for_backward(logits, safe, valid, top, log_sum, true_log_prob)
        ctx.chunk_rows = chunk_rows
        return torch.where(valid, -true_log_prob, 0.0)

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, safe, valid, top, log_sum, true_log_prob = ctx.saved_tensors
        scale = torch.where(valid, grad_nll, 0.0)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            part = slice(start, start + ctx.chunk_rows)
            torch.sub(logits[part], top[part, None], out=grad[part])
            grad[part].sub_(log_sum[part, None]).exp_().mul_(scale[part, None])
        grad.scatter_(-1, safe[:, None], (torch.expm1(true_log_prob) * scale)[:, None])
        return grad, None, None


def trained_token_nll(logits: torch.Tensor, targets: torch.Tensor, *, chunk_rows: int = 64) -> torch.Tensor:
    """The next-token NLL `−log softmax(logits)[targets]` of logits already taken at the trained positions (`[N, V]`
    against `targets` `[N]`; a target of `-100` gives 0 and no gradient), in float32 (float64 for float64 logits),
    differentiable. The values and gradient of `F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)`,
    with less memory traffic and more precision:

    - the forward keeps two numbers per row (the largest logit and the log of the others' mass) instead of the
      `[N, V]` log-probabilities; the backward writes the gradient (softmax − onehot, scaled per row) in one pass
      instead of a zero-filled buffer, a scatter and the log-softmax backward;
    - where the model is confident (p_y near 1, so the loss and its gradient are tiny) they keep their relative
      precision in float32 (log1p and expm1), where `F.cross_entropy` loses it (relative errors of several percent
      on such rows' gradients, measured against float64).

    The exact per-example gradient norms of a causal LM (`per_example_grad_norms`) use it.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.causal_lm import trained_token_nll
    >>> logits = torch.randn(3, 5, requires_grad=True)
    >>> targets = torch.tensor([4, -100, 0])
    >>> reference = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    >>> torch.allclose(trained_token_nll(logits, targets), reference)
    True

    ```
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"trained_token_nll takes logits [N, V] and targets [N]; got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}."
        )
    return _TrainedTokenNLL.apply(as_float(logits), targets.long(), chunk_rows)


def per_example_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `values` `[B, T]` over each row's trained positions (`mask`); NaN for a row with none (callers
    refuse such rows before scoring, see `datadiet.tasks.causal_lm`)."""
    counts = mask.sum(dim=1)
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=1)
    return total / counts.to(values.dtype)  # 0 / 0 = NaN for a row with no trained token


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, return_token_scores: bool):
    per_example = per_example_mean(per_token, mask)
    return (per_example, per_token.masked_fill(~mask, float("nan"))) if return_token_scores else per_example


@register_score("loss", task="causal_lm")
def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, return_token_scores: bool = False):
    """A causal LM's per-example loss: the mean next-token negative log-likelihood over the row's trained tokens,
    (1/|S|) Σ_{t∈S} −log p(x_{t+1} | x_{≤t}), S the positions whose next label is not `-100`. It is the loss
    transformers / `SFTTrainer` compute for the row alone. Low loss = easy; loss-based SFT filters keep low or high
    loss depending on the paper, so measure both ends.

    Args:
        logits (`torch.Tensor`): `[B, T, V]`, the model's output for `input_ids`.
        labels (`torch.Tensor`): `[B, T]`, the input ids with untrained positions set to `-100` (not yet shifted).
        return_token_scores (`bool`, *optional*, defaults to `False`): also return the per-position values `[B, T-1]`
            (NaN where not trained), position t scoring the prediction of token t + 1.

    Returns:
        `torch.Tensor` `[B]` (float32), or `(per_example, per_token)` with `return_token_scores=True`.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.causal_lm import causal_lm_loss
    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: every NLL is log 4
    >>> causal_lm_loss(logits, torch.tensor([[-100, 1, 2]]))
    tensor([1.3863])

    ```
    """
    nll, mask = per_token_cross_entropy(logits, labels)
    return _reduce(nll, mask, return_token_scores)


@register_score("perplexity", task="causal_lm")
def causal_lm_perplexity(logits: torch.Tensor, labels: torch.Tensor, *, return_token_scores: bool = False):
    """Perplexity over the row's trained tokens, exp(`causal_lm_loss`) (Jelinek et al. 1977). With
    `return_token_scores=True` the per-token values are each token's exp(NLL), 1 / p(x_{t+1} | x_{≤t}).

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.causal_lm import causal_lm_perplexity
    >>> causal_lm_perplexity(torch.zeros(1, 3, 4), torch.tensor([[-100, 1, 2]]))
    tensor([4.])

    ```
    """
    nll, mask = per_token_cross_entropy(logits, labels)
    loss = per_example_mean(nll, mask).exp()
    return (loss, nll.exp().masked_fill(~mask, float("nan"))) if return_token_scores else loss


@register_score("el2n", task="causal_lm")
def causal_lm_el2n(logits: torch.Tensor, labels: torch.Tensor, *, return_token_scores: bool = False):
    """Token-level EL2N: the mean over the row's trained tokens of ‖softmax(z_t) − onehot(x_{t+1})‖₂, the error
    L2-norm of Paul et al. (2021, eq. 2) applied to each next-token prediction (as in Marion et al. 2023, "When Less
    is More", which prunes LLM pre-training data by it). Computed as √(Σ_v p_v² − 2 p_y + 1) without building the
    one-hot tensor.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.causal_lm import causal_lm_el2n
    >>> causal_lm_el2n(torch.zeros(1, 2, 2), torch.tensor([[-100, 0]]))  # ‖(0.5, 0.5) − (1, 0)‖₂
    tensor([0.7071])

    ```
    """
    shifted, targets, mask = next_token_targets(logits, labels)
    return _reduce(_token_el2n(shifted, targets), mask, return_token_scores)


def _token_el2n(shifted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    probs = shifted.float().softmax(dim=-1)
    true_prob = probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (probs.square().sum(dim=-1) - 2 * true_prob + 1).clamp(min=0).sqrt()


def per_token_predictions(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each next-token prediction of a causal LM, as the training dynamics record them: `nll` (from
    `per_token_cross_entropy`), `mask` (the trained positions), `correct` (1.0 where the target is the arg-max token,
    TRL's `mean_token_accuracy` per token), token `el2n` and `margin` (the target's logit minus the largest other
    logit, Pleiss et al. 2020 per token); all `[B, T-1]`, float32 (mask bool), meaningful where `mask` is True.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.causal_lm import per_token_predictions
    >>> values = per_token_predictions(torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([[-100, 0]]))
    >>> values["correct"].tolist(), values["margin"].tolist()
    ([[1.0]], [[2.0]])

    ```
    """
    nll, mask = per_token_cross_entropy(logits, labels)
    shifted, targets, _ = next_token_targets(logits, labels)
    shifted = shifted.detach().float()
    safe_targets = targets.clamp(min=0)
    target_logit = shifted.gather(-1, safe_targets[..., None]).squeeze(-1)
    top2 = shifted.topk(2, dim=-1)
    predicted = top2.indices[..., 0]
    largest_other = torch.where(predicted == safe_targets, top2.values[..., 1], top2.values[..., 0])
    return {
        "nll": nll.detach(),
        "mask": mask,
        "correct": (predicted == safe_targets).float(),
        "el2n": _token_el2n(shifted, targets),
        "margin": target_logit - largest_other,
    }


@register_score("ifd", needs="response", task="causal_lm")
def ifd(conditioned_loss: torch.Tensor, response_loss: torch.Tensor) -> torch.Tensor:
    """Instruction-Following Difficulty (Li et al. 2024, "From Quantity to Quality", NAACL; Superfiltering, Li et al.
    2024, ACL): IFD = PPL(response | instruction) / PPL(response alone) = exp(loss_conditioned − loss_alone), both
    losses means over the response tokens. Values ≥ 1 mean the instruction does not help the model predict the
    response; the papers keep high-IFD rows (below 1).

    What "response alone" is, is the task's choice (see `datadiet.tasks.CausalLMTask.response_batch`): datadiet scores
    exactly the tokens trained on in the conditioned sequence, moved to the start of a sequence.

    Args:
        conditioned_loss (`torch.Tensor`): `[B]`, the mean NLL of the response tokens after the instruction.
        response_loss (`torch.Tensor`): `[B]`, the mean NLL of the same tokens without the instruction.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores.causal_lm import ifd
    >>> ifd(torch.tensor([1.0]), torch.tensor([1.0]))
    tensor([1.])

    ```
    """
    return (conditioned_loss.float() - response_loss.float()).exp()
