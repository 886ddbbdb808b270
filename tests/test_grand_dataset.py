"""GraNd through score_dataset on 2,000 real CIFAR-10 rows against a naive per-example autograd loop."""

import numpy as np
import torch

from datadiet import score_dataset
from datadiet.data import build_image_transform
from datadiet.models import build_model


def _naive_grand(model, x, y):
    # Reference: one backward per example, gradient norm over every trainable parameter (BatchNorm in eval mode).
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(x)):
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 1]).double(), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item())
    return np.asarray(norms)


def test_grand_on_2000_cifar10_rows_equals_the_naive_loop(cifar10_train):
    subset = cifar10_train.select(range(2000))
    model = build_model("test_resnet", num_classes=10, seed=7)
    with torch.no_grad():  # give BatchNorm non-trivial running statistics, as a trained model has
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    transform = build_image_transform(mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])
    scored = score_dataset(subset, model, ["grand", "el2n"], transform=transform, batch_size=100)
    x = torch.stack([transform(image) for image in subset["img"]])
    y = torch.as_tensor(np.asarray(subset["label"]))
    expected = _naive_grand(model, x, y)
    got = np.asarray(scored["grand"], dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert got.std() > 0.01 * got.mean()  # really per example, not a constant
