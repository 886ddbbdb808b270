"""One SFT curve run: a LoRA fine-tune with TRL's `SFTTrainer` (completion-only loss) on some rows of the pool, and the
held-out mean completion-token loss of the fine-tuned model."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import torch
from datasets import Dataset

from ...scores.causal_lm import per_token_cross_entropy
from .arguments import SFTCurveArguments

logger = logging.getLogger(__name__)

__all__ = ["held_out_loss", "load_causal_lm", "train_lora"]


# TODO: `datadiet.model_sources.load_checkpoint(..., task="causal_lm", model_kwargs={"dtype": torch.float32})` with
# `datadiet.language_models.load_tokenizer` was checked against this loader and is not switched in while the
# pre-registered study (recipes/sft/study.yaml) runs: on its SmolLM2-135M-Instruct Q4_1 GGUF both give the same class,
# config, generation config, float32 tensors (bit for bit), tokenizer and chat-template ids, logits, and LoRA adapters
# and held-out loss after a `train_lora` step, but not the same model object. This loader rebuilds the GGUF model with
# `from_config` (train mode, never kernelized, no `is_quantized`); `load_checkpoint` keeps transformers'
# `from_pretrained` model, in eval mode, with `is_quantized=False` and kernelized for inference by default
# (`_use_kernels=True`, `_kernels_mode=Mode.INFERENCE`, since the `kernels` package is installed). A tiny
# `save_pretrained` Llama loads identically either way. Switch after the study (the comparison: the first 50 rows of
# alpaca_9k and dolly_3k, both loaders, the checks above).
def load_causal_lm(model_name_or_path: str, gguf_file: str | None = None):
    """A causal LM and its tokenizer from a folder, or from a GGUF file (a path to the `.gguf` file, or a folder and
    `gguf_file`), in float32. Returns `(model, tokenizer)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_name_or_path)
    if path.suffix == ".gguf":
        if gguf_file and gguf_file != path.name:
            raise ValueError(
                f"--model_name_or_path names the GGUF file {path.name} and --gguf_file names {gguf_file}: name the "
                "file once (its path, or its folder and --gguf_file)."
            )
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise ValueError(f"No model at {path}: pass --model_name_or_path with a causal LM folder or a .gguf file.")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    if gguf_file:
        # transformers dequantises a GGUF file's weights into plain float32 tensors at load, yet marks the model as
        # quantized, and `Trainer` then refuses to train it ("GGUF ... do not support training"): the same weights in
        # a model built from the configuration alone train as any other.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
    if tokenizer.chat_template is None:
        raise ValueError(
            f"The tokenizer of {model_name_or_path} has no chat template: the SFT curve trains conversational "
            "prompt/completion rows. Use an instruct model (e.g. SmolLM2-135M-Instruct) or set tokenizer.chat_template."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def train_lora(
    base_model, tokenizer, train_rows: Dataset, args: SFTCurveArguments, seed: int, eval_sets: dict[str, Dataset]
):
    """Fine-tune a LoRA adapter on a copy of `base_model` (never changed) with `SFTTrainer` for `args.max_steps`
    optimizer steps on the prompt/completion `train_rows` (completion-only loss), with training randomness (adapter
    initialisation, row order, dropout) from `seed`. `eval_sets` (prompt/completion rows) are tokenised by the same
    trainer, exactly as the training rows; read their loss with `held_out_loss(trainer, name)`. Returns the trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(seed)
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules[0]
        if args.lora_target_modules == ["all-linear"]
        else args.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base_model), lora)
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="datadiet-sft-"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=seed,
        data_seed=seed,
        max_length=args.max_length,
        completion_only_loss=True,
        packing=False,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=max(1, args.max_steps // 10),
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=False,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train_rows, eval_dataset=eval_sets or None, processing_class=tokenizer
    )
    trainer.train()
    return trainer


@torch.no_grad()
def held_out_loss(trainer, name: str) -> dict[str, float]:
    """The mean completion-token loss of `trainer.model` on the held-out set `name` (one of the trainer's eval
    datasets): the token-weighted mean, i.e. the summed next-token negative log-likelihood of every completion token
    of every row over the number of those tokens (rows cut at `max_length` as in training). Returns `{"loss",
    "tokens", "rows"}`; `rows` counts the rows `SFTTrainer` kept, which leaves out rows whose prompt fills
    `max_length` (no completion token: nothing to add to the mean)."""
    model = trainer.model
    model.eval()
    total, tokens, rows = 0.0, 0, 0
    for batch in trainer.get_eval_dataloader(name):
        batch = {key: value.to(model.device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, mask = per_token_cross_entropy(logits, batch["labels"])  # zero where the mask is False
        total += float(nll.sum())
        tokens += int(mask.sum())
        rows += len(mask)
    if tokens == 0:
        raise ValueError(f"The held-out set {name!r} has no completion token within max_length: raise --max_length.")
    return {"loss": total / tokens, "tokens": tokens, "rows": rows}
