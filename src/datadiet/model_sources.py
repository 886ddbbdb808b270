"""Where a model's weights come from: a checkpoint (`model_name_or_path`: a `save_pretrained` folder, a Hub id, a timm
name with its pretrained tag, a timm checkpoint file, a GGUF file) loaded with what was loaded and what was initialised
said and recorded, or an architecture built from scratch (`datadiet.models.build_model`)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "LoadReport",
    "ModelSource",
    "checkpoint_preprocessing",
    "checkpoint_sha256",
    "file_sha256",
    "load_checkpoint",
]

TASKS = ("image_classification", "text_classification", "causal_lm")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


@dataclass
class LoadReport:
    """What [`load_checkpoint`] did: the checkpoint, its library, which tensors came from it and which were
    initialised (a new classification head), and, for a local checkpoint, the sha256 of its weights file."""

    checkpoint: str
    library: str
    loaded: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    new_head: bool = False
    weights_file: str | None = None
    weights_sha256: str | None = None

    def summary(self) -> str:
        """One line for the log: how many tensors were loaded, and which were initialised."""
        total = len(self.loaded) + len(self.initialised)
        line = f"Checkpoint {self.checkpoint} ({self.library}): loaded {len(self.loaded)} of {total} tensors"
        if self.initialised:
            shown = ", ".join(self.initialised[:6]) + (", ..." if len(self.initialised) > 6 else "")
            line += f"; initialised {len(self.initialised)} ({shown})"
            line += "; the classification head is new, for the dataset's classes" if self.new_head else ""
        else:
            line += "; none initialised"
        if self.unused:
            line += f"; {len(self.unused)} checkpoint tensors unused ({', '.join(self.unused[:4])})"
        return line + (f"; weights sha256 {self.weights_sha256[:16]}..." if self.weights_sha256 else "")

    def provenance(self) -> dict:
        """The entries a dataset's provenance (and its card's `datadiet:` block) records about the checkpoint."""
        entries = {"checkpoint": self.checkpoint, "checkpoint_library": self.library}
        if self.weights_sha256:
            entries["checkpoint_sha256"] = self.weights_sha256
        if self.initialised:
            entries["checkpoint_initialised"] = ", ".join(self.initialised)
        return entries


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (a weights file), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_error(name: str, error: Exception) -> ValueError:
    """One line for a checkpoint that is neither local nor loadable from the Hub (offline or unreachable)."""
    from huggingface_hub import constants

    repo = name.removeprefix("hf-hub:")
    repo = repo if "/" in repo else f"timm/{repo}"  # timm's pretrained tags live under timm/ on the Hub
    why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else f"the Hub did not answer ({type(error).__name__})"
    return ValueError(
        f"{name!r} is not a local checkpoint and {why}, so it cannot be downloaded: download it once on a connected "
        f"machine (`hf download {repo} --local-dir <folder>`) and pass --model_name_or_path <folder>, or pass "
        "--model_name <architecture> to train from scratch."
    )


def _resolve(model_name_or_path: str, checkpoint_file: str | None, gguf_file: str | None) -> tuple[str, dict]:
    """`(library, options)` of a checkpoint name: 'gguf', 'timm' (options: the timm name and file) or 'transformers'."""
    name = model_name_or_path
    path = Path(name).expanduser()
    if gguf_file or name.endswith(".gguf"):
        if name.endswith(".gguf"):
            if gguf_file:
                raise ValueError(
                    f"Give the GGUF file once: {name!r} is a .gguf file, so drop --gguf_file {gguf_file}."
                )
            if not path.is_file():
                raise ValueError(f"GGUF file {name!r} not found: give the path of an existing .gguf file.")
            return "gguf", {"folder": str(path.parent), "gguf_file": path.name, "file": str(path)}
        local = path / gguf_file if path.is_dir() else None
        if local is not None and not local.is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ValueError(f"{gguf_file!r} is not in {name!r}: its GGUF files are {found}; pass --gguf_file <one>.")
        return "gguf", {"folder": name, "gguf_file": gguf_file, "file": str(local) if local else None}
    import timm

    from . import nets  # noqa: F401  (registers datadiet's built-in nets with timm)

    if checkpoint_file:
        if not timm.is_model(name):
            raise ValueError(
                f"--checkpoint_file needs the timm architecture of its weights as --model_name_or_path; {name!r} is "
                "not one (e.g. --model_name_or_path resnet10t --checkpoint_file model.safetensors)."
            )
        if not Path(checkpoint_file).is_file():
            raise ValueError(f"Checkpoint file {checkpoint_file!r} not found: give an existing weights file.")
        return "timm", {"name": name, "file": checkpoint_file}
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            raise ValueError(
                f"{name!r} has no config.json: it is not a save_pretrained (transformers) or save_for_hf (timm) "
                "folder. For a bare weights file pass --model_name_or_path <timm architecture> --checkpoint_file <file>."
            )
        config = json.loads(config_path.read_text())
        if "architecture" in config and "model_type" not in config:
            return "timm", {"name": f"local-dir:{path}", "file": _weights_file(path)}
        return "transformers", {"name": str(path), "file": _weights_file(path)}
    if path.is_file():
        config_path = path.parent / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if "architecture" not in config:
            raise ValueError(
                f"{name!r} is a weights file with no timm config.json beside it naming its architecture: pass "
                f"--model_name_or_path <timm architecture> --checkpoint_file {name}."
            )
        return "timm", {"name": config["architecture"], "file": str(path), "config": config}
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:"))
        if not (folder / "config.json").exists():
            raise ValueError(f"{name!r}: {str(folder)!r} is not a timm save_for_hf folder (no config.json).")
        return "timm", {"name": name, "file": _weights_file(folder)}
    if name.startswith("hf-hub:") or timm.is_model(name):
        return "timm", {"name": name, "file": None}
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(_WEIGHT_SUFFIXES):
        raise ValueError(f"Checkpoint {name!r} not found: no such folder or file (relative to {Path.cwd()}).")
    return "transformers", {"name": name, "file": None}


def _weights_file(folder: Path) -> str | None:
    for candidate in ("model.safetensors", "pytorch_model.bin"):
        if (folder / candidate).is_file():
            return str(folder / candidate)
    return None


def _same_labels(checkpoint_names: list[str] | None, num_labels: int | None, label_names: list[str] | None) -> bool:
    """Whether the checkpoint's head already predicts the dataset's classes (same names, or unnamed and as many)."""
    if num_labels is None:
        return True
    if checkpoint_names is None:
        return False
    if len(checkpoint_names) != num_labels:
        return False
    unnamed = all(str(n) == f"LABEL_{i}" for i, n in enumerate(checkpoint_names))
    if unnamed or label_names is None:
        if unnamed:
            logger.warning(
                "The checkpoint names no classes; its %d-class head is kept as the dataset's %d classes.",
                len(checkpoint_names),
                num_labels,
            )
        return True
    return [str(n) for n in checkpoint_names] == [str(n) for n in label_names]


def load_checkpoint(
    model_name_or_path: str,
    *,
    task: str = "image_classification",
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    checkpoint_file: str | None = None,
    gguf_file: str | None = None,
    in_chans: int | None = None,
    model_kwargs: dict | None = None,
    seed: int | None = None,
) -> tuple[nn.Module, LoadReport]:
    """Load a pretrained model and say what was loaded. A classifier whose head does not predict the dataset's classes
    (another number, or other class names) gets a new head, initialised on purpose (seeded by `seed`) and reported;
    a checkpoint that cannot be read is an error, never a random model built from its config.

    Args:
        model_name_or_path (`str`): a local `save_pretrained` folder (transformers) or `save_for_hf` folder (timm), a
            weights file with a timm `config.json` beside it, a timm name with its pretrained tag
            (`"resnet18.a1_in1k"`, `"hf-hub:timm/..."`, `"local-dir:..."`), a timm architecture with
            `checkpoint_file`, a Hub id (`"google/vit-base-patch16-224-in21k"`), or a `.gguf` file (`causal_lm`).
        task (`str`, *optional*, defaults to `"image_classification"`): `"image_classification"`,
            `"text_classification"` or `"causal_lm"` (the transformers auto class).
        num_labels (`int`, *optional*) / label_names (`list[str]`, *optional*): the dataset's classes.
        checkpoint_file (`str`, *optional*): a timm weights file, read as timm's `pretrained_cfg_overlay=dict(file=...)`.
        gguf_file (`str`, *optional*): the `.gguf` file inside the folder or Hub repository `model_name_or_path`.
        in_chans (`int`, *optional*): input channels (timm adapts the first convolution's weights).
        model_kwargs (`dict`, *optional*): extra `timm.create_model` / `from_pretrained` options.

    Returns:
        `(model, LoadReport)`, the model in eval mode.

    Example:
    ```python
    >>> import tempfile, timm
    >>> from timm.models import save_for_hf
    >>> from datadiet.model_sources import load_checkpoint
    >>> folder = tempfile.mkdtemp()
    >>> save_for_hf(timm.create_model("test_resnet", num_classes=3), folder, model_config={"label_names": ["a", "b", "c"]})
    >>> model, report = load_checkpoint(folder, num_labels=2, label_names=["x", "y"], seed=0)
    >>> model.num_classes, report.new_head, report.initialised
    (2, True, ['fc.bias', 'fc.weight'])

    ```
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}.")
    if label_names is not None:
        num_labels = len(label_names) if num_labels is None else num_labels
    library, options = _resolve(model_name_or_path, checkpoint_file, gguf_file)
    if library == "timm" and task != "image_classification":
        raise ValueError(f"{model_name_or_path!r} is a timm checkpoint (images); the {task} task needs transformers.")
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(model_kwargs or {})
    if library == "timm":
        model, report = _load_timm(model_name_or_path, options, num_labels, label_names, in_chans, kwargs)
    else:
        model, report = _load_transformers(model_name_or_path, library, options, task, num_labels, label_names, kwargs)
    file = options.get("file")
    if file:
        report.weights_file, report.weights_sha256 = str(file), file_sha256(file)
    logger.info(report.summary())
    return model.eval(), report


def _load_timm(name, options, num_labels, label_names, in_chans, kwargs) -> tuple[nn.Module, LoadReport]:
    import timm

    create = dict(kwargs)
    if in_chans is not None:
        create["in_chans"] = in_chans
    if options.get("file") and not options["name"].startswith("local-dir:"):
        # The model is built with the file's own head, so that timm loads every tensor (then the head is replaced
        # on purpose if the dataset's classes differ).
        file_classes = (options.get("config") or {}).get("num_classes") or _file_num_classes(options, create)
        overlay = dict(file=options["file"], num_classes=file_classes)
        if (options.get("config") or {}).get("label_names"):
            overlay["label_names"] = options["config"]["label_names"]
        create.update(num_classes=file_classes, pretrained_cfg_overlay=overlay)
    try:
        model = timm.create_model(options["name"], pretrained=True, **create)
    except OSError as error:  # a Hub name with the Hub offline or unreachable
        raise _hub_error(name, error) from None
    checkpoint_names = model.pretrained_cfg.get("label_names")
    if checkpoint_names is not None:
        checkpoint_names = list(checkpoint_names.values() if isinstance(checkpoint_names, dict) else checkpoint_names)
    elif num_labels is not None and model.num_classes == num_labels:
        checkpoint_names = [f"LABEL_{i}" for i in range(num_labels)]
    new_head = not _same_labels(checkpoint_names, num_labels, label_names)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    if new_head:
        model.reset_classifier(num_labels)
    if label_names is not None:  # saved with the model (save_for_hf) so that a reload knows its classes
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": [str(n) for n in label_names]}
    state = model.state_dict()
    reference = before
    if options.get("file") and str(options["file"]).endswith(".safetensors"):
        from safetensors.torch import load_file

        reference = load_file(options["file"])
    loaded = sorted(k for k, v in state.items() if k in reference and reference[k].shape == v.shape and torch.equal(
        reference[k].to(v.dtype), v))  # fmt: skip
    initialised = sorted(k for k in state if k not in set(loaded))
    unused = sorted(k for k in reference if k not in state or k in initialised) if reference is not before else []
    report = LoadReport(name, "timm", loaded=loaded, initialised=initialised, unused=unused, new_head=new_head)
    return model, report


def _file_num_classes(options: dict, create: dict) -> int:
    """The number of classes of a bare timm weights file: the rows of its classifier's weight."""
    import timm
    from safetensors import safe_open

    classifier = timm.create_model(options["name"], pretrained=False, **create).pretrained_cfg.get("classifier")
    key = f"{classifier}.weight"
    with safe_open(options["file"], framework="pt") as handle:  # a .pth / .bin file: pass its save_for_hf folder
        if key in handle.keys():
            return int(handle.get_slice(key).get_shape()[0])
    raise ValueError(f"{options['file']!r} holds no {key!r}: it is not a {options['name']} checkpoint.")


def _load_transformers(name, library, options, task, num_labels, label_names, kwargs) -> tuple[nn.Module, LoadReport]:
    import transformers

    auto = {
        "image_classification": transformers.AutoModelForImageClassification,
        "text_classification": transformers.AutoModelForSequenceClassification,
        "causal_lm": transformers.AutoModelForCausalLM,
    }[task]
    source = options.get("folder", options.get("name"))
    load = dict(kwargs)
    if library == "gguf":
        load["gguf_file"] = options["gguf_file"]
    new_head = False
    try:
        if task != "causal_lm" and num_labels is not None:
            config = transformers.AutoConfig.from_pretrained(source, **load)
            checkpoint_names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else None
            new_head = not _same_labels(checkpoint_names, num_labels, label_names)
            names = [str(n) for n in label_names] if label_names is not None else checkpoint_names
            if new_head and label_names is None:
                names = [f"LABEL_{i}" for i in range(num_labels)]
            load.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
            load["ignore_mismatched_sizes"] = new_head
        model, info = auto.from_pretrained(source, output_loading_info=True, **load)
    except OSError as error:
        if Path(source).expanduser().exists():
            raise ValueError(
                f"{name!r} could not be read as a transformers checkpoint: {error}".splitlines()[0]
            ) from None
        raise _hub_error(name, error) from None
    if library == "gguf" and getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantises GGUF tensors into ordinary float weights but keeps a GGUF "quantizer" mark, for
        # which Trainer refuses to train and save_pretrained to save: the model is a plain float model, so drop it.
        model.hf_quantizer.remove_quantization_config(model)
    initialised = sorted({key for key, *_ in info.get("mismatched_keys", ())} | set(info.get("missing_keys", ())))
    if new_head and not initialised:  # same number of classes, other classes: the head is made anew all the same
        initialised = _reinitialise_head(model)
    loaded = sorted(k for k in model.state_dict() if k not in set(initialised))
    unused = sorted(info.get("unexpected_keys", ()))
    report = LoadReport(name, library, loaded=loaded, initialised=initialised, unused=unused, new_head=new_head)
    return model, report


def _reinitialise_head(model) -> list[str]:
    """Initialise every module outside the base model (the head) as transformers initialises a new one."""
    names = []
    for child_name, child in model.named_children():
        if child_name == model.base_model_prefix:
            continue
        for module in child.modules():
            for tensor in [module, *module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if getattr(tensor, "_is_hf_initialized", False):
                    tensor._is_hf_initialized = False
            model._init_weights(module)
        names += [f"{child_name}.{key}" for key in child.state_dict()]
    return sorted(names)


def checkpoint_preprocessing(model: nn.Module, model_name_or_path: str) -> dict:
    """The input size and normalisation the checkpoint was trained with (`image_size`, `mean`, `std`; absent keys are
    unknown): a transformers checkpoint's image processor, or a timm model's `pretrained_cfg` (its input size only when
    the architecture fixes it)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_type"):
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        except (OSError, ValueError):
            return {}
        found = {"mean": list(processor.image_mean), "std": list(processor.image_std)}
        size = getattr(processor, "size", None) or {}
        side = size.get("height") or size.get("shortest_edge")
        if side:
            found["image_size"] = int(side)
        return {**found, "processor": processor}
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    found = {key: list(pretrained_cfg[key]) for key in ("mean", "std") if pretrained_cfg.get(key) is not None}
    if pretrained_cfg.get("fixed_input_size") and pretrained_cfg.get("input_size"):
        found["image_size"] = int(pretrained_cfg["input_size"][-1])
    return found


class ModelSource:
    """`seed -> model` as a command's arguments say (`datadiet.arguments.ModelSourceArguments` and the fields
    `model_library`, `model_kwargs`, `in_chans`, `image_size`, `mean`, `std` when present): the checkpoint
    `model_name_or_path` loaded by [`load_checkpoint`] (checked once, here, before any data is scored or trained on),
    or the architecture `model_name` built from scratch. The model knows the dataset's class names (transformers
    `id2label`, timm `pretrained_cfg["label_names"]`) and, for timm, the normalisation it is fed, so that a saved
    checkpoint carries both.

    Example:
    ```python
    >>> from datadiet.arguments import ModelArguments
    >>> from datadiet.model_sources import ModelSource
    >>> source = ModelSource(ModelArguments(model_name="test_resnet"), label_names=["cat", "dog"])
    >>> source(0).pretrained_cfg["label_names"], source.provenance()["model"]
    (['cat', 'dog'], 'test_resnet')

    ```
    """

    def __init__(self, arguments, *, label_names, task: str = "image_classification", in_chans: int | None = None):
        self.arguments = arguments
        self.label_names = [str(name) for name in label_names]
        self.task = task
        self.in_chans = in_chans if in_chans is not None else getattr(arguments, "in_chans", 3)
        kwargs = getattr(arguments, "model_kwargs", None)
        self.model_kwargs = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs or {})
        self.checkpoint = getattr(arguments, "model_name_or_path", None)
        self.report: LoadReport | None = None
        self.preprocessing: dict = {}
        if self.checkpoint:
            model, self.report = self._load(seed=None)
            wanted = getattr(arguments, "model_library", None)
            if wanted and wanted != self.report.library:
                raise ValueError(
                    f"{self.checkpoint!r} is a {self.report.library} checkpoint, not {wanted}: drop --model_library "
                    "(a checkpoint's library is read from it)."
                )
            self.preprocessing = checkpoint_preprocessing(model, self.checkpoint)

    def _load(self, seed: int | None) -> tuple[nn.Module, LoadReport]:
        return load_checkpoint(
            self.checkpoint,
            task=self.task,
            label_names=self.label_names if self.task != "causal_lm" else None,
            checkpoint_file=getattr(self.arguments, "checkpoint_file", None),
            gguf_file=getattr(self.arguments, "gguf_file", None),
            in_chans=self.in_chans,
            model_kwargs=self.model_kwargs,
            seed=seed,
        )

    def image_settings(self) -> tuple[int | None, list[float] | None, list[float] | None]:
        """`(image_size, mean, std)`: the arguments' values, else the checkpoint's."""
        found = self.preprocessing
        mean, std = getattr(self.arguments, "mean", None), getattr(self.arguments, "std", None)
        if mean is None and std is None and len(found.get("mean") or ()) == self.in_chans:
            mean, std = found.get("mean"), found.get("std")
        elif mean is None and std is None and found.get("mean"):
            logger.warning("The checkpoint's normalisation is for %d channels, not %d: pass --mean / --std.",
                           len(found["mean"]), self.in_chans)  # fmt: skip
        return getattr(self.arguments, "image_size", None) or found.get("image_size"), mean, std

    def __call__(self, seed: int) -> nn.Module:
        if self.checkpoint:
            model = self._load(seed)[0]
        else:
            from .models import build_model

            model = build_model(
                self.arguments.model_name,
                num_classes=len(self.label_names),
                library=getattr(self.arguments, "model_library", None) or "timm",
                in_chans=self.in_chans,
                image_size=getattr(self.arguments, "image_size", None),
                model_kwargs=self.model_kwargs,
                seed=seed,
            )
            config = getattr(model, "config", None)
            if config is not None and hasattr(config, "id2label"):
                config.id2label = dict(enumerate(self.label_names))
                config.label2id = {name: i for i, name in enumerate(self.label_names)}
        if isinstance(getattr(model, "pretrained_cfg", None), dict):  # timm: saved in the checkpoint's config.json
            image_size, mean, std = self.image_settings()
            stamp = {"label_names": self.label_names}
            if mean is not None:
                stamp.update(mean=tuple(mean), std=tuple(std))
            if image_size is not None:
                stamp["input_size"] = (self.in_chans, image_size, image_size)
            model.pretrained_cfg = {**model.pretrained_cfg, **stamp}
        return model

    @property
    def name(self) -> str:
        """The checkpoint or the architecture, as the user named it."""
        return self.checkpoint or self.arguments.model_name

    def provenance(self) -> dict:
        """What a dataset's provenance records about the model that scored it."""
        entries = {"model": self.name, "model_kwargs": self.model_kwargs or None}
        if self.report is not None:
            return {**entries, **self.report.provenance()}
        return {**entries, "model_library": getattr(self.arguments, "model_library", None) or "timm"}


def checkpoint_sha256(model_name_or_path: str, checkpoint_file: str | None = None) -> str | None:
    """sha256 of a local checkpoint's weights file (`None` for a Hub name), e.g. to tell a resumed run that the
    checkpoint it starts from changed."""
    file = _resolve(model_name_or_path, checkpoint_file, None)[1].get("file")
    return file_sha256(file) if file else None
