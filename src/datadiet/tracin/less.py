"""LESS (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning"): score each training row
by how well its (Adam-normalised, projected) gradient aligns with the gradients of a small target set, through the
checkpoints of a warm-up training run. Features go to Parquet shards, so memory stays flat in the number of rows and
an interrupted run resumes."""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.store import check_or_write_config
from ..scores.gradients import RandomProjector, select_parameters
from ..scores.less import PerExampleLoss, adam_update_direction, per_example_loss_gradients
from .checkpoints import Checkpoint, match_keys, read_adam_state, resolve_checkpoints

logger = logging.getLogger(__name__)

__all__ = ["LESS", "less_scores", "pad_causal_rows"]

LESS_CONFIG_FILE = "less_config.json"


def pad_causal_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad tokenised rows to the longest: `input_ids` with 0, `attention_mask` with 0, `labels` with -100
    (`attention_mask` defaults to ones, `labels` to `input_ids`). Other columns are left out."""
    if not rows or "input_ids" not in rows[0]:
        raise ValueError(
            "Rows need an 'input_ids' column (tokenised text; 'labels' with -100 on untrained tokens). Tokenise the "
            "dataset first, or pass collate_fn= that turns a list of rows into the batch per_example_loss takes."
        )
    length = max(len(row["input_ids"]) for row in rows)
    batch = {}
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        values = [
            list(row.get(key, [1] * len(row["input_ids"]) if key == "attention_mask" else row["input_ids"]))
            for row in rows
        ]
        batch[key] = torch.tensor([v + [pad] * (length - len(v)) for v in values], dtype=torch.long)
    return batch


def _target_sets(targets: Any) -> dict[str, Any]:
    if isinstance(targets, Mapping):
        sets = {str(name): rows for name, rows in targets.items()}
    elif isinstance(targets, (list, tuple)) and targets and not isinstance(targets[0], Mapping):
        sets = {str(i): rows for i, rows in enumerate(targets)}
    else:
        sets = {"0": targets}
    empty = [name for name, rows in sets.items() if len(rows) == 0]
    if not sets or empty:
        raise ValueError(f"Target set(s) {empty or ['(none)']} have no rows: give at least one target row per set.")
    return sets


def _digest(rows: Any) -> str:
    """A hash of the rows' content, so that resuming refuses another training set in the same output_dir."""
    digest = hashlib.sha256(f"{len(rows)}".encode())
    if hasattr(rows, "with_format"):
        import pyarrow as pa

        for table in rows.with_format("arrow").iter(batch_size=1024):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            digest.update(sink.getvalue().to_pybytes())
    else:
        digest.update(repr(rows).encode())
    return digest.hexdigest()


class LESS:
    """LESS targeted data selection (Xia et al. 2024): a training row scores high when the update it would make
    points where the target examples' gradients point, through the checkpoints of a (warm-up) training run.

    For checkpoints `c` with learning rates `η_c`, target sets `T_s` and a training row `z`:

        Γ_c(z) = AdamW's update direction for ∇ℓ(z) from checkpoint c's optimizer state   (plain ∇ℓ(z) if adam=False)
        less(z) = max_s Σ_c (η_c / Σ_c' η_c') · (1 / |T_s|) Σ_{z' ∈ T_s} cos(R Γ_c(z), R ∇ℓ(z'))
                = max_s Σ_c w_c · ⟨R Γ_c(z) / ‖R Γ_c(z)‖, μ_{c,s}⟩,  μ_{c,s} = mean_{z' ∈ T_s} R ∇ℓ(z') / ‖R ∇ℓ(z')‖

    with `R` the seeded random projection (the identity when `projection_dim=None`) and gradients over the trainable
    parameters (with peft LoRA: the adapters). This is LESS's own computation (`matching.py`: normalised features, one
    inner product per target example, averaged over the target set, checkpoint weights renormalised to sum to 1, max
    over target subsets); target gradients are plain SGD gradients there too. It is not the cosine with the target
    set's mean gradient summed over checkpoints: averaging the cosines gives every target example the same weight
    whatever its gradient norm (long or badly fitted targets would otherwise dominate the mean), and equals
    `‖μ_{c,s}‖` times the cosine with `μ_{c,s}`, the mean of the *normalised* target gradients (a factor constant
    over training rows within one checkpoint and target set, not across checkpoints). Scores lie in [-1, 1];
    renormalising the weights does not change the ranking of the learning-rate-weighted sum. Differences from LESS's code: `Γ` follows the paper's equation and
    `torch.optim.AdamW` (bias-corrected moments, ε outside the square root, β and ε read from the checkpoint), where
    their code omits the bias correction (a per-checkpoint factor that the cosine ignores) and adds ε under the root.

    Args:
        model (`nn.Module`): the model the checkpoints were trained as (e.g. the peft model given to the Trainer); a
            copy is loaded with each checkpoint and put in eval mode.
        checkpoints: Trainer checkpoint folders (weights or peft adapters, `trainer_state.json` for the learning rate,
            `optimizer.pt` for the Adam state), or `(folder, lr)` pairs; `(state_dict, lr)` pairs when `adam=False`.
        per_example_loss (`Callable`): `(model, batch) -> [B]`, each row's loss alone (for a causal LM, the mean
            next-token loss over its trained tokens).
        learning_rates (`list[float]`, *optional*): one per checkpoint, overriding those read from the folders.
        adam (`bool`, *optional*, defaults to `True`): Adam-normalise the training gradients with the optimizer state.
        projection_dim (`int`, *optional*, defaults to 8192): the projected dimension; `None` for exact gradients.
        projection (`str`, *optional*, defaults to `"countsketch"`): `"countsketch"` (O(P) memory: a dense Gaussian map
            of the 5M LoRA parameters of a 135M model to 8,192 dimensions would take 160 GB) or `"gaussian"`.
        seed (`int`, *optional*, defaults to 0): the projection's seed, recorded in `metadata`.
        batch_size (`int`, *optional*, defaults to 8): rows per forward pass.
        collate_fn (`Callable`, *optional*): turns a list of rows into the batch `per_example_loss` takes;
            `pad_causal_rows` by default.
        output_dir (`str`, *optional*): where the training rows' features go (`features/checkpoint-<c>/*.parquet`);
            a rerun in the same folder reads the shards already written. Without it nothing is stored.
        rows_per_shard (`int`, *optional*, defaults to 256): training rows per feature shard (the memory held, and
            the unit of work resumed and shared between processes).
        device (`str`, *optional*): where to run; the model's device by default.
        state (`accelerate.PartialState`, *optional*): the processes to share the work with. By default the state of
            this launch (one process under `python`; under `accelerate launch`, every process started). Each process
            computes the target gradients of its slice of the target rows and the features of its share of the
            (checkpoint, shard) pairs; the partial sums are added across processes, so every process returns the
            one-process scores (up to the order of floating-point sums).

    Example:
    ```python
    >>> import torch
    >>> from datadiet.tracin.less import LESS
    >>> model = torch.nn.Linear(4, 3)
    >>> def loss(model, batch):
    ...     return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
    >>> def collate(rows):
    ...     return {"x": torch.tensor([r["x"] for r in rows]), "y": torch.tensor([r["y"] for r in rows])}
    >>> rows = [{"x": torch.randn(4).tolist(), "y": i % 3} for i in range(10)]
    >>> less = LESS(model, [(model.state_dict(), 1e-3)], per_example_loss=loss, adam=False, projection_dim=None,
    ...             collate_fn=collate)
    >>> scores = less.scores(rows, {"task": rows[:3]})
    >>> scores.shape, bool((abs(scores) <= 1 + 1e-6).all())
    ((10,), True)

    ```
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Sequence[Any],
        *,
        per_example_loss: PerExampleLoss,
        learning_rates: Sequence[float] | None = None,
        adam: bool = True,
        projection_dim: int | None = 8192,
        projection: str = "countsketch",
        seed: int = 0,
        batch_size: int = 8,
        collate_fn: Callable[[list[dict]], Any] | None = None,
        output_dir: str | os.PathLike | None = None,
        rows_per_shard: int = 256,
        device: str | torch.device | None = None,
        max_projection_bytes: int = 2 * 2**30,
        state: Any = None,
    ):
        if not callable(per_example_loss):
            raise ValueError("per_example_loss must be a callable (model, batch) -> per-example losses [B].")
        resolved = resolve_checkpoints(checkpoints, learning_rates)
        if batch_size < 1 or rows_per_shard < 1:
            raise ValueError(f"batch_size and rows_per_shard must be >= 1, got {batch_size} and {rows_per_shard}.")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 (or None for exact gradients), got {projection_dim}.")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.parameter_names = select_parameters(self.model, None)
        named = dict(self.model.named_parameters())
        self.num_parameters = sum(named[name].numel() for name in self.parameter_names)
        self.per_example_loss, self.collate_fn = per_example_loss, collate_fn or pad_causal_rows
        self.adam, self.batch_size, self.rows_per_shard = adam, batch_size, rows_per_shard
        self.projection_dim, self.projection, self.seed = projection_dim, projection, seed
        self.projector = (
            None
            if projection_dim is None
            else RandomProjector(self.num_parameters, projection_dim, projection, seed, max_projection_bytes)
        )
        self.output_dir = None if output_dir is None else Path(output_dir)
        if state is None:
            from ..engine.process import get_process_state

            state = get_process_state()
        self.state = state
        self.checkpoints = resolved
        total = sum(c.learning_rate for c in self.checkpoints)
        if total <= 0:
            raise ValueError("Every checkpoint has learning rate 0: LESS weighs checkpoints by their learning rates.")
        self.weights = [c.learning_rate / total for c in self.checkpoints]
        if adam:
            for checkpoint in self.checkpoints:
                if checkpoint.state_dict is not None:
                    raise ValueError(
                        f"Checkpoint {checkpoint.source} is a state_dict: Adam normalisation needs a Trainer "
                        "checkpoint folder with optimizer.pt. Pass the folder, or adam=False."
                    )
                read_adam_state(checkpoint.source, self.model, self.parameter_names)  # fail now, not after an hour
        logger.info("LESS over %d checkpoint(s), %s trainable parameters, %s.", len(self.checkpoints),
                    f"{self.num_parameters:,}", "exact" if projection_dim is None else f"{projection} to {projection_dim}")  # fmt: skip

    @property
    def metadata(self) -> dict[str, Any]:
        """How the scores are computed: checkpoints, learning rates and weights, projection, seed, Adam."""
        return {
            "method": "less",
            "checkpoints": [c.source for c in self.checkpoints],
            "learning_rates": [c.learning_rate for c in self.checkpoints],
            "checkpoint_weights": self.weights,
            "adam": self.adam,
            "projection": None if self.projection_dim is None else self.projection,
            "projection_dim": self.projection_dim,
            "projection_seed": self.seed,
            "num_parameters": self.num_parameters,
        }

    # -- checkpoints and features -------------------------------------------------------------------------------------

    def _load(self, checkpoint: Checkpoint) -> None:
        state_dict = checkpoint.load()
        if hasattr(self.model, "peft_config") and not set(state_dict) <= set(self.model.state_dict()):
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, state_dict)
            missing = sorted(set(self.parameter_names) & set(result.missing_keys))
            if result.unexpected_keys or missing:
                raise ValueError(
                    f"Checkpoint {checkpoint.source} does not fit the peft model: unexpected "
                    f"{list(result.unexpected_keys)[:3]}, missing {missing[:3]}. Pass the model with the LoraConfig "
                    "the checkpoint was trained with."
                )
        else:
            self.model.load_state_dict(match_keys(state_dict, self.model, checkpoint.source), strict=False)
        self.model.eval()

    def _adam_state(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        states = read_adam_state(checkpoint.source, self.model, self.parameter_names)
        named = dict(self.model.named_parameters())

        def flat(get):
            return torch.cat([torch.as_tensor(get(states[n]), dtype=torch.float32).expand(named[n].shape).reshape(-1)
                              for n in self.parameter_names]).to(self.device)  # fmt: skip

        return {
            "exp_avg": flat(lambda s: s.exp_avg),
            "exp_avg_sq": flat(lambda s: s.exp_avg_sq),
            "step": flat(lambda s: s.step),
            "betas": torch.stack([flat(lambda s: s.betas[0]), flat(lambda s: s.betas[1])]),
            "eps": flat(lambda s: s.eps),
        }

    def _batches(self, rows: Any, start: int, end: int) -> Iterator[Any]:
        for first in range(start, end, self.batch_size):
            last = min(first + self.batch_size, end)
            chunk = rows.select(range(first, last)) if hasattr(rows, "select") else rows[first:last]
            batch = self.collate_fn(list(chunk))
            if isinstance(batch, Mapping):
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            yield batch

    def _features(
        self, rows: Any, start: int, end: int, adam_state: dict | None, progress: Any = None
    ) -> torch.Tensor:
        """Unit-norm features `[end - start, dim]` of rows `start:end`: `R Γ(z) / ‖R Γ(z)‖` (`progress`, a tqdm bar,
        advanced by each batch's rows)."""
        out = []
        for batch in self._batches(rows, start, end):
            grads = per_example_loss_gradients(
                self.model, batch, self.per_example_loss, parameters=self.parameter_names
            )
            if adam_state is not None:
                grads = adam_update_direction(grads, adam_state["exp_avg"], adam_state["exp_avg_sq"],
                                              adam_state["step"], betas=adam_state["betas"], eps=adam_state["eps"])  # fmt: skip
            grads = grads.detach().float().cpu()
            projected = grads if self.projector is None else self.projector(grads)
            out.append(torch.nn.functional.normalize(projected.double(), dim=1).float())
            if progress is not None:
                progress.update(len(projected))
        return torch.cat(out)

    def _shard_path(self, index: int, start: int) -> Path | None:
        if self.output_dir is None:
            return None
        return self.output_dir / "features" / f"checkpoint-{index}" / f"rows-{start:010d}.parquet"

    # -- scores -------------------------------------------------------------------------------------------------------

    def target_scores(self, train_dataset: Any, targets: Any) -> dict[str, np.ndarray]:
        """The score of every training row against each target set (before the max), by set name.

        Args:
            train_dataset: a `datasets.Dataset` or a list of rows, which `collate_fn` turns into batches.
            targets: one target set (a `Dataset` or list of rows), a list of sets, or a dict of named sets.
        """
        sets = _target_sets(targets)
        num_rows = len(train_dataset)
        if num_rows == 0:
            raise ValueError("train_dataset has no rows.")
        if self.output_dir is not None:
            config = {**self.metadata, "rows_per_shard": self.rows_per_shard, "train_digest": _digest(train_dataset),
                      "parameter_names": hashlib.sha256("\n".join(self.parameter_names).encode()).hexdigest()}  # fmt: skip
            check_or_write_config(self.output_dir, config, file_name=LESS_CONFIG_FILE, state=self.state)
        scores = np.zeros((num_rows, len(sets)), dtype=np.float64)
        rank, world = self.state.process_index, self.state.num_processes
        starts = list(range(0, num_rows, self.rows_per_shard))
        mine = [(c, start) for c in range(len(self.checkpoints)) for start in starts][rank::world]
        progress = tqdm(total=sum(min(start + self.rows_per_shard, num_rows) - start for _, start in mine),
                        desc=f"LESS features ({len(self.checkpoints)} checkpoints)", unit="row",
                        disable=not self.state.is_local_main_process)  # fmt: skip
        for index, (checkpoint, weight) in enumerate(zip(self.checkpoints, self.weights)):
            self._load(checkpoint)
            # Targets: plain gradients (LESS computes validation gradients with SGD), normalised, averaged per set;
            # each process takes a contiguous slice of every set's rows, and the sums are added across processes.
            sums = torch.stack([self._target_sum(rows, rank, world) for rows in sets.values()])
            sizes = torch.tensor([len(rows) for rows in sets.values()], dtype=torch.float64)
            means = self._sum_over_processes(sums) / sizes[:, None]
            adam_state = self._adam_state(checkpoint) if self.adam else None
            for start in (start for c, start in mine if c == index):
                end = min(start + self.rows_per_shard, num_rows)
                path = self._shard_path(index, start)
                if path is not None and path.exists():
                    features = _read_features(path)
                    progress.update(end - start)
                else:
                    features = self._features(train_dataset, start, end, adam_state, progress)
                    if path is not None:
                        _write_features(path, features)
                if len(features) != end - start:
                    raise RuntimeError(f"{path} holds {len(features)} rows, not {end - start}: delete it and rerun.")
                scores[start:end] += weight * (features.double() @ means.T).numpy()
        progress.close()
        scores = self._sum_over_processes(torch.from_numpy(scores)).numpy()
        return {name: scores[:, i] for i, name in enumerate(sets)}

    def _target_sum(self, rows: Any, rank: int, world: int) -> torch.Tensor:
        """The sum of the unit-norm target features of this process's contiguous slice of `rows` (float64 `[dim]`)."""
        start, end = len(rows) * rank // world, len(rows) * (rank + 1) // world
        if start == end:
            return torch.zeros(self.feature_dim, dtype=torch.float64)
        return self._features(rows, start, end, None).double().sum(0)

    @property
    def feature_dim(self) -> int:
        return self.num_parameters if self.projection_dim is None else self.projection_dim

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.state.num_processes == 1:
            return tensor
        import torch.distributed as dist

        total = tensor.to(self.state.device).contiguous()
        dist.all_reduce(total)
        return total.cpu()

    def scores(self, train_dataset: Any, targets: Any) -> np.ndarray:
        """Each training row's LESS score, the max over target sets (float64 `[num_rows]`, in row order)."""
        per_set = self.target_scores(train_dataset, targets)
        return np.max(np.stack(list(per_set.values()), axis=1), axis=1)

    def with_scores(self, dataset, targets: Any, column: str = "less", *, overwrite: bool = False):
        """`dataset` with a float32 column `column` holding `scores(dataset, targets)`, and `metadata` (with the
        target sets' names and sizes) recorded in its provenance."""
        from ..provenance import record_provenance

        if column in dataset.column_names:
            if not overwrite:
                raise ValueError(f"The dataset already has a column {column!r}: pass overwrite=True to replace it.")
            dataset = dataset.remove_columns(column)
        values = self.scores(dataset, targets).astype(np.float32)
        sizes = {name: len(rows) for name, rows in _target_sets(targets).items()}
        return record_provenance(
            dataset.add_column(column, values), less={**self.metadata, "column": column, "target_sets": sizes}
        )


def _write_features(path: Path, features: torch.Tensor) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(features.numpy().reshape(-1).astype(np.float32))
    table = pa.table({"feature": pa.FixedSizeListArray.from_arrays(values, features.shape[1])})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves half a shard to be read back


def _read_features(path: Path) -> torch.Tensor:
    import pyarrow.parquet as pq

    column = pq.read_table(path).column("feature").combine_chunks()
    return torch.from_numpy(column.flatten().to_numpy().reshape(len(column), -1).copy())


def less_scores(
    model: nn.Module, train_dataset: Any, targets: Any, *, checkpoints: Sequence[Any], **kwargs: Any
) -> np.ndarray:
    """LESS scores of `train_dataset`'s rows against `targets`: `LESS(model, checkpoints, **kwargs).scores(...)`.

    Example:
    ```python
    >>> import torch
    >>> from datadiet.tracin.less import less_scores
    >>> model = torch.nn.Linear(4, 3)
    >>> def loss(model, batch):
    ...     return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
    >>> def collate(rows):
    ...     return {"x": torch.tensor([r["x"] for r in rows]), "y": torch.tensor([r["y"] for r in rows])}
    >>> rows = [{"x": torch.randn(4).tolist(), "y": i % 3} for i in range(6)]
    >>> less_scores(model, rows, rows[:2], checkpoints=[(model.state_dict(), 1e-3)], per_example_loss=loss,
    ...             adam=False, projection_dim=64, collate_fn=collate).shape
    (6,)

    ```
    """
    return LESS(model, checkpoints, **kwargs).scores(train_dataset, targets)
