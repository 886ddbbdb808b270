"""`score_dataset`: runs models over a dataset and turns their per-example scores into dataset columns (several
seeds, training of proxy models, each row scored exactly once under `accelerate launch`, streaming datasets keyed by
a stored row id, partial results in `output_dir` so that an interrupted run resumes instead of starting over). The
run is plan (`engine/plan.py`) -> a proxy per seed -> the scoring loop (`engine/loop.py`) -> the columns."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset
from torch import nn

from ..data import check_input_channels
from ..models import input_channels_of, model_name_of, weights_fingerprint
from ..provenance import describe_source, read_provenance, record_provenance
from ..scores.registry import varies_with_the_model
from .batches import task_provenance
from .dynamics import dynamics_of
from .loop import score_rows, score_stream
from .plan import ProxyTrainer, ScoringPlan, plan_scoring
from .process import get_process_state
from .store import check_or_write_config, load_scores, load_weights, save_weights

logger = logging.getLogger(__name__)

__all__ = ["ProxyTrainer", "score_dataset", "score_planned"]


def score_dataset(
    dataset: Dataset | IterableDataset,
    model: nn.Module | None = None,
    methods: Sequence[str] | str = ("el2n",),
    *,
    model_init: Callable[[int], nn.Module] | None = None,
    seeds: Sequence[int] = (0,),
    train_epochs: float = 0,
    transform: Callable | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 128,
    output_dir: str | os.PathLike | None = None,
    text_column: str | None = None,
    overwrite: bool = False,
    mixed_precision: str | None = None,
    save_every: int = 20,
    training_kwargs: dict[str, Any] | None = None,
    row_id_column: str | None = None,
    task: str | None = None,
    tokenizer=None,
    max_length: int | None = 1024,
    train_proxy: ProxyTrainer | None = None,
) -> Dataset:
    """Score every example of `dataset` and return the dataset with one float32 column per method.

    With `model`, that model is scored as it is. With `model_init(seed) -> model` and `seeds`, one model per seed is
    built (after `transformers.set_seed(seed)`), trained `train_epochs` epochs on `dataset` (0: scored at
    initialisation, e.g. "GraNd at init") and scored; the column `<method>` holds the mean over seeds and
    `<method>_std` the standard deviation (population std, only with several seeds). Models run in eval mode on
    un-augmented inputs, as EL2N and GraNd are defined (Paul et al. 2021).

    Under `accelerate launch` / `torchrun` with N processes, each process scores its own rows (contiguous blocks of
    a `Dataset`, disjoint parts of a stream; no sampler padding) and every row gets exactly one score: the result is
    the one-process result. Every process returns the full result.

    A streaming `IterableDataset` needs a stored integer `row_id_column` (positions in a stream are not stable ids)
    and an `output_dir`: the scores go straight to Parquet shards keyed by row id, memory stays flat whatever the
    number of rows, and the return value is the scores keyed by row id (`load_scores(output_dir)`), which
    `join_scores(stream, scores, row_id_column)` joins back.

    Args:
        dataset: a `datasets.Dataset` (or streaming `datasets.IterableDataset`) with an input column (`Image`, text,
            or array) and a label column.
        model: a timm model, a transformers `*ForImageClassification` / `*ForSequenceClassification`, or any
            `nn.Module` returning logits.
        methods: score names, see `datadiet.scores.list_scores()` (`el2n`, `grand`, `loss`, `margin`, ...).
        model_init: builds a fresh model for a seed; use it for several independently initialised models.
        seeds: the seeds of the models to average over.
        train_epochs: epochs each model from `model_init` is trained before scoring (fractions allowed).
        transform: per-image callable (timm / torchvision transform), transformers image processor, or tokenizer.
        image_column / text_column / label_column: detected from the features when not given.
        batch_size: rows per forward pass.
        output_dir: where partial scores (Parquet shards keyed by row id, written atomically) and trained proxy
            weights are written; a rerun with the same folder and configuration skips the rows already scored (also
            after a crash), and a rerun with another configuration fails.
        overwrite: replace existing columns of the same names instead of failing.
        mixed_precision: `"bf16"` to run the forward passes under bfloat16 autocast.
        save_every: batches between two shard writes (what a crash can lose per process).
        training_kwargs: extra arguments for the proxy models' training (learning rate, ...).
        row_id_column: an integer column holding each row's own id, which keys the shards in `output_dir`.
            Required for an `IterableDataset`; optional for a `Dataset`, whose rows are keyed by position without it.
        task: `None` (or `"image_classification"` / `"text_classification"`) for classifiers, or `"causal_lm"` for a
            causal language model scored on instruction / SFT rows (TRL's `text`, `prompt`/`completion`, `messages`,
            or Alpaca `instruction`/`input`/`output`), with the methods of `list_scores("causal_lm")` (`loss`, `perplexity`, `el2n`, `ifd`, `grand`) over the tokens
            `SFTTrainer` trains on (see `datadiet.tasks.CausalLMTask`).
        tokenizer: the causal LM's tokenizer (`task="causal_lm"`).
        max_length: `SFTConfig.max_length` for `task="causal_lm"`: rows are truncated to their first `max_length`
            tokens.
        train_proxy: `train_proxy(model, dataset, *, preprocessor, epochs, seed, batch_size, output_dir, ...,
            track_scores=[...]) -> (trained model, {score: per-row values})` trains the proxies; `datadiet.score_dataset`
            passes the trainer's `datadiet.trainer.proxy.fit_proxy` (the engine never imports the trainer).

    Example:
    ```python
    >>> import timm
    >>> from datasets import ClassLabel, Dataset, Features, Image
    >>> from PIL import Image as PILImage
    >>> from datadiet import score_dataset
    >>> images = [PILImage.new("RGB", (32, 32), color=(i * 30, 0, 0)) for i in range(6)]
    >>> ds = Dataset.from_dict({"img": images, "label": [0, 1, 2, 0, 1, 2]},
    ...                        features=Features({"img": Image(), "label": ClassLabel(num_classes=3)}))
    >>> scored = score_dataset(ds, model_init=lambda seed: timm.create_model("test_resnet", num_classes=3),
    ...                        methods=["el2n", "loss"], seeds=[0, 1])
    >>> scored.column_names
    ['img', 'label', 'el2n', 'el2n_std', 'loss', 'loss_std']

    ```
    """
    plan = plan_scoring(
        dataset,
        model,
        methods,
        model_init=model_init,
        seeds=seeds,
        train_epochs=train_epochs,
        transform=transform,
        image_column=image_column,
        label_column=label_column,
        batch_size=batch_size,
        output_dir=output_dir,
        text_column=text_column,
        overwrite=overwrite,
        mixed_precision=mixed_precision,
        save_every=save_every,
        training_kwargs=training_kwargs,
        row_id_column=row_id_column,
        task=task,
        tokenizer=tokenizer,
        max_length=max_length,
        train_proxy=train_proxy,
    )
    return score_planned(plan)


def score_planned(plan: ScoringPlan) -> Dataset:
    """Run a [`~datadiet.engine.plan.ScoringPlan`]: one proxy per seed, each scoring every row once through the
    loop, then the columns (mean over seeds, `_std` where it applies) and the provenance. `score_dataset` is
    `score_planned(plan_scoring(...))`; the command builds its plan itself (its columns and preprocessor are built
    once, its methods checked once)."""
    state = get_process_state()
    per_seed: list[dict[str, np.ndarray]] = []
    for position, seed in enumerate(plan.seeds, start=1):
        model, dynamics = _proxy_for_seed(plan, seed, position, state)
        seed_dir = plan.output_dir / f"seed-{seed}" if plan.output_dir is not None else None
        shard_dir = seed_dir / "scores" if seed_dir is not None else None
        loop = {
            "shard_dir": shard_dir,
            "state": state,
            "description": f"Scoring {'+'.join(plan.evaluated)} (seed {seed})",
        }
        if plan.streaming:
            score_stream(model, plan, **loop)
        else:
            scores = score_rows(model, plan, **loop) if plan.evaluated else {}
            per_seed.append({**scores, **dynamics})
    return _aggregate(plan, per_seed, model, state)


def _model_identity(plan: ScoringPlan, model: nn.Module) -> str:
    # The first seed's model: the model given (or its copy, before any training), else `model_init`'s fresh one.
    digest = plan.model_sha256 if plan.model_init is None else weights_fingerprint(model)
    return f"{type(model).__module__}.{type(model).__qualname__}:{digest}"


def _proxy_for_seed(plan: ScoringPlan, seed: int, position: int, state) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """The model of `seed` (built by `model_init`, or the model given, copied when it trains) trained by the plan's
    `train_proxy`, or loaded from the weights an earlier run saved in `output_dir`; and its training-dynamics
    scores. The first seed's model is checked against the inputs and recorded in the run folder's configuration
    before anything trains."""
    if plan.model_init is not None:
        from transformers import set_seed

        set_seed(seed)
        model = plan.model_init(seed)
    else:
        model = copy.deepcopy(plan.model) if plan.train_epochs > 0 else plan.model
    first = position == 1
    if first and plan.task is None:
        check_input_channels(plan.dataset, plan.preprocessor, input_channels_of(model))
    if first and plan.config is not None:
        # Hashes every weight: only where a run folder needs it.
        check_or_write_config(plan.output_dir, {**plan.config, "model": _model_identity(plan, model)}, state=state)
    if plan.train_epochs <= 0:
        return model, {}
    seed_dir = plan.output_dir / f"seed-{seed}" if plan.output_dir is not None else None
    weights = seed_dir / "model.safetensors" if seed_dir is not None else None
    dynamics_cache = seed_dir / "dynamics.npz" if seed_dir is not None else None
    if weights is not None and weights.exists():
        logger.info("Loading the seed-%d model trained by an earlier run from %s.", seed, weights)
        load_weights(model, weights)
        return model, dynamics_of(None, plan.dynamics, dynamics_cache) if plan.dynamics else {}
    which = f"seed {seed} ({position} of {len(plan.seeds)})"
    logger.info("Training proxy %s for %s epochs.", which, plan.train_epochs)
    # Training-dynamics scores are tracked during this very training (as the curve's proxies do).
    tracking = {"track_scores": plan.dynamics} if plan.dynamics else {}
    model, tracked = plan.train_proxy(
        model,
        plan.dataset,
        preprocessor=plan.preprocessor,
        epochs=plan.train_epochs,
        seed=seed,
        batch_size=plan.batch_size,
        output_dir=seed_dir / "training" if seed_dir else None,
        progress_bar=state.is_local_main_process,
        progress_description=f"Training proxy {which}",
        **{**(plan.training_kwargs or {}), **tracking},
    )
    dynamics = {}
    if plan.dynamics:
        dynamics = dynamics_of(tracked, plan.dynamics, dynamics_cache if state.is_main_process else None)
    if weights is not None and state.is_main_process:
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, weights)
    state.wait_for_everyone()
    return model, dynamics


def _aggregate(plan: ScoringPlan, per_seed: list[dict[str, np.ndarray]], last_model: nn.Module, state) -> Dataset:
    """The scored dataset: per method the mean over seeds and, with several seeds, the `_std` of what varies with the
    model; and the scoring provenance. A stream's scores stay in `output_dir`: returned keyed by row id."""
    described = plan.model if plan.model is not None else last_model
    config_of = getattr(described, "config", None)
    provenance = {
        "methods": plan.methods,
        "seeds": plan.seeds,
        "train_epochs": plan.train_epochs,
        "model": model_name_of(described),
        "model_config": config_of.to_dict() if hasattr(config_of, "to_dict") else None,
        "input_column": plan.input_column,
        "label_column": plan.label_column,
        "batch_size": plan.batch_size,
        "mixed_precision": plan.mixed_precision,
        "num_processes": state.num_processes,
        "model_init": plan.model_init is not None,  # fresh models per seed, or the one model given
        "weights_sha256": plan.model_sha256,
        "training": plan.training_kwargs or None,
        "preprocessing": plan.preprocessor.fingerprint(),
    }
    if plan.task is not None:
        provenance.update(task=plan.task, **task_provenance(plan.preprocessor.task))
    if plan.streaming:
        return record_provenance(load_scores(plan.output_dir, row_id_column=plan.row_id_column), scoring=provenance)
    dataset = plan.dataset
    # A dataset scored from Python names its source too (the command records its own, fuller one).
    source = {} if read_provenance(dataset).get("source") else {"source": describe_source(dataset)}
    scored = dataset.remove_columns(plan.clashing) if plan.clashing else dataset
    for method in plan.methods:
        stacked = np.stack([scores[method] for scores in per_seed]).astype(np.float64)
        scored = scored.add_column(method, stacked.mean(axis=0).astype(np.float32))
        if len(plan.seeds) > 1 and (method in plan.dynamics or varies_with_the_model(method)):
            scored = scored.add_column(f"{method}_std", stacked.std(axis=0).astype(np.float32))
    return record_provenance(scored, scoring=provenance, **source)
