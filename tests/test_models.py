"""Building and calling classifiers: built-in nets found by name in a fresh process, input adapters, fingerprints."""

import subprocess
import sys

import torch

from datadiet.models import as_model_inputs, build_model, weights_fingerprint


def test_build_model_finds_the_built_in_nets_in_a_fresh_process():
    # timm knows datadiet's nets only once datadiet.nets is imported: build_model must do it (issue #15).
    code = (
        "import sys, torch\n"
        "from datadiet.models import build_model\n"
        "assert 'datadiet.nets' not in sys.modules\n"
        "model = build_model('datadiet_tiny_net', num_classes=10, in_chans=1, seed=0)\n"
        "assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_as_model_inputs_passes_images_by_keyword_only_to_models_that_take_pixel_values():
    class Keyword(torch.nn.Module):
        def forward(self, pixel_values):
            return pixel_values

    x = torch.randn(2, 3)
    assert as_model_inputs(torch.nn.Linear(3, 2), x) is x
    assert as_model_inputs(Keyword(), x)["pixel_values"] is x


def test_weights_fingerprint_follows_the_weights():
    a, b = build_model("test_resnet", num_classes=3, seed=0), build_model("test_resnet", num_classes=3, seed=0)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    assert weights_fingerprint(a) != weights_fingerprint(b)
