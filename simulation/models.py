"""Models for the MpLe simulation, split into the frozen first convolution and the trainable backbone.

On a data holder the first convolution is replaced by an augmented convolution (AugConv) that gives the
same features from morphed images, possibly with the output channels in a secret order. Federated learning
trains and aggregates the backbone only, so every model here is a `SplitModel`: `model(x) ==
model.backbone(model.first(x))`.

The backbone is the whole network with its first convolution replaced by `nn.Identity`, so its
`state_dict` keys are the reference network's own (torchvision's for VGG and ResNet) minus those of the
first convolution. Beware that VGG-16's backbone starts with an in-place ReLU: hand it a copy of any
first-layer output you want to keep.

The order-sensitive entries (`SplitModel.order_sensitive`) are given as full keys and are the minimal set:
a BatchNorm's `num_batches_tracked` and a convolution's bias are not indexed by the incoming channels, so
they are not in it.

Architectures (`build_model` names):

- `cnn`: a small CNN for CPU runs: conv 3x3 (32 channels) + BN, max-pool, conv 3x3 (64) + BN, max-pool,
  conv 3x3 (128) + BN, adaptive average pool to 2x2, classifier 512 -> 128 -> classes with dropout.
- `vgg16`, `vgg16_bn`: torchvision's VGG-16 adapted to small images the way CIFAR VGGs are: the features
  are unchanged except the first convolution (any number of input channels), the average pool is
  `AdaptiveAvgPool2d(1)` (a no-op on the 1x1 map of a 32x32 input) and the classifier is
  512 -> 512 -> classes (`Linear, ReLU, Dropout(0.5), Linear`) instead of 25088 -> 4096 -> 4096 -> classes,
  which would dwarf the convolutional part at this input size. For images smaller than 32 pixels the
  trailing max-pools that would shrink the map below one pixel are replaced by `nn.Identity` (so the
  `features.N` indices, and with them the state_dict keys, stay torchvision's).
- `resnet18`: torchvision's ResNet-18 in its CIFAR form: `conv1` is 3x3, stride 1, padding 1 (no bias, as in
  torchvision) and there is no max-pool.

Layers are initialised the way torchvision initialises the networks they come from.

With `dp_sgd=True` (`--dp holder`: Opacus computes per-sample gradients, and a BatchNorm mixes the examples of a
batch) every `BatchNorm2d` is a `GroupNorm` of as many channels, with `gcd(32, channels)` groups as Opacus'
`ModuleValidator.fix` chooses, except the norms indexed by the first convolution's output channels, which get one
group per channel: a holder's secret channel order must not change what the model computes, and only one group per
channel (or a single group) is indifferent to the order. Their state_dict keys are the BatchNorms' `weight` and
`bias`, without running statistics. Its ReLUs and ResNet's residual additions are not in place either (Opacus'
backward hooks refuse a layer output modified in place); the function is the same.
"""

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from simulation.errors import UsageError

MODEL_NAMES = ("cnn", "vgg16", "vgg16_bn", "resnet18")
MIN_IMAGE_SIZE = 8

_BN_ENTRIES = ("weight", "bias", "running_mean", "running_var")


class SplitModel(nn.Module):
    """A network split into its first convolution and the rest: `model(x) == backbone(first(x))`.

    `first` must be a plain convolution (stride 1, dilation 1, groups 1, zero padding), the only kind
    AugConv can stand for. `channel_dims` maps each prefix of a backbone state_dict key whose value is
    indexed by the first convolution's output channels to the dimension that carries them;
    `order_sensitive` lists those prefixes. Prefixes match on dot boundaries.
    """

    def __init__(self, first: nn.Conv2d, backbone: nn.Module, channel_dims: Mapping[str, int]):
        super().__init__()
        if not isinstance(first, nn.Conv2d):
            raise TypeError(f"the first layer must be an nn.Conv2d, got {type(first).__name__}")
        if (
            first.stride != (1, 1)
            or first.dilation != (1, 1)
            or first.groups != 1
            or first.padding_mode != "zeros"
        ):
            raise ValueError(
                "AugConv supports only stride 1, dilation 1, groups 1, zero-padded first convolutions, got "
                f"{first}"
            )
        self.first = first
        self.backbone = backbone
        self.channel_dims = dict(channel_dims)
        self.order_sensitive: tuple[str, ...] = tuple(self.channel_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.first(x))


class SmallCNN(nn.Module):
    """The unsplit `cnn` model: three 3x3 conv + BN + ReLU stages with max-pools between, then a small MLP."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(128 * 2 * 2, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int | tuple[int, int], dp_sgd: bool = False
) -> SplitModel:
    """Build model `name` (one of `MODEL_NAMES`) for `in_channels` x `image_size` images, split for MpLe; with
    `dp_sgd`, ready for Opacus' per-sample gradients: GroupNorms for BatchNorms (see the module's docstring).

    Raises `UsageError` for an unknown name, fewer than 1 input channel, fewer than 2 classes or an image
    side under `MIN_IMAGE_SIZE`.
    """
    if name not in MODEL_NAMES:
        raise UsageError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    if not _is_int(in_channels) or in_channels < 1:
        raise UsageError(f"in_channels must be a positive integer, got {in_channels!r}")
    if not _is_int(num_classes) or num_classes < 2:
        raise UsageError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
    height, width = _image_sides(image_size)
    if name == "cnn":
        model = _split_cnn(in_channels, num_classes)
    elif name == "resnet18":
        model = _split_resnet18(in_channels, num_classes, out_of_place=dp_sgd)
    else:
        model = _split_vgg16(
            batch_norm=name == "vgg16_bn",
            in_channels=in_channels,
            num_classes=num_classes,
            height=height,
            width=width,
        )
    if dp_sgd:
        _for_per_sample_gradients(model)
    return model


def _for_per_sample_gradients(model: SplitModel) -> None:
    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, nn.ReLU):
            module.inplace = False
        elif isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            indexed = f"{name}.weight" in model.channel_dims
            groups = channels if indexed else math.gcd(32, channels)
            model.backbone.set_submodule(name, nn.GroupNorm(groups, channels, affine=module.affine))


def order_sensitive_keys(model: SplitModel) -> list[str]:
    """The backbone state_dict keys whose values depend on the order of the first conv's output channels."""
    return [key for key in model.backbone.state_dict() if _matching_prefix(model, key) is not None]


def channel_dim(model: SplitModel, key: str) -> int:
    """The dimension of an order-sensitive backbone entry that is indexed by the first conv's output channels."""
    prefix = _matching_prefix(model, key)
    if prefix is None:
        raise KeyError(f"{key} is not indexed by the first layer's channels")
    return model.channel_dims[prefix]


def permute_first_layer_channels(model: SplitModel, order: Sequence[int] | torch.Tensor) -> None:
    """Reorder the first conv's output channels to `order` without changing the function the model computes.

    Output channel `j` of the first conv becomes its old channel `order[j]`, and every order-sensitive
    backbone entry is reindexed the same way along its channel dimension. Works in place.
    """
    out_channels = model.first.out_channels
    index = torch.as_tensor(order, dtype=torch.long, device=model.first.weight.device).reshape(-1)
    if index.numel() != out_channels or not torch.equal(
        index.sort().values, torch.arange(out_channels, device=index.device)
    ):
        raise UsageError(
            f"the channel order must be a permutation of 0..{out_channels - 1} (the first conv's "
            f"{out_channels} output channels), got {torch.as_tensor(order).tolist()}"
        )
    entries = model.backbone.state_dict(keep_vars=True)
    with torch.no_grad():
        _reindex(model.first.weight, 0, index)
        if model.first.bias is not None:
            _reindex(model.first.bias, 0, index)
        for key in order_sensitive_keys(model):
            _reindex(entries[key], channel_dim(model, key), index)


def _reindex(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    tensor.copy_(tensor.index_select(dim, index))


def _matching_prefix(model: SplitModel, key: str) -> str | None:
    for prefix in model.order_sensitive:
        if under_prefix(key, prefix):
            return prefix
    return None


def under_prefix(name: str, prefix: str) -> bool:
    """Whether state-dict entry `name` belongs to the layer `prefix` ("layer1" holds "layer1.0.weight")."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_sides(image_size: int | tuple[int, int]) -> tuple[int, int]:
    sides = (image_size, image_size) if _is_int(image_size) else image_size
    if (
        not isinstance(sides, (tuple, list))
        or len(sides) != 2
        or not all(_is_int(side) and side >= MIN_IMAGE_SIZE for side in sides)
    ):
        raise UsageError(
            f"image_size must be an integer or a (height, width) pair, each at least {MIN_IMAGE_SIZE}, "
            f"got {image_size!r}"
        )
    return sides[0], sides[1]


def _bn_dims(prefix: str) -> dict[str, int]:
    return {f"{prefix}.{entry}": 0 for entry in _BN_ENTRIES}


def _split_off_first(model: nn.Module, path: str, channel_dims: Mapping[str, int]) -> SplitModel:
    """Take the conv at `path` out of `model` (leaving `nn.Identity`); the rest becomes the backbone."""
    first = model.get_submodule(path)
    model.set_submodule(path, nn.Identity())
    return SplitModel(first, model, channel_dims)


def _split_cnn(in_channels: int, num_classes: int) -> SplitModel:
    model = SmallCNN(in_channels, num_classes)
    return _split_off_first(model, "features.0", {**_bn_dims("features.1"), "features.4.weight": 1})


def _split_vgg16(
    *, batch_norm: bool, in_channels: int, num_classes: int, height: int, width: int
) -> SplitModel:
    # On the meta device the 25088 x 4096 classifier that gets replaced is never allocated (it would make
    # each build take over a second); every layer is then initialised as torchvision initialises VGG.
    with torch.device("meta"):
        import torchvision  # imported when needed: it adds ~1.7 s to every worker process's start

        model = (torchvision.models.vgg16_bn if batch_norm else torchvision.models.vgg16)(
            weights=None, init_weights=False
        )
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )
    model.to_empty(device="cpu")
    for layer in model.modules():
        _init_vgg_layer(layer)
    for index, layer in enumerate(model.features):
        if isinstance(layer, nn.MaxPool2d):
            if height < 2 or width < 2:
                model.features[index] = nn.Identity()
            else:
                height, width = height // 2, width // 2
    if batch_norm:
        channel_dims = {**_bn_dims("features.1"), "features.3.weight": 1}
    else:
        channel_dims = {"features.2.weight": 1}
    return _split_off_first(model, "features.0", channel_dims)


def _init_vgg_layer(layer: nn.Module) -> None:
    """Initialise a VGG layer as `torchvision.models.VGG.__init__` does."""
    if isinstance(layer, nn.Conv2d):
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    elif isinstance(layer, nn.BatchNorm2d):
        layer.reset_parameters()
    elif isinstance(layer, nn.Linear):
        nn.init.normal_(layer.weight, 0, 0.01)
        nn.init.zeros_(layer.bias)


class OutOfPlaceBasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock computing the same, with its residual added out of place: Opacus' backward hooks
    refuse `out += identity` on a layer's output (--dp holder). A BasicBlock becomes one by swapping its class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


def _split_resnet18(in_channels: int, num_classes: int, *, out_of_place: bool = False) -> SplitModel:
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if out_of_place:
        for block in model.modules():
            if isinstance(block, torchvision.models.resnet.BasicBlock):
                block.__class__ = OutOfPlaceBasicBlock
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    # The first conv's channels run through layer1's identity shortcuts: each block's last conv and BN
    # write into that stream, and layer2.0 reads it in both its conv1 and its projection shortcut.
    channel_dims = _bn_dims("bn1")
    for block in ("layer1.0", "layer1.1"):
        channel_dims |= {f"{block}.conv1.weight": 1, f"{block}.conv2.weight": 0, **_bn_dims(f"{block}.bn2")}
    channel_dims |= {"layer2.0.conv1.weight": 1, "layer2.0.downsample.0.weight": 1}
    return _split_off_first(model, "conv1", channel_dims)
