"""The dataset card of a saved or pushed dataset: score statistics, the `datadiet:` YAML block, the Hub metadata
`load_dataset` reads, and the readable body filled into `card_template.md`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
from datasets import Dataset, DatasetInfo, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict

from ..data import column_values
from ..provenance import name_of_source

__all__ = ["CARD_TEMPLATE_PATH", "build_card", "score_statistics"]

CARD_TEMPLATE_PATH = Path(__file__).with_name("card_template.md")
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# What each causal-LM score column means (DESIGN.md, "Definitions users rely on"), written into a causal-LM card.
CAUSAL_LM_DEFINITIONS = {
    "loss": "mean next-token negative log-likelihood over the trained tokens (the completion / assistant tokens, "
    "after the shift), as TRL's SFTTrainer computes it for the row alone",
    "perplexity": "exp(loss)",
    "el2n": "mean over the trained tokens of the L2 norm of softmax(logits) minus the next token's one-hot vector",
    "ifd": "Instruction-Following Difficulty (Li et al. 2024; Superfiltering): PPL(response | instruction) / "
    "PPL(response alone); above 1, the instruction does not help",
    "grand": "L2 norm of the row's loss gradient over the trainable parameters (with LoRA adapters: the adapters only)",
    "less": "LESS (Xia et al. 2024): mean over the target rows of the cosine between the row's (Adam-normalised, "
    "projected) gradient and each target row's gradient, weighted over the warm-up checkpoints by their learning "
    "rates (weights summing to 1); the maximum over target sets when several are given",
}


def score_statistics(dataset: Dataset, column: str) -> dict[str, Any]:
    """Count, mean, std, min, quantiles and max of the finite values of `column` (and how many are not finite),
    rounded to 6 significant digits for the card."""
    values = np.asarray(column_values(dataset, column), dtype=np.float64)
    finite = values[np.isfinite(values)]
    stats: dict[str, Any] = {"count": int(finite.size)}
    if finite.size < values.size:
        stats["non_finite"] = int(values.size - finite.size)
    if finite.size:
        stats.update(mean=finite.mean(), std=finite.std(ddof=1) if finite.size > 1 else 0.0, min=finite.min())
        stats.update({f"q{round(q * 100):02d}": np.quantile(finite, q) for q in _QUANTILES})
        stats["max"] = finite.max()
    return {key: _round(value) for key, value in stats.items()}


def _round(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return float(f"{value:.6g}") if math.isfinite(value) else value
    return int(value) if isinstance(value, np.integer) else value


def _plain(value: Any) -> Any:
    """A YAML-safe copy: dicts with string keys, lists, str, bool, int, float, None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return _round(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _versions() -> dict[str, str]:
    from .. import __version__

    versions = {"datadiet": __version__}
    for package in ("datasets", "huggingface_hub", "torch", "transformers", "timm", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _commands(command: str | Sequence[str] | None, provenance: Mapping) -> list[str]:
    if command is not None:
        return [command] if isinstance(command, str) else [str(c) for c in command]
    commands = []
    for step in provenance.get("steps") or []:
        if isinstance(step, Mapping) and step.get("command"):
            commands.append(str(step["command"]))
    recorded = provenance.get("command")
    if isinstance(recorded, str):
        commands.append(recorded)
    elif isinstance(recorded, Sequence):
        commands.extend(str(c) for c in recorded)
    return commands


def _settings(settings: Mapping[str, Any]) -> str:
    """`key = value` pairs for the card body; nested configs (a transformers `model_config`) stay in the YAML block."""
    shown = [f"{k} = `{v}`" for k, v in settings.items() if v is not None and not isinstance(v, Mapping)]
    hidden = [k for k, v in settings.items() if isinstance(v, Mapping) and v]
    return "; ".join(shown + ([f"{', '.join(hidden)} in the YAML header"] if hidden else []))


def _size_category(rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return label
    return "1M<n<10M" if rows < 10_000_000 else "10M<n<100M" if rows < 100_000_000 else "100M<n<1B"


def build_card(
    splits: dict[str, Dataset],
    provenance: dict[str, Any],
    *,
    statistics: dict[str, dict[str, dict]],
    sizes: dict[str, int],
    main_split: str,
    scores_only: bool,
    row_id_column: str,
    command: str | Sequence[str] | None,
    repo_id: str | None,
    pretty_name: str | None,
    license: str | None,
    histogram_file: str | None,
    data_dir: str,
):
    """The `huggingface_hub.DatasetCard` of `splits`: Hub metadata (`dataset_info`, `configs`, tags), the `datadiet:`
    block (provenance, rows, `statistics`, library versions, commands) and the body of `card_template.md`.

    Args:
        splits (`dict[str, Dataset]`): the saved splits, by name.
        provenance (`dict`): the merged provenance (`source`, `scoring`, `pruning`, `steps`, `command`, ...).
        statistics (`dict`): per split, per score column, the result of `score_statistics`.
        sizes (`dict[str, int]`): per split, the bytes of its Parquet shards.
        main_split (`str`): the split the histogram and the loading snippets describe.
        scores_only (`bool`): whether only the row ids and scores are published.
        row_id_column (`str`): the row id column of a scores-only card.
        command (`str` or `list[str]`, *optional*): the command(s) that made the data; by default the recorded ones.
        repo_id / pretty_name / license (`str`, *optional*): the Hub repository, the title, the data's license.
        histogram_file (`str`, *optional*): the histogram image beside the card, shown in its body.
        data_dir (`str`): the folder of the Parquet shards `<split>-*`, relative to the card.
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    pruning = provenance.get("pruning") if isinstance(provenance.get("pruning"), Mapping) else {}
    commands = _commands(command, provenance)
    rows_after = {name: len(ds) for name, ds in splits.items()}
    scoring = provenance.get("scoring") if isinstance(provenance.get("scoring"), Mapping) else {}
    definitions = {}
    if scoring.get("task") == "causal_lm":
        definitions = {m: CAUSAL_LM_DEFINITIONS[m] for m in scoring.get("methods") or () if m in CAUSAL_LM_DEFINITIONS}
    block = {
        **{k: v for k, v in provenance.items() if k not in ("command", "steps")},
        "score_definitions": definitions or None,
        "scores_only": scores_only,
        "rows_before": pruning.get("rows_before"),
        "rows_after": pruning.get("rows_after", rows_after[main_split]),
        "splits": rows_after,
        "score_statistics": statistics,
        "command": commands or None,
        "steps": provenance.get("steps"),
        "versions": _versions(),
    }
    if scores_only:
        block["row_id_column"] = row_id_column
    block = _plain({k: v for k, v in block.items() if v is not None})

    info = DatasetInfo(features=splits[main_split].features, splits=SplitDict(), download_size=0, dataset_size=0)
    for name, ds in splits.items():
        info.splits.add(SplitInfo(name=name, num_bytes=ds._estimate_nbytes(), num_examples=len(ds)))
        info.download_size += sizes[name]
        info.dataset_size += ds._estimate_nbytes()
    info.size_in_bytes = info.download_size + info.dataset_size

    fields = _card_fields(block, splits, main_split, scores_only, row_id_column, commands, repo_id, pretty_name)
    source = block.get("source") if isinstance(block.get("source"), Mapping) else {}
    data = DatasetCardData(
        pretty_name=fields["title"],
        license=license or source.get("license"),
        size_categories=_size_category(sum(rows_after.values())),
        task_categories=["text-generation"]
        if scoring.get("task") == "causal_lm"
        else _task_categories(splits[main_split]),
        source_datasets=_source_datasets(source),
        tags=["datadiet", "data-pruning", "example-difficulty"],
    )
    # The same `dataset_info` and `configs` metadata `Dataset.push_to_hub` writes: `load_dataset` reads its data
    # files from `configs`, the Hub viewer its features from `dataset_info`.
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    data["configs"] = [
        {
            "config_name": "default",
            "data_files": [{"split": name, "path": f"{data_dir}/{name}-*"} for name in splits],
        }
    ]
    data["datadiet"] = block
    fields["scores"] = _scores_section(block, main_split, histogram_file)
    fields["definitions"] = "".join(["\n\n## What the scores mean\n"] + [
        f"\n- `{name}`: {text}." for name, text in definitions.items()]) if definitions else ""  # fmt: skip
    template = Template(CARD_TEMPLATE_PATH.read_text(encoding="utf-8"))
    return DatasetCard(template.substitute(metadata=data.to_yaml(), **fields))


def _task_categories(dataset: Dataset) -> list[str] | None:
    """The Hub task of a classification dataset, from its input feature: images or text."""
    from datasets import Image, Value

    features = dataset.features.values()
    if any(isinstance(feature, Image) for feature in features):
        return ["image-classification"]
    if any(isinstance(feature, Value) and feature.dtype in ("string", "large_string") for feature in features):
        return ["text-classification"]
    return None


def _source_datasets(source: Mapping) -> list[str] | None:
    """The Hub dataset the data come from, when the recorded source is a Hub id (not a local path or files)."""
    path = source.get("path") or source.get("name")
    if isinstance(path, str) and path.count("/") == 1 and not Path(path).exists() and not path.startswith((".", "~")):
        return [path]
    return None


def _card_fields(
    block: dict,
    splits: dict[str, Dataset],
    main_split: str,
    scores_only: bool,
    row_id_column: str,
    commands: list[str],
    repo_id: str | None,
    pretty_name: str | None,
) -> dict[str, str]:
    """The texts filling `card_template.md`; optional sections are empty or start with their blank line."""
    source = block.get("source") or {}
    scoring = block.get("scoring") or {}
    pruning = block.get("pruning") or {}
    source_name = name_of_source(source)
    revision = source.get("revision") or source.get("fingerprint")
    title = pretty_name or (f"Scores of {source_name}" if scores_only else f"{source_name}, pruned with datadiet")

    rows_after, rows_before = block["rows_after"], block.get("rows_before")
    # Provenance is stored with sorted keys; show prune()'s own argument order first.
    order = ["by", "keep", "strategy", "offset", "class_balanced", "seed"]
    names = [k for k in order if k in pruning] + [k for k in pruning if k not in order]
    prune_args = {k: pruning[k] for k in names if k not in ("rows_before", "rows_after") and pruning[k] is not None}
    prune_call = "dataset = datadiet.prune(dataset, " + ", ".join(f"{k}={v!r}" for k, v in prune_args.items()) + ")"
    if scores_only:
        columns = [c for c in splits[main_split].column_names if c != row_id_column]
        summary = (
            f"Per-example scores ({', '.join(f'`{c}`' for c in columns)}) of **{source_name}**, one row per example, "
            f"keyed by `{row_id_column}`. The data themselves are not included: join the scores to the source by "
            f"`{row_id_column}` and prune it your own way."
        )
    elif pruning:
        kept = (
            f"{rows_after:,} of {rows_before:,} rows ({rows_after / rows_before:.1%})"
            if rows_before
            else f"{rows_after:,} rows"
        )
        summary = (
            f"A subset of **{source_name}** made by datadiet: it keeps {kept}, chosen by per-example scores "
            f"({_settings(prune_args)})."
        )
    else:
        summary = f"**{source_name}** with per-example scores added by datadiet (not pruned)."

    made = [
        f"- **Source**: `{source_name}`"
        + (f" (split `{source['split']}`)" if source.get("split") else "")
        + (f", revision/fingerprint `{revision}`" if revision else "")
    ]
    if scoring:
        made.append(f"- **Scoring**: {_settings(scoring)}")
    if pruning:
        made.append(f"- **Pruning**: {_settings(prune_args)}")
    made.append(
        "- **Rows**: "
        + ", ".join(f"{name}: {n:,}" for name, n in block["splits"].items())
        + (f" (before pruning: {rows_before:,})" if rows_before else "")
    )
    made.append(f"- **Library versions**: {', '.join(f'{k} {v}' for k, v in block['versions'].items())}")
    methods = scoring.get("methods") or []
    grand_note = ""
    if "grand" in methods and scoring.get("train_epochs") in (0, None) and scoring.get("task") != "causal_lm":
        grand_note = (
            "\n\n> GraNd at initialisation correlates with the input norm and did not beat random pruning in "
            "Kirsch (2023); compare against the `input_norm` and `random` baselines before relying on it."
        )

    where = repo_id or "path/to/this/folder"
    prune_it_yourself = ""
    if scores_only:
        score_column = next((c for c in splits[main_split].column_names if c != row_id_column), "score")
        prune_it_yourself = "\n".join(
            [
                "",
                "",
                "To prune the source yourself (here keeping the hardest half):",
                "",
                "```python",
                "import datadiet",
                "from datasets import load_dataset",
                "",
                f'scores = load_dataset("{where}", split="{main_split}").sort("{row_id_column}")',
                f'source = load_dataset("{source_name}", split="{source.get("split", main_split)}")'
                f'.select(scores["{row_id_column}"])',
                f'source = source.add_column("{score_column}", scores["{score_column}"])',
                f'pruned = datadiet.prune(source, by="{score_column}", keep=0.5, strategy="hardest")',
                "```",
            ]
        )

    if commands:
        reproduce = ["```bash", *commands, "```"]
        if pruning and not any(" prune" in c or " demo" in c for c in commands):
            # The pruning step was not recorded as a command (`prune` and `demo` prune themselves): give its
            # equivalent call from the provenance.
            reproduce += [
                "",
                "then, on the scored dataset:",
                "",
                "```python",
                "import datadiet",
                "",
                prune_call,
                "```",
            ]
    else:
        reproduce = [
            "The exact command was not recorded. In Python, with the settings above:",
            "",
            "```python",
            "import datadiet",
            "from datasets import load_dataset",
            "",
            *_load_line(source, source_name),
            *_score_lines(scoring, methods),
        ]
        if pruning:
            reproduce.append(prune_call)
        reproduce.append("```")
    return {
        "title": title,
        "summary": summary,
        "how_it_was_made": "\n".join(made),
        "grand_note": grand_note,
        "where": where,
        "prune_it_yourself": prune_it_yourself,
        "reproduce": "\n".join(reproduce),
    }


def _load_line(source: Mapping, source_name: str) -> list[str]:
    """The line loading the source in the reproduce snippet; a comment when the source has no loadable name."""
    split = source.get("split") or "train"
    if source.get("path") or source.get("name"):
        return [f'dataset = load_dataset("{source_name}", split="{split}")']
    return [f"dataset = ...  # the source: {source_name}, split {split}, {source.get('num_rows', '?')} rows"]


def _score_lines(scoring: Mapping, methods: Sequence[str]) -> list[str]:
    """The `score_dataset` call of the reproduce snippet, with every recorded setting (model, seeds, epochs, ...)."""
    model = scoring.get("model") or "the scoring model"
    arguments = [f"methods={list(methods) or ['el2n']}"]
    fresh_models = ("seeds", "train_epochs") if scoring.get("model_init") else ()
    for key in (*fresh_models, "batch_size", "mixed_precision", "training_kwargs"):
        value = scoring.get("training" if key == "training_kwargs" else key)
        if value is not None:
            arguments.append(f"{key}={value!r}")
    if scoring.get("model_init"):
        lines = [f"# model_init(seed) builds a fresh `{model}` (randomly initialised with that seed)"]
        return [*lines, f"dataset = datadiet.score_dataset(dataset, model_init=model_init, {', '.join(arguments)})"]
    lines = [f"# model: the `{model}` scored (weights sha256 {scoring.get('weights_sha256', 'not recorded')})"]
    return [*lines, f"dataset = datadiet.score_dataset(dataset, model, {', '.join(arguments)})"]


def _scores_section(block: dict, main_split: str, histogram_file: str | None) -> str:
    """The card's `## Scores` section (histogram and statistics table), starting with its blank line; empty without
    score columns."""
    statistics = block.get("score_statistics") or {}
    if not any(statistics.values()):
        return ""
    lines = ["", "", "## Scores", ""]
    if histogram_file:
        lines += [f"![Histogram of the scores of the {main_split} split]({histogram_file})", ""]
    keys = ["count", "mean", "std", "min", "q05", "q25", "q50", "q75", "q95", "max"]
    lines += ["| split | column | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, columns in statistics.items():
        for column, stats in columns.items():
            lines.append(f"| {name} | `{column}` | " + " | ".join(str(stats.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)
