"""The curve's lean in-memory training: the decoded data (`CurveData`), an SGD loop, test accuracy, and the proxy
models whose scores the curve prunes by.

Images are decoded once to a uint8 tensor and augmented per batch on tensors, not by `DataDietTrainer`: a curve is
hundreds of short trainings, and on a few CPU cores decoding and transforming every image of every step one by one
costs more than the small networks the curve is run with."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .arguments import CurveArguments, check_steps

logger = logging.getLogger(__name__)

__all__ = [
    "SEED_PURPOSES",
    "CurveData",
    "accuracy_on",
    "accuracy_on_test",
    "build_curve_model",
    "proxy_scores",
    "stream_seed",
    "train_on_rows",
]

# The separate random streams of a curve: the same integer given as a training seed, a proxy (scoring) seed and the
# validation seed draws three unrelated streams, so a proxy never shares its initialisation and data order with a
# trained model (the overlap that made proxy and trained runs alike before streams were separated).
SEED_PURPOSES = ("training", "proxy", "validation")


def stream_seed(purpose: str, seed: int) -> int:
    """The torch / numpy seed of `seed` used for `purpose` (one of `SEED_PURPOSES`): the first 31 bits of
    sha256(`"datadiet-curve/{purpose}/{seed}"`), so that each purpose has its own stream of seeds.

    Example:
    ```python
    >>> from datadiet.curve.training import stream_seed
    >>> stream_seed("training", 5) != stream_seed("proxy", 5), stream_seed("training", 5) == stream_seed("training", 5)
    (True, True)

    ```
    """
    import hashlib

    if purpose not in SEED_PURPOSES:
        raise ValueError(f"Unknown seed purpose {purpose!r}: one of {list(SEED_PURPOSES)}.")
    digest = hashlib.sha256(f"datadiet-curve/{purpose}/{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


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


class CurveData:
    """The decoded train and test sets and the per-batch preprocessing (normalisation, crop, flip)."""

    def __init__(self, args: CurveArguments):
        from ..data import detect_columns, load_data

        every = bool(args.keep_classes)  # then max_rows / max_eval_rows count rows of the kept classes
        train = load_data(
            args.dataset_name, split=args.split, data_files=args.data_files, max_rows=None if every else args.max_rows
        )
        test = load_data(
            args.eval_dataset_name or args.dataset_name,
            split=args.eval_split,
            data_files=args.eval_data_files,
            max_rows=None if every else args.max_eval_rows,
        )
        image_column, kind, label_column = detect_columns(
            train, image_column=args.image_column, label_column=args.label_column
        )
        if args.keep_classes:
            from ..data import keep_classes

            train = keep_classes(train, args.keep_classes, label_column, max_rows=args.max_rows)
            test = keep_classes(test, args.keep_classes, label_column, max_rows=args.max_eval_rows)
        if kind != "image":
            raise ValueError(
                f"Pruning curves train image classifiers; the detected input column {image_column!r} is {kind}. "
                "Pass image_column=... ."
            )
        self.x_train, self.y_train = _to_tensors(train, image_column, label_column)
        self.x_test, self.y_test = _to_tensors(test, image_column, label_column)
        feature = train.features[label_column]
        self.num_classes = int(getattr(feature, "num_classes", 0) or int(self.y_train.max()) + 1)
        self.label_names = list(getattr(feature, "names", None) or map(str, range(self.num_classes)))
        self.model_sources: dict = {}  # built on first use (a named checkpoint is loaded and checked once)
        # The validation hold-out: its rows leave the training tensors here, so that no proxy and no subset (both
        # drawn from positions of x_train) can ever train on them. `train_rows` maps positions back to the split.
        self.train_rows = np.arange(len(self.y_train))
        self.validation_rows = np.zeros(0, dtype=np.int64)
        if args.validation_fraction:
            from ..selection import stratified_split

            rng = np.random.default_rng(stream_seed("validation", args.validation_seed))
            self.validation_rows = stratified_split(self.y_train.numpy(), args.validation_fraction, rng)
            keep = np.setdiff1d(self.train_rows, self.validation_rows)
            self.x_validation, self.y_validation = (
                self.x_train[self.validation_rows],
                self.y_train[self.validation_rows],
            )
            self.x_train, self.y_train, self.train_rows = self.x_train[keep], self.y_train[keep], keep
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


def build_curve_model(args: CurveArguments, data: CurveData, seed: int, *, proxy: bool = False) -> nn.Module:
    """A seeded model for `data`'s classes and channels, in channels-last layout: the checkpoint
    `args.model_name_or_path` (a new head when its classes differ) or a fresh timm model `args.model_name`; for a
    `proxy`, a fresh `args.proxy_model_name` when one is given."""
    from types import SimpleNamespace

    from ..model_sources import ModelSource
    from ..models import LogitsModule

    key = "proxy" if proxy and args.proxy_model_name else "runs"
    if key not in data.model_sources:
        source = SimpleNamespace(model_name=args.proxy_model_name) if key == "proxy" else args
        data.model_sources[key] = ModelSource(source, label_names=data.label_names, in_chans=data.in_chans)
    model = data.model_sources[key](seed)
    if getattr(model, "config", None) is not None and hasattr(model.config, "model_type"):
        model = LogitsModule(model)  # transformers: called as model(images) -> logits by the loop below
    # channels-last convolutions train the small CIFAR nets about 1.4x faster on this kind of CPU (oneDNN).
    return model.to(memory_format=torch.channels_last)


def train_on_rows(
    model: nn.Module,
    data: CurveData,
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
def accuracy_on(
    model: nn.Module, data: CurveData, images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> float:
    """Accuracy on `images` / `labels` (the test split or the validation rows); with flips on, the logits of the image
    and its mirror are averaged (test-time augmentation)."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = data.normalise(images[start : start + batch_size])
        logits = model(batch)
        if data.flip:
            logits = logits + model(batch.flip(3))
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def accuracy_on_test(model: nn.Module, data: CurveData, batch_size: int) -> float:
    """Test accuracy (see `accuracy_on`)."""
    return accuracy_on(model, data, data.x_test, data.y_test, batch_size)


# ---- scoring ---------------------------------------------------------------------------------------------------------


def _score_proxy(args: CurveArguments, data: CurveData, seed: int, path: Path) -> dict[str, np.ndarray]:
    """Train one proxy model `scoring_epochs` epochs and score every training row with it (eval mode, un-augmented
    input, as EL2N and GraNd are defined by Paul et al. 2021); cached at `path`."""
    if path.exists():
        with np.load(path) as cached:
            return {name: cached[name] for name in cached.files}
    from ..scores import forgetting_events
    from ..scores.batch import score_batch
    from ..scores.trackers import fill_unseen

    num_rows = len(data.y_train)
    steps_per_epoch = max(num_rows // args.batch_size, 1)
    history = np.full((num_rows, args.scoring_epochs), np.nan)
    steps = steps_per_epoch * args.scoring_epochs
    check_steps(
        steps,
        f"Scoring the proxies ({num_rows} rows, batch_size={args.batch_size}, scoring_epochs={args.scoring_epochs})",
    )
    torch_seed = stream_seed("proxy", seed)
    model = build_curve_model(args, data, torch_seed, proxy=True)
    train_on_rows(model, data, np.arange(num_rows), steps, args, torch_seed, history)
    wanted = [name for name in args.scores if name not in ("forgetting", "input_norm")]
    values: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for start in range(0, num_rows, args.eval_batch_size):
        images = data.normalise(data.x_train[start : start + args.eval_batch_size])
        labels = data.y_train[start : start + args.eval_batch_size]
        # GraNd is exact over all parameters (eval mode), chunked to bound memory.
        rows = range(start, start + len(labels))
        scores = score_batch(model, images, labels, wanted, row_ids=rows, gradient_chunk_size=128)
        for name in wanted:
            values[name].append(scores[name].numpy())
    result = {name: np.concatenate(parts).astype(np.float64) for name, parts in values.items()}
    # Rows never presented (the dropped partial batch of a one-epoch run) count as unseen: NaN events. They are
    # given the median so that every row has a score.
    result["forgetting"] = fill_unseen(forgetting_events(history))
    result["proxy_train_accuracy"] = np.array([np.nanmean(history[:, -1])])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **result)
    return result


def proxy_scores(args: CurveArguments, data: CurveData, output_dir: Path) -> dict[str, np.ndarray]:
    """Every requested score, averaged over the proxy models of `scoring_seeds` (input_norm needs no model)."""
    from tqdm.auto import tqdm

    from ..scores import get_score

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
