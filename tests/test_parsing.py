"""The command's argument errors: an unknown flag is named with the closest known flag, in the command's own words
(never the parser class's), and a misspelt score method gets a suggestion from the Python API's own check."""

from __future__ import annotations

import pytest

from datadiet import ScoreTransform
from datadiet.cli import main


def _error_line(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_unknown_flag_names_the_command_and_the_closest_flag(capsys):
    line = _error_line(["prune", "--dataset_name", "scored", "--kep", "0.3"], capsys)
    assert line == "datadiet prune: error: unknown argument --kep (did you mean --keep?)"
    line = _error_line(["score", "--dataset_name", "scored", "--method", "el2n"], capsys)
    assert line == "datadiet score: error: unknown argument --method (did you mean --methods?)"
    line = _error_line(["push", "--dataset_path", "x", "--output_dir", "y", "--zzzzzz", "1"], capsys)
    assert line == "datadiet push: error: unknown argument --zzzzzz (see --help for the flags)"
    assert "HfArgumentParser" not in line


def test_misspelt_score_method_gets_a_suggestion_in_python_and_on_the_command_line(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^Unknown score method 'gradn' \(did you mean 'grand'\?\)\. Valid methods"):
        ScoreTransform(None, "gradn")
    line = _error_line(["score", "--dataset_name", str(tmp_path / "none"), "--methods", "gradn"], capsys)
    assert line.startswith("datadiet score: error: Unknown score method 'gradn' (did you mean 'grand'?).")
