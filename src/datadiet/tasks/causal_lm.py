"""The `causal_lm` task: rows in TRL's dataset formats tokenised and masked exactly as `SFTTrainer` does it, padded
into batches, and a causal LM's logits turned into per-example quantities over the trained tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..scores.batch import check_token_labels, score_causal_lm_batch
from ..scores.causal_lm import IGNORE_INDEX, per_example_mean, per_token_cross_entropy, per_token_predictions
from ..scores.logits import unwrap_logits
from ..scores.trackers import sequence_training_quantities
from .registry import register_task

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "CausalLMTask", "alpaca_to_prompt_completion"]

# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py), used when the tokenizer has no chat
# template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FORMATS = ("messages", "prompt_completion", "alpaca", "text")


def alpaca_to_prompt_completion(row: dict[str, Any], *, conversational: bool) -> dict[str, Any]:
    """An `instruction` / `input` / `output` (Alpaca) row as TRL's prompt-completion format.

    Conversational (for a tokenizer with a chat template): `prompt = [{"role": "user", "content": instruction +
    "\\n\\n" + input}]` (just `instruction` when `input` is empty or missing), `completion = [{"role": "assistant",
    "content": output}]`. Otherwise the prompt is Stanford Alpaca's template (`ALPACA_PROMPT`, or
    `ALPACA_PROMPT_NO_INPUT` when `input` is empty) and the completion is `output`.

    Example:
    ```python
    >>> from datadiet.tasks.causal_lm import alpaca_to_prompt_completion
    >>> alpaca_to_prompt_completion({"instruction": "Add.", "input": "1 2", "output": "3"}, conversational=True)
    {'prompt': [{'role': 'user', 'content': 'Add.\\n\\n1 2'}], 'completion': [{'role': 'assistant', 'content': '3'}]}

    ```
    """
    instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
    if conversational:
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": output}],
        }
    template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
    return {"prompt": template.format(instruction=instruction, input=extra), "completion": output}


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    # TRL's `common_prefix_length`: the completion starts where the two tokenisations diverge.
    length = 0
    for token, other_token in zip(ids, other):
        if token != other_token:
            break
        length += 1
    return length


@register_task("causal_lm")
class CausalLMTask:
    """Instruction / SFT data for a causal language model, as TRL's `SFTTrainer` trains on it.

    Rows (one format for the whole dataset, detected from the columns): `messages` (a conversation, rendered with the
    tokenizer's chat template), `prompt` / `completion` (strings, or conversations), `instruction` / `input` /
    `output` (Alpaca, see `alpaca_to_prompt_completion`), or `text`. Each row is tokenised as `SFTTrainer` does: the
    EOS token appended to non-conversational text and completions that lack it; the loss on the completion only for
    prompt-completion rows (`completion_only_loss`, default on), on the assistant turns only with
    `assistant_only_loss=True` (the chat template must mark them with `{% generation %}`), otherwise on every token;
    truncation to the first `max_length` tokens. Batches are padded with the tokenizer's pad token (its EOS token when
    it has none), labels with `-100`.

    Args:
        tokenizer: the model's tokenizer (a transformers `PreTrainedTokenizerBase`).
        max_length (`int` or `None`, *optional*, defaults to `1024`): `SFTConfig.max_length`; `None` keeps every token.
        completion_only_loss (`bool`, *optional*): `SFTConfig.completion_only_loss`; `None` = on for prompt-completion
            (and Alpaca) rows.
        assistant_only_loss (`bool`, *optional*, defaults to `False`): `SFTConfig.assistant_only_loss`.
        padding_side (`str`, *optional*, defaults to `"right"`): `"right"` as TRL's collator; `"left"` adds
            `position_ids` so that each row keeps the positions it has alone.
        eos_token (`str`, *optional*): `SFTConfig.eos_token`; defaults to the tokenizer's.

    Example:
    ```python
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import PreTrainedTokenizerFast
    >>> from datadiet.tasks import get_task
    >>> words = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "Add": 2, "1": 3, "2": 4, "3": 5}, unk_token="<pad>"))
    >>> words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>")
    >>> task = get_task("causal_lm", tokenizer=tokenizer)
    >>> batch = task.collate({"prompt": ["Add 1 2", "Add 2"], "completion": [" 3", " 2"]})
    >>> batch["input_ids"].tolist(), batch["labels"].tolist()
    ([[2, 3, 4, 5, 1], [2, 4, 4, 1, 0]], [[-100, -100, -100, 5, 1], [-100, -100, 4, 1, -100]])

    ```
    """

    name = "causal_lm"

    def __init__(
        self,
        tokenizer,
        *,
        max_length: int | None = 1024,
        completion_only_loss: bool | None = None,
        assistant_only_loss: bool = False,
        padding_side: str = "right",
        eos_token: str | None = None,
    ):
        if tokenizer is None:
            raise ValueError("The causal_lm task needs the model's tokenizer: pass tokenizer=AutoTokenizer...(...).")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens (one predicted from another), got {max_length}.")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.completion_only_loss = completion_only_loss
        self.assistant_only_loss = assistant_only_loss
        self.padding_side = padding_side
        self.eos_token = eos_token if eos_token is not None else tokenizer.eos_token
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token.")
        self.pad_token_id = int(pad)

    # Rows -> token ids and labels ---------------------------------------------------------------------------------

    @staticmethod
    def detect_format(columns: Sequence[str]) -> str:
        """Which of TRL's formats rows with these columns are in: `"messages"`, `"prompt_completion"`, `"alpaca"`
        (`instruction` / `output`, `input` optional) or `"text"`."""
        columns = set(columns)
        if "messages" in columns:
            return "messages"
        if {"prompt", "completion"} <= columns:
            return "prompt_completion"
        if {"instruction", "output"} <= columns:
            return "alpaca"
        if "text" in columns:
            return "text"
        raise ValueError(
            f"No causal-LM data among the columns {sorted(columns)}: rows need `messages`, `prompt` and `completion`, "
            "`instruction` and `output` (Alpaca, `input` optional) or `text` (TRL's dataset formats). Rename your "
            "columns with dataset.rename_column(...)."
        )

    def columns_in(self, names: Sequence[str]) -> list[str]:
        """The columns among `names` (a dataset's or a batch's) that this task reads: those of the detected format."""
        return [name for name in self.columns_of(self.detect_format(names)) if name in names]

    @staticmethod
    def columns_of(format_name: str) -> list[str]:
        """The columns a format reads."""
        return {
            "messages": ["messages"],
            "prompt_completion": ["prompt", "completion"],
            "alpaca": ["instruction", "input", "output"],
            "text": ["text"],
        }[format_name]

    def _chat(self, conversation: list, **kwargs) -> dict[str, list[int]]:
        return dict(self.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs))

    def tokenize(self, row: dict[str, Any]) -> dict[str, list[int]]:
        """One row -> `{"input_ids", "labels"}` (lists, labels `-100` where not trained on), as `SFTTrainer` prepares it
        (`_prepare_dataset`: EOS, tokenisation, the completion / assistant mask, `build_labels`, truncation)."""
        if "instruction" in row and "messages" not in row and "prompt" not in row:
            row = alpaca_to_prompt_completion(row, conversational=self.tokenizer.chat_template is not None)
        masks, assistant_mask = [], None
        if "prompt" in row:
            if isinstance(row["prompt"], list):  # conversational prompt-completion
                prompt_ids = self._chat(row["prompt"], add_generation_prompt=True)["input_ids"]
                processed = self._chat(
                    row["prompt"] + row["completion"], return_assistant_tokens_mask=self.assistant_only_loss
                )
                input_ids = processed["input_ids"]
                assistant_mask = processed.get("assistant_masks")
            else:
                completion = row["completion"]
                if not completion.endswith(self.eos_token):
                    completion = completion + self.eos_token
                prompt_ids = self.tokenizer(text=row["prompt"])["input_ids"]
                input_ids = self.tokenizer(text=row["prompt"] + completion)["input_ids"]
            if self.completion_only_loss is not False:
                start = _common_prefix_length(prompt_ids, input_ids)
                masks.append([0] * start + [1] * (len(input_ids) - start))
        elif "messages" in row:
            if self.completion_only_loss:
                raise ValueError("completion_only_loss=True needs prompt-completion rows; these rows are `messages`.")
            processed = self._chat(row["messages"], return_assistant_tokens_mask=self.assistant_only_loss)
            input_ids = processed["input_ids"]
            assistant_mask = processed.get("assistant_masks")
        else:
            if self.completion_only_loss:
                raise ValueError("completion_only_loss=True needs prompt-completion rows; these rows are `text`.")
            text = row["text"] if row["text"].endswith(self.eos_token) else row["text"] + self.eos_token
            input_ids = self.tokenizer(text=text)["input_ids"]
        if assistant_mask is not None and 1 not in assistant_mask:
            raise ValueError(
                "assistant_only_loss=True but a row has no assistant tokens: the tokenizer's chat template must mark "
                "assistant turns with {% generation %} (as SFTTrainer requires)."
            )
        if assistant_mask is not None:
            masks.append(assistant_mask)
        labels = [token if all(bits) else IGNORE_INDEX for token, *bits in zip(input_ids, *masks)]
        if self.max_length is not None:
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": list(input_ids), "labels": labels}

    # Token ids -> a batch -----------------------------------------------------------------------------------------

    def pad(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Tokenised rows -> `input_ids`, `attention_mask`, `labels` `[B, T]` (and `position_ids` when padding on the
        left), as TRL's `DataCollatorForLanguageModeling` pads them."""
        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            where = slice(0, length) if self.padding_side == "right" else slice(width - length, width)
            input_ids[row, where] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            labels[row, where] = torch.as_tensor(example["labels"], dtype=torch.long)
            attention_mask[row, where] = 1
            if self.padding_side == "left":
                # A row's first token is never a target (nothing precedes it); on the left of it stands padding, whose
                # logits would otherwise be scored as predicting it.
                labels[row, width - length] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.padding_side == "left":
            batch["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return batch

    def collate(self, rows: dict[str, list] | Sequence[dict[str, Any]], row_ids: Sequence[int] | None = None):
        """Raw rows (a `dict` of column lists, as `Dataset[...]` and `map(batched=True)` give them, or a list of row
        dicts) -> a padded batch: `input_ids`, `attention_mask`, `labels` (and `position_ids` for left padding).

        Rows left with no trained token (e.g. a prompt filling `max_length`) are refused, naming them: `SFTTrainer`
        drops such rows, and a score of nothing would be meaningless."""
        if isinstance(rows, dict):
            names = list(rows)
            rows = [dict(zip(names, values)) for values in zip(*rows.values())]
        if not rows:
            raise ValueError("No rows to collate.")
        examples = [self.tokenize(row) for row in rows]
        empty = [
            i for i, example in enumerate(examples) if all(label == IGNORE_INDEX for label in example["labels"][1:])
        ]
        if empty:
            named = [int(row_ids[i]) if row_ids is not None else i for i in empty[:5]]
            raise ValueError(
                f"Rows {named}{' ...' if len(empty) > 5 else ''} have no trained token after truncation to "
                f"max_length={self.max_length} (SFTTrainer drops such rows): raise max_length, or filter these rows "
                "out first."
            )
        return self.pad(examples)

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the model is called with: the batch without `labels` (so that it computes no loss of its own)."""
        return {key: value for key, value in batch.items() if key != "labels"}

    # Outputs -> per-example quantities ----------------------------------------------------------------------------

    @staticmethod
    def loss_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, T-1]` bool: the positions whose next token is trained on (`labels[:, 1:] != -100`)."""
        return batch["labels"][:, 1:] != IGNORE_INDEX

    @staticmethod
    def per_token_losses(
        logits: torch.Tensor, batch: dict[str, torch.Tensor], *, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token NLL `[B, T-1]` (logits at t, label at t + 1; zero where not trained) and the loss mask."""
        if label_smoothing:
            raise ValueError(
                f"label_smoothing={label_smoothing} is not supported for a causal LM (its loss is each row's mean "
                "token NLL): set label_smoothing_factor=0."
            )
        return per_token_cross_entropy(logits, batch["labels"].to(logits.device))

    @staticmethod
    def per_example(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token values `[B, T-1]` -> `[B]`: the mean over each row's trained tokens."""
        return per_example_mean(values, mask.to(values.device))

    def per_example_losses(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's loss, as `SFTTrainer` computes it for the row alone."""
        return self.per_example(*self.per_token_losses(logits, batch))

    @staticmethod
    def check_outputs(logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        """A causal LM's training forward: logits `[B, T, V]` and token labels `[B, T]`."""
        if logits.ndim != 3 or labels is None or labels.ndim != 2:
            raise ValueError(
                "A causal LM is tracked from logits [batch, tokens, vocabulary] and labels [batch, tokens]; got logits "
                f"{tuple(logits.shape)} and labels {None if labels is None else tuple(labels.shape)}. For a "
                "classifier, pass task='classification'."
            )

    @staticmethod
    def tracked_quantities(output, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The per-row quantities recorded while training (see
        [`~datadiet.scores.trackers.sequence_training_quantities`]) over each row's trained tokens: from the logits
        `[B, T, V]` and labels `[B, T]` of a training forward, or from TRL's fused LM head output (`log_probs`,
        `label_mask`, `is_top1`: no logits, so no EL2N or margin).

        Example:
        ```python
        >>> import torch
        >>> from datadiet.tasks import CausalLMTask
        >>> q = CausalLMTask.tracked_quantities(torch.zeros(1, 3, 4), torch.tensor([[-100, 1, 2]]))
        >>> round(q["loss"].item(), 4), q["probability"].item()
        (1.3863, 0.25)

        ```
        """
        log_probs, label_mask = _field(output, "log_probs"), _field(output, "label_mask")
        if log_probs is not None and label_mask is not None:
            return sequence_training_quantities(-log_probs.detach(), label_mask, _field(output, "is_top1"))
        logits = unwrap_logits(output)
        CausalLMTask.check_outputs(logits, labels)
        values = per_token_predictions(logits, labels)
        return sequence_training_quantities(
            values["nll"], values["mask"], values["correct"], el2n=values["el2n"], margin=values["margin"]
        )

    @staticmethod
    def check_labels(labels: torch.Tensor, vocab_size: int, row_ids: Sequence[int] | None = None) -> None:
        """Token ids within the vocabulary, `-100` ignored (never a classifier's `num_labels` check)."""
        check_token_labels(labels, vocab_size, range(len(labels)) if row_ids is None else row_ids)

    # IFD's second pass ---------------------------------------------------------------------------------------------

    def _adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        ids = self.tokenizer(text="a")["input_ids"]
        return bos is not None and len(ids) > 0 and ids[0] == bos

    def _check_response_scorable(self, batch: dict[str, torch.Tensor], row_ids: Sequence[int] | None) -> None:
        # Without a BOS the response alone does not predict its first token: a row with one trained token (e.g. its
        # completion cut to one token by max_length) has nothing left to score, and its ifd would be 0 / 0.
        if self._adds_bos():
            return
        single = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1) == 1
        if bool(single.any()):
            rows = single.nonzero().flatten().tolist()
            named = [int(row_ids[i]) if row_ids is not None else i for i in rows[:5]]
            raise ValueError(
                f"ifd is undefined for rows {named}{' ...' if len(rows) > 5 else ''}: each has one trained token after "
                f"truncation to max_length={self.max_length}, and this tokenizer adds no BOS, so the response alone "
                "has no token to predict: raise max_length, or drop these rows (or score them without ifd)."
            )

    def response_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each row's response alone, for `ifd`'s denominator PPL(response).

        The response is exactly the tokens trained on in the row (positions t ≥ 1 with `labels[t] != -100`: the
        completion, or the assistant turns, with whatever the chat template puts around them, e.g. `<|im_end|>`), in
        order, with the same token ids, at the start of a new sequence. It is preceded by the tokenizer's BOS token
        when the tokenizer adds one to plain text (Llama-2 style), as Superfiltering's `tokenizer.encode(output)`
        does; no chat template is applied. Without a BOS, the first response token has no context and is not scored
        (Superfiltering's unconditional loss, `labels=input_ids`, skips it the same way), so `score_batch` refuses,
        naming them, rows with a single trained token (their response alone predicts nothing); with a BOS, every
        response token is scored. Superfiltering re-tokenises the response text alone, which can split its first word
        differently; datadiet keeps the trained tokens so that both perplexities are over the same ids."""
        bos = [self.tokenizer.bos_token_id] if self._adds_bos() else []
        labels = batch["labels"]
        examples = []
        for row in range(labels.shape[0]):
            trained = batch["input_ids"][row, 1:][labels[row, 1:] != IGNORE_INDEX].tolist()
            examples.append({"input_ids": bos + trained, "labels": [IGNORE_INDEX] * len(bos) + trained})
        return self.pad(examples)

    # Scoring ------------------------------------------------------------------------------------------------------

    def score_batch(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        methods: Sequence[str],
        *,
        row_ids: Sequence[int] | None = None,
        autocast_dtype: torch.dtype | None = None,
        gradient_chunk_size: int | None = None,
        return_token_scores: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Score a collated batch (on the model's device) with the `causal_lm` scores (`loss`, `perplexity`, `el2n`,
        `ifd`, `grand`); see `datadiet.scores.batch.score_causal_lm_batch`."""
        methods = [methods] if isinstance(methods, str) else list(methods)
        response = None
        if "ifd" in methods:
            untrained = (batch["attention_mask"] == 1) & (batch["labels"] == IGNORE_INDEX)
            if not bool(untrained.any(dim=1).all()):
                raise ValueError(
                    "ifd needs an instruction to condition on, but every token of some rows is trained on: use "
                    "prompt-completion, Alpaca or messages rows (with assistant_only_loss=True) and the completion-only "
                    "loss."
                )
            self._check_response_scorable(batch, row_ids)
            device = batch["input_ids"].device
            responses = {key: value.to(device) for key, value in self.response_batch(batch).items()}
            response = (self.model_inputs(responses), responses["labels"])
        return score_causal_lm_batch(
            model,
            self.model_inputs(batch),
            batch["labels"],
            methods,
            response=response,
            row_ids=row_ids,
            autocast_dtype=autocast_dtype,
            gradient_chunk_size=gradient_chunk_size,
            return_token_scores=return_token_scores,
        )

    def fingerprint(self) -> str:
        """A stable description of the batches this task builds, for caches and resumable runs."""
        tokenizer = self.tokenizer
        return (
            f"causal_lm:{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}:"
            f"{hashlib.sha256((tokenizer.chat_template or '').encode()).hexdigest()[:16]}:{self.max_length}:{self.completion_only_loss}:"
            f"{self.assistant_only_loss}:{self.padding_side}:{self.eos_token}"
        )


def _field(output, name: str):
    """`output[name]` of a dict output, `output.name` of an output object (`None` when absent)."""
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)
