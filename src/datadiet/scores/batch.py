"""The one dispatch of score methods over a batch: one forward pass shared by the logit scores, the input scores, the
gradient scores on the model itself, with the finite-logits and label-range checks and optional autocast."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .causal_lm import IGNORE_INDEX, per_example_mean, per_token_cross_entropy, trained_token_scores
from .lm_head import logits_at_trained_positions
from .logits import forward_logits, slice_batch
from .registry import get_score_spec

__all__ = [
    "check_class_labels",
    "check_token_labels",
    "main_input",
    "score_batch",
    "score_causal_lm_batch",
    "validate_methods",
]


def validate_methods(methods: Sequence[str] | str, task: str | None = None) -> list[str]:
    """Check every method is a registered score (of `task`, classification when `None`); return them as a list (a
    single string is one method).

    Example:
    ```python
    >>> from datadiet.scores import validate_methods
    >>> validate_methods("el2n")
    ['el2n']

    ```
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError("methods is empty: name at least one score, e.g. methods=('el2n',).")
    for method in methods:
        get_score_spec(method, task)  # raises a ValueError listing the valid names
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods} names a score more than once.")
    return methods


def main_input(inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The input tensor of a batch of model inputs, what input scores (`input_norm`) measure: the tensor itself, the
    `pixel_values` / `input_values` / `inputs` entry of a dict, or its only floating-point tensor; otherwise the dict
    unchanged (tokenised text), which an input score refuses with its own message."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    for name in ("pixel_values", "input_values", "inputs"):
        if name in inputs:
            return inputs[name]
    tensors = [value for value in inputs.values() if torch.is_tensor(value) and value.is_floating_point()]
    return tensors[0] if len(tensors) == 1 else inputs


def check_class_labels(labels: torch.Tensor, num_classes: int, row_ids: Sequence[int]) -> None:
    """Refuse class ids outside `[0, num_classes)`, naming the rows (a classifier's label check; never a causal LM's,
    whose config reports a `num_labels` unrelated to its vocabulary)."""
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if len(bad):
        rows = [int(row_ids[i]) for i in bad[:5]]
        raise ValueError(
            f"Labels outside the model's {num_classes} classes at rows {rows} (label {int(labels[bad[0]])}). Build "
            "the model with as many outputs as the dataset has classes, or fix the label column."
        )


def check_token_labels(labels: torch.Tensor, vocab_size: int, row_ids: Sequence[int]) -> None:
    """Refuse token labels `[B, T]` outside the vocabulary `[0, vocab_size)`, `-100` (untrained) excepted, naming the
    rows: a causal LM's label check."""
    bad = ((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))).any(dim=1).nonzero().flatten()
    if len(bad):
        rows = [int(row_ids[i]) for i in bad[:5]]
        raise ValueError(
            f"Token ids outside the model's vocabulary of {vocab_size} at rows {rows}: tokenise with the model's own "
            "tokenizer (a tokenizer with a larger vocabulary needs model.resize_token_embeddings(len(tokenizer)))."
        )


def _check_finite(logits: torch.Tensor, row_ids: Sequence[int], rows: torch.Tensor | None = None) -> None:
    # A row's sum is finite when all its values are (a sum overflowing float32 is rechecked value by value): one
    # reduction instead of isfinite's several passes over large logits. `rows` maps logits rows to batch rows.
    flat = logits.flatten(1)
    suspect = (~torch.isfinite(flat.sum(dim=-1))).nonzero().flatten()
    if not len(suspect):
        return
    suspect = suspect[(~torch.isfinite(flat[suspect])).any(dim=-1)]
    bad = (suspect if rows is None else rows.to(suspect.device)[suspect]).unique()
    if len(bad):
        rows = [int(row_ids[i]) for i in bad[:5]]
        raise ValueError(
            f"The model produced NaN or infinite logits for rows {rows}{' ...' if len(bad) > 5 else ''}. Check "
            "those inputs and the model's weights (a diverged training run, or inputs not normalised)."
        )


def score_batch(
    model: nn.Module,
    inputs: torch.Tensor | dict[str, torch.Tensor],
    labels: torch.Tensor,
    methods: Sequence[str] | str,
    *,
    input_tensor: torch.Tensor | None = None,
    row_ids: Sequence[int] | None = None,
    num_classes: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    gradient_chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Score one batch with `model` (already in eval mode) for each method.

    Logit scores share one no-grad forward pass (under autocast when `autocast_dtype` is given), checked for NaN or
    infinite logits and for labels outside the model's classes; gradient scores (`grand`, `tracin_self_influence`)
    run their own forward and backward on `model` and `inputs`; input scores (`input_norm`) see `input_tensor`.

    Args:
        model (`nn.Module`): the classifier, in eval mode.
        inputs (`torch.Tensor` or `dict`): model-ready inputs: a tensor passed positionally or a dict passed as
            keywords (see `datadiet.models.as_model_inputs`).
        labels (`torch.Tensor`): class ids `[B]`, on the device of the batch (autocast runs on that device).
        methods (`str` or sequence of `str`): registered score names.
        input_tensor (`torch.Tensor`, *optional*): what input scores measure; by default `main_input(inputs)`.
        row_ids (sequence of `int`, *optional*): the rows' ids, named in error messages; positions by default.
        num_classes (`int`, *optional*): the model's number of classes, to check the labels when only gradient
            scores run (no logits are computed then), e.g. `datadiet.models.num_labels_of(model)`.
        autocast_dtype (`torch.dtype`, *optional*): autocast the logits' forward pass to this dtype.
        gradient_chunk_size (`int`, *optional*): run gradient scores on at most this many examples at once, to bound
            memory.

    Returns:
        `dict[str, torch.Tensor]`: one detached float32 CPU tensor of shape `[B]` per method.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.scores import score_batch
    >>> model = torch.nn.Linear(4, 3).eval()
    >>> scores = score_batch(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), ["el2n", "grand"])
    >>> {name: tuple(value.shape) for name, value in scores.items()}
    {'el2n': (5,), 'grand': (5,)}

    ```
    """
    row_ids = range(len(labels)) if row_ids is None else row_ids
    specs = [get_score_spec(method) for method in ([methods] if isinstance(methods, str) else methods)]
    results: dict[str, torch.Tensor] = {}
    if any(spec.needs == "logits" for spec in specs) or not any(spec.needs == "gradients" for spec in specs):
        device_type = labels.device.type  # autocast on the device the batch is on (cpu, cuda, ...)
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = forward_logits(model, inputs).float()
        _check_finite(logits, row_ids)
        check_class_labels(labels, logits.shape[-1], row_ids)
    elif num_classes is not None:
        check_class_labels(labels, num_classes, row_ids)
    for spec in specs:
        if spec.needs == "logits":
            results[spec.name] = spec.fn(logits, labels)
        elif spec.needs == "inputs":
            results[spec.name] = spec.fn(main_input(inputs) if input_tensor is None else input_tensor)
        else:
            values = _gradient_score(spec.fn, model, inputs, labels, gradient_chunk_size)
            if not torch.isfinite(values).all():
                _check_finite(values[:, None], row_ids)
            results[spec.name] = values
    return {name: value.detach().float().cpu() for name, value in results.items()}


def _gradient_score(fn, model: nn.Module, inputs, labels: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    batch_size = len(labels)
    if chunk_size is None or chunk_size >= batch_size:
        return fn(model, inputs, labels)
    if chunk_size < 1:
        raise ValueError(f"gradient_chunk_size must be a positive number of examples, got {chunk_size}.")
    return torch.cat(
        [
            fn(model, slice_batch(inputs, start, start + chunk_size, batch_size), labels[start : start + chunk_size])
            for start in range(0, batch_size, chunk_size)
        ]
    )


def score_causal_lm_batch(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    methods: Sequence[str] | str,
    *,
    response: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None,
    row_ids: Sequence[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    gradient_chunk_size: int | None = None,
    return_token_scores: bool = False,
) -> dict[str, torch.Tensor]:
    """Score one batch of a causal LM (already in eval mode) for each method of the `causal_lm` task: one no-grad
    forward shared by `loss`, `perplexity`, `el2n` and `ifd`'s conditioned loss, a second on the response alone for
    `ifd`, the exact per-example gradient norm for `grand`. Labels are checked against the vocabulary (the logits' last
    dimension), never against a classifier's `num_labels`. The output head and the softmax run at the trained
    positions only (`datadiet.scores.lm_head`; the full logits when the head cannot be hooked, or when a score
    registered by the user asks for them), and only the logits used are checked finite.

    Args:
        model (`nn.Module`): the causal LM (e.g. `LlamaForCausalLM`, or a peft model around it), in eval mode.
        inputs (`dict`): model inputs (`input_ids`, `attention_mask`, ...), without `labels`.
        labels (`torch.Tensor`): `[B, T]` token ids, `-100` where not trained on (not yet shifted).
        methods (`str` or sequence of `str`): names from `list_scores("causal_lm")`.
        response (`tuple`, *optional*): `(inputs, labels)` of each row's response alone, needed by `ifd` (built by
            `datadiet.tasks.CausalLMTask.response_batch`).
        row_ids, autocast_dtype, gradient_chunk_size: as for `score_batch`.
        return_token_scores (`bool`, *optional*, defaults to `False`): also return, under `"<method>_tokens"`, the
            per-position values `[B, T-1]` of `loss`, `perplexity` and `el2n` (NaN where not trained).

    Returns:
        `dict[str, torch.Tensor]`: one detached float32 CPU tensor `[B]` per method (and `[B, T-1]` token scores).
    """
    row_ids = range(len(labels)) if row_ids is None else row_ids
    specs = [get_score_spec(method, "causal_lm") for method in ([methods] if isinstance(methods, str) else methods)]
    results: dict[str, torch.Tensor] = {}
    autocast = {"dtype": autocast_dtype, "enabled": autocast_dtype is not None}
    # The built-in scores read the logits at the trained positions only; a score registered by the user gets them all.
    full = any(spec.needs == "logits" and spec.name not in _TOKEN_SCORES for spec in specs)
    logits = token_values = None
    if full:
        with torch.no_grad(), torch.autocast(labels.device.type, **autocast):
            logits = forward_logits(model, inputs).float()
        _check_finite(logits[:, :-1][labels[:, 1:] != IGNORE_INDEX], row_ids, _trained_rows(labels))
        check_token_labels(labels, logits.shape[-1], row_ids)
    elif any(spec.needs != "gradients" for spec in specs):
        el2n = any(spec.name == "el2n" for spec in specs)
        token_values = _trained_token_values(model, inputs, labels, row_ids, autocast, el2n=el2n)
    for spec in sorted(specs, key=lambda spec: spec.needs == "response"):  # `ifd` after `loss`, whose value it reuses
        if spec.needs == "logits":
            if token_values is not None:
                values = _token_score(spec.name, *token_values, return_token_scores)
            else:
                values = spec.fn(logits, labels, return_token_scores=return_token_scores)
            if return_token_scores:
                values, results[f"{spec.name}_tokens"] = values
            results[spec.name] = values
        elif spec.needs == "response":
            if response is None:
                raise ValueError(f"{spec.name} needs each row's response alone: pass response=(inputs, labels).")
            # The conditioned loss is the `loss` score itself: taken from it when it was computed.
            conditioned = results.get("loss")
            if conditioned is None and token_values is not None:
                conditioned = per_example_mean(token_values[0], token_values[2])
            elif conditioned is None:
                conditioned = per_example_mean(*per_token_cross_entropy(logits, labels))
            nll, _, mask = _trained_token_values(model, response[0], response[1], row_ids, autocast, el2n=False)
            results[spec.name] = spec.fn(conditioned, per_example_mean(nll, mask))
        elif spec.needs == "gradients":
            check_token_labels(labels, _vocab_size(model, labels), row_ids)
            values = _gradient_score(spec.fn, model, inputs, labels, gradient_chunk_size)
            if not torch.isfinite(values).all():
                _check_finite(values[:, None], row_ids)
            results[spec.name] = values
        else:
            raise ValueError(f"{spec.name} needs {spec.needs!r}, which a causal LM's batch does not provide.")
    return {name: value.detach().float().cpu() for name, value in results.items()}


# The scores computed from the log-softmax at the trained positions (see `_trained_token_values`).
_TOKEN_SCORES = ("loss", "perplexity", "el2n")


def _trained_rows(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]


def _trained_token_values(model, inputs, labels, row_ids, autocast: dict, *, el2n: bool):
    """`(nll, el2n, mask)`: the next-token NLL and token EL2N `[B, T-1]` (zero where not trained; EL2N `None` unless
    asked) and the mask of trained positions, from one no-grad forward whose output head runs at those positions
    only; the logits used are checked finite and the labels within the vocabulary."""
    mask = labels[:, 1:] != IGNORE_INDEX
    with torch.no_grad(), torch.autocast(labels.device.type, **autocast):
        logits = logits_at_trained_positions(model, inputs, mask, packed=True).float()
    check_token_labels(labels, logits.shape[-1], row_ids)
    _check_finite(logits, row_ids, _trained_rows(labels))
    nll, token_el2n = trained_token_scores(logits, labels[:, 1:][mask].to(logits.device), el2n=el2n)
    mask = mask.to(logits.device)

    def spread(values):
        return None if values is None else values.new_zeros(mask.shape).masked_scatter_(mask, values)

    return spread(nll), spread(token_el2n), mask


def _token_score(name: str, nll: torch.Tensor, token_el2n: torch.Tensor | None, mask: torch.Tensor, tokens: bool):
    """A built-in score (`loss`, `perplexity`, `el2n`) from the per-token values, as its registered function gives
    it from the full logits."""
    per_token = token_el2n if name == "el2n" else nll
    per_example = per_example_mean(per_token, mask)
    if name == "perplexity":
        per_example, per_token = per_example.exp(), per_token.exp()
    return (per_example, per_token.masked_fill(~mask, float("nan"))) if tokens else per_example


def _vocab_size(model: nn.Module, labels: torch.Tensor) -> int:
    # The output embedding's rows when the model says (transformers' get_output_embeddings), else no bound beyond ids.
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    weight = getattr(output, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else int(labels.max()) + 1
