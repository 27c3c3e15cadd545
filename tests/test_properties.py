"""Property-based tests of the math core: morphing, AugConv and key files over random geometries, families, block
sizes, paddings, kernels and channel orders (hypothesis draws them; the example tests pin the cases a reader
knows)."""

from __future__ import annotations

import stat

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from clients.augconv import AugConv, augconv_bytes
from clients.keys import HolderKey, MorphingKeyError
from clients.morphing import morph, unmorph
from clients.secrets import HolderSecrets

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def geometries(draw):
    """A key over a small image, square or not: channels, height, width, padding, family and a block size q that
    divides N."""
    channels = draw(st.sampled_from([1, 2, 3]))
    height, width = draw(st.integers(3, 7)), draw(st.integers(3, 7))
    padding = draw(st.integers(0, 2))
    family = draw(st.sampled_from(["dense", "blocks", "repeated"]))
    size = channels * (height + 2 * padding) * (width + 2 * padding)
    divisors = [q for q in range(2, size + 1) if size % q == 0 and q <= 64]
    q = None if family == "dense" else draw(st.sampled_from(divisors))
    entries = draw(st.sampled_from(["uniform", "integer"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return (channels, height, width), padding, family, q, entries, seed


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


@SETTINGS
@given(geometries(), st.integers(1, 3))
def test_unmorph_inverts_morph(geometry, batch):
    shape, padding, family, q, entries, seed = geometry
    key = HolderKey.generate(shape, family=family, block_size=q, padding=padding, entries=entries, seed=seed)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    morphed = morph(x, key)
    assert morphed.shape == (batch, *key.domain_shape)
    assert relative_error(unmorph(morphed, key), x) < 1e-9
    # Morphing is the row-vector product D M over the domain, image by image.
    domain = torch.nn.functional.pad(x, (padding,) * 4).reshape(batch, -1)
    assert relative_error(morphed.reshape(batch, -1), domain @ key.matrix()) < 1e-9


@SETTINGS
@given(geometries(), st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 3, 5])), st.booleans(),
       st.integers(1, 6), st.data())
def test_augconv_of_the_morphed_image_is_the_convolution_in_the_channel_order(geometry, kernel, bias, out_channels,
                                                                                data):
    shape, padding, family, q, entries, seed = geometry
    key = HolderKey.generate(shape, family=family, block_size=q, padding=padding, entries=entries, seed=seed)
    # Keys over the padded image need the convolution to pad by as much; keys over the image take any padding.
    largest = max(kernel)  # kernels may be taller than wide, or the reverse
    conv_padding = padding if padding else data.draw(st.integers(0, largest // 2), label="conv padding")
    if min(shape[1:]) + 2 * conv_padding < largest:
        conv_padding = (largest - min(shape[1:]) + 1) // 2 + 1
        if padding:
            return
    torch.manual_seed(seed)
    conv = nn.Conv2d(shape[0], out_channels, kernel, padding=conv_padding, bias=bias).double()
    order = data.draw(st.permutations(list(range(out_channels))), label="channel order")
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    augconv = AugConv.from_conv(conv, key, order, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)[:, order]
    assert relative_error(augconv(morph(x, key)), expected) < 1e-9
    assert not any(parameter.requires_grad for parameter in augconv.parameters())


@SETTINGS
@given(geometries())
def test_key_files_round_trip_and_carry_their_holders_tag(tmp_path_factory, geometry):
    shape, padding, family, q, entries, seed = geometry
    key = HolderKey.generate(shape, family=family, block_size=q, padding=padding, entries=entries, seed=seed)
    path = tmp_path_factory.mktemp("keys") / "key.mple"
    owner, stranger = HolderSecrets.from_holder_seed(seed, 0), HolderSecrets.from_holder_seed(seed, 1)
    key.save(path, auth_key=owner.file_key)
    loaded = HolderKey.load(path, image_shape=shape, auth_key=owner.file_key)
    assert loaded == key and loaded.fingerprint == key.fingerprint
    assert (loaded.family, loaded.block_size, loaded.padding, loaded.entries) == (family, key.block_size, padding, entries)
    try:
        HolderKey.load(path, auth_key=stranger.file_key)
    except MorphingKeyError as error:
        assert "authentication tag" in str(error)
    else:
        raise AssertionError("another holder's file key accepted the tag")


@SETTINGS
@given(geometries(), st.sampled_from([1, 3]), st.booleans(), st.integers(1, 4))
def test_augconv_files_round_trip_exactly_and_carry_their_holders_tag(tmp_path_factory, geometry, kernel, bias,
                                                                       out_channels):
    """What a holder reads back is the layer it saved, buffer for buffer, or nothing (it then rebuilds); and the
    memory the run's plan estimates for it before any key is drawn is what it holds."""
    shape, padding, family, q, entries, seed = geometry
    key = HolderKey.generate(shape, family=family, block_size=q, padding=padding, entries=entries, seed=seed)
    conv_padding = padding if padding else kernel // 2
    torch.manual_seed(seed)
    conv = nn.Conv2d(shape[0], out_channels, kernel, padding=conv_padding, bias=bias)
    augconv = AugConv.from_conv(conv, key, list(reversed(range(out_channels))))
    assert augconv.memory_bytes - sum(buffer.numel() * buffer.element_size() for name, buffer in
                                      augconv.named_buffers() if name != "weight") \
        == augconv_bytes(conv, key.domain_shape, family, key.block_size, padding)
    path = tmp_path_factory.mktemp("augconv") / "augconv.pt"
    owner, stranger = HolderSecrets.from_holder_seed(seed, 0), HolderSecrets.from_holder_seed(seed, 1)
    augconv.save(path, auth_key=owner.file_key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # owner-only from the moment it exists
    loaded = AugConv.load(path, auth_key=owner.file_key)
    assert loaded is not None and repr(loaded) == repr(augconv)
    saved, read = dict(augconv.named_buffers()), dict(loaded.named_buffers())
    assert saved.keys() == read.keys()
    assert all(torch.equal(saved[name], read[name]) and saved[name].dtype == read[name].dtype for name in saved)
    x = morph(torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed)), key)
    assert torch.equal(loaded(x), augconv(x))
    assert AugConv.load(path, auth_key=stranger.file_key) is None
    edited = torch.load(path, weights_only=True)
    edited["tensors"]["weight"] = edited["tensors"]["weight"] + 1
    torch.save(edited, path)
    assert AugConv.load(path, auth_key=owner.file_key) is None
