"""`datadiet demo` / `make demo`: the whole chain on scikit-learn's bundled digits (no download) — EL2N from several
seeds of a small timm model, pruning to half with `hardest` and `random`, retraining at a fixed step budget, and
the test accuracy of each, with a score histogram and the hardest images as PNGs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .parsing import parse_config

logger = logging.getLogger(__name__)

__all__ = ["DemoArguments", "main", "run_demo"]


@dataclass
class DemoArguments:
    """Arguments of `datadiet demo`."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the PNGs and pruned dataset go."})
    model_name: str = field(default="resnet10t", metadata={"help": "timm architecture of every model."})
    image_size: int = field(default=32, metadata={"help": "Digits are upscaled from 8×8 to this size."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Scoring models' seeds."})
    score_epochs: float = field(default=4, metadata={"help": "Epochs each scoring model trains before EL2N."})
    keep: float = field(default=0.5, metadata={"help": "Fraction of the training split kept."})
    train_steps: int = field(default=200, metadata={"help": "Steps of every retraining run (fixed budget)."})
    batch_size: int = field(default=64, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    retrain_seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds of the retraining runs."})


def run_demo(args: DemoArguments) -> dict:
    """Run the demo; returns the accuracy table as a dict and prints it."""
    from ..data import build_image_transform, load_digits_dataset
    from ..engine import score_dataset
    from ..models import build_model
    from ..report import plot_image_grid, plot_score_histogram
    from ..selection import prune
    from ..trainer.proxy import evaluate_accuracy, fit

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = load_digits_dataset()
    train, test = splits["train"], splits["test"]
    transform = build_image_transform(args.image_size, mean=[0.5], std=[0.5])
    train_transform = build_image_transform(args.image_size, mean=[0.5], std=[0.5], augment=True, crop_padding=2)

    def model_init(seed: int):
        return build_model(args.model_name, num_classes=10, in_chans=1, seed=seed)

    logger.info(
        "Scoring %d training digits with EL2N from %d models trained %s epochs.",
        len(train),
        len(args.seeds),
        args.score_epochs,
    )
    scored = score_dataset(
        train,
        model_init=model_init,
        methods=["el2n"],
        seeds=args.seeds,
        train_epochs=args.score_epochs,
        transform=transform,
        batch_size=args.batch_size,
        training_kwargs={"learning_rate": args.learning_rate},
    )
    subsets = {
        "full": scored,
        f"EL2N hardest {args.keep:.0%}": prune(scored, "el2n", args.keep, strategy="hardest"),
        f"random {args.keep:.0%}": prune(scored, None, args.keep, strategy="random"),
    }
    results = {}
    for name, subset in subsets.items():
        accuracies = []
        for seed in args.retrain_seeds:
            model = fit(
                model_init(1000 + seed),
                subset,
                transform=train_transform,
                max_steps=args.train_steps,
                seed=seed,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
            )
            accuracies.append(evaluate_accuracy(model, test, transform=transform))
        results[name] = {
            "rows": len(subset),
            "accuracy": float(np.mean(accuracies)),
            "accuracy_std": float(np.std(accuracies)),
        }

    el2n = np.asarray(scored["el2n"])
    hardest = np.argsort(-el2n, kind="stable")[:16]
    plot_score_histogram(
        {"el2n": el2n},
        output_dir / "el2n_histogram.png",
        title=f"EL2N of {len(train)} digits, mean of {len(args.seeds)} models",
    )
    plot_image_grid(
        [train[int(i)]["image"] for i in hardest],
        output_dir / "hardest_16.png",
        captions=[f"y={train[int(i)]['label']} el2n={el2n[i]:.2f}" for i in hardest],
        title="The 16 hardest training digits by EL2N",
    )
    subsets[f"EL2N hardest {args.keep:.0%}"].save_to_disk(str(output_dir / "pruned_el2n_hardest"))
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))

    width = max(len(name) for name in results)
    lines = [f"{'training set':<{width}}  rows  test accuracy ({args.train_steps} steps each)"]
    lines += [f"{name:<{width}}  {r['rows']:>4}  {r['accuracy']:.4f}" for name, r in results.items()]
    print("\n".join(lines))
    print(
        f"Wrote {output_dir / 'el2n_histogram.png'}, {output_dir / 'hardest_16.png'} and "
        f"{output_dir / 'pruned_el2n_hardest'}"
    )
    return results


def main(argv: list[str]) -> int:
    """`datadiet demo [--flag value ...]`; returns the exit code."""
    (args,) = parse_config((DemoArguments,), argv)
    run_demo(args)
    return 0
