"""AugConv: ``AugConv(morph(x)) == conv(x)[:, order]`` for every key family, against conv2d and the paper's matrices."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients.augconv import AugConv, conv_matrix
from clients.keys import HolderKey, MorphingKeyError
from clients.morphing import morph, unmorph

# Block sizes per (image shape, key padding): one domain row, two rows, half a row, and a block that
# straddles rows without tiling them (for colour images it also crosses channel planes).
BLOCK_SIZES = {
    ((1, 8, 8), 0): (8, 16, 4, 32),  # N = 64
    ((1, 8, 8), 1): (10, 20, 5, 25),  # N = 100
    ((3, 6, 6), 0): (6, 12, 3, 27),  # N = 108
    ((3, 6, 6), 1): (8, 16, 4, 48),  # N = 192
}
KEY_CASES = [("dense", shape, padding, None) for shape, padding in BLOCK_SIZES] + [
    (family, shape, padding, q)
    for family in ("blocks", "repeated")
    for (shape, padding), sizes in BLOCK_SIZES.items()
    for q in sizes
]
CASE_IDS = [f"{family}-{'x'.join(map(str, shape))}-pad{padding}-q{q or 'N'}" for family, shape, padding, q in KEY_CASES]

# First layers: kernel, zero padding for keys over the image as is (keys over the padded image need
# the convolution to pad by the key's padding), bias, output channels, whether a channel order is used.
CONVS = [(3, 1, True, 4, True), (5, 0, False, 6, False), (5, 2, True, 5, True)]
CONV_IDS = ["k3-bias-order", "k5-valid-nobias", "k5-same-bias-order"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error relative to the output's scale, max |expected|."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max())


def make_key(family, shape, padding, q, *, entries="uniform", seed=0) -> HolderKey:
    return HolderKey.generate(shape, family=family, block_size=q, padding=padding, entries=entries, seed=seed)


def make_conv(channels, key_padding, config, dtype=torch.float64, seed=0):
    kernel, padding, bias, out_channels, ordered = config
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, out_channels, kernel, padding=key_padding or padding, bias=bias).to(dtype)
    order = torch.randperm(out_channels, generator=torch.Generator().manual_seed(seed + 1)) if ordered else None
    return conv, order


def images(batch, shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference(conv, x, order) -> torch.Tensor:
    with torch.no_grad():
        out = conv.double()(x.double())
    return out if order is None else out[:, order]


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("config", CONVS, ids=CONV_IDS)
@pytest.mark.parametrize("family, shape, padding, q", KEY_CASES, ids=CASE_IDS)
def test_float64_augconv_equals_conv2d(family, shape, padding, q, config):
    key = make_key(family, shape, padding, q)
    conv, order = make_conv(shape[0], padding, config)
    aug = AugConv.from_conv(conv, key, order, dtype=torch.float64)
    x = images(3, shape)
    out = aug(morph(x, key))
    expected = reference(conv, x, order)
    assert out.dtype == torch.float64 and out.shape == expected.shape
    assert relative_error(out, expected) <= 1e-9


@pytest.mark.parametrize("entries", ["uniform", "integer"])
@pytest.mark.parametrize("family, shape, padding, q", KEY_CASES, ids=CASE_IDS)
def test_float32_augconv_is_close_to_conv2d(family, shape, padding, q, entries):
    key = make_key(family, shape, padding, q, entries=entries, seed=1)
    conv, order = make_conv(shape[0], padding, CONVS[0], dtype=torch.float32)
    aug = AugConv.from_conv(conv, key, order)
    x = images(4, shape, dtype=torch.float32)
    out = aug(morph(x, key))
    assert out.dtype == torch.float32
    assert relative_error(out, reference(conv, x, order)) <= 1e-4


@pytest.mark.parametrize("shape", [(1, 6, 6), (3, 5, 5)])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_conv_matrix_is_the_convolution(shape, kernel, padding):
    weight = torch.randn(4, shape[0], kernel, kernel, dtype=torch.float64)
    x = images(1, shape)
    matrix = conv_matrix(weight, shape, padding)
    expected = F.conv2d(x, weight, padding=padding)
    assert matrix.shape == (x.numel(), expected.numel())
    assert relative_error(x.reshape(-1) @ matrix, expected.reshape(-1)) < 1e-12


@pytest.mark.parametrize("family", ["dense", "blocks", "repeated"])
@pytest.mark.parametrize("shape", [(1, 6, 6), (3, 5, 5)])
@pytest.mark.parametrize("padding", [0, 1])
def test_augconv_is_the_paper_fused_matrix(family, shape, padding):
    """``T^r C^ac`` with ``C^ac = M^-1 C Pi`` built explicitly (paper Algorithm 1) matches AugConv."""
    key = make_key(family, shape, padding, None, seed=2)
    conv, order = make_conv(shape[0], padding, CONVS[0])
    weight, bias = conv.weight.detach(), conv.bias.detach()
    # C over the morphing domain: the padded image (the convolution then adds no padding) or the image as is.
    matrix = conv_matrix(weight, key.domain_shape, 0 if padding else conv.padding)
    out_pixels = matrix.shape[1] // 4
    fused = (key.matrix(inverse=True) @ matrix).reshape(key.size, 4, out_pixels)[:, order].reshape(key.size, -1)
    x = images(2, shape)
    morphed = morph(x, key).reshape(2, -1)
    explicit = morphed @ fused + bias[order].repeat_interleave(out_pixels)
    aug = AugConv.from_conv(conv, key, order, dtype=torch.float64)
    assert relative_error(aug(morph(x, key)).reshape(2, -1), explicit) < 1e-9
    assert relative_error(explicit, reference(conv, x, order).reshape(2, -1)) < 1e-9
    if family == "dense":  # the dense AugConv stores exactly this matrix
        assert aug.weight.shape == fused.shape
        assert relative_error(aug.weight, fused) < 1e-12


@pytest.mark.parametrize("family, shape, padding, q", KEY_CASES[::3], ids=CASE_IDS[::3])
def test_another_holders_key_gives_useless_features(family, shape, padding, q):
    key = make_key(family, shape, padding, q, seed=0)
    other = make_key(family, shape, padding, q, seed=1)
    conv, order = make_conv(shape[0], padding, CONVS[0])
    aug = AugConv.from_conv(conv, key, order, dtype=torch.float64)
    x = images(3, shape)
    assert relative_error(aug(morph(x, key)), reference(conv, x, order)) <= 1e-9
    assert relative_error(aug(morph(x, other)), reference(conv, x, order)) > 0.1


def test_channel_order_permutes_the_output_channels():
    key = make_key("repeated", (3, 6, 6), 1, None)
    conv, _ = make_conv(3, 1, CONVS[0])
    order = [2, 0, 3, 1]
    plain = AugConv.from_conv(conv, key, dtype=torch.float64)
    ordered = AugConv.from_conv(conv, key, order, dtype=torch.float64)
    morphed = morph(images(2, (3, 6, 6)), key)
    assert torch.allclose(ordered(morphed), plain(morphed)[:, order], rtol=0, atol=1e-12)
    assert not torch.allclose(ordered(morphed), plain(morphed))


# --------------------------------------------------------------------------------- structure
def test_structured_keys_store_only_the_nonzero_part():
    shape, kernel, out_channels = (3, 10, 10), 3, 8
    conv = nn.Conv2d(3, out_channels, kernel, padding=1)
    side = 12  # the padded domain
    dense = AugConv.from_conv(conv, make_key("dense", shape, 1, None))
    blocks = AugConv.from_conv(conv, make_key("blocks", shape, 1, None))
    repeated = AugConv.from_conv(conv, make_key("repeated", shape, 1, None))
    # Dense: the whole N x beta*n^2 matrix. Blocks: a weight per output row over its alpha*p input rows.
    # Repeated with q = row width: one shared weight, a 1-D convolution over rows.
    assert tuple(dense.weight.shape) == (3 * side * side, out_channels * 10 * 10)
    assert not blocks.shared and tuple(blocks.weight.shape) == (10, 3 * kernel * side, out_channels * 10)
    assert repeated.shared and tuple(repeated.weight.shape) == (3 * kernel * side, out_channels * 10)
    for aug in (dense, blocks, repeated):
        assert aug.memory_bytes == sum(b.numel() * b.element_size() for b in aug.buffers())
    assert repeated.memory_bytes * 9 < blocks.memory_bytes < dense.memory_bytes / 3
    assert "MiB" in repr(repeated)


# ------------------------------------------------------------------------------------ frozen
@pytest.mark.parametrize("family", ["dense", "blocks", "repeated"])
def test_augconv_is_frozen_and_training_goes_through_it(family):
    key = make_key(family, (3, 6, 6), 1, None)
    conv, order = make_conv(3, 1, CONVS[0])
    aug = AugConv.from_conv(conv, key, order, dtype=torch.float64)
    assert list(aug.parameters()) == []
    assert all(not buffer.requires_grad for buffer in aug.buffers())
    fused = aug.weight.clone()
    head = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.LazyLinear(3)).double()
    model = nn.Sequential(aug, head)
    morphed = morph(images(5, (3, 6, 6)), key)
    head(aug(morphed))  # materialise the lazy layer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in head.parameters()]
    loss = F.cross_entropy(model(morphed), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, head.parameters()))
    assert aug.weight.grad is None and torch.equal(aug.weight, fused)


@pytest.mark.parametrize("family", ["dense", "blocks", "repeated"])
def test_gradient_reaches_the_morphed_input(family):
    key = make_key(family, (1, 6, 6), 0, None)
    conv, order = make_conv(1, 0, CONVS[0])
    aug = AugConv.from_conv(conv, key, order, dtype=torch.float64)
    morphed = morph(images(2, (1, 6, 6)), key).requires_grad_(True)
    upstream = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    (gradient,) = torch.autograd.grad((aug(morphed) * upstream).sum(), morphed)
    # The same function written as unmorph-then-convolve must have the same gradient.
    (expected,) = torch.autograd.grad((conv(unmorph(morphed, key))[:, order] * upstream).sum(), morphed)
    assert relative_error(gradient, expected) < 1e-9


# -------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "conv, message",
    [
        (nn.Conv2d(3, 4, 3, padding=1, stride=2), "stride 1 and dilation 1 only"),
        (nn.Conv2d(3, 4, 3, padding=1, dilation=2), "stride 1 and dilation 1 only"),
        (nn.Conv2d(3, 3, 3, padding=1, groups=3), "groups=1 and zero padding only"),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), "groups=1 and zero padding only"),
        (nn.Conv2d(1, 4, 3, padding=1), "reads 1 channels but the key is for 3-channel images"),
        (nn.Conv2d(3, 4, 3, padding=0), r"morphs images zero-padded by 1 but the convolution pads by \(0, 0\)"),
        (nn.Conv2d(3, 4, 11, padding=1), "leaves no output"),
        (nn.Linear(3, 4), "built from an nn.Conv2d, got Linear"),
    ],
    ids=["stride", "dilation", "groups", "reflect", "channels", "padding", "kernel", "linear"],
)
def test_unsupported_layers_raise_one_line_errors(conv, message):
    key = make_key("repeated", (3, 6, 6), 1, None)
    with pytest.raises(MorphingKeyError, match=message) as excinfo:
        AugConv.from_conv(conv, key)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("family, q", [("dense", None), ("blocks", 3), ("repeated", 3)])
def test_a_kernel_that_leaves_one_output_pixel_is_exact_and_one_that_leaves_none_is_refused(family, q):
    key = make_key(family, (1, 3, 3), 0, q)
    conv, _ = make_conv(1, 0, (3, 0, True, 2, False))
    x = images(2, (1, 3, 3))
    out = AugConv.from_conv(conv, key, dtype=torch.float64)(morph(x, key))
    assert out.shape == (2, 2, 1, 1) and relative_error(out, reference(conv, x, None)) <= 1e-9
    with pytest.raises(MorphingKeyError, match="leaves no output on 3x3 images"):
        AugConv.from_conv(nn.Conv2d(1, 2, 4).double(), key)


def test_even_kernel_with_same_padding_is_refused():
    key = make_key("repeated", (3, 6, 6), 0, None)
    with pytest.raises(MorphingKeyError, match="even kernel"):
        AugConv.from_conv(nn.Conv2d(3, 4, 4, padding="same"), key)


def test_non_finite_layer_is_refused():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(MorphingKeyError, match="NaN or infinite"):
        AugConv.from_conv(conv, make_key("repeated", (3, 6, 6), 1, None))


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 1, 2, 2], [1, 2, 3, 4]], ids=["short", "repeat", "shifted"])
def test_bad_channel_order_is_refused(order):
    key = make_key("repeated", (3, 6, 6), 1, None)
    with pytest.raises(MorphingKeyError, match=r"permutation of 0\.\.3") as excinfo:
        AugConv.from_conv(nn.Conv2d(3, 4, 3, padding=1), key, order)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("shape", [(2, 3, 6, 6), (2, 1, 8, 8), (3, 8, 8)], ids=["unpadded", "channels", "no-batch"])
def test_augconv_refuses_input_that_is_not_morphed_for_it(shape):
    key = make_key("blocks", (3, 6, 6), 1, None)
    aug = AugConv.from_conv(nn.Conv2d(3, 4, 3, padding=1), key)
    with pytest.raises(MorphingKeyError, match=r"expects morphed images of shape \(B, 3, 8, 8\)") as excinfo:
        aug(torch.zeros(shape))
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("chunk_rows", [1, 3, 40], ids=["part-of-a-block", "parts-of-blocks", "several-blocks"])
@pytest.mark.parametrize("family, shape, q", [("dense", (3, 6, 6), None), ("blocks", (1, 8, 8), 16),
                                              ("repeated", (3, 6, 6), 12)])
def test_augconv_built_in_small_chunks_is_exact(monkeypatch, chunk_rows, family, shape, q):
    """The construction runs in chunks of rows of C^ac when it would not fit CONSTRUCTION_CHUNK_BYTES (a dense key
    on 3x32x32 images does); every chunk must land, so build tiny cases in chunks of 1, 3 or 40 rows."""
    import clients.augconv as augconv_module

    key = make_key(family, shape, 0, q, seed=5)
    conv, order = make_conv(shape[0], 0, CONVS[0])
    kernel = conv.kernel_size[0]
    rows = conv.out_channels * (key.block_size // shape[2] + kernel + 2) * shape[2]  # an upper bound of one row's response
    monkeypatch.setattr(augconv_module, "CONSTRUCTION_CHUNK_BYTES", chunk_rows * rows * 8)
    x = images(4, shape)
    chunked = AugConv.from_conv(conv, key, order, dtype=torch.float64)
    assert relative_error(chunked(morph(x, key)), reference(conv, x, order)) < 1e-9
