"""Building, calling and wrapping classifiers the same way whatever their library (timm, transformers, plain
`nn.Module`): the input adapters, the number of classes, a fingerprint of the weights."""

from __future__ import annotations

import hashlib
import inspect

import torch
from torch import nn

from .scores.logits import forward_logits, unwrap_logits

__all__ = [
    "ClassifierWrapper",
    "LogitsModule",
    "as_model_inputs",
    "build_model",
    "forward_logits",
    "input_channels_of",
    "is_causal_lm",
    "model_accepts_keyword",
    "model_name_of",
    "num_labels_of",
    "unwrap_logits",
    "weights_fingerprint",
]


def model_accepts_keyword(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` takes `name` (e.g. `pixel_values` for transformers image models)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def as_model_inputs(model: nn.Module, inputs: torch.Tensor | dict) -> torch.Tensor | dict:
    """transformers image models take `pixel_values=`; timm and plain modules take the tensor positionally."""
    if isinstance(inputs, torch.Tensor) and model_accepts_keyword(model, "pixel_values"):
        return {"pixel_values": inputs}
    return inputs


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes and values): equal weights, equal digest."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def input_channels_of(model: nn.Module) -> int | None:
    """The number of input channels of the model's first convolution (`None` for a model without one)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is a causal language model: a transformers `*ForCausalLM` / `*LMHeadModel` class (the classes
    `AutoModelForCausalLM` builds), looking through peft's and DDP's wrappers.

    Example:
    ```python
    >>> import torch, transformers
    >>> from datadiet.models import is_causal_lm
    >>> config = transformers.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
    ...                                   num_attention_heads=1)
    >>> is_causal_lm(transformers.LlamaForCausalLM(config)), is_causal_lm(torch.nn.Linear(2, 2))
    (True, False)

    ```
    """
    while True:
        inner = getattr(model, "module", None)  # DistributedDataParallel
        if isinstance(inner, nn.Module):
            model = inner
        elif callable(getattr(model, "get_base_model", None)):  # peft's PeftModel
            model = model.get_base_model()
            break
        else:
            break
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def num_labels_of(model: nn.Module) -> int | None:
    """The number of classes a classifier predicts, when the model says so (transformers `config.num_labels`, timm
    `num_classes`)."""
    model = getattr(model, "model", model) if isinstance(model, ClassifierWrapper) else model
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None) is not None:
        return int(config.num_labels)
    if getattr(model, "num_classes", None) is not None:
        return int(model.num_classes)
    return None


def model_name_of(model: nn.Module) -> str:
    """The name a person would rebuild `model` by: the timm architecture (`"resnet10t"`, from `pretrained_cfg`), the
    transformers checkpoint or model type (`"vit"`), else the class name.

    Example:
    ```python
    >>> import timm
    >>> from datadiet.models import model_name_of
    >>> model_name_of(timm.create_model("test_resnet", num_classes=3)), type(timm.create_model("test_resnet")).__name__
    ('test_resnet', 'ResNet')

    ```
    """
    model = getattr(model, "model", model) if isinstance(model, ClassifierWrapper) else model
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if isinstance(architecture, str) and architecture:
        return architecture
    config = getattr(model, "config", None)
    for name in ("_name_or_path", "model_type"):
        value = getattr(config, name, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


class ClassifierWrapper(nn.Module):
    """Gives a logits-returning module (timm, torchvision, your own) the interface `transformers.Trainer` expects:
    `forward(pixel_values, labels=None) -> {"loss", "logits"}`.

    Args:
        model: a module mapping an input tensor to logits.
        input_name: the keyword the batch carries the input under (`"pixel_values"` for images).

    Example:
    ```python
    >>> import timm, torch
    >>> from datadiet.models import ClassifierWrapper
    >>> wrapped = ClassifierWrapper(timm.create_model("test_resnet", num_classes=3))
    >>> out = wrapped(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    >>> sorted(out)
    ['logits', 'loss']

    ```
    """

    def __init__(self, model: nn.Module, input_name: str = "pixel_values"):
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, labels: torch.Tensor | None = None, **inputs) -> dict[str, torch.Tensor]:
        if self.input_name not in inputs:
            raise ValueError(f"The batch has no {self.input_name!r} input; it has {sorted(inputs)}.")
        logits = unwrap_logits(self.model(inputs[self.input_name]))
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = nn.functional.cross_entropy(logits, labels)
        return output


class LogitsModule(nn.Module):
    """A transformers image classifier called as timm's are, `module(images) -> logits` (e.g. by the curve's loop)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return unwrap_logits(self.model(pixel_values=pixel_values))


def build_model(
    name: str,
    *,
    num_classes: int,
    library: str = "timm",
    in_chans: int = 3,
    image_size: int | None = None,
    model_kwargs: dict | None = None,
    seed: int | None = None,
) -> nn.Module:
    """A randomly initialised classifier: a timm architecture (`library="timm"`, e.g. `"resnet18"`) or a
    transformers model built from its config (`library="transformers"`, `name` a model type such as `"vit"` or a
    local config folder, with `model_kwargs` overriding config fields). Never downloads weights.

    Example:
    ```python
    >>> from datadiet.models import build_model
    >>> model = build_model("test_resnet", num_classes=3, seed=0)
    >>> model.num_classes
    3

    ```
    """
    model_kwargs = dict(model_kwargs or {})
    if seed is not None:
        torch.manual_seed(seed)
    if library == "timm":
        import timm

        from . import nets  # noqa: F401  (registers datadiet's built-in nets with timm)

        if ":" not in name and not timm.is_model(name):  # `hf-hub:` / `local-dir:` names are timm's to resolve
            from .validation import closest_names

            close = closest_names(name, timm.list_models(), n=5)
            suggestion = f"did you mean {', '.join(close)}?" if close else "timm.list_models('*net*') lists them."
            own = ", ".join(timm.list_models("datadiet_*"))
            raise ValueError(f"Unknown timm model {name!r}: {suggestion} (datadiet's own nets: {own})")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    if library == "transformers":
        from pathlib import Path

        from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

        if Path(name).is_dir():
            config = AutoConfig.from_pretrained(name, num_labels=num_classes, **model_kwargs)
        else:
            config = AutoConfig.for_model(name, num_labels=num_classes, **model_kwargs)
        if hasattr(config, "num_channels"):
            config.num_channels = in_chans
        if image_size is not None and hasattr(config, "image_size"):
            config.image_size = image_size
        auto = AutoModelForSequenceClassification if hasattr(config, "vocab_size") else AutoModelForImageClassification
        return auto.from_config(config)
    raise ValueError(f"library must be 'timm' or 'transformers', got {library!r}.")
