"""Exact per-example gradient norms (GraNd) against an independent reference: a naive loop running autograd on each
example alone, over every trainable parameter. float32, max relative error 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from datadiet.scores import get_score_spec, per_example_grad_norms

RTOL = 1e-4


def naive_grad_norms(model, inputs, targets, loss_fn=None) -> torch.Tensor:
    """One forward and backward per example, batch of one, model in eval mode; tied parameters counted once."""
    model.eval()
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    norms = []
    for i in range(targets.shape[0]):
        x = {k: v[i : i + 1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[i : i + 1]
        out = model(**x) if isinstance(x, dict) else model(x)
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits, targets[i : i + 1]) if loss_fn is None else loss_fn(logits, targets[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None)))
    return torch.stack(norms)


def assert_matches_naive(model, inputs, targets, **kwargs) -> torch.Tensor:
    ours = per_example_grad_norms(model, inputs, targets, **kwargs)
    reference = naive_grad_norms(model, inputs, targets, kwargs.get("loss_fn"))
    assert ours.shape == targets.shape[:1] and ours.dtype == torch.float32
    assert (reference > 0).all()
    relative = ((ours.double() - reference).abs() / reference).max().item()
    assert relative <= RTOL, f"max relative error {relative:.2e} against the naive loop"
    return ours


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that BatchNorm in eval mode is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext", "test_efficientnet", "resnet18"])
def test_timm_models(name):
    torch.manual_seed(0)
    model = randomise_batchnorm(timm.create_model(name, pretrained=False, num_classes=5))
    assert_matches_naive(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 4, 2]))


def test_transformers_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=4,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config)
    assert_matches_naive(model, {"pixel_values": torch.randn(4, 3, 32, 32)}, torch.tensor([0, 3, 1, 1]))


def test_transformers_resnet():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=4)
    model = randomise_batchnorm(transformers.ResNetForImageClassification(config))
    assert_matches_naive(model, torch.randn(4, 3, 32, 32), torch.tensor([2, 0, 3, 1]))


def test_transformers_bert_padded_batch():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    input_ids = torch.randint(1, 50, (5, 12))
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate([12, 9, 5, 12, 7]):
        input_ids[row, length:] = 0  # padding_idx rows get no gradient
        attention_mask[row, length:] = 0
    input_ids[0, :4] = 7  # a repeated token: its embedding row gets the sum of four gradients
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.zeros(5, dtype=torch.long)}
    ours = assert_matches_naive(model, batch, torch.tensor([0, 2, 1, 1, 0]))
    # Padding must not change an example's norm: the 5-token example alone, unpadded, gives the same value.
    alone = {"input_ids": input_ids[2:3, :5], "attention_mask": attention_mask[2:3, :5]}
    assert torch.allclose(per_example_grad_norms(model, alone, torch.tensor([1])), ours[2:3], rtol=RTOL)


def test_transformers_conv1d_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    model = transformers.GPT2ForSequenceClassification(config)
    assert_matches_naive(model, {"input_ids": torch.randint(1, 50, (4, 10))}, torch.tensor([0, 2, 1, 2]))


def test_frozen_backbone_excluded():
    torch.manual_seed(0)
    model = randomise_batchnorm(timm.create_model("test_resnet", pretrained=False, num_classes=4))
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("fc."))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    ours = assert_matches_naive(model, x, y)
    # Only the head is trainable: ‖∂ℓ/∂W‖² + ‖∂ℓ/∂b‖² = ‖p − onehot‖² (‖features‖² + 1), computed by hand.
    model.eval()
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    error = model.fc(features).softmax(-1) - F.one_hot(y, 4)
    by_hand = (error.square().sum(1) * (features.square().sum(1) + 1)).sqrt()
    assert torch.allclose(ours, by_hand, rtol=RTOL)
    assert [p.requires_grad for p in model.parameters()].count(True) == 2


def test_inplace_relu_after_conv():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(inplace=True), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(6 * 6 * 6, 3),
    )  # fmt: skip
    assert_matches_naive(model, torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1]))


class _WeightStandardisedConv(nn.Conv2d):
    """A weight computed from the parameter at every call (as timm's StdConv2d): gradients must be mapped back."""

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-5
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ManyLayers(nn.Module):
    """Grouped, depthwise, dilated, 'same'- and reflect-padded convolutions, GroupNorm, InstanceNorm, weight
    standardisation, PReLU (no closed form: torch.func fallback), a layer-scale parameter, Conv1d, LayerNorm, a
    Linear called twice, an embedding of fixed ids broadcast over the batch, and a class token."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding="same")
        self.group_norm = nn.GroupNorm(2, 8)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(8, 12, 3, groups=4, stride=2, dilation=2)
        self.standardised = _WeightStandardisedConv(12, 6, 1)
        self.instance_norm = nn.InstanceNorm2d(6, affine=True)
        self.prelu = nn.PReLU(6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.conv1d = nn.Conv1d(6, 5, 3, padding=1)
        self.layer_norm = nn.LayerNorm(5)
        self.shared = nn.Linear(5, 5)
        self.positions = nn.Embedding(7, 5, padding_idx=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = self.group_norm(self.stem(x)).relu()
        x = self.prelu(self.instance_norm(self.standardised(self.grouped(self.depthwise(x)))))
        x = x * self.gamma.view(1, -1, 1, 1)
        x = self.layer_norm(self.conv1d(x.flatten(2)).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.shared(self.shared(x).tanh()) + self.positions(torch.tensor([[1, 2, 3, 1]]))[:, :1]
        return self.head(x.mean(1))


def test_other_layers_and_parameters_not_owned_by_a_layer():
    torch.manual_seed(0)
    assert_matches_naive(_ManyLayers(), torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1]))


def test_tied_parameters_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.mid = nn.Linear(6, 6)
            self.out = nn.Linear(6, 11, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(self.mid(self.embed(ids)).mean(1))

    torch.manual_seed(0)
    model = Tied()
    ids, y = torch.randint(0, 11, (4, 5)), torch.tensor([1, 5, 10, 0])
    ours = assert_matches_naive(model, ids, y)
    # Counting the tied matrix twice (once per use) would give a different, wrong value.
    model.out.weight = nn.Parameter(model.embed.weight.detach().clone())
    untied = per_example_grad_norms(model, ids, y)
    assert not torch.allclose(ours, untied, rtol=1e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_each_norm_is_that_of_the_examples_own_loss(reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    ours = assert_matches_naive(model, x, y, loss_fn=lambda logits, t: F.cross_entropy(logits, t, reduction=reduction))
    assert torch.allclose(ours, per_example_grad_norms(model, x, y), rtol=RTOL)


def test_chunks_and_state_restored():
    torch.manual_seed(0)
    model = randomise_batchnorm(timm.create_model("test_resnet", pretrained=False, num_classes=4))
    model.train()
    model.layer1.eval()
    model.fc.bias.requires_grad_(False)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    whole = per_example_grad_norms(model, x, y)
    chunked = per_example_grad_norms(model, x, y, chunk_size=4)
    assert torch.allclose(whole, chunked, rtol=RTOL)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.eval()
    assert torch.allclose(whole, naive_grad_norms(model, x, y).float(), rtol=RTOL)


def test_batchnorm_with_batch_statistics_is_refused():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.LazyLinear(2)
    )
    model(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="batch statistics"):
        per_example_grad_norms(model, torch.randn(3, 3, 6, 6), torch.tensor([0, 1, 0]))
    assert all(p.requires_grad for p in model.parameters())


def test_time_major_activations_are_refused():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=False)
    model = nn.Sequential(nn.Linear(4, 8), _TimeMajor(layer), nn.Flatten(), nn.Linear(8 * 3, 2))
    with pytest.raises(ValueError, match="batch as the first dimension"):
        per_example_grad_norms(model, torch.randn(5, 3, 4), torch.tensor([0, 1, 0, 1, 1]))


class _TimeMajor(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


def test_registered_as_grand_score():
    spec = get_score_spec("grand")
    assert spec.needs == "gradients" and spec.higher_is_harder
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(spec.fn(model, x, y), naive_grad_norms(model, x, y).float(), rtol=RTOL)


def test_real_cifar10_images(cifar10_train):
    rows = cifar10_train.select(range(16))
    images = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in rows["img"]])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) - 0.5) / 0.25
    y = torch.tensor(rows["label"])
    torch.manual_seed(0)
    model = randomise_batchnorm(timm.create_model("test_resnet", pretrained=False, num_classes=10))
    assert_matches_naive(model, x, y)


@pytest.mark.parametrize(
    "kernel, stride, dilation, padding, size",
    [(3, 1, 1, 1, (8, 8)), (3, 2, 1, 1, (9, 7)), ((3, 2), (2, 1), (1, 2), (1, 0), (7, 7)), (1, 2, 1, 0, (8, 8))],
)
def test_every_convolution_rule_agrees_with_per_example_autograd(kernel, stride, dilation, padding, size):
    # Each per-layer rule (materialised, ghost from patches, ghost from the input's Gram matrix), forced, against the
    # weight gradient of each example alone.
    from datadiet.scores.layer_rules import conv_weight_sq_norms

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, dilation=dilation, padding=padding, bias=False).double()
    x = torch.randn(4, 3, *size, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    reference = torch.stack(
        [
            torch.autograd.grad((conv(x[i : i + 1]) * g[i : i + 1]).sum(), conv.weight)[0].square().sum()
            for i in range(4)
        ]
    )
    pad = conv.padding
    padded = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    for rule in ("materialised", "ghost", "input_gram"):
        ours = conv_weight_sq_norms(padded, g, tuple(conv.weight.shape), conv.stride, conv.dilation, 1, rule)
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0, msg=rule)
