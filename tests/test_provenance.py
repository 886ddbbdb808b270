"""Provenance reaches the dataset card whichever way the scores were made from Python: `dataset.map(ScoreTransform)`
(in one process or two, freshly or from the `datasets` cache), `ScoreTransform.apply`, and `score_dataset`, whose
card names the source and the whole scoring setup (model, seeds, epochs) instead of "an unrecorded source"."""

from __future__ import annotations

import hashlib

import pytest
import timm
import torch
from datasets import Dataset, load_from_disk
from huggingface_hub import DatasetCard

from datadiet import ScoreTransform, prune, read_provenance, save_pruned, score_dataset


def _sha256_of_weights(model: torch.nn.Module) -> str:
    """The weights' digest computed here, as the card documents it (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def digits_on_disk(digits, tmp_path):
    """96 digits as a dataset read back from a save_to_disk folder (so `map` has a cache to hit)."""
    digits["train"].select(range(96)).save_to_disk(str(tmp_path / "digits"))
    return load_from_disk(str(tmp_path / "digits"))


def _card_block(dataset: Dataset, folder) -> tuple[dict, str]:
    """The `datadiet:` block and the body (title included) of the card `save_pruned` writes for the pruned half."""
    pruned = prune(dataset, "el2n", keep=0.5)
    card = DatasetCard.load(save_pruned(pruned, folder) / "README.md")
    return card.data["datadiet"], f"pretty_name: {card.data['pretty_name']}\n{card.text}"


def _model(seed: int):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()


def test_map_route_records_provenance_fresh_multiprocess_and_cached(digits_on_disk, tmp_path, one_thread):
    model = _model(0)

    def transform():
        return ScoreTransform(model, ["el2n", "loss"], image_column="image", label_column="label")

    routes = {
        "fresh": dict(batch_size=32),
        "two processes": dict(batch_size=16, num_proc=2, load_from_cache_file=False),
        "from the cache": dict(batch_size=32),  # the same fingerprint as "fresh": the transform is never called
    }
    for name, kwargs in routes.items():
        scored = digits_on_disk.map(transform(), batched=True, **kwargs)
        block, text = _card_block(scored, tmp_path / name.replace(" ", "_"))
        assert block["scoring"]["methods"] == ["el2n", "loss"], name
        assert block["scoring"]["model"] == "test_resnet" and block["scoring"]["route"] == "Dataset.map"
        assert block["scoring"]["weights_sha256"] == _sha256_of_weights(model), name
        assert "- **Scoring**:" in text

    # Scores another model made are not attributed to this one; scores no transform made get no scoring block.
    other = _model(1)
    by_other = digits_on_disk.map(
        ScoreTransform(other, ["el2n", "loss"], image_column="image", label_column="label"), batched=True
    )
    assert read_provenance(by_other)["scoring"]["weights_sha256"] == _sha256_of_weights(other)
    unscored = digits_on_disk.add_column("el2n", [0.5] * 96).add_column("loss", [1.0] * 96)
    assert "scoring" not in read_provenance(unscored)
    block, _ = _card_block(unscored, tmp_path / "unscored")
    assert "scoring" not in block


def test_apply_records_provenance_in_the_metadata(digits_on_disk, tmp_path, one_thread):
    model = _model(0)
    scored = ScoreTransform(model, "el2n", image_column="image", label_column="label").apply(digits_on_disk)
    scored.save_to_disk(str(tmp_path / "scored"))
    again = load_from_disk(str(tmp_path / "scored"))  # the metadata travels with the saved dataset
    assert again.info.description and "datadiet provenance" in again.info.description
    assert read_provenance(again)["scoring"]["weights_sha256"] == _sha256_of_weights(model)


def test_score_dataset_card_names_the_source_and_the_whole_scoring_setup(digits_on_disk, tmp_path, one_thread):
    scored = score_dataset(
        digits_on_disk,
        model_init=lambda seed: timm.create_model("test_resnet", num_classes=10, in_chans=1),
        methods=["el2n"],
        seeds=[0, 1],
        train_epochs=1,
        batch_size=32,
    )
    block, text = _card_block(scored, tmp_path / "card")
    folder = str(tmp_path / "digits")
    assert block["source"]["path"] == folder and block["source"]["num_rows"] == 96
    assert block["source"]["fingerprint"] == digits_on_disk._fingerprint
    assert block["scoring"]["seeds"] == [0, 1] and block["scoring"]["train_epochs"] == 1
    assert block["scoring"]["model"] == "test_resnet"
    assert "unrecorded" not in text
    assert f"\n# {folder}, pruned with datadiet\n" in text
    assert f"pretty_name: {folder}, pruned with datadiet" in text
    assert f'dataset = load_dataset("{folder}", split="train")' in text
    assert "fresh `test_resnet`" in text
    assert "model_init=model_init, methods=['el2n'], seeds=[0, 1], train_epochs=1, batch_size=32" in text
