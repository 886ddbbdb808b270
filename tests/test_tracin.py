"""TracIn against an independent naive computation: one backward pass per example through plain autograd, every
trainable parameter (BatchNorm's included) read from `.grad`, dot products summed over checkpoints by hand."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from datadiet.scores import per_example_gradients
from datadiet.tracin import TracIn, read_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tests run many tiny operations; on a shared 2-core machine two intra-op threads spend most of their time
    # waiting for each other (measured: 50x slower per-example loops under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _snapshots(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, lrs: list[float]) -> list[dict]:
    """Train `model` a few SGD steps in train mode (BatchNorm running statistics move too); the weights after each
    step are the checkpoints."""
    model = copy.deepcopy(model).train()
    snapshots = []
    for lr in lrs:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snapshots


def _naive_gradients(model: nn.Module, state_dict: dict, inputs, labels, *, skip_batchnorm: bool = False):
    """Per-example gradients the slow, obvious way: a batch of one, `loss.backward()`, read every `.grad`."""
    model = copy.deepcopy(model)
    model.load_state_dict(state_dict)
    model.eval()
    params = [
        p
        for module in model.modules()
        for p in module.parameters(recurse=False)
        if p.requires_grad and not (skip_batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm))
    ]
    rows = []
    for i in range(len(labels)):
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs[i : i + 1]), labels[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.detach().reshape(-1).double() for p in params]))
    return torch.stack(rows)


def _naive_influence(model, snapshots, lrs, train, test, **kwargs) -> np.ndarray:
    total = 0
    for state_dict, lr in zip(snapshots, lrs):
        g_train = _naive_gradients(model, state_dict, *train, **kwargs)
        g_test = _naive_gradients(model, state_dict, *test, **kwargs)
        total = total + lr * (g_test @ g_train.T)
    return total.numpy()


def _small_cnn() -> nn.Module:
    """Convolutions, BatchNorm (whose parameters must be counted) and a linear head, small enough for naive loops."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.fixture(scope="module")
def setup():
    """A small CNN with BatchNorm, 24 training and 5 test images, and two checkpoints."""
    torch.manual_seed(0)
    model = _small_cnn().eval()
    train = (torch.randn(24, 3, 12, 12), torch.randint(0, 4, (24,)))
    test = (torch.randn(5, 3, 12, 12), torch.randint(0, 4, (5,)))
    lrs = [0.5, 0.2]
    snapshots = _snapshots(model, *train, lrs)
    return model, train, test, lrs, snapshots


def test_exact_influence_matches_naive(setup):
    model, train, test, lrs, snapshots = setup
    tracin = TracIn(model, list(zip(snapshots, lrs)), batch_size=7, chunk_size=5)
    got = tracin.influence_matrix(train, test)
    expected = _naive_influence(model, snapshots, lrs, train, test)
    assert got.shape == (5, 24)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())

    result = tracin.influence(train, test, k=3)
    np.testing.assert_array_equal(result.proponents, np.argsort(-expected, axis=1)[:, :3])
    np.testing.assert_array_equal(result.opponents, np.argsort(expected, axis=1)[:, :3])
    np.testing.assert_allclose(result.proponent_influence, np.sort(expected, axis=1)[:, ::-1][:, :3], rtol=1e-4)
    assert (result.opponent_influence[:, 0] < 0).all()  # the strongest opponents raise the test loss


def test_self_influence_counts_batchnorm(setup):
    pytest.importorskip("datadiet.scores.grad_norms", reason="per_example_grad_norms (GraNd issue) not merged yet")
    model, train, _, lrs, snapshots = setup
    tracin = TracIn(model, list(zip(snapshots, lrs)), batch_size=10)
    got = tracin.self_influence(train)
    expected = np.diag(_naive_influence(model, snapshots, lrs, train, train))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # Leaving BatchNorm's parameters out (what a widely used implementation's fast path does) is measurably wrong.
    without_bn = np.diag(_naive_influence(model, snapshots, lrs, train, train, skip_batchnorm=True))
    assert np.abs(without_bn / expected - 1).max() > 1e-3


def test_layer_restriction_matches_naive_on_those_parameters():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    train = (torch.randn(30, 6), torch.randint(0, 3, (30,)))
    test = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    snapshots = _snapshots(model, *train, [0.3])
    tracin = TracIn(model, [(snapshots[0], 0.3)], layers=["3"])
    head = nn.Sequential(*list(model)[:3]).eval()
    head.load_state_dict({k: v for k, v in snapshots[0].items() if not k.startswith("3.")})
    with torch.no_grad():
        features = (head(train[0]), head(test[0]))
    last = nn.Linear(16, 3)
    last.load_state_dict({"weight": snapshots[0]["3.weight"], "bias": snapshots[0]["3.bias"]})
    # The last layer's gradient computed on its own inputs, independently of the full model.
    expected = _naive_influence(last, [last.state_dict()], [0.3], (features[0], train[1]), (features[1], test[1]))
    np.testing.assert_allclose(tracin.influence_matrix(train, test), expected, rtol=1e-4, atol=1e-7)
    expected_self = np.diag(
        _naive_influence(last, [last.state_dict()], [0.3], (features[0], train[1]), (features[0], train[1]))
    )
    np.testing.assert_allclose(tracin.self_influence(train), expected_self, rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # the user's model is not frozen
    with pytest.raises(ValueError, match="match no trainable parameter"):
        TracIn(model, [(snapshots[0], 0.3)], layers=["classifier"])


@pytest.mark.parametrize("projection", ["gaussian", "countsketch"])
def test_random_projection_approximates_exact(setup, projection):
    model, train, test, lrs, snapshots = setup
    tracin = TracIn(model, list(zip(snapshots, lrs)))
    exact = tracin.influence_matrix(train, test)
    approx = [tracin.influence_matrix(train, test, projection_dim=512, projection=projection, seed=s) for s in (0, 1)]
    for estimate in approx:
        error = np.linalg.norm(estimate - exact) / np.linalg.norm(exact)
        assert error < 0.2, error  # ~ 1/sqrt(512) per entry relative to the gradient norms
        correlation = np.corrcoef(estimate.ravel(), exact.ravel())[0, 1]
        assert correlation > 0.95, correlation
    assert not np.allclose(approx[0], approx[1])  # the seed matters: it is a random projection
    same = tracin.influence_matrix(train, test, projection_dim=512, projection=projection, seed=0)
    np.testing.assert_array_equal(same, approx[0])


def test_gaussian_projection_refuses_huge_matrices(setup):
    model, train, test, lrs, snapshots = setup
    tracin = TracIn(model, [(snapshots[0], 1.0)])
    with pytest.raises(ValueError, match="countsketch"):
        tracin.influence_matrix(train, test, projection_dim=4096, max_projection_bytes=2**20)


def test_per_example_gradients_vmap_equals_loop(setup):
    model, train, *_ = setup
    inputs, labels = train[0][:6], train[1][:6]
    vmap = per_example_gradients(model, inputs, labels, method="vmap", chunk_size=4)
    loop = per_example_gradients(model, inputs, labels, method="loop")
    assert vmap.shape == (6, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(vmap, loop, rtol=1e-4, atol=1e-6)


def test_trainer_checkpoint_folders(tmp_path):
    """Real `transformers.Trainer` checkpoints of a timm model trained through ClassifierWrapper: weights under the
    `model.` prefix in model.safetensors, the learning rate in trainer_state.json."""
    import timm
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from datadiet.models import ClassifierWrapper

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    rows = [{"pixel_values": images[i], "labels": labels[i]} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        label_names=["labels"],
        remove_unused_columns=False,
    )
    Trainer(model=ClassifierWrapper(model), args=args, train_dataset=rows).train()
    folders = [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]

    before = [v.clone() for v in model.state_dict().values()]
    tracin = TracIn(model, folders, batch_size=8)
    for folder, lr in zip(folders, tracin.learning_rates):
        state = json.loads((folder / "trainer_state.json").read_text())
        logged = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
        assert lr == pytest.approx(logged[state["global_step"]])
    assert tracin.learning_rates[0] > tracin.learning_rates[1] > 0  # linear decay

    # The reference reads the files itself and strips the wrapper's prefix by hand.
    snapshots = [{k.removeprefix("model."): v for k, v in load_file(f / "model.safetensors").items()} for f in folders]
    test = (images[:3], labels[:3])
    expected = _naive_influence(model, snapshots, tracin.learning_rates, (images, labels), test)
    np.testing.assert_allclose(tracin.influence_matrix((images, labels), test), expected, rtol=1e-4, atol=1e-8)
    # The user's model is left as it was: TracIn loads the checkpoints into a copy.
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before))


def test_learning_rate_required_without_trainer_state(tmp_path):
    from safetensors.torch import save_model

    model = nn.Linear(3, 2)
    save_model(model, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="No learning rate"):
        TracIn(model, [tmp_path])
    assert TracIn(model, [tmp_path], learning_rates=[0.1]).learning_rates == [0.1]
    with pytest.raises(ValueError, match="does not fit the model"):
        TracIn(nn.Linear(4, 2), [tmp_path], learning_rates=[0.1])


class _Payload:
    """Unpickling this object would create a file: the loader must refuse it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_objects_are_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": _Payload(str(marker))}, f, protocol=2)
    with pytest.raises(ValueError, match="not loaded"):
        read_checkpoint(folder)
    assert not marker.exists()

    # A plain state_dict saved with torch.save loads.
    model = nn.Linear(3, 2)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    state_dict, lr = read_checkpoint(folder)
    assert lr is None and torch.equal(state_dict["weight"], model.weight)


def test_the_old_name_load_checkpoint_warns_and_reads_the_same():
    import datadiet.tracin

    with pytest.warns(FutureWarning, match="renamed read_checkpoint"):
        old = datadiet.tracin.load_checkpoint
    assert old is read_checkpoint
    with pytest.raises(AttributeError):
        datadiet.tracin.no_such_name  # noqa: B018


def test_datasets_input_matches_tensors(setup):
    """A `datasets.Dataset` of images goes through the same preprocessing as score_dataset (uint8 -> [0, 1])."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    model, _, _, lrs, snapshots = setup
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 12, 12, 3), dtype=np.uint8)
    labels = [0, 1, 2, 3, 0, 1]
    ds = Dataset.from_dict(
        {"img": [PILImage.fromarray(p) for p in pixels], "label": labels},
        features=Features({"img": Image(), "label": ClassLabel(num_classes=4)}),
    )
    tensors = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, torch.tensor(labels))
    tracin = TracIn(model, list(zip(snapshots, lrs)), batch_size=4)
    np.testing.assert_allclose(
        tracin.influence_matrix(ds, ds.select([0, 5])),
        tracin.influence_matrix(tensors, _take(tensors, [0, 5])),
        rtol=1e-5,
    )


def _take(data, rows):
    return data[0][rows], data[1][rows]


def test_registered_score_through_score_dataset(digits):
    pytest.importorskip("datadiet.scores.grad_norms", reason="per_example_grad_norms (GraNd issue) not merged yet")
    import timm

    from datadiet import score_dataset

    ds = digits["train"].select(range(12))
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=1).eval()
    scored = score_dataset(ds, model, methods=["tracin_self_influence"], batch_size=5)
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32))[None] / 255 for im in ds["image"]])
    labels = torch.tensor(ds["label"])
    expected = np.diag(_naive_influence(model, [model.state_dict()], [1.0], (pixels, labels), (pixels, labels)))
    np.testing.assert_allclose(np.asarray(scored["tracin_self_influence"]), expected, rtol=1e-4)
