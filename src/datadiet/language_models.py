"""A causal LM's companions for the commands: its tokenizer, read from the same checkpoint as its weights (a GGUF file
too), and the peft LoRA adapters that `grand` is computed over."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["add_adapters", "load_tokenizer"]


def load_tokenizer(model_name_or_path: str, *, gguf_file: str | None = None):
    """The tokenizer of a causal-LM checkpoint, with its chat template: from a `save_pretrained` folder, a Hub id, a
    `.gguf` file, or a folder with `gguf_file` (as `datadiet.model_sources.load_checkpoint` reads the weights).

    Example:
    ```python
    >>> import tempfile
    >>> from transformers import AutoTokenizer, PreTrainedTokenizerFast
    >>> from tokenizers import Tokenizer, models
    >>> from datadiet.language_models import load_tokenizer
    >>> folder = tempfile.mkdtemp()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<eos>": 1})),
    ...                                     eos_token="<eos>")
    >>> _ = tokenizer.save_pretrained(folder)
    >>> load_tokenizer(folder).eos_token
    '<eos>'

    ```
    """
    from transformers import AutoTokenizer

    source, options = model_name_or_path, {}
    if model_name_or_path.endswith(".gguf"):
        source, options["gguf_file"] = str(Path(model_name_or_path).expanduser().parent), Path(model_name_or_path).name
    elif gguf_file:
        options["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(source, **options)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"No tokenizer could be read from {model_name_or_path!r} ({str(error).splitlines()[0]}): pass "
            "--tokenizer_name_or_path <a folder or file holding the model's tokenizer>."
        ) from None


def add_adapters(
    model: nn.Module,
    *,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    target_modules: list[str] | str = "all-linear",
    adapter_name_or_path: str | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict]:
    """`model` with peft LoRA adapters, the only trainable parameters (what `grand` is then over), and what to record
    about them: fresh adapters of rank `lora_r` (initialised with `seed`; peft's B = 0, so the model's outputs are
    unchanged and the gradient reaches the B matrices only), or the trained adapters of a peft folder. Without either,
    `model` is returned as it is (`grand` over every parameter).

    Example:
    ```python
    >>> import transformers
    >>> from datadiet.language_models import add_adapters
    >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                                   num_attention_heads=2, num_key_value_heads=1)
    >>> model, recorded = add_adapters(transformers.LlamaForCausalLM(config), lora_r=4)
    >>> recorded["adapters"], recorded["trainable_parameters"]
    ('lora_r=4, lora_alpha=8, target_modules=all-linear', 1024)

    ```
    """
    if lora_r is None and adapter_name_or_path is None:
        return model, {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_name_or_path is not None:
        if not (Path(adapter_name_or_path) / "adapter_config.json").is_file():
            raise ValueError(
                f"{adapter_name_or_path!r} holds no adapter_config.json: pass a peft adapter folder (save_pretrained of "
                "a PeftModel, or a Trainer checkpoint of one)."
            )
        wrapped = PeftModel.from_pretrained(model, adapter_name_or_path, is_trainable=True)
        recorded = {"adapters": adapter_name_or_path}
    else:
        alpha = lora_alpha if lora_alpha is not None else 2 * lora_r
        modules = target_modules[0] if isinstance(target_modules, list) and target_modules == ["all-linear"] else (
            target_modules)  # fmt: skip
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=alpha, target_modules=modules))
        shown = modules if isinstance(modules, str) else ",".join(modules)
        recorded = {"adapters": f"lora_r={lora_r}, lora_alpha={alpha:g}, target_modules={shown}", "adapter_seed": seed}
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    logger.info("Scoring with LoRA adapters (%s): %s trainable parameters.", recorded["adapters"], f"{trainable:,}")
    return wrapped.eval(), {**recorded, "trainable_parameters": trainable}
