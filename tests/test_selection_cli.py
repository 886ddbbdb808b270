"""The validation protocol's choice used as a user would: `datadiet report curve` on a tiny slice, `datadiet score` on
the same rows, then `datadiet prune --from_selection` for every keep fraction it chose (real subprocesses)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import run_datadiet as _datadiet

ROWS = 240


def _ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, f"exit {run.returncode}:\n{run.stderr[-3000:]}"


def _rows(dataset) -> list[tuple[bytes, int]]:
    """Each row's identity: its pixels and label (independent of any column the commands add)."""
    return [(np.asarray(image).tobytes(), label) for image, label in zip(dataset["image"], dataset["label"])]


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("selection")
    curve = [
        "report", "curve", "--dataset_name", "sklearn-digits", "--max_rows", str(ROWS), "--max_eval_rows", "60",
        "--model_name", "datadiet_tiny_net", "--model_kwargs", '{"stem_width": 8, "widths": [8, 16, 16]}',
        "--scores", "grand", "forgetting", "--strategies", "hardest", "window@0.1", "--keep_fractions", "0.6", "0.3",
        "--seeds", "0", "1", "--scoring_seeds", "0", "--scoring_epochs", "1", "--max_steps", "10",
        "--batch_size", "16", "--crop_padding", "1", "--flip", "false", "--num_threads", "1",
        "--validation_fraction", "0.25", "--output_dir", str(folder / "curve"),
    ]  # fmt: skip
    _ok(_datadiet(*curve, cwd=folder))
    score = [
        "score", "--dataset_name", "sklearn-digits", "--max_rows", str(ROWS), "--model_name", "datadiet_tiny_net",
        "--in_chans", "1", "--methods", "grand", "forgetting", "--train_epochs", "1", "--batch_size", "16",
        "--output_dir", str(folder / "scored"),
    ]  # fmt: skip
    _ok(_datadiet(*score, cwd=folder))
    return folder


def test_prune_from_selection_keeps_the_rows_the_python_route_keeps_for_every_keep_fraction(chosen):
    from datadiet import prune
    from datadiet.curve import read_selection
    from datadiet.data import load_data

    selection = json.loads((chosen / "curve" / "selection.json").read_text())
    keeps = [cell["prune"]["keep"] for cell in selection["chosen"]]
    assert keeps == [0.6, 0.3]
    for cell in selection["chosen"]:
        # Every prune setting of the cell is stored, class_balanced and num_bins included.
        assert set(cell["prune"]) == {"by", "keep", "strategy", "offset", "hard_cutoff", "num_bins", "class_balanced"}
    scored = load_data(str(chosen / "scored" / "dataset"))
    assert {"grand", "forgetting"} <= set(scored.column_names) and len(scored) == ROWS
    for keep in keeps:
        output = chosen / f"pruned-{keep}"
        run = _datadiet(
            "prune", "--dataset_name", str(chosen / "scored"), "--from_selection", str(chosen / "curve"),
            "--keep", str(keep), "--output_dir", str(output), cwd=chosen,
        )  # fmt: skip
        _ok(run)
        expected = prune(scored, **read_selection(chosen / "curve" / "selection.json", keep=keep))
        assert len(expected) == round(keep * ROWS)
        assert _rows(load_data(str(output))) == _rows(expected)


def test_prune_from_selection_refuses_a_contradicting_flag_even_at_its_default(chosen):
    selection = json.loads((chosen / "curve" / "selection.json").read_text())
    cell = selection["chosen"][0]["prune"]
    base = ["prune", "--dataset_name", str(chosen / "scored"), "--from_selection", str(chosen / "curve")]
    base += ["--keep", str(cell["keep"]), "--output_dir", str(chosen / "refused")]
    # `--by el2n` is prune's default, yet the user typed it and the curve chose another score: refused.
    run = _datadiet(*base, "--by", "el2n", cwd=chosen)
    assert (
        run.returncode == 2
        and f"--by el2n conflicts with {chosen / 'curve'}, which chose by={cell['by']}" in run.stderr
    )
    other = "false" if cell["class_balanced"] else "true"
    run = _datadiet(*base, "--class_balanced", other, cwd=chosen)
    assert run.returncode == 2 and "--class_balanced" in run.stderr and "conflicts" in run.stderr
    # A flag equal to the selection's value is accepted.
    _ok(_datadiet(*base, "--by", cell["by"], "--num_bins", str(cell["num_bins"]), cwd=chosen))
    assert not (chosen / "refused" / "dataset").exists()


def test_prune_from_selection_on_a_dataset_without_the_chosen_score_says_how_to_score_it(chosen):
    from datadiet.data import load_data

    selection = json.loads((chosen / "curve" / "selection.json").read_text())
    cell = selection["chosen"][0]["prune"]
    load_data(str(chosen / "scored" / "dataset")).remove_columns([cell["by"]]).save_to_disk(str(chosen / "unscored"))
    run = _datadiet(
        "prune", "--dataset_name", str(chosen / "unscored"), "--from_selection", str(chosen / "curve"),
        "--keep", str(cell["keep"]), cwd=chosen,
    )  # fmt: skip
    lines = [line for line in run.stderr.splitlines() if "error" in line]
    assert run.returncode == 2 and len(lines) == 1
    assert f"has no {cell['by']!r} column" in lines[0] and "datadiet score" in lines[0]
    assert f"--methods {cell['by']} --train_epochs 1" in lines[0]
