"""HOST-CP against EL2N and random selection at equal subset size, on MNIST and a CIFAR-10 subset, at a small CPU
budget; and the measurement behind HOST-CP's quadratic regularisation (the learning signal of the published LP).

For each dataset a pool of training rows is drawn; one small CNN (the proxy) is trained on the whole pool and gives
both the EL2N scores (`score_dataset`, final proxy model) and the frozen 64-d penultimate features HOST-CP selects
on. For each kept fraction, each method picks a subset of exactly the same size, a fresh CNN is trained on it for
the same number of steps, and its accuracy on the full test split is reported (mean over `--seeds`).

    python recipes/bench/hostcp.py                          # table to docs/bench/hostcp, ~20-30 min on 2 CPU cores
    python recipes/bench/hostcp.py --measure_gradient       # the LP vs QP learning-signal measurement

Results are written per (dataset, method, fraction, seed) as they come; a rerun skips what is done. Uses
`torch.set_num_threads(--threads)`, 1 by default (faster than 2 on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import discipline  # noqa: E402
from noise import REPO, load_split, predict_proba, small_cnn, to_uint8, train  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logger = logging.getLogger("datadiet.bench.hostcp")

SETTINGS = {
    "mnist": {"image_column": "image", "pool": 4000, "epochs": 4, "widths": (16, 32, 64), "lr": 0.05},
    "cifar10": {"image_column": "img", "pool": 4000, "epochs": 6, "widths": (16, 32, 64), "lr": 0.05},
}
METHODS = ["random", "el2n", "el2n_ccs", "hostcp", "hostcp_lp"]
# Coverage-centric coreset selection on EL2N (Zheng et al. 2023): the hardest 10% dropped, then stratified sampling.
CCS_HARD_CUTOFF = 0.1


def prepare(name: str, args, work: Path) -> dict:
    """Pool, proxy model, EL2N scores and features; cached in `work`."""
    from datasets import ClassLabel

    from datadiet import score_dataset

    settings = {**SETTINGS[name], **({"pool": args.pool} if args.pool else {})}
    cache = work / f"{name}-pool{settings['pool']}-prepared.npz"
    full = load_split(name, "train")
    rows = np.sort(np.random.default_rng(args.seed).choice(len(full), size=settings["pool"], replace=False))
    pool = full.select(rows)
    images = to_uint8(pool, settings["image_column"])
    labels = np.asarray(pool["label"])
    test = load_split(name, "test")
    prepared = {"images": images, "labels": labels, "num_classes": pool.features["label"].num_classes}
    prepared["test_images"], prepared["test_labels"] = (
        to_uint8(test, settings["image_column"]),
        np.asarray(test["label"]),
    )
    prepared["mean"] = images.float().div(255).mean(dim=(0, 2, 3))
    prepared["std"] = images.float().div(255).std(dim=(0, 2, 3))
    if cache.exists():
        saved = np.load(cache)
        prepared.update(el2n=saved["el2n"], features=saved["features"], proxy_accuracy=float(saved["proxy_accuracy"]))
        return prepared
    start = time.time()
    torch.manual_seed(args.seed)
    proxy = small_cnn(images.shape[1], prepared["num_classes"], settings["widths"], prepared["mean"], prepared["std"])
    train(
        proxy, images, labels, settings=settings, output_dir=work / f"{name}-proxy", seed=args.seed,
        flip=name == "cifar10", checkpoints=False, track=False,
    )  # fmt: skip
    ds = pool.cast_column("label", ClassLabel(names=pool.features["label"].names))
    el2n = np.asarray(score_dataset(ds, proxy, methods=["el2n"], batch_size=256)["el2n"], dtype=np.float64)
    # Penultimate features (the input of the last linear layer), standardised: what HOST-CP's selection model and
    # classifier see (the published code uses frozen ResNet-18 features the same way).
    captured = []
    handle = proxy[-1].register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    proxy_accuracy = float((predict_proba(proxy, prepared["test_images"]).argmax(1) == prepared["test_labels"]).mean())
    captured.clear()
    predict_proba(proxy, images)
    handle.remove()
    features = torch.cat(captured).numpy()
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    np.savez(cache, el2n=el2n, features=features, proxy_accuracy=proxy_accuracy)
    logger.info(
        "%s: proxy trained and scored in %.0f s (test accuracy %.3f).", name, time.time() - start, proxy_accuracy
    )
    prepared.update(el2n=el2n, features=features, proxy_accuracy=proxy_accuracy)
    return prepared


def select(method: str, prepared: dict, keep: float, args, seed: int) -> tuple[np.ndarray, float]:
    from datadiet.selection import select_indices
    from datadiet.selection.hostcp import select_hostcp

    start = time.time()
    num_rows = len(prepared["labels"])
    if method == "random":
        indices = select_indices(np.zeros(num_rows), keep, strategy="random", seed=seed)
    elif method == "el2n":
        indices = select_indices(prepared["el2n"], keep, strategy="hardest")
    elif method == "el2n_ccs":
        indices = select_indices(prepared["el2n"], keep, strategy="stratified", hard_cutoff=CCS_HARD_CUTOFF, seed=seed)
    elif method in ("hostcp", "hostcp_lp"):
        # hostcp_lp: the published linear program (quadratic_weight 0), whose selection model gets no gradient.
        indices = select_hostcp(
            prepared["features"], prepared["labels"], keep, epochs=args.hostcp_epochs, batch_size=40,
            num_existing=40, quadratic_weight=args.quadratic_weight if method == "hostcp" else 0.0, seed=seed,
            progress=False,
        ).indices  # fmt: skip
    else:
        raise ValueError(method)
    return np.asarray(indices), time.time() - start


def evaluate(name: str, prepared: dict, indices: np.ndarray, args, seed: int, work: Path) -> float:
    """Test accuracy of a fresh CNN trained on the subset for `--steps` steps (the same for every method)."""
    settings = SETTINGS[name]
    torch.manual_seed(1000 + seed)
    model = small_cnn(
        prepared["images"].shape[1], prepared["num_classes"], settings["widths"], prepared["mean"], prepared["std"]
    )
    train(
        model, prepared["images"][indices], prepared["labels"][indices], settings=settings,
        output_dir=work / f"{name}-eval", seed=seed, flip=name == "cifar10", checkpoints=False, track=False,
        max_steps=args.steps,
    )  # fmt: skip
    predictions = predict_proba(model, prepared["test_images"]).argmax(1)
    return float((predictions == prepared["test_labels"]).mean())


def ambiguous_region_problem(seed: int, rows: int = 400):
    """Labels follow x0 + x1 > 0 except where x2 > 0, where they are coin flips: the rows with x2 <= 0 are the ones
    that teach the rule. The selection model sees the features only."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, 6)).astype(np.float32)
    labels = (features[:, 0] + features[:, 1] > 0).astype(np.int64)
    noise = features[:, 2] > 0
    labels[noise] = rng.integers(0, 2, noise.sum())
    return features, labels, ~noise


def measure_gradient(args) -> dict:
    """Median norm of the selection model's gradient, and the selection's quality on the synthetic problem of
    tests/test_hostcp.py, for several quadratic weights (0 = the published LP)."""
    from datadiet.selection.hostcp import select_hostcp

    work = args.work_dir
    prepared = prepare("mnist", args, work)
    subset = np.random.default_rng(0).choice(len(prepared["labels"]), size=800, replace=False)
    results = {}
    for weight in args.weights:
        start = time.time()
        mnist = select_hostcp(
            prepared["features"][subset], prepared["labels"][subset], 0.3, epochs=1, batch_size=40, num_existing=40,
            quadratic_weight=weight, seed=0, progress=False,
        )  # fmt: skip
        shares = []
        for seed in (0, 1, 2):
            features, labels, valuable = ambiguous_region_problem(seed, rows=600)
            synthetic = select_hostcp(
                features, labels, keep=0.3, epochs=6, batch_size=20, num_existing=20, selector_lr=0.01,
                quadratic_weight=weight, seed=seed, progress=False,
            )  # fmt: skip
            pool = np.setdiff1d(np.arange(len(labels)), synthetic.validation_indices)
            shares.append(float(valuable[synthetic.indices].mean() - valuable[pool].mean()))
        results[str(weight)] = {
            "mnist_median_grad_norm": float(np.median(mnist.history["selector_grad_norm"])),
            "mnist_median_solve_seconds_40x40": float(np.median(mnist.history["solve_seconds"])),
            "synthetic_valuable_share_gain": shares,
            "seconds": time.time() - start,
        }
        logger.info("quadratic_weight=%g: %s", weight, results[str(weight)])
    path = args.output_dir / "gradient.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return results


def report(output_dir: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(output_dir.glob("runs/*.json"))]
    if not results:
        return "No results yet."
    lines = [
        "Test accuracy (full test split) of a CNN trained on the selected subset for the same number of steps; mean "
        "over seeds (± half the spread when there are two or more), selection time in seconds.",
        "",
    ]
    rows = []
    for dataset in SETTINGS:
        for keep in sorted({r["keep"] for r in results if r["dataset"] == dataset}):
            cells, size = [], None
            for method in METHODS:
                runs = [r for r in results if r["dataset"] == dataset and r["keep"] == keep and r["method"] == method]
                if not runs:
                    cells.append("-")
                    continue
                size = runs[0]["subset_size"]
                accuracies = [r["accuracy"] for r in runs]
                spread = f" ± {(max(accuracies) - min(accuracies)) / 2:.3f}" if len(runs) > 1 else ""
                seconds = np.mean([r["select_seconds"] for r in runs])
                cells.append(f"{np.mean(accuracies):.3f}{spread} ({seconds:.0f} s)")
            rows.append([dataset, f"{int(100 * keep)}%", size, *cells])
    headers = ["dataset", "kept", "subset size", "random", "EL2N (hardest)", "EL2N (CCS)", "HOST-CP",
               "HOST-CP, published LP"]  # fmt: skip
    lines.append(discipline.markdown_table(headers, rows))
    gradient = output_dir / "gradient.json"
    if gradient.exists():
        headers = ["quadratic_weight", "median selector gradient norm (MNIST features)", "median 40x40 solve (s)",
                   "synthetic: valuable share gain over the pool (seeds 0, 1, 2)"]  # fmt: skip
        rows = [
            [weight, f"{r['mnist_median_grad_norm']:.2g}", f"{r['mnist_median_solve_seconds_40x40']:.3f}",
             ", ".join(f"{g:+.3f}" for g in r["synthetic_valuable_share_gain"])]
            for weight, r in json.loads(gradient.read_text()).items()
        ]  # fmt: skip
        lines += ["", discipline.markdown_table(headers, rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=REPO / "docs" / "bench" / "hostcp")
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "bench" / "hostcp")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"], choices=sorted(SETTINGS))
    parser.add_argument("--keep", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=250, help="training steps (batch 128) on every subset")
    parser.add_argument("--hostcp_epochs", type=int, default=2)
    parser.add_argument("--pool", type=int, default=None, help="pool size (default per dataset)")
    parser.add_argument("--quadratic_weight", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the pool and the proxy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure_gradient", action="store_true")
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.01, 0.1, 1.0])
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("datadiet").setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    if args.measure_gradient:
        measure_gradient(args)
    elif not args.report_only:
        for name in args.datasets:
            prepared = None
            for keep in args.keep:
                for method in args.methods:
                    for seed in args.seeds:
                        path = (
                            args.output_dir / "runs" / f"{name}-keep{int(round(100 * keep))}-{method}-seed{seed}.json"
                        )
                        if path.exists():
                            continue
                        prepared = prepared or prepare(name, args, args.work_dir)
                        indices, seconds = select(method, prepared, keep, args, seed)
                        accuracy = evaluate(name, prepared, indices, args, seed, args.work_dir)
                        result = {
                            "dataset": name, "keep": keep, "method": method, "seed": seed,
                            "subset_size": int(len(indices)), "pool": int(len(prepared["labels"])),
                            "accuracy": accuracy, "select_seconds": seconds, "steps": args.steps,
                            "proxy_accuracy": prepared["proxy_accuracy"], "quadratic_weight": 0.0 if method == "hostcp_lp" else args.quadratic_weight,
                            "hostcp_epochs": args.hostcp_epochs, "threads": torch.get_num_threads(),
                        }  # fmt: skip
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(json.dumps(result, indent=2))
                        logger.info("%s: accuracy %.3f (selection %.0f s).", path.stem, accuracy, seconds)
    table = report(args.output_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
