"""Label-noise benchmark: flip a fraction of the labels of MNIST and of a CIFAR-10 subset uniformly at random, score
every row with each datadiet score, and measure how well each score finds the flipped rows (AUROC, and precision at
k = the number of flipped rows). cleanlab's `find_label_issues` on out-of-sample predicted probabilities (k-fold
cross-validation with the same model and training budget) is the reference.

One small CNN per (dataset, noise level) is trained with `DataDietTrainer` (which tracks forgetting, AUM and data-map
confidence online and saves a checkpoint per epoch); the final model is scored with `score_dataset` (EL2N, GraNd,
loss, margin) and the per-epoch checkpoints give TracIn self-influence. Results are written as they come, per
configuration, to `--output_dir` (checkpoints to `--work_dir`, deleted when a configuration is done); a rerun skips
the configurations already done (delete a configuration's folder to redo it).

    python recipes/bench/noise.py --plot docs/noise_roc.png      # results to docs/bench/noise, ~20+ min on 2 CPU cores
    python recipes/bench/noise.py --report_only --plot docs/noise_roc.png

Needs `pip install "datadiet[bench]"` (cleanlab). Uses `torch.set_num_threads(--threads)`, 1 by default: on a shared
2-core machine, one intra-op thread per process was faster than two.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import discipline  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

logger = logging.getLogger("datadiet.bench.noise")

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("DATADIET_SHARED_DATA", REPO.parent / "shared" / "data"))

# Per dataset: image column, rows of the training split used, epochs, CNN widths, peak learning rate.
SETTINGS = {
    "mnist": {"image_column": "image", "rows": 4000, "epochs": 4, "widths": (16, 32, 64), "lr": 0.05},
    "cifar10": {"image_column": "img", "rows": 4000, "epochs": 6, "widths": (16, 32, 64), "lr": 0.05},
}
SCORES = ["el2n", "grand", "loss", "margin", "aum", "forgetting", "confidence", "tracin_self_influence"]


# ---- data and model -------------------------------------------------------------------------------------------------


def load_split(name: str, split: str):
    from datasets import load_dataset

    path = DATA / name / f"{split}-00000-of-00001.parquet"
    if not path.exists():
        raise SystemExit(f"{path} is absent: this benchmark needs the shared {name} Parquet files.")
    return load_dataset("parquet", data_files={split: str(path)}, split=split)


def to_uint8(dataset, image_column: str) -> torch.Tensor:
    """[N, C, H, W] uint8 pixels, decoded once."""
    images = [np.asarray(image) for image in dataset[image_column]]
    array = np.stack(images)
    if array.ndim == 3:
        array = array[:, :, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip `fraction` of the labels, chosen uniformly at random, each to a different class chosen uniformly."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)] = True
    noisy = labels.copy()
    offsets = rng.integers(1, num_classes, size=flipped.sum())
    noisy[flipped] = (labels[flipped] + offsets) % num_classes
    return noisy, flipped


class Normalize(nn.Module):
    """Per-channel standardisation inside the model, so that the trainer, `score_dataset` and `TracIn` can all feed
    it the library's default [0, 1] pixels."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1))
        self.register_buffer("std", std.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def small_cnn(in_chans: int, num_classes: int, widths: tuple[int, int, int], mean, std) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    a, b, c = widths
    return nn.Sequential(
        Normalize(mean, std),
        *block(in_chans, a),
        nn.MaxPool2d(2),
        *block(a, b),
        nn.MaxPool2d(2),
        *block(b, c),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(c, num_classes),
    )


class TensorImages(torch.utils.data.Dataset):
    """uint8 images in memory -> {"pixel_values": [0, 1] float, "labels"}; random crop (pad 2) and, for CIFAR,
    horizontal flip when `augment`."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, augment: bool, flip: bool, seed: int = 0):
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.long)
        self.augment, self.flip = augment, flip
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x = self.images[index].float().div_(255)
        if self.augment:
            dy, dx = torch.randint(0, 5, (2,), generator=self.generator).tolist()
            x = nn.functional.pad(x, (2, 2, 2, 2))[:, dy : dy + x.shape[1], dx : dx + x.shape[2]]
            if self.flip and torch.rand((), generator=self.generator) < 0.5:
                x = x.flip(-1)
        return {"pixel_values": x, "labels": self.labels[index]}


def train(model, images, labels, *, settings, output_dir, seed, flip, checkpoints: bool, track: bool, max_steps=-1):
    """Train with DataDietTrainer (SGD + Nesterov, linear decay) for `settings["epochs"]` epochs, or `max_steps`
    steps when given; returns the trainer."""
    from datadiet.models import ClassifierWrapper
    from datadiet.trainer import DataDietConfig, DataDietTrainer

    config = DataDietConfig(
        output_dir=str(output_dir),
        num_train_epochs=settings["epochs"],
        max_steps=max_steps,
        per_device_train_batch_size=128,
        learning_rate=settings["lr"],
        optim="sgd",
        optim_args="momentum=0.9,nesterov=True",
        weight_decay=5e-4,
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=seed,
        save_strategy="epoch" if checkpoints else "no",
        save_only_model=True,
        logging_strategy="epoch",
        disable_tqdm=True,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        track_scores=["aum", "forgetting", "confidence"] if track else [],
        remove_unused_columns=False,
    )
    trainer = DataDietTrainer(
        ClassifierWrapper(model),
        config,
        train_dataset=TensorImages(images, labels, augment=True, flip=flip, seed=seed),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the per-epoch logs stay in trainer_state.json
    trainer.train()
    model.eval()
    return trainer


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = [model(images[i : i + batch_size].float() / 255).softmax(-1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


# ---- one configuration ----------------------------------------------------------------------------------------------


def run_config(name: str, noise: float, args, out: Path, work: Path) -> dict:
    from datasets import ClassLabel

    from datadiet import score_dataset
    from datadiet.scores.registry import get_score_spec
    from datadiet.scores.trackers import TRACKED_SCORES_HIGHER_IS_HARDER
    from datadiet.tracin import TracIn

    settings = dict(SETTINGS[name])
    if args.rows:
        settings["rows"] = args.rows
    if args.epochs:
        settings["epochs"] = args.epochs
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    full = load_split(name, "train")
    rows = np.sort(np.random.default_rng(args.seed).choice(len(full), size=settings["rows"], replace=False))
    clean_ds = full.select(rows)
    image_column = settings["image_column"]
    clean = np.asarray(clean_ds["label"])
    num_classes = clean_ds.features["label"].num_classes
    noisy, flipped = flip_labels(clean, noise, num_classes, seed=args.seed + 1)
    ds = clean_ds.remove_columns("label").add_column("label", noisy.tolist())
    ds = ds.cast_column("label", ClassLabel(names=clean_ds.features["label"].names))
    images = to_uint8(clean_ds, image_column)
    mean = images.float().div(255).mean(dim=(0, 2, 3))
    std = images.float().div(255).std(dim=(0, 2, 3))
    test = load_split(name, "test").select(range(2000))
    test_images, test_labels = to_uint8(test, image_column), np.asarray(test["label"])
    flip = name == "cifar10"

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return small_cnn(images.shape[1], num_classes, settings["widths"], mean, std)

    # 1. The proxy model: trained on the noisy labels, scores tracked online, a checkpoint per epoch.
    start = time.time()
    proxy_dir = work / "proxy"
    model = make_model(args.seed)
    if proxy_dir.exists():
        shutil.rmtree(proxy_dir)  # a half-trained proxy is retrained: its online scores need the whole run
    trainer = train(
        model, images, noisy, settings=settings, output_dir=proxy_dir, seed=args.seed, flip=flip, checkpoints=True,
        track=True,
    )  # fmt: skip
    online = {name_: np.asarray(trainer.score_callback.scores[name_]) for name_ in ("aum", "forgetting", "confidence")}
    test_accuracy = float((predict_proba(model, test_images).argmax(1) == test_labels).mean())
    timings["train_proxy"] = time.time() - start

    # 2. Scores of the final model, un-augmented, eval mode.
    start = time.time()
    scored = score_dataset(ds, model, methods=["el2n", "grand", "loss", "margin"], batch_size=256)
    values = {m: np.asarray(scored[m], dtype=np.float64) for m in ("el2n", "grand", "loss", "margin")}
    timings["score_dataset"] = time.time() - start

    # 3. TracIn self-influence over the per-epoch checkpoints (learning rates read from trainer_state.json).
    start = time.time()
    folders = sorted(proxy_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    tracin = TracIn(make_model(0), folders, batch_size=256)
    values["tracin_self_influence"] = tracin.self_influence(ds)
    timings["tracin"] = time.time() - start
    values.update(online)

    # 4. cleanlab reference: out-of-sample probabilities from k-fold cross-validation, same model and budget.
    start = time.time()
    pred_probs = np.zeros((len(noisy), num_classes))
    folds = np.random.default_rng(args.seed + 2).permutation(len(noisy)) % args.folds
    for fold in range(args.folds):
        held = folds == fold
        fold_model = make_model(args.seed + 10 + fold)
        train(
            fold_model, images[~held], noisy[~held], settings=settings, output_dir=work / f"fold{fold}",
            seed=args.seed + fold, flip=flip, checkpoints=False, track=False,
        )  # fmt: skip
        pred_probs[held] = predict_proba(fold_model, images[held])
        shutil.rmtree(work / f"fold{fold}", ignore_errors=True)
    timings["cleanlab_cv"] = time.time() - start
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    issues = find_label_issues(noisy, pred_probs)
    # Lower label quality = more likely an issue.
    values["cleanlab"] = -get_label_quality_scores(noisy, pred_probs)

    # Orientation: higher = more suspicious.
    higher_is_harder = {m: get_score_spec(m).higher_is_harder for m in ("el2n", "grand", "loss", "margin")}
    higher_is_harder.update({"tracin_self_influence": True, "cleanlab": True})
    higher_is_harder.update({m: TRACKED_SCORES_HIGHER_IS_HARDER[m] for m in online})
    suspicion = {m: v if higher_is_harder[m] else -v for m, v in values.items()}
    metrics = {m: detection_metrics(flipped, s) for m, s in suspicion.items()}
    metrics["cleanlab"]["find_label_issues_precision"] = float(flipped[issues].mean()) if issues.any() else 0.0
    metrics["cleanlab"]["find_label_issues_recall"] = float(issues[flipped].mean())
    metrics["cleanlab"]["find_label_issues_flagged"] = int(issues.sum())
    result = {
        "dataset": name,
        "noise": noise,
        "rows": int(len(noisy)),
        "flipped": int(flipped.sum()),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "folds": args.folds,
        "proxy_test_accuracy": test_accuracy,
        "cv_accuracy_on_noisy_labels": float((pred_probs.argmax(1) == noisy).mean()),
        "metrics": metrics,
        "seconds": timings,
        "threads": torch.get_num_threads(),
    }
    np.savez_compressed(out / "scores.npz", flipped=flipped, **{m: v.astype(np.float32) for m, v in suspicion.items()})
    shutil.rmtree(proxy_dir, ignore_errors=True)  # checkpoints are large and no longer needed
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def detection_metrics(flipped: np.ndarray, suspicion: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    k = int(flipped.sum())
    # Ties (e.g. forgetting counts) broken at random, not by row order.
    jitter = np.random.default_rng(0).random(len(suspicion)) * 1e-9 * (np.abs(suspicion).max() + 1)
    top = np.argsort(-(suspicion + jitter))[:k]
    return {"auroc": float(roc_auc_score(flipped, suspicion)), "precision_at_k": float(flipped[top].mean())}


# ---- report ---------------------------------------------------------------------------------------------------------


def report(output_dir: Path, plot: Path | None) -> str:
    results = [json.loads(p.read_text()) for p in sorted(output_dir.glob("*/result.json"))]
    if not results:
        return "No results yet."
    results.sort(key=lambda r: (r["dataset"] != "mnist", r["noise"]))
    methods = SCORES + ["cleanlab"]
    lines = [
        "AUROC / precision at k (k = number of flipped rows) for finding the flipped rows; higher is better.",
        "",
    ]
    rows = []
    for method in methods:
        cells = []
        for r in results:
            m = r["metrics"].get(method)
            best = max(r["metrics"], key=lambda name: r["metrics"][name]["auroc"] if name != "cleanlab" else -1)
            cell = f"{m['auroc']:.3f} / {m['precision_at_k']:.3f}" if m else "-"
            cells.append(f"**{cell}**" if method == best else cell)
        label = "cleanlab (k-fold out-of-sample, reference)" if method == "cleanlab" else method
        rows.append([label, *cells])
    rows.append(
        ["cleanlab `find_label_issues` precision / recall (flagged)"]
        + [
            f"{r['metrics']['cleanlab']['find_label_issues_precision']:.3f} / "
            f"{r['metrics']['cleanlab']['find_label_issues_recall']:.3f} "
            f"({r['metrics']['cleanlab']['find_label_issues_flagged']})"
            for r in results
        ]
    )
    configurations = [f"{r['dataset']} {int(100 * r['noise'])}%" for r in results]
    lines += [discipline.markdown_table(["score", *configurations], rows), ""]
    headers = ["configuration", "rows", "flipped", "epochs", "proxy test acc.", "proxy train+track", "score_dataset",
               "TracIn", f"cleanlab {results[0]['folds']}-fold CV"]  # fmt: skip
    rows = [
        [name, r["rows"], r["flipped"], r["settings"]["epochs"], f"{r['proxy_test_accuracy']:.3f}",
         f"{r['seconds']['train_proxy']:.0f} s", f"{r['seconds']['score_dataset']:.0f} s",
         f"{r['seconds']['tracin']:.0f} s", f"{r['seconds']['cleanlab_cv']:.0f} s"]
        for name, r in zip(configurations, results)
    ]  # fmt: skip
    lines.append(discipline.markdown_table(headers, rows))
    if plot is not None:
        plot_roc(output_dir, results, plot)
    return "\n".join(lines)


def plot_roc(output_dir: Path, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    columns = min(2, len(results))
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4.6 * rows), squeeze=False)
    for ax, r in zip(axes.ravel(), results):
        folder = output_dir / f"{r['dataset']}-noise{int(100 * r['noise'])}"
        data = np.load(folder / "scores.npz")
        for method in SCORES + ["cleanlab"]:
            if method not in data:
                continue
            fpr, tpr, _ = roc_curve(data["flipped"], data[method])
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if method == "cleanlab" else {}
            ax.plot(fpr, tpr, label=f"{method} ({r['metrics'][method]['auroc']:.3f})", **style)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        ax.set_title(f"{r['dataset']}, {int(100 * r['noise'])}% flipped ({r['rows']} rows)")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=REPO / "docs" / "bench" / "noise", help="results (small)")
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "bench" / "noise", help="checkpoints")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"], choices=sorted(SETTINGS))
    parser.add_argument("--noise", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--rows", type=int, default=None, help="training rows per dataset (default per dataset)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default per dataset)")
    parser.add_argument("--folds", type=int, default=4, help="cross-validation folds for cleanlab")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--plot", type=Path, default=None, help="where to save the ROC plot (PNG)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("datadiet").setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)

    if not args.report_only:
        for name in args.datasets:
            for noise in args.noise:
                out = args.output_dir / f"{name}-noise{int(round(100 * noise))}"
                if (out / "result.json").exists():
                    logger.info("%s: done already, skipping.", out.name)
                    continue
                logger.info("%s: running.", out.name)
                start = time.time()
                result = run_config(name, noise, args, out, args.work_dir / out.name)
                best = max(
                    (m for m in result["metrics"] if m != "cleanlab"), key=lambda m: result["metrics"][m]["auroc"]
                )
                logger.info(
                    "%s done in %.0f s: best datadiet score %s AUROC %.3f, cleanlab %.3f.", out.name,
                    time.time() - start, best, result["metrics"][best]["auroc"], result["metrics"]["cleanlab"]["auroc"],
                )  # fmt: skip
    table = report(args.output_dir, args.plot)
    (args.output_dir / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
