"""Fine-tune a causal LM with TRL's SFTTrainer and peft LoRA on instruction rows (e.g. the rows `datadiet prune` kept),
then report the held-out completion loss. The same script makes LESS's warm-up checkpoints (`--save_steps`).

    python recipes/sft/sft_lora.py --model_name_or_path <folder | .gguf file> --dataset_name outputs/sft/pruned \
        --eval_dataset_name ../shared/data/instructions/alpaca_9k --eval_start 9000 --max_eval_rows 200 \
        --use_peft --lora_r 16 --lora_target_modules all-linear --max_steps 100 --output_dir outputs/sft/lora

Its flags are TRL's: `SFTConfig` (training) and `ModelConfig` (LoRA), plus the few below. Alpaca rows
(`instruction` / `input` / `output`) become TRL prompt-completion rows exactly as `datadiet score --task causal_lm`
reads them, so that the model trains on the tokens that were scored. The held-out loss is each row's mean
completion-token loss (`datadiet`'s `loss` score, the row alone), averaged over the rows; it is written with the loss
of the model before fine-tuning to `<output_dir>/results.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from datadiet import score_dataset
from datadiet.data import load_data
from datadiet.language_models import load_tokenizer
from datadiet.model_sources import load_checkpoint
from datadiet.tasks.causal_lm import alpaca_to_prompt_completion


@dataclass
class ScriptArguments:
    dataset_name: str = field(metadata={"help": "Training rows: a datadiet prune / score folder, a dataset folder."})
    gguf_file: str | None = field(default=None, metadata={"help": "The .gguf file inside model_name_or_path."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Only the first rows of the training set."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Held-out rows (never trained on)."})
    eval_start: int = field(default=0, metadata={"help": "The first held-out row (e.g. past the scored pool)."})
    max_eval_rows: int = field(default=200, metadata={"help": "Number of held-out rows."})


def as_prompt_completion(dataset, tokenizer):
    """TRL prompt-completion rows (Alpaca rows converted as datadiet's causal_lm task converts them); other columns
    (score columns) dropped."""
    if {"instruction", "output"} <= set(dataset.column_names):
        conversational = tokenizer.chat_template is not None
        dataset = dataset.map(lambda row: alpaca_to_prompt_completion(row, conversational=conversational))
    keep = [name for name in ("prompt", "completion", "messages", "text") if name in dataset.column_names]
    return dataset.select_columns(keep)


def held_out_loss(model, rows, tokenizer, max_length) -> float:
    scored = score_dataset(rows, model, ["loss"], task="causal_lm", tokenizer=tokenizer, max_length=max_length)
    return float(np.mean(scored["loss"]))


def main():
    script, training, model_config = TrlParser((ScriptArguments, SFTConfig, ModelConfig)).parse_args_and_config()
    if not model_config.model_name_or_path:
        raise SystemExit("--model_name_or_path is required (a save_pretrained folder, Hub id or .gguf file).")
    tokenizer = load_tokenizer(model_config.model_name_or_path, gguf_file=script.gguf_file)
    model, _ = load_checkpoint(model_config.model_name_or_path, task="causal_lm", gguf_file=script.gguf_file)
    train = load_data(script.dataset_name, max_rows=script.max_train_rows)
    evaluation = None
    if script.eval_dataset_name:
        evaluation = load_data(script.eval_dataset_name, max_rows=script.eval_start + script.max_eval_rows)
        evaluation = evaluation.select(range(script.eval_start, len(evaluation)))
        if len(evaluation) == 0:
            raise SystemExit(f"No held-out rows from row {script.eval_start} of {script.eval_dataset_name}.")
    before = held_out_loss(model, evaluation, tokenizer, training.max_length) if evaluation is not None else None
    trainer = SFTTrainer(
        model=model,
        args=training,
        train_dataset=as_prompt_completion(train, tokenizer),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_config),
    )
    result = trainer.train()
    trainer.save_model(training.output_dir)
    results = {
        "train_rows": len(train),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "eval_rows": None if evaluation is None else len(evaluation),
        "eval_loss_before": before,
        "eval_loss": held_out_loss(trainer.model, evaluation, tokenizer, training.max_length)
        if evaluation is not None
        else None,
    }
    Path(training.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(training.output_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
