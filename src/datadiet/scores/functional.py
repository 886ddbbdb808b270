"""Per-example scores computed from one forward pass: logits and labels, or the model inputs. Pure PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register_score

__all__ = ["el2n", "loss", "margin", "entropy", "input_norm"]


@register_score("el2n")
def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Error L2-norm, ‖softmax(f(x)) − onehot(y)‖₂ (Paul et al. 2021, eq. 2). Shape `[B]`.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores import el2n
    >>> el2n(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
    tensor([0.7071])

    ```
    """
    probs = logits.float().softmax(dim=-1)
    onehot = F.one_hot(labels.long(), num_classes=logits.shape[-1]).to(probs.dtype)
    return torch.linalg.vector_norm(probs - onehot, dim=-1)


@register_score("loss")
def loss(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-example cross-entropy loss in float32, shape `[B]`: the one per-example cross-entropy of classifiers
    (scores, `per_example_grad_norms`, TracIn, the trainer's loss with its `label_smoothing`)."""
    return F.cross_entropy(logits.float(), labels.long(), reduction="none", label_smoothing=label_smoothing)


@register_score("margin", higher_is_harder=False)
def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the largest other logit (the margin whose mean over training is AUM, Pleiss et al.
    2020). Low or negative = hard or mislabelled, so pruning treats *low* margins as hard. Shape `[B]`."""
    logits = logits.float()
    true_logit = logits.gather(1, labels.long()[:, None]).squeeze(1)
    others = logits.scatter(1, labels.long()[:, None], float("-inf"))
    return true_logit - others.max(dim=-1).values


@register_score("entropy")
def entropy(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of the predicted distribution, −Σ p log p (labels unused). Shape `[B]`."""
    log_probs = logits.float().log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


@register_score("input_norm", needs="inputs")
def input_norm(inputs: torch.Tensor) -> torch.Tensor:
    """L2 norm of each (transformed) input. The baseline Kirsch (2023) found GraNd at initialisation to track. Shape
    `[B]`."""
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(
            "input_norm needs tensor inputs (images after their transform); got "
            f"{type(inputs).__name__}. It is not defined for tokenised text."
        )
    return torch.linalg.vector_norm(inputs.float().flatten(1), dim=-1)
