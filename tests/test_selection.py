"""Pruning strategies: what each keeps, determinism, class balance, CCS, and bad input."""

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from datadiet import prune, read_provenance
from datadiet.selection import list_strategies, select_indices


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    n = 1000
    return Dataset.from_dict(
        {
            "idx": list(range(n)),
            "el2n": rng.random(n).tolist(),
            "margin": rng.normal(size=n).tolist(),
            "label": rng.integers(0, 4, n).tolist(),
        },
        features=Features(
            {
                "idx": Value("int64"),
                "el2n": Value("float32"),
                "margin": Value("float32"),
                "label": ClassLabel(num_classes=4),
            }
        ),
    )


def test_hardest_and_easiest_keep_the_extremes_in_original_order(scored):
    el2n = np.asarray(scored["el2n"])
    hard = prune(scored, "el2n", 0.3)
    assert len(hard) == 300
    assert hard["idx"] == sorted(hard["idx"])  # original order kept
    assert set(hard["idx"]) == set(np.argsort(-el2n)[:300].tolist())
    easy = prune(scored, "el2n", 300, strategy="easiest")
    assert set(easy["idx"]) == set(np.argsort(el2n)[:300].tolist())
    assert scored.num_rows == 1000  # input untouched


def test_margin_is_oriented_low_is_hard(scored):
    margins = np.asarray(scored["margin"])
    hard = prune(scored, "margin", 0.1)
    assert set(hard["idx"]) == set(np.argsort(margins)[:100].tolist())


def test_window_skips_the_hardest(scored):
    el2n = np.asarray(scored["el2n"])
    window = prune(scored, "el2n", 0.5, strategy="window", offset=0.1)
    assert set(window["idx"]) == set(np.argsort(-el2n)[100:600].tolist())


def test_ties_are_broken_by_position():
    ds = Dataset.from_dict({"el2n": [1.0, 0.5, 1.0, 1.0, 0.5]})
    assert select_indices(np.asarray(ds["el2n"]), 2).tolist() == [0, 2]
    assert select_indices(np.asarray(ds["el2n"]), 2, strategy="easiest").tolist() == [1, 4]


def test_random_is_seeded_and_needs_no_score(scored):
    a = prune(scored, None, 0.2, strategy="random", seed=3)
    b = prune(scored, None, 0.2, strategy="random", seed=3)
    c = prune(scored, None, 0.2, strategy="random", seed=4)
    assert a["idx"] == b["idx"] and a["idx"] != c["idx"] and len(a) == 200


def test_stratified_covers_the_score_range(scored):
    el2n = np.asarray(scored["el2n"])
    kept = np.asarray(prune(scored, "el2n", 0.2, strategy="stratified", hard_cutoff=0.1, num_bins=10)["idx"])
    assert len(kept) == 200
    assert not set(kept) & set(np.argsort(-el2n)[:100].tolist())  # hardest 10% dropped
    # Budget shared over equal-width bins of the remaining range: each of the 10 bins gets ~20 rows.
    pool = np.sort(np.argsort(-el2n)[100:])
    low, high = el2n[pool].min(), el2n[pool].max()
    bins = np.minimum(((el2n[kept] - low) / (high - low) * 10).astype(int), 9)
    counts = np.bincount(bins, minlength=10)
    sizes = np.bincount(np.minimum(((el2n[pool] - low) / (high - low) * 10).astype(int), 9), minlength=10)
    assert (counts == np.minimum(sizes, counts.max())).all() and counts.min() >= 15


def test_stratified_gives_small_bins_everything():
    values = np.concatenate([np.full(5, 0.95), np.linspace(0.0, 0.5, 95)])
    kept = select_indices(values, 40, strategy="stratified", num_bins=2)
    assert set(range(5)) <= set(kept.tolist()) and len(kept) == 40


def test_class_balanced_keeps_class_proportions(scored):
    labels = np.asarray(scored["label"])
    pruned = prune(scored, "el2n", 0.5, class_balanced=True)
    kept = np.asarray(pruned["label"])
    for c in range(4):
        assert abs((kept == c).sum() - (labels == c).sum() * 0.5) <= 1
    assert len(pruned) == 500


def test_provenance_is_recorded(scored):
    pruned = prune(scored, "el2n", 0.25, strategy="window", offset=0.05)
    record = read_provenance(pruned)["pruning"]
    assert record["rows_before"] == 1000 and record["rows_after"] == 250 and record["strategy"] == "window"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"by": "el2n", "keep": 0.0}, r"outside \(0, 1\]"),
        ({"by": "el2n", "keep": 1.5}, r"outside \(0, 1\]"),
        ({"by": "el2n", "keep": 1001}, "more than the dataset's 1000 rows"),
        ({"by": "el2n", "keep": 0.5, "strategy": "hardest-ish"}, "Valid strategies: easiest, hardest, random"),
        ({"by": "el2n", "keep": 0.5, "strategy": "hostcp"}, r"use datadiet.prune_hostcp\(dataset"),
        ({"by": "grand", "keep": 0.5}, "Column 'grand' is not in the dataset"),
        ({"by": None, "keep": 0.5}, "needs a score column"),
    ],
)
def test_bad_input(scored, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune(scored, **kwargs)


def test_empty_dataset_and_nan_scores():
    with pytest.raises(ValueError, match="empty"):
        prune(Dataset.from_dict({"el2n": []}), "el2n", 0.5)
    with pytest.raises(ValueError, match=r"NaN or infinite values at rows \[1\]"):
        prune(Dataset.from_dict({"el2n": [0.1, float("nan"), 0.3]}), "el2n", 0.5)


def test_strategies_listed():
    assert {"hardest", "easiest", "random", "window", "stratified"} <= set(list_strategies())


def test_tracked_scores_where_low_is_hard_are_oriented():
    # AUM and data-map confidence from DataDietTrainer: low values mark hard / mislabelled rows.
    ds = Dataset.from_dict(
        {"aum": [2.0, -1.0, 0.5, 3.0], "confidence": [0.9, 0.1, 0.5, 0.95], "forgetting": [0.0, 3.0, 1.0, 0.0]}
    )
    assert prune(ds, "aum", 2)["aum"] == [-1.0, 0.5]
    assert prune(ds, "confidence", 1)["confidence"] == [0.1]
    assert prune(ds, "forgetting", 1)["forgetting"] == [3.0]
