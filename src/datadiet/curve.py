"""Pruning curves (`datadiet report curve`): test accuracy against the fraction of training data kept, for several
scores and pruning strategies, each retrained from scratch over several seeds at a fixed training budget.

The curve scores the training set once (K proxy models trained a few epochs; cached on disk), then for every
(score, strategy, keep fraction, seed) prunes with `datadiet.prune`, trains a fresh model and evaluates it,
appending one JSON line per finished run to `runs.jsonl` so that an interrupted curve resumes where it stopped.

Training here is a lean in-memory loop (images decoded once to a uint8 tensor, augmentation done per batch on
tensors), not `DataDietTrainer`: a curve is hundreds of short trainings, and on a few CPU cores decoding and
transforming every image of every step one by one costs more than the small networks the curve is run with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["CurveArguments", "run_curve", "strategy_options", "summarize_runs", "write_curve_report"]

# Scores the curve knows how to compute from its proxy models (plus `random`, which needs none).
_CURVE_SCORES = ("el2n", "grand", "forgetting", "input_norm", "loss", "margin")
# Fields that change what a finished run or a cached score means: a rerun with other values needs another folder.
_RESULT_FIELDS = (
    "dataset_name",
    "data_files",
    "split",
    "eval_dataset_name",
    "eval_data_files",
    "eval_split",
    "max_rows",
    "max_eval_rows",
    "model_name",
    "model_kwargs",
    "mean",
    "std",
    "crop_padding",
    "flip",
    "offset",
    "hard_cutoff",
    "num_bins",
    "class_balanced",
    "scoring_seeds",
    "scoring_epochs",
    "max_steps",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "label_smoothing",
)


@dataclass
class CurveArguments:
    """Arguments of `datadiet report curve`: which data, scores, strategies, keep fractions, seeds and training budget
    a pruning curve covers, and where it writes `runs.jsonl`, `curve.png` and `curve.md`."""

    dataset_name: str = field(
        metadata={"help": "Training data: a save_to_disk folder, a dataset folder, 'sklearn-digits', or a Hub id."}
    )
    data_files: str | None = field(default=None, metadata={"help": "Data file(s) of the training split."})
    split: str = field(default="train", metadata={"help": "Training split name."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Test data (default: dataset_name)."})
    eval_data_files: str | None = field(default=None, metadata={"help": "Data file(s) of the test split."})
    eval_split: str = field(default="test", metadata={"help": "Test split name."})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first rows of the training split."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Use only the first rows of the test split."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (detected when not given)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (detected when not given)."})
    model_name: str = field(
        default="datadiet_cifar_net",
        metadata={"help": "timm architecture, e.g. datadiet_cifar_net, datadiet_tiny_net, resnet18, test_resnet."},
    )
    model_kwargs: str | None = field(default=None, metadata={"help": "JSON mapping of extra timm model options."})
    mean: list[float] | None = field(
        default=None, metadata={"help": "Normalisation mean per channel (computed from the training data if unset)."}
    )
    std: list[float] | None = field(
        default=None, metadata={"help": "Normalisation std per channel (computed from the training data if unset)."}
    )
    crop_padding: int = field(default=4, metadata={"help": "Random-crop padding while training (0: no crop)."})
    flip: bool = field(
        default=True, metadata={"help": "Random horizontal flips while training and flip test-time averaging."}
    )
    scores: list[str] = field(
        default_factory=lambda: ["el2n", "grand", "forgetting", "input_norm"],
        metadata={"help": f"Scores to prune by, among {', '.join(_CURVE_SCORES)}; random is always included."},
    )
    strategies: list[str] = field(
        default_factory=lambda: ["hardest", "window", "stratified"],
        metadata={
            "help": "Pruning strategies (see datadiet.selection.list_strategies()); window@0.2 / stratified@0.05 "
            "set that entry's offset / hard_cutoff, so one curve can sweep them."
        },
    )
    keep_fractions: list[float] = field(
        default_factory=lambda: [0.7, 0.5, 0.3], metadata={"help": "Fractions of the training set kept, in (0, 1)."}
    )
    offset: float = field(default=0.1, metadata={"help": "window: fraction of hardest rows skipped."})
    hard_cutoff: float = field(default=0.1, metadata={"help": "stratified: fraction of hardest rows dropped (CCS)."})
    num_bins: int = field(default=50, metadata={"help": "stratified: number of score bins (CCS)."})
    class_balanced: bool = field(default=False, metadata={"help": "Apply every strategy per class."})
    scoring_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3], metadata={"help": "Seeds of the proxy models the scores average over."}
    )
    scoring_epochs: int = field(
        default=1,
        metadata={
            "help": "Epochs the proxy models train before EL2N / GraNd are taken; forgetting counts events over "
            "these epochs (with 1 epoch it reduces to 'misclassified at its one presentation')."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds of every curve point."}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Training budget in optimiser steps, the same for every subset (fair)."}
    )
    epochs: float | None = field(
        default=None, metadata={"help": "Training budget in epochs of each subset (if no max_steps)."}
    )
    batch_size: int = field(default=256, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=0.1, metadata={"help": "Peak learning rate (SGD + Nesterov, OneCycle)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay."})
    label_smoothing: float = field(default=0.2, metadata={"help": "Label smoothing of the training loss."})
    eval_batch_size: int = field(default=1024, metadata={"help": "Batch size for scoring and evaluation."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: torch's)."})
    report_only: bool = field(
        default=False, metadata={"help": "Only rewrite curve.md / curve.png from the finished runs in runs.jsonl."}
    )
    report_every: int = field(default=5, metadata={"help": "Rewrite curve.md / curve.png after every n runs."})
    output_dir: str = field(default="outputs/curve", metadata={"help": "Where runs.jsonl, curve.png, curve.md go."})

    def __post_init__(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("Give exactly one training budget: max_steps (fixed steps, fair) or epochs.")
        if self.max_steps is not None:
            _check_steps(self.max_steps, "max_steps")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}.")
        unknown = [name for name in self.scores if name not in _CURVE_SCORES]
        if unknown:
            raise ValueError(
                f"Unknown curve score(s) {unknown}: choose among {list(_CURVE_SCORES)} (random is always included)."
            )
        if "random" in self.strategies:
            raise ValueError("Leave 'random' out of strategies: every curve includes it as the baseline.")
        for name in self.strategies:
            strategy_options(name, self)
        bad_keep = [keep for keep in self.keep_fractions if not 0.0 < keep < 1.0]
        if bad_keep or not self.keep_fractions:
            raise ValueError(f"keep_fractions must be non-empty fractions in (0, 1); got {self.keep_fractions}.")
        if not self.seeds or not self.scoring_seeds:
            raise ValueError("seeds and scoring_seeds must each name at least one seed.")
        if self.scoring_epochs < 1:
            raise ValueError(f"scoring_epochs must be >= 1 (scores of trained proxies); got {self.scoring_epochs}.")
        if (self.mean is None) != (self.std is None):
            raise ValueError("Give both mean and std, or neither (then they are computed from the training data).")


# A strategy of the grid may carry its own value of its parameter, so that one curve compares several offsets (or
# CCS cut-offs) against the same full-data and random runs: "window@0.2" skips the hardest 20%, "stratified@0.05"
# drops the hardest 5% before sampling. A bare name uses the curve's `offset` / `hard_cutoff`.
_STRATEGY_PARAMETER = {"window": "offset", "stratified": "hard_cutoff"}


def strategy_options(name: str, args: CurveArguments) -> tuple[str, dict[str, float]]:
    """The registered strategy and its pruning options for a grid entry such as `"window"` or `"window@0.2"`.

    Example:
    ```python
    >>> from datadiet.curve import CurveArguments, strategy_options
    >>> args = CurveArguments("sklearn-digits", max_steps=100, offset=0.1)
    >>> strategy_options("window@0.2", args)
    ('window', {'offset': 0.2, 'hard_cutoff': 0.1, 'num_bins': 50})

    ```
    """
    from .selection import list_strategies

    strategy, _, value = name.partition("@")
    if strategy not in list_strategies():
        raise ValueError(f"Unknown pruning strategy {name!r}: choose among {list_strategies()}.")
    options = {"offset": args.offset, "hard_cutoff": args.hard_cutoff, "num_bins": args.num_bins}
    if not value:
        return strategy, options
    parameter = _STRATEGY_PARAMETER.get(strategy)
    if parameter is None:
        raise ValueError(
            f"Strategy {name!r}: only {sorted(_STRATEGY_PARAMETER)} take a value after '@' "
            f"({', '.join(f'{s}@x sets {p}' for s, p in _STRATEGY_PARAMETER.items())})."
        )
    try:
        number = float(value)
    except ValueError:
        raise ValueError(
            f"Strategy {name!r}: the value after '@' must be a fraction such as {strategy}@0.2."
        ) from None
    if not 0.0 <= number < 1.0:
        raise ValueError(f"Strategy {name!r}: {parameter}={number} is outside [0, 1).")
    options[parameter] = number
    return strategy, options


# ---- data ----------------------------------------------------------------------------------------------------------


def _image_array(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return array.transpose(2, 0, 1)


def _to_tensors(dataset, image_column: str, label_column: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images as one uint8 `[N, C, H, W]` tensor and the labels as int64, decoded once."""
    from tqdm.auto import tqdm

    images, labels = [], []
    for start in tqdm(range(0, len(dataset), 2048), desc="Decoding images", leave=False):
        batch = dataset[start : start + 2048]
        images.extend(_image_array(image) for image in batch[image_column])
        labels.extend(batch[label_column])
    return torch.from_numpy(np.stack(images)).contiguous(), torch.as_tensor(labels, dtype=torch.int64)


class _Data:
    """The decoded train and test sets and the per-batch preprocessing (normalisation, crop, flip)."""

    def __init__(self, args: CurveArguments):
        from .data import detect_columns, load_data

        train = load_data(args.dataset_name, split=args.split, data_files=args.data_files, max_rows=args.max_rows)
        test = load_data(
            args.eval_dataset_name or args.dataset_name,
            split=args.eval_split,
            data_files=args.eval_data_files,
            max_rows=args.max_eval_rows,
        )
        image_column, kind, label_column = detect_columns(
            train, image_column=args.image_column, label_column=args.label_column
        )
        if kind != "image":
            raise ValueError(
                f"Pruning curves train image classifiers; the detected input column {image_column!r} is {kind}. "
                "Pass image_column=... ."
            )
        self.x_train, self.y_train = _to_tensors(train, image_column, label_column)
        self.x_test, self.y_test = _to_tensors(test, image_column, label_column)
        feature = train.features[label_column]
        self.num_classes = int(getattr(feature, "num_classes", 0) or int(self.y_train.max()) + 1)
        self.in_chans = int(self.x_train.shape[1])
        if args.mean is not None:
            mean, std = torch.tensor(args.mean), torch.tensor(args.std)
        else:
            pixels = self.x_train.float().div_(255)
            mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
        if mean.numel() != self.in_chans or std.numel() != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (one per channel); got {mean.tolist()}.")
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.crop_padding, self.flip = args.crop_padding, args.flip

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float().div_(255) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop with reflect padding and random horizontal flip, for a whole uint8 batch at once."""
        batch, _, height, width = images.shape
        if self.crop_padding > 0:
            pad = self.crop_padding
            padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
            dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
            dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
            rows = (dy[:, None] + torch.arange(height))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(width))[:, None, None, :]
            index = torch.arange(batch)[:, None, None, None]
            channels = torch.arange(images.shape[1])[None, :, None, None]
            images = padded[index, channels, rows, cols]
        if self.flip:
            flip = torch.rand(batch, generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images


# ---- training and evaluation ---------------------------------------------------------------------------------------


def _build(args: CurveArguments, data: _Data, seed: int) -> nn.Module:
    from . import nets  # noqa: F401  (registers the built-in small networks with timm)
    from .models import build_model

    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    model = build_model(
        args.model_name, num_classes=data.num_classes, in_chans=data.in_chans, model_kwargs=model_kwargs, seed=seed
    )
    # channels-last convolutions train the small CIFAR nets about 1.4x faster on this kind of CPU (oneDNN).
    return model.to(memory_format=torch.channels_last)


_MIN_STEPS = 5


def _check_steps(steps: int, what: str) -> None:
    """The one-cycle schedule needs a warm-up and an anneal of at least one step each: with 4 steps and a 25% warm-up
    torch's `OneCycleLR` divides by zero, and with fewer the only steps run at a learning rate near 0."""
    if steps < _MIN_STEPS:
        raise ValueError(
            f"{what} gives {steps} training step(s); the one-cycle schedule needs at least {_MIN_STEPS}. "
            "Raise max_steps / epochs / scoring_epochs, or lower batch_size."
        )


def _train(
    model: nn.Module,
    data: _Data,
    rows: np.ndarray,
    steps: int,
    args: CurveArguments,
    seed: int,
    correct_history: np.ndarray | None = None,
) -> nn.Module:
    """SGD with Nesterov momentum and a OneCycle schedule for `steps` steps over the training rows `rows`
    (reshuffled every pass). With `correct_history` (`[num_rows, passes]`), records whether each example was
    classified correctly at each presentation, from the training forward pass (Toneva et al. 2019, sec. 3)."""
    generator = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for parameter in model.parameters():
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        momentum=0.9,
        nesterov=True,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=steps, pct_start=0.25, anneal_strategy="linear"
    )
    rows = torch.as_tensor(rows, dtype=torch.int64)
    model.train()
    step, epoch = 0, 0
    while step < steps:
        order = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(order), args.batch_size):
            batch_rows = order[start : start + args.batch_size]
            if len(batch_rows) < args.batch_size and len(order) >= args.batch_size:
                break  # drop the last partial batch: every step sees a full batch
            images = data.normalise(data.augment(data.x_train[batch_rows], generator))
            labels = data.y_train[batch_rows]
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if correct_history is not None and epoch < correct_history.shape[1]:
                correct_history[batch_rows.numpy(), epoch] = (logits.argmax(-1) == labels).numpy()
            step += 1
            if step >= steps:
                break
        epoch += 1
    model.eval()
    return model


@torch.no_grad()
def _accuracy(model: nn.Module, data: _Data, batch_size: int) -> float:
    """Test accuracy; with flips on, the logits of the image and its mirror are averaged (test-time augmentation)."""
    model.eval()
    correct = 0
    for start in range(0, len(data.y_test), batch_size):
        images = data.normalise(data.x_test[start : start + batch_size])
        logits = model(images)
        if data.flip:
            logits = logits + model(images.flip(3))
        correct += int((logits.argmax(-1) == data.y_test[start : start + batch_size]).sum())
    return correct / len(data.y_test)


# ---- scoring ---------------------------------------------------------------------------------------------------------


def _score_proxy(args: CurveArguments, data: _Data, seed: int, path: Path) -> dict[str, np.ndarray]:
    """Train one proxy model `scoring_epochs` epochs and score every training row with it (eval mode, un-augmented
    input, as EL2N and GraNd are defined by Paul et al. 2021); cached at `path`."""
    if path.exists():
        with np.load(path) as cached:
            return {name: cached[name] for name in cached.files}
    from .scores import forgetting_events, get_score

    num_rows = len(data.y_train)
    steps_per_epoch = max(num_rows // args.batch_size, 1)
    history = np.full((num_rows, args.scoring_epochs), np.nan)
    steps = steps_per_epoch * args.scoring_epochs
    _check_steps(
        steps,
        f"Scoring the proxies ({num_rows} rows, batch_size={args.batch_size}, scoring_epochs={args.scoring_epochs})",
    )
    model = _build(args, data, seed)
    _train(model, data, np.arange(num_rows), steps, args, seed, history)
    wanted = [name for name in args.scores if name not in ("forgetting", "input_norm")]
    values: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for start in range(0, num_rows, args.eval_batch_size):
        images = data.normalise(data.x_train[start : start + args.eval_batch_size])
        labels = data.y_train[start : start + args.eval_batch_size]
        with torch.no_grad():
            logits = model(images)
        for name in wanted:
            if name == "grand":
                # Exact per-example gradient norms over all parameters (eval mode); chunked to bound memory.
                parts = [
                    get_score("grand")(model, images[i : i + 128], labels[i : i + 128]).detach()
                    for i in range(0, len(labels), 128)
                ]
                values[name].append(torch.cat(parts).numpy())
            else:
                values[name].append(get_score(name)(logits, labels).numpy())
    result = {name: np.concatenate(parts).astype(np.float64) for name, parts in values.items()}
    # Rows never presented (the dropped partial batch of a one-epoch run) count as unseen: NaN events. They are
    # given the median so that every row has a score.
    events = forgetting_events(history)
    result["forgetting"] = np.where(np.isnan(events), np.nanmedian(events), events)
    result["proxy_train_accuracy"] = np.array([np.nanmean(history[:, -1])])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **result)
    return result


def _scores(args: CurveArguments, data: _Data, output_dir: Path) -> dict[str, np.ndarray]:
    """Every requested score, averaged over the proxy models of `scoring_seeds` (input_norm needs no model)."""
    from tqdm.auto import tqdm

    from .scores import get_score

    per_seed = [
        _score_proxy(args, data, seed, output_dir / "scores" / f"proxy-seed{seed}.npz")
        for seed in tqdm(args.scoring_seeds, desc="Scoring proxies")
    ]
    scores = {}
    for name in args.scores:
        if name == "input_norm":
            parts = [
                get_score("input_norm")(data.normalise(data.x_train[i : i + 4096])).numpy()
                for i in range(0, len(data.y_train), 4096)
            ]
            scores[name] = np.concatenate(parts).astype(np.float64)
        else:
            scores[name] = np.mean([values[name] for values in per_seed], axis=0)
    for seed, values in zip(args.scoring_seeds, per_seed):
        logger.info(
            "Proxy seed %d: training accuracy in its last scoring epoch %.3f", seed, values["proxy_train_accuracy"][0]
        )
    return scores


# ---- the curve -------------------------------------------------------------------------------------------------------


def _run_key(score: str, strategy: str, keep: float, seed: int) -> str:
    return f"{score}|{strategy}|{keep:g}|{seed}"


def _planned_runs(args: CurveArguments) -> list[tuple[str, str, float, int]]:
    runs = [("full", "full", 1.0, seed) for seed in args.seeds]
    for keep in args.keep_fractions:
        runs += [("random", "random", keep, seed) for seed in args.seeds]
        for score in args.scores:
            for strategy in args.strategies:
                runs += [(score, strategy, keep, seed) for seed in args.seeds]
    return runs


def _read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("Skipping a truncated line of %s (an interrupted write).", path)
    return runs


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(output_dir: Path, runs_path: Path, run) -> bool:
    """Claim `run` for this process: several processes may share one curve folder (more CPU share on a busy
    machine), each taking the runs nobody has finished or is running. A claim whose process is gone is taken over."""
    key = _run_key(*run)
    if key in {_run_key(r["score"], r["strategy"], r["keep"], r["seed"]) for r in _read_runs(runs_path)}:
        return False
    claims = output_dir / "claims"
    claims.mkdir(exist_ok=True)
    path = claims / key.replace("|", "_")
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                text = path.read_text().strip()
                owner = int(text) if text else -1  # -1: just created, its owner is writing its pid
            except (OSError, ValueError):
                owner = 0
            if owner in (os.getpid(), -1):
                return owner == os.getpid()
            if owner and _pid_alive(owner):
                return False
            path.unlink(missing_ok=True)  # a stale claim from an interrupted process
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def _check_config(args: CurveArguments, output_dir: Path) -> None:
    config = {name: getattr(args, name) for name in _RESULT_FIELDS}
    path = output_dir / "curve_config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(name for name in config if previous.get(name) != config[name])
        if changed:
            raise ValueError(
                f"{output_dir} holds a curve made with other values of {changed} (was "
                f"{ {name: previous.get(name) for name in changed} }): its finished runs would not be comparable. "
                "Use another output_dir, or restore those values to resume."
            )
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2))


def _subset(args: CurveArguments, scores: dict[str, np.ndarray], labels: np.ndarray, run) -> np.ndarray:
    """Positions of the kept training rows, chosen by `datadiet.prune` on a table of the score columns."""
    from datasets import ClassLabel, Dataset, Features, Value

    from .selection import prune

    score, strategy, keep, seed = run
    if score == "full":
        return np.arange(len(labels))
    columns = {"row": np.arange(len(labels)), "label": labels}
    features = {"row": Value("int64"), "label": ClassLabel(num_classes=int(labels.max()) + 1)}
    if score != "random":
        columns[score] = scores[score]
        features[score] = Value("float64")
    table = Dataset.from_dict(columns, features=Features(features))
    name, options = strategy_options(strategy, args)
    pruned = prune(
        table,
        None if score == "random" else score,
        keep,
        strategy=name,
        **options,
        class_balanced=args.class_balanced,
        seed=seed,
        label_column="label",
    )
    return np.asarray(pruned["row"], dtype=np.int64)


def run_curve(args: CurveArguments) -> dict:
    """Score the training set once, then train and evaluate one model per (score, strategy, keep fraction, seed),
    plus full-data and random-subset references; write `runs.jsonl`, `summary.json`, `curve.png` and `curve.md` to
    `args.output_dir` and return the summary. Finished runs found in `runs.jsonl` are not run again.

    Example (a toy budget, to show the calls: 40 digits, one seed, 5 steps per run):
    ```python
    >>> import tempfile
    >>> from datadiet.curve import CurveArguments, run_curve
    >>> args = CurveArguments("sklearn-digits", model_name="datadiet_tiny_net", scores=["el2n"],
    ...                       strategies=["hardest"], keep_fractions=[0.5], seeds=[0], scoring_seeds=[0],
    ...                       max_rows=40, max_eval_rows=40, max_steps=5, batch_size=8, output_dir=tempfile.mkdtemp())
    >>> summary = run_curve(args)
    >>> [(point["score"], point["strategy"], point["keep"]) for point in summary["points"]]
    [('el2n', 'hardest', 0.5), ('full', 'full', 1.0), ('random', 'random', 0.5)]

    ```
    """
    from tqdm.auto import tqdm

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    _check_config(args, output_dir)
    runs_path = output_dir / "runs.jsonl"
    if args.report_only:
        return _write_summary(args, output_dir, runs_path)
    data = _Data(args)
    logger.info(
        "Curve data: %d training rows, %d test rows, %d classes, %d channels.",
        len(data.y_train),
        len(data.y_test),
        data.num_classes,
        data.in_chans,
    )
    scores = _scores(args, data, output_dir)
    labels = data.y_train.numpy()
    done = {_run_key(r["score"], r["strategy"], r["keep"], r["seed"]) for r in _read_runs(runs_path)}
    todo = [run for run in _planned_runs(args) if _run_key(*run) not in done]
    logger.info(
        "%d runs planned, %d already finished.", len(_planned_runs(args)), len(_planned_runs(args)) - len(todo)
    )
    for run in tqdm(todo, desc="Curve runs"):
        score, strategy, keep, seed = run
        if not _claim(output_dir, runs_path, run):
            continue  # finished or being run by another process sharing this folder
        started = time.time()
        rows = _subset(args, scores, labels, run)
        if args.max_steps is not None:
            steps = args.max_steps
        else:
            steps = max(1, math.ceil(args.epochs * len(rows) / args.batch_size))
            _check_steps(steps, f"epochs={args.epochs} of {len(rows)} rows at batch_size={args.batch_size}")
        model = _train(_build(args, data, seed), data, rows, steps, args, seed)
        accuracy = _accuracy(model, data, args.eval_batch_size)
        record = {
            "score": score,
            "strategy": strategy,
            "keep": keep,
            "seed": seed,
            "accuracy": accuracy,
            "train_rows": len(rows),
            "steps": steps,
            "seconds": round(time.time() - started, 1),
        }
        with runs_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("%s %s keep=%g seed=%d: test accuracy %.4f", score, strategy, keep, seed, accuracy)
        if args.report_every and (todo.index(run) + 1) % args.report_every == 0:
            _write_summary(args, output_dir, runs_path)
    return _write_summary(args, output_dir, runs_path)


def _write_summary(args: CurveArguments, output_dir: Path, runs_path: Path) -> dict:
    summary = summarize_runs(_read_runs(runs_path))
    summary["arguments"] = asdict(args)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_curve_report(summary, output_dir, title=_title(args, summary["points"]))
    return summary


def _title(args: CurveArguments, points: list[dict]) -> str:
    budget = f"{args.max_steps} steps" if args.max_steps is not None else f"{args.epochs:g} epochs of each subset"
    # The seeds finished, not the ones asked for this time: a folder may hold points of a 4th seed run on its own.
    counts = sorted({p["n"] for p in points}) or [len(args.seeds)]
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (
        f"{Path(args.data_files or args.dataset_name).parent.name or args.dataset_name}: {args.model_name}, "
        f"{budget} at batch {args.batch_size}, {seeds} seeds per point; scores from {len(args.scoring_seeds)} "
        f"proxies after {args.scoring_epochs} epoch(s)"
    )


def summarize_runs(runs: list[dict]) -> dict:
    """Mean and (population) std of the test accuracy of each (score, strategy, keep) over its seeds.

    Returns `{"points": [{"score", "strategy", "keep", "mean", "std", "n", "seeds", "accuracies"}...]}`, sorted
    (`accuracies[i]` is the run of `seeds[i]`).

    Example:
    ```python
    >>> from datadiet.curve import summarize_runs
    >>> runs = [{"score": "full", "strategy": "full", "keep": 1.0, "seed": 0, "accuracy": 0.9},
    ...         {"score": "full", "strategy": "full", "keep": 1.0, "seed": 1, "accuracy": 0.8}]
    >>> point = summarize_runs(runs)["points"][0]
    >>> point["mean"], point["std"], point["seeds"]
    (0.85, 0.05, [0, 1])

    ```
    """
    groups: dict[tuple, dict[int, float]] = {}
    for run in runs:
        # A run repeated (e.g. two processes on one folder) counts once per seed: the last line wins.
        groups.setdefault((run["score"], run["strategy"], float(run["keep"])), {})[int(run["seed"])] = run["accuracy"]
    points = []
    for (score, strategy, keep), by_seed in sorted(groups.items()):
        values = np.array([by_seed[s] for s in sorted(by_seed)])
        points.append(
            {
                "score": score,
                "strategy": strategy,
                "keep": keep,
                "mean": round(float(values.mean()), 6),
                "std": round(float(values.std()), 6),
                "n": len(values),
                "seeds": sorted(by_seed),
                "accuracies": [by_seed[s] for s in sorted(by_seed)],
            }
        )
    return {"points": points}


def _by_seed(point: dict) -> dict[int, float]:
    """A summary point's accuracy of each seed."""
    return dict(zip(point.get("seeds", []), point.get("accuracies", [])))


def _on_seeds(reference: dict, seeds: list[int]) -> dict:
    """`reference` (a summary point) restricted to `seeds`, so that a point run on fewer seeds than its baselines is
    compared with the baselines' runs of the same seeds. Points written before per-seed accuracies were kept, or
    missing one of the seeds, are used whole."""
    by_seed = _by_seed(reference)
    if not by_seed or set(seeds) == set(by_seed) or not set(seeds) <= set(by_seed):
        return reference
    values = np.array([by_seed[s] for s in seeds])
    return {**reference, "mean": float(values.mean()), "std": float(values.std()), "n": len(values)}


def _verdicts(points: list[dict], tolerance: float = 0.005) -> list[str]:
    """One plain sentence per (score, strategy): at each keep fraction, does it beat random (by more than the larger
    std over seeds; otherwise a tie) and is it within `tolerance` of the full data (or above it)? Both comparisons
    use the baselines' runs of the same seeds as the point."""
    full = next((p for p in points if p["score"] == "full"), None)
    random = {p["keep"]: p for p in points if p["score"] == "random"}
    sentences = []
    methods = sorted({(p["score"], p["strategy"]) for p in points if p["score"] not in ("full", "random")})
    for score, strategy in methods:
        parts = []
        for point in sorted(
            (p for p in points if (p["score"], p["strategy"]) == (score, strategy)), key=lambda p: -p["keep"]
        ):
            keep = point["keep"]
            pieces = []
            if keep in random:
                baseline = _on_seeds(random[keep], point.get("seeds", []))
                delta = 100 * (point["mean"] - baseline["mean"])
                # A difference smaller than the seeds' spread is not a win or a loss: call it a tie.
                noise = 100 * max(point["std"], baseline["std"])
                verdict = "ties with" if abs(delta) <= noise else "beats" if delta > 0 else "loses to"
                pieces.append(f"{verdict} random ({delta:+.2f} pt, std {noise:.2f})")
            if full is not None:
                gap = 100 * (point["mean"] - _on_seeds(full, point.get("seeds", []))["mean"])
                if gap > 100 * tolerance:
                    pieces.append(f"is above the full data ({gap:+.2f} pt)")
                else:
                    within = abs(gap) <= 100 * tolerance
                    pieces.append(f"{'within' if within else 'not within'} 0.5 pt of full data ({gap:+.2f} pt)")
            parts.append(f"at {100 * keep:g}% it " + " and ".join(pieces))
        sentences.append(f"- **{score} / {strategy}**: " + "; ".join(parts) + ".")
    return sentences


def _per_seed_table(points: list[dict]) -> list[str]:
    """Every run's accuracy by seed, and each pruned run minus the random subset of its seed and keep fraction (the
    paired difference: a method that wins on every seed is more convincing than its mean alone says)."""
    seeds = sorted({seed for point in points for seed in point.get("seeds", [])})
    if not seeds or all(point["score"] == "full" for point in points):
        return []  # the report already says that no pruned run has finished
    random = {p["keep"]: p for p in points if p["score"] == "random"}
    lines = ["", "## Per seed", ""]
    lines.append(
        "Test accuracy (%) of every run; in brackets, minus the random subset of the same seed and keep (pt)."
    )
    lines.append("")
    lines.append("| score | strategy | keep | " + " | ".join(f"seed {seed}" for seed in seeds) + " |")
    lines.append("|---|---|---|" + "---|" * len(seeds))
    for point in sorted(points, key=lambda p: (p["score"] != "full", p["score"] != "random", -p["keep"])):
        by_seed = _by_seed(point)
        paired = point["score"] not in ("full", "random")
        baseline = _by_seed(random.get(point["keep"], {})) if paired else {}
        cells = []
        for seed in seeds:
            if seed not in by_seed:
                cells.append("—")
            elif seed in baseline:
                cells.append(f"{100 * by_seed[seed]:.2f} ({100 * (by_seed[seed] - baseline[seed]):+.2f})")
            else:
                cells.append(f"{100 * by_seed[seed]:.2f}")
        lines.append(
            f"| {point['score']} | {point['strategy']} | {100 * point['keep']:g}% | " + " | ".join(cells) + " |"
        )
    return lines


def write_curve_report(summary: dict, output_dir: str | Path, *, title: str | None = None) -> tuple[Path, Path]:
    """Write `curve.md` (a table of mean ± std test accuracy per score × strategy and keep fraction, then one plain
    verdict per score × strategy) and `curve.png` (see `datadiet.report.plot_pruning_curve`); return both paths."""
    from .report import plot_pruning_curve

    output_dir = Path(output_dir)
    points = summary["points"]
    keeps = sorted({p["keep"] for p in points if p["score"] != "full"}, reverse=True)
    full = next((p for p in points if p["score"] == "full"), None)
    rows = [("random", "random")] + sorted(
        {(p["score"], p["strategy"]) for p in points} - {("full", "full"), ("random", "random")}
    )
    lookup = {(p["score"], p["strategy"], p["keep"]): p for p in points}
    lines = [f"# Pruning curve{': ' + title if title else ''}", ""]
    lines.append("Test accuracy (%), mean ± std over training seeds (n = number of seeds).")
    lines.append("")
    if full is not None:
        lines.append(f"Full data (100%): **{100 * full['mean']:.2f} ± {100 * full['std']:.2f}** (n={full['n']})")
        lines.append("")
    best: dict[float, dict] = {}
    if keeps:
        lines.append("| score | strategy | " + " | ".join(f"keep {100 * k:g}%" for k in keeps) + " |")
        lines.append("|---|---|" + "---|" * len(keeps))
    else:
        lines.append("No pruned run has finished yet: rerun the curve command to continue.")
        rows = []
    for score, strategy in rows:
        cells = []
        for keep in keeps:
            point = lookup.get((score, strategy, keep))
            if point is None:
                cells.append("—")
                continue
            cells.append(f"{100 * point['mean']:.2f} ± {100 * point['std']:.2f} (n={point['n']})")
            if score != "random" and point["mean"] > best.get(keep, {"mean": -1.0})["mean"]:
                best[keep] = point
        lines.append(f"| {score} | {strategy} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", ""]
    lines += _verdicts(points)
    if best:
        lines += ["", "Best score / strategy per keep fraction (the baselines on the same seeds):"]
        for keep in keeps:
            if keep in best:
                point = best[keep]
                seeds = point.get("seeds", [])
                random = lookup.get(("random", "random", keep))
                versus = f", random {100 * _on_seeds(random, seeds)['mean']:.2f}" if random else ""
                versus += f", full {100 * _on_seeds(full, seeds)['mean']:.2f}" if full else ""
                name = f"{point['score']} / {point['strategy']}"
                lines.append(f"- {100 * keep:g}%: {name} {100 * point['mean']:.2f} (n={point['n']}){versus}")
    lines += _per_seed_table(points)
    markdown = output_dir / "curve.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown.write_text("\n".join(lines) + "\n")
    image = plot_pruning_curve(points, output_dir / "curve.png", title=title)
    return markdown, image


def config_digest(args: CurveArguments) -> str:
    """A short digest of the fields that define the curve's results (for naming folders)."""
    config = json.dumps({name: getattr(args, name) for name in _RESULT_FIELDS}, sort_keys=True)
    return hashlib.sha256(config.encode()).hexdigest()[:12]
