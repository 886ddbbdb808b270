"""Plots: a skewed score's histogram gets a log-scaled count axis, and its label says so."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from datadiet.report import histogram_count_scale, plot_score_histogram


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures `plot_score_histogram` writes, kept for inspection (the PNG is still written)."""
    figures = []
    savefig = Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def test_a_skewed_score_gets_a_log_count_axis(tmp_path, saved_figures):
    rng = np.random.default_rng(0)
    # EL2N of a trained model: most rows near 0, a long tail (the digits demo put 1,000 of 1,347 in the first bin).
    skewed = np.concatenate([rng.uniform(0, 0.02, 1000), rng.uniform(0.02, 1.4, 347)])
    spread = rng.uniform(0, 1, 1347)
    assert np.histogram(skewed, bins=50)[0].max() >= 1000  # the crowded first bin, counted by numpy alone
    assert histogram_count_scale(skewed) == "log" and histogram_count_scale(spread) == "linear"
    # Not finite values are left out of the histogram, as they are of the plot.
    assert histogram_count_scale(np.append(spread, [np.nan] * 5000)) == "linear"

    path = plot_score_histogram({"el2n": skewed, "input_norm": spread}, tmp_path / "hist.png")
    assert path.stat().st_size > 0
    (figure,) = saved_figures
    log_axis, linear_axis = figure.axes
    assert log_axis.get_yscale() == "log" and log_axis.get_ylabel() == "examples (log scale)"
    assert linear_axis.get_yscale() == "linear" and linear_axis.get_ylabel() == "examples"
    # Every row is drawn: the bars add up to the number of finite values.
    assert sum(patch.get_height() for patch in log_axis.patches) == pytest.approx(1347)
