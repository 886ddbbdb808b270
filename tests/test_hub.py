"""datadiet.hub: the saved folder loads back with `datasets.load_dataset`, the card keeps its `datadiet:` block, and
`push_to_hub` uploads the same files (HfApi's network calls replaced by a recorder writing to a local folder)."""

from __future__ import annotations

import logging
import shutil
import statistics
from pathlib import Path

import huggingface_hub
import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset, load_from_disk
from huggingface_hub import DatasetCard, HfApi
from PIL import Image as PILImage

import datadiet
from datadiet.cli.push import PushArguments, run_push
from datadiet.hub import push_to_hub, save_pruned
from datadiet.provenance import read_provenance, record_provenance

TOKEN = "hf_datadietFakeToken0123456789abcdef"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _image_bytes(dataset: Dataset, column: str) -> list[bytes]:
    return [item["bytes"] for item in dataset.cast_column(column, Image(decode=False))[column]]


@pytest.fixture
def cifar_slice(request):
    """48 real CIFAR-10 rows (Image `img`, ClassLabel `label`), or, when the shared data are absent, 48 of
    scikit-learn's digits as PNG images in the same columns."""
    try:
        return request.getfixturevalue("cifar10_train").select(range(48))
    except pytest.skip.Exception:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = [PILImage.fromarray((digits.images[i] * 16).astype(np.uint8)) for i in range(48)]
        features = Features({"img": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
        return Dataset.from_dict({"img": images, "label": digits.target[:48].tolist()}, features=features)


@pytest.fixture
def digits_on_disk(tmp_path):
    """Real images (scikit-learn digits) stored as PNG files referenced by path, as `imagefolder` datasets are."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in range(30):
        path = tmp_path / "pngs" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        PILImage.fromarray((digits.images[i] * 16).astype(np.uint8)).save(path)
        paths.append(str(path))
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return Dataset.from_dict({"image": paths, "label": digits.target[:30].tolist()}, features=features)


def _scored_and_pruned(dataset: Dataset, seed: int = 0) -> Dataset:
    """A dataset as `score_dataset` then `prune` leave it: score columns, a row id, and their provenance."""
    rng = np.random.default_rng(seed)
    n = len(dataset)
    dataset = dataset.add_column("row_id", np.arange(n, dtype=np.int64))
    dataset = dataset.add_column("el2n", rng.random(n).astype(np.float32))
    dataset = dataset.add_column("el2n_std", rng.random(n) / 10)
    dataset = record_provenance(
        dataset,
        scoring={
            "methods": ["el2n"],
            "seeds": [0, 1, 2],
            "train_epochs": 2,
            "model": "test_resnet",
            "model_config": {"num_classes": 10, "drop_rate": 0.0},
        },
        source={"path": "uoft-cs/cifar10", "split": "train", "fingerprint": dataset._fingerprint},
    )
    order = np.argsort(-np.asarray(dataset["el2n"]))[: n // 2]
    pruned = dataset.select(sorted(order.tolist()))
    return record_provenance(
        pruned,
        pruning={
            "by": "el2n",
            "keep": 0.5,
            "strategy": "hardest",
            "seed": 0,
            "rows_before": n,
            "rows_after": len(pruned),
        },
        steps=[
            {"command": "datadiet score --config recipes/cifar10/score.yaml"},
            {"command": "datadiet prune --by el2n --keep 0.5"},
        ],
    )


def test_round_trip_cifar_image_and_classlabel(cifar_slice, tmp_path):
    pruned = _scored_and_pruned(cifar_slice)
    folder = save_pruned(pruned, tmp_path / "out", num_shards=3)

    shards = sorted(p.name for p in (folder / "data").iterdir())
    assert shards == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    # Independent of the datasets loader: the Parquet files themselves hold every row once, in order.
    row_ids = np.concatenate([pq.read_table(folder / "data" / s).column("row_id").to_numpy() for s in shards])
    np.testing.assert_array_equal(row_ids, pruned["row_id"])

    back = load_dataset(str(folder))
    assert list(back) == ["train"]
    back = back["train"]
    assert back.features == pruned.features
    assert isinstance(back.features["img"], Image) and isinstance(back.features["label"], ClassLabel)
    assert back["label"] == pruned["label"] and back["row_id"] == pruned["row_id"]
    np.testing.assert_array_equal(back["el2n"], pruned["el2n"])
    np.testing.assert_array_equal(back["el2n_std"], pruned["el2n_std"])
    assert _image_bytes(back, "img") == _image_bytes(pruned, "img")
    np.testing.assert_array_equal(np.asarray(back[5]["img"]), np.asarray(pruned[5]["img"]))


def test_local_image_files_are_embedded(digits_on_disk, tmp_path):
    folder = save_pruned(digits_on_disk, tmp_path / "out")
    expected = [np.asarray(image) for image in digits_on_disk["image"]]
    shutil.rmtree(tmp_path / "pngs")  # the saved folder must not point at the writer's disk
    back = load_dataset(str(folder), split="train")
    assert back.features == digits_on_disk.features
    assert back["label"] == digits_on_disk["label"]
    for got, want in zip(back["image"], expected):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_card_keeps_datadiet_block_and_statistics(cifar_slice, tmp_path):
    pruned = _scored_and_pruned(cifar_slice)
    folder = save_pruned(pruned, tmp_path / "out", license="mit", provenance={"scoring": {"model_revision": "r1"}})
    card = DatasetCard.load(folder / "README.md")
    block = card.data["datadiet"]

    assert block["source"]["path"] == "uoft-cs/cifar10" and block["source"]["fingerprint"]
    # Recorded provenance merged key by key with the explicit one.
    assert block["scoring"]["model"] == "test_resnet" and block["scoring"]["model_revision"] == "r1"
    assert block["scoring"]["seeds"] == [0, 1, 2] and block["scoring"]["train_epochs"] == 2
    assert block["pruning"]["strategy"] == "hardest" and block["pruning"]["keep"] == 0.5
    assert (block["rows_before"], block["rows_after"]) == (48, 24)
    assert block["command"] == [
        "datadiet score --config recipes/cifar10/score.yaml",
        "datadiet prune --by el2n --keep 0.5",
    ]
    assert block["versions"]["datadiet"] == datadiet.__version__
    assert card.data["license"] == "mit"
    assert card.data["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}
    ]

    # Statistics checked against Python's statistics module (sample std, inclusive quantiles = numpy's linear).
    values = [float(v) for v in pruned["el2n"]]
    stats = block["score_statistics"]["train"]["el2n"]
    assert stats["count"] == 24
    assert stats["mean"] == pytest.approx(statistics.fmean(values), rel=1e-5)
    assert stats["std"] == pytest.approx(statistics.stdev(values), rel=1e-5)
    assert (stats["min"], stats["max"]) == (pytest.approx(min(values), rel=1e-5), pytest.approx(max(values), rel=1e-5))
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    assert [stats["q25"], stats["q50"], stats["q75"]] == pytest.approx(quartiles, rel=1e-5)
    assert set(block["score_statistics"]["train"]) == {"el2n", "el2n_std"}

    # Readable body: what was kept, the histogram, how to reproduce.
    assert "24 of 48 rows (50.0%)" in card.text
    assert "![Histogram" in card.text and "(score_histogram.png)" in card.text
    assert "datadiet prune --by el2n --keep 0.5" in card.text
    with PILImage.open(folder / "score_histogram.png") as png:
        assert png.format == "PNG" and png.width > 100


def test_dataset_dict_splits(digits_on_disk, tmp_path):
    splits = DatasetDict({"train": digits_on_disk.select(range(20)), "test": digits_on_disk.select(range(20, 30))})
    folder = save_pruned(splits, tmp_path / "out")
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train-00000-of-00001.parquet",
    ]
    back = load_dataset(str(folder))
    assert set(back) == {"train", "test"}
    for name in ("train", "test"):
        assert back[name]["label"] == splits[name]["label"]
        for got, want in zip(back[name]["image"], splits[name]["image"]):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert DatasetCard.load(folder / "README.md").data["datadiet"]["splits"] == {"train": 20, "test": 10}


def test_scores_only(cifar_slice, tmp_path):
    scored = _scored_and_pruned(cifar_slice).rename_column("row_id", "source_row")
    folder = save_pruned(scored, tmp_path / "positions", scores_only=True)
    back = load_dataset(str(folder), split="train")
    assert back.column_names == ["row_id", "el2n", "el2n_std"]
    assert back["row_id"] == list(range(len(scored)))
    np.testing.assert_array_equal(back["el2n"], scored["el2n"])
    card = DatasetCard.load(folder / "README.md")
    assert card.data["datadiet"]["scores_only"] is True and card.data["datadiet"]["row_id_column"] == "row_id"

    # An existing row id column is kept as it is, and score_columns picks the columns explicitly.
    folder = save_pruned(
        scored, tmp_path / "ids", scores_only=True, row_id_column="source_row", score_columns=["el2n"]
    )
    back = load_dataset(str(folder), split="train")
    assert back.column_names == ["source_row", "el2n"]
    assert back["source_row"] == scored["source_row"] and back["source_row"] != list(range(len(scored)))


@pytest.fixture
def local_endpoint(monkeypatch):
    """A real HTTP server on 127.0.0.1 standing in for the Hub's endpoint, so that push_to_hub's reachability check
    gets an answer without leaving the machine."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answer(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


def _record_hub(monkeypatch, hub_root: Path) -> list[tuple]:
    """Replace HfApi's network calls by a recorder that writes what it receives under `hub_root/<repo_id>` (with
    `local_endpoint` answering the reachability check)."""
    calls: list[tuple] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", self.token, repo_id, kwargs))
        return f"https://huggingface.co/datasets/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", self.token, repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", self.token, repo_id, {**kwargs, "folder_path": folder_path}))
        destination = hub_root / repo_id / (kwargs.get("revision") or "main")
        shutil.copytree(folder_path, destination, dirs_exist_ok=True)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the recorder stands in for the network
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_same_layout_and_never_writes_the_token(
    cifar_slice, tmp_path, monkeypatch, caplog, local_endpoint
):
    calls = _record_hub(monkeypatch, tmp_path / "hub")
    pruned = _scored_and_pruned(cifar_slice)
    caplog.set_level(logging.DEBUG)

    commit = push_to_hub(pruned, "me/cifar10-el2n", token=TOKEN, private=True, revision="pruned", num_shards=2)

    assert commit == "commit-info"
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert all(c[1] == TOKEN and c[2] == "me/cifar10-el2n" for c in calls)  # the token reaches HfApi, and only it
    assert calls[0][3]["repo_type"] == "dataset" and calls[0][3]["private"] is True and calls[0][3]["exist_ok"]
    upload = calls[2][3]
    assert upload["repo_type"] == "dataset" and upload["revision"] == "pruned"
    assert upload["delete_patterns"] == ["data/*.parquet"]
    assert not Path(upload["folder_path"]).exists()  # the temporary folder is cleaned up

    received = tmp_path / "hub" / "me" / "cifar10-el2n" / "pruned"
    back = load_dataset(str(received), split="train")
    assert back.features == pruned.features and back["row_id"] == pruned["row_id"]
    assert _image_bytes(back, "img") == _image_bytes(pruned, "img")
    card = DatasetCard.load(received / "README.md")
    assert card.data["datadiet"]["pruning"]["by"] == "el2n"
    assert 'load_dataset("me/cifar10-el2n")' in card.text

    for path in received.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert caplog.records and not any(TOKEN in record.getMessage() for record in caplog.records)


def test_overwrite_replaces_stale_shards(digits_on_disk, tmp_path):
    folder = save_pruned(digits_on_disk, tmp_path / "out", num_shards=3)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        save_pruned(digits_on_disk, folder)
    save_pruned(digits_on_disk.select(range(5)), folder, overwrite=True)
    assert [p.name for p in (folder / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert load_dataset(str(folder), split="train")["label"] == digits_on_disk["label"][:5]


def test_clear_errors(digits_on_disk, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no rows"):
        save_pruned(digits_on_disk.select([]), tmp_path / "empty")
    with pytest.raises(ValueError, match="no score column"):
        save_pruned(digits_on_disk, tmp_path / "noscores", scores_only=True)
    with pytest.raises(ValueError, match=r"score_columns \['grand'\]"):
        save_pruned(digits_on_disk, tmp_path / "missing", score_columns=["grand"])
    with pytest.raises(TypeError, match="Dataset or DatasetDict"):
        save_pruned({"label": [1]}, tmp_path / "dict")
    with pytest.raises(ValueError, match="not a Hub repository id"):
        push_to_hub(digits_on_disk, "not a repo id")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set.*save_pruned"):
        push_to_hub(digits_on_disk, "me/digits")
    with pytest.raises(ValueError, match="repo_id.*output_dir"):
        PushArguments(dataset_path=str(tmp_path))


def test_run_push_from_save_to_disk(tmp_path):
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=["neg", "pos"]), "margin": Value("float64")}
    )
    dataset = Dataset.from_dict(
        {"text": ["good", "bad", "fine"], "label": [1, 0, 1], "margin": [0.5, -0.2, 0.1]}, features=features
    )
    dataset = record_provenance(dataset, scoring={"methods": ["margin"], "seeds": [7]})
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert read_provenance(load_from_disk(str(tmp_path / "saved")))["scoring"]["seeds"] == [7]

    result = run_push(PushArguments(dataset_path=str(tmp_path / "saved"), output_dir=str(tmp_path / "out")))
    assert result["commit"] is None
    back = load_dataset(str(result["output_dir"]), split="train")
    assert back.features == features and back["text"] == ["good", "bad", "fine"]
    block = DatasetCard.load(tmp_path / "out" / "README.md").data["datadiet"]
    assert block["scoring"]["seeds"] == [7] and block["score_statistics"]["train"]["margin"]["min"] == -0.2


def test_card_metadata_matches_datasets_push_to_hub(cifar_slice, tmp_path):
    """`configs` and `dataset_info` are what `Dataset.push_to_hub` writes, per datasets' own card updater run on an
    empty local folder instead of a Hub repository."""
    try:
        from datasets.arrow_dataset import _get_updated_dataset_card
    except ImportError:
        pytest.skip("datasets no longer has the private _get_updated_dataset_card used as the reference here.")
    from datasets import SplitInfo
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    folder = save_pruned(cifar_slice, tmp_path / "out", num_shards=2)
    uploaded = sum(p.stat().st_size for p in (folder / "data").iterdir())
    (tmp_path / "empty").mkdir()
    reference, _ = _get_updated_dataset_card(
        fs=DirFileSystem(path=str(tmp_path / "empty"), fs=LocalFileSystem()),
        config_name="default",
        splits_info=[SplitInfo(name="train", num_bytes=cifar_slice._estimate_nbytes(), num_examples=len(cifar_slice))],
        features=cifar_slice.features,
        data_dir="data",
        set_default=None,
        uploaded_sizes=[uploaded],
        deleted_sizes=[0],
        remove_other_splits=False,
    )
    mine = DatasetCard.load(folder / "README.md").data.to_dict()
    assert mine["configs"] == reference.data.to_dict()["configs"]
    assert mine["dataset_info"] == reference.data.to_dict()["dataset_info"]


def test_real_score_and_prune_provenance_reaches_the_card(digits_on_disk, tmp_path):
    """The provenance written by the real score_dataset and prune is rendered in the card."""
    import timm

    from datadiet.engine import score_dataset
    from datadiet.selection import prune

    def model_init(seed: int):
        return timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1)

    scored = score_dataset(digits_on_disk, methods=["el2n"], model_init=model_init, seeds=[0], batch_size=32)
    pruned = prune(scored, "el2n", 0.5, strategy="hardest")
    folder = save_pruned(pruned, tmp_path / "out", source="sklearn/digits")

    card = DatasetCard.load(folder / "README.md")
    block = card.data["datadiet"]
    assert block["scoring"]["methods"] == ["el2n"] and block["scoring"]["seeds"] == [0]
    assert block["pruning"]["by"] == "el2n" and (block["rows_before"], block["rows_after"]) == (30, 15)
    assert block["score_statistics"]["train"]["el2n"]["min"] == pytest.approx(min(pruned["el2n"]), rel=1e-5)
    assert (
        "sklearn/digits" in card.text
        and "datadiet.prune(dataset, by='el2n', keep=0.5, strategy='hardest'" in card.text
    )
    back = load_dataset(str(folder), split="train")
    np.testing.assert_array_equal(back["el2n"], pruned["el2n"])


def test_score_columns_are_the_registered_and_tracked_scores():
    from datadiet.hub.save import known_score_columns
    from datadiet.scores import list_scores
    from datadiet.scores.trackers import TRACKED_SCORES

    design = {"el2n", "grand", "forgetting", "loss", "margin", "entropy", "input_norm", "confidence", "variability"}
    assert design | {"tracin_self_influence"} <= known_score_columns() == {*list_scores(), *TRACKED_SCORES}
