"""Split models: the reference network's function, channel-order bookkeeping, training with a frozen first conv."""

import pytest
import torch
import torchvision
from torch import nn

from simulation.errors import UsageError
from simulation.models import (
    MODEL_NAMES,
    SmallCNN,
    SplitModel,
    build_model,
    order_sensitive_keys,
    permute_first_layer_channels,
)

FIRST_CONV_PATH = {"cnn": "features.0", "vgg16": "features.0", "vgg16_bn": "features.0", "resnet18": "conv1"}


def reference_model(name: str, in_channels: int, num_classes: int, height: int, width: int) -> nn.Module:
    """The unsplit network, built from torchvision (or SmallCNN) independently of `build_model`.

    Its entries are left uninitialised (built on the meta device, so VGG's big classifier is never
    allocated): the tests load every one of them.
    """
    with torch.device("meta"):
        model = _reference_on_meta(name, in_channels, num_classes, height, width)
    return model.to_empty(device="cpu")


def _reference_on_meta(name: str, in_channels: int, num_classes: int, height: int, width: int) -> nn.Module:
    if name == "cnn":
        return SmallCNN(in_channels, num_classes)
    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    model = getattr(torchvision.models, name)(weights=None)
    model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes)
    )
    pools = [index for index, layer in enumerate(model.features) if isinstance(layer, nn.MaxPool2d)]
    pools_that_fit = min(height, width).bit_length() - 1  # halvings before the map is 1 pixel
    for index in pools[pools_that_fit:]:
        model.features[index] = nn.Identity()
    return model


def randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm distinct per-channel parameters and running statistics, so mix-ups show."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(channels, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)


def evaluation_setup(name: str, in_channels: int = 2, size: int = 8) -> tuple[SplitModel, torch.Tensor]:
    """A float64 model in eval mode with random BN statistics, and a small input batch."""
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    model = build_model(name, in_channels=in_channels, num_classes=5, image_size=size)
    randomize_batch_norms(model, generator)
    model.double().eval()
    return model, torch.randn(3, in_channels, size, size, generator=generator, dtype=torch.float64)


def random_order(channels: int) -> torch.Tensor:
    order = torch.randperm(channels, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(order, torch.arange(channels))
    return order


def assert_differs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    gap = (actual - expected).abs().max().item()
    assert gap > 1e-6 * expected.abs().max().item(), f"outputs agree (max gap {gap:.3g})"


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("in_channels", "size"), [(1, 8), (3, 8), (1, 28), (3, 32), (1, 64), (2, (8, 40))])
def test_split_model_computes_exactly_the_reference_network(name, in_channels, size):
    height, width = (size, size) if isinstance(size, int) else size
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=4, image_size=size)
    randomize_batch_norms(model, torch.Generator().manual_seed(1))
    reference = reference_model(name, in_channels, 4, height, width)
    first_path = FIRST_CONV_PATH[name]
    # Strict loading also checks that the backbone keeps the reference's state_dict names.
    reference.load_state_dict(
        {f"{first_path}.{key}": value for key, value in model.first.state_dict().items()}
        | model.backbone.state_dict()
    )
    assert isinstance(model.backbone.get_submodule(first_path), nn.Identity)
    model.eval()
    reference.eval()
    x = torch.randn(2, in_channels, height, width)
    with torch.no_grad():
        output = model(x)
        expected = reference(x)
    assert output.shape == (2, 4)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("size", "pools"), [(8, 3), (28, 4), (32, 5), (64, 5), ((40, 8), 3)])
@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_vgg_keeps_only_the_max_pools_that_leave_a_pixel(name, size, pools):
    model = build_model(name, in_channels=3, num_classes=2, image_size=size)
    assert sum(isinstance(layer, nn.MaxPool2d) for layer in model.backbone.features) == pools


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_new_model_starts_from_finite_weights_and_fresh_batch_norm_statistics(name):
    model = build_model(name, in_channels=3, num_classes=2, image_size=32)
    for key, value in model.state_dict().items():
        assert torch.isfinite(value).all(), key
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.running_mean, torch.zeros_like(module.running_mean))
            assert torch.equal(module.running_var, torch.ones_like(module.running_var))
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert module.num_batches_tracked.item() == 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_order_sensitive_prefixes_name_channel_indexed_entries(name):
    model = build_model(name, in_channels=3, num_classes=2, image_size=8)
    keys = order_sensitive_keys(model)
    state = model.backbone.state_dict()
    for prefix in model.order_sensitive:
        assert any(key == prefix or key.startswith(prefix + ".") for key in keys), prefix
    for key in keys:
        dim = model.channel_dims[key]
        assert state[key].shape[dim] == model.first.out_channels, key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channel_permutation_keeps_the_function_and_touches_only_order_sensitive_entries(name):
    model, x = evaluation_setup(name)
    with torch.no_grad():
        expected = model(x)
    backbone_before = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    first_before = model.first.weight.clone()
    order = random_order(model.first.out_channels)

    permute_first_layer_channels(model, order)

    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.first.weight, first_before[order])
    sensitive = set(order_sensitive_keys(model))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]) != (key in sensitive), key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_permuting_the_first_conv_alone_changes_the_output(name):
    model, x = evaluation_setup(name)
    with torch.no_grad():
        expected = model(x)
        order = random_order(model.first.out_channels)
        model.first.weight.copy_(model.first.weight[order])
        if model.first.bias is not None:
            model.first.bias.copy_(model.first.bias[order])
        assert_differs(model(x), expected)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_order_sensitive_entry_is_needed(name):
    model, x = evaluation_setup(name)
    original = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    permute_first_layer_channels(model, random_order(model.first.out_channels))
    state = model.backbone.state_dict()
    with torch.no_grad():
        for key in order_sensitive_keys(model):
            permuted = state[key].clone()
            state[key].copy_(original[key])
            assert_differs(model(x), expected)
            state[key].copy_(permuted)
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_sgd_step_trains_the_backbone_with_the_first_conv_frozen(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, num_classes=10, image_size=16).train()
    model.first.requires_grad_(False)
    x = torch.randn(4, 3, 16, 16)
    y = torch.randint(0, 10, (4,))
    assert not model.first(x).requires_grad
    backbone_before = {key: value.detach().clone() for key, value in model.backbone.named_parameters()}
    first_before = model.first.weight.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    assert model.first.weight.grad is None
    assert torch.equal(model.first.weight, first_before)
    for key, parameter in model.backbone.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), key
        assert not torch.equal(parameter, backbone_before[key]), key


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"name": "vgg19"}, "unknown model 'vgg19'"),
        ({"in_channels": 0}, "in_channels"),
        ({"in_channels": 2.0}, "in_channels"),
        ({"num_classes": 1}, "num_classes"),
        ({"image_size": 7}, "image_size"),
        ({"image_size": (32, 7)}, "image_size"),
        ({"image_size": (32, 32, 32)}, "image_size"),
        ({"image_size": "32"}, "image_size"),
    ],
)
def test_build_model_rejects_bad_arguments(arguments, message):
    valid = {"name": "cnn", "in_channels": 1, "num_classes": 2, "image_size": 28}
    with pytest.raises(UsageError, match=message):
        build_model(**(valid | arguments))


@pytest.mark.parametrize("order", [list(range(31)), [0] * 32, list(range(1, 33))])
def test_permutation_rejects_an_order_that_is_not_a_permutation_of_the_channels(order):
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=8)
    with pytest.raises(UsageError, match="permutation of 0..31"):
        permute_first_layer_channels(model, order)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3, stride=2),
        nn.Conv2d(3, 8, 3, dilation=2),
        nn.Conv2d(4, 8, 3, groups=2),
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_split_model_refuses_a_first_conv_that_augconv_cannot_replace(conv):
    with pytest.raises(ValueError, match="AugConv supports only"):
        SplitModel(conv, nn.Identity(), {})
