"""`evaluate` metrics shipped inside the package, so they load offline (`evaluate.load("accuracy")` needs the Hub)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["load_metric", "METRICS_DIR"]

METRICS_DIR = Path(__file__).parent


def load_metric(name: str):
    """Load the packaged `evaluate` metric `name` (e.g. `"accuracy"`) by path, without the network.

    Example:
    ```python
    >>> from datadiet.metrics import load_metric
    >>> result = load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    >>> round(result["accuracy"], 4)
    0.6667

    ```
    """
    import evaluate

    path = METRICS_DIR / name / f"{name}.py"
    if not path.exists():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").exists())
        raise ValueError(f"No packaged metric {name!r}; available: {available}.")
    return evaluate.load(str(path))
