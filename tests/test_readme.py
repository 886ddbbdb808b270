"""README.md's small Python example runs as written (on a 48-row slice instead of its 1,000 rows), in a scratch
repository root where `../shared/data` resolves as in a clone; its set-up lines are those of the large example."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import CIFAR10_TRAIN, SHARED_DATA, require_shared_data
from huggingface_hub import DatasetCard

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    section = README.read_text().split("## In Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


def test_readme_small_python_example_runs(tmp_path, monkeypatch, one_thread):
    require_shared_data(CIFAR10_TRAIN)
    large, small = _python_blocks()[:2]
    setup, expensive = large.split("\nscored = score_dataset(", 1)  # the 4-hour scoring is not run
    assert "seeds=[0, 1, 2, 3]" in expensive
    assert "small = train.select(range(1000))" in small
    small = small.replace("range(1000)", "range(48)")

    root = tmp_path / "repo"
    root.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    monkeypatch.chdir(root)
    exec(compile(setup + "\n" + small, "README.md", "exec"), {})

    card = DatasetCard.load(root / "outputs" / "cifar10" / "pruned_small" / "README.md")
    block = card.data["datadiet"]
    assert block["rows_before"] == 48 and block["rows_after"] == 24
    assert block["scoring"]["model"] == "resnet10t" and block["scoring"]["seeds"] == [0, 1]
    assert block["scoring"]["train_epochs"] == 1 and block["scoring"]["methods"] == ["el2n", "input_norm"]
