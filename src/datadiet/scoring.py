"""`datadiet.score_dataset` as users call it: the engine's `score_dataset` with its proxy models trained by the
trainer (`datadiet.trainer.proxy.fit_proxy`). The engine trains proxies through the function it is given and never
imports the trainer; this module, above both, gives it the trainer's."""

from __future__ import annotations

from functools import wraps

from .engine.score import score_dataset as _score_dataset

__all__ = ["fit_proxy", "score_dataset"]


def fit_proxy(model, dataset, **kwargs):
    """`datadiet.trainer.proxy.fit_proxy`, the `train_proxy` of `score_dataset` and of the command's scoring plan;
    imported when a proxy first trains."""
    from .trainer.proxy import fit_proxy  # transformers loads only when a proxy trains

    return fit_proxy(model, dataset, **kwargs)


def _check_training_kwargs(training_kwargs) -> None:
    from .trainer.proxy import check_training_kwargs

    check_training_kwargs(training_kwargs)


fit_proxy.check_kwargs = _check_training_kwargs  # score_dataset's plan refuses a wrong key before anything trains


@wraps(_score_dataset)
def score_dataset(*args, train_proxy=None, **kwargs):
    return _score_dataset(*args, train_proxy=train_proxy or fit_proxy, **kwargs)
