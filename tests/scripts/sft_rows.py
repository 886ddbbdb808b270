"""A user's TRL SFTTrainer script (peft LoRA, learning rate 0, a tiny random Llama) with `callbacks=[ScoreCallback()]`,
one process or under `accelerate launch`, on Alpaca rows as conversational prompt-completion pairs (row 3 given a
prompt longer than max_length, which SFTTrainer drops): writes the world size and the per-row loss and probability
histories to an .npz.

    python sft_rows.py RESULT.npz TOKENIZER_FOLDER ALPACA_PARQUET NUM_ROWS
"""

import sys

import numpy as np
import torch
import transformers
from datasets import Dataset, load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from datadiet.tasks.causal_lm import alpaca_to_prompt_completion
from datadiet.trainer import ScoreCallback

torch.set_num_threads(1)
output, tokenizer_folder, alpaca, num_rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
rows = [dict(row) for row in load_dataset("parquet", data_files=alpaca, split="train").select(range(num_rows))]
rows[3] = {**rows[3], "instruction": "Repeat after me: " + "the quick brown fox jumps over the lazy dog " * 20}
dataset = Dataset.from_list([alpaca_to_prompt_completion(row, conversational=True) for row in rows])
torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1,
)  # fmt: skip
args = SFTConfig(
    output_dir=output + ".out", report_to=[], use_cpu=True, learning_rate=0.0, num_train_epochs=2,
    per_device_train_batch_size=2, max_length=96, save_strategy="no", logging_strategy="no", disable_tqdm=True,
)  # fmt: skip
callback = ScoreCallback()
trainer = SFTTrainer(
    model=transformers.LlamaForCausalLM(config),
    args=args,
    train_dataset=dataset,
    processing_class=tokenizer,
    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    callbacks=[callback],
)
trainer.train()
if trainer.accelerator.is_main_process:
    history = callback.score_history
    np.savez(
        output, world_size=trainer.accelerator.num_processes, loss=history["loss"], probability=history["probability"]
    )
