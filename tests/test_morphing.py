"""Morphing ``T = D M``: agreement with the dense matrix product, round trips, structure, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients.augconv import AugConv
from clients.keys import HolderKey, MorphingKeyError
from clients.morphing import morph, unmorph

# (family, image shape, padding, block size): rows, several rows, a fraction of a row, and blocks
# that straddle rows or channel planes; every q divides N.
KEY_CASES = [
    ("dense", (1, 6, 6), 0, None),
    ("dense", (3, 5, 5), 1, None),
    ("blocks", (1, 6, 6), 0, 6),
    ("blocks", (1, 6, 6), 1, 16),
    ("blocks", (3, 5, 5), 0, 15),
    ("blocks", (3, 5, 5), 1, 3),
    ("blocks", (3, 6, 6), 0, 27),
    ("repeated", (1, 6, 6), 0, 3),
    ("repeated", (1, 6, 6), 1, 8),
    ("repeated", (3, 5, 5), 0, 25),
    ("repeated", (3, 5, 5), 1, 21),
    ("repeated", (3, 6, 6), 0, 54),
]
CASE_IDS = [f"{family}-{'x'.join(map(str, shape))}-pad{padding}-q{q}" for family, shape, padding, q in KEY_CASES]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max())


def make_key(family, shape, padding, q, *, entries="uniform", seed=0) -> HolderKey:
    return HolderKey.generate(shape, family=family, block_size=q, padding=padding, entries=entries, seed=seed)


def images(batch, shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("family, shape, padding, q", KEY_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("entries", ["uniform", "integer"])
def test_morph_is_the_dense_matrix_product(family, shape, padding, q, entries):
    key = make_key(family, shape, padding, q, entries=entries)
    x = images(3, shape)
    domain = F.pad(x, (padding,) * 4).reshape(3, -1)  # D^r over the (padded) domain
    expected = domain @ key.matrix()
    morphed = morph(x, key)
    assert morphed.shape == (3, *key.domain_shape)
    assert relative_error(morphed.reshape(3, -1), expected) < 1e-12


@pytest.mark.parametrize("family, shape, padding, q", KEY_CASES, ids=CASE_IDS)
def test_unmorph_inverts_morph(family, shape, padding, q):
    key = make_key(family, shape, padding, q)
    x = images(4, shape)
    morphed = morph(x, key)
    assert relative_error(morphed, F.pad(x, (padding,) * 4)) > 0.1  # morphing does change the image
    restored = unmorph(morphed, key)
    assert restored.shape == x.shape
    assert relative_error(restored, x) < 1e-10
    assert relative_error(morph(restored, key), morphed) < 1e-10


@pytest.mark.parametrize("family", ["dense", "blocks", "repeated"])
def test_unmorph_is_the_inverse_matrix_product(family):
    key = make_key(family, (3, 5, 5), 1, None)
    morphed = images(2, key.domain_shape)
    expected = (morphed.reshape(2, -1) @ key.matrix(inverse=True)).reshape(2, *key.domain_shape)[..., 1:-1, 1:-1]
    assert relative_error(unmorph(morphed, key), expected) < 1e-10


@pytest.mark.parametrize("family", ["dense", "blocks", "repeated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_morph_equals_one_image_at_a_time(family, dtype):
    key = make_key(family, (3, 6, 6), 1, None)
    x = images(5, (3, 6, 6), dtype=dtype)
    morphed = morph(x, key)
    assert morphed.dtype == dtype and morphed.shape == (5, 3, 8, 8)
    one_by_one = torch.cat([morph(x[i : i + 1], key) for i in range(5)])
    assert relative_error(morphed, one_by_one) < (1e-6 if dtype == torch.float32 else 1e-14)
    assert morph(x[:0], key).shape == (0, 3, 8, 8)


def test_float32_morph_round_trip_is_close():
    key = make_key("blocks", (3, 6, 6), 1, None)
    x = images(4, (3, 6, 6), dtype=torch.float32)
    assert relative_error(unmorph(morph(x, key), key), x) < 1e-4


def test_padded_morph_mixes_into_the_border():
    # The zero border is added before morphing (MoLe layout), so the morphed border carries data.
    key = make_key("dense", (1, 6, 6), 1, None)
    morphed = morph(images(1, (1, 6, 6)), key)
    border = torch.ones(8, 8, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert morphed[0, 0][border].abs().min() > 0


@pytest.mark.parametrize("family, shape, padding, q", [case for case in KEY_CASES if case[0] != "dense"])
def test_blocks_and_repeated_never_build_the_dense_matrix(monkeypatch, family, shape, padding, q):
    key = make_key(family, shape, padding, q)
    x = images(2, shape)
    expected = F.pad(x, (padding,) * 4).reshape(2, -1) @ key.matrix()

    def refuse(*args, **kwargs):
        raise AssertionError("a dense N x N matrix was built")

    monkeypatch.setattr(HolderKey, "matrix", refuse)
    monkeypatch.setattr(torch, "block_diag", refuse)
    monkeypatch.setattr(torch, "kron", refuse)
    morphed = morph(x, key)
    assert relative_error(morphed.reshape(2, -1), expected) < 1e-12
    assert relative_error(unmorph(morphed, key), x) < 1e-10
    conv = nn.Conv2d(shape[0], 4, 3, padding=1).double()
    aug = AugConv.from_conv(conv, key, dtype=torch.float64)
    assert relative_error(aug(morphed), conv(x)) < 1e-9
    n_by_n = key.size * key.size
    assert key.blocks().numel() < n_by_n and key.blocks(inverse=True).numel() < n_by_n


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.ones(2, 3, 6, 6, dtype=torch.int64), "must be a floating-point torch tensor"),
        (torch.ones(2, 3, 6, 6, dtype=torch.uint8), "must be a floating-point torch tensor"),
        (torch.ones(2, 3, 6, 6).numpy(), "must be a floating-point torch tensor, got ndarray"),
        (torch.ones(3, 6, 6), r"shape \(3, 6, 6\) do not match the key's image shape \(B, 3, 6, 6\)"),
        (torch.ones(2, 1, 6, 6), r"shape \(2, 1, 6, 6\) do not match"),
        (torch.ones(2, 3, 8, 8), r"shape \(2, 3, 8, 8\) do not match"),
        (torch.ones(2, 3, 6, 6).index_fill_(3, torch.tensor([2]), float("nan")), "NaN or infinite"),
        (torch.ones(2, 3, 6, 6).index_fill_(3, torch.tensor([2]), float("inf")), "NaN or infinite"),
    ],
    ids=["int64", "uint8", "numpy", "no-batch", "channels", "padded-size", "nan", "inf"],
)
def test_bad_images_raise_one_line_errors(bad, message):
    key = make_key("blocks", (3, 6, 6), 1, None)
    with pytest.raises(MorphingKeyError, match=message) as excinfo:
        morph(bad, key)
    assert "\n" not in str(excinfo.value)


def test_unmorph_expects_the_domain_shape():
    key = make_key("repeated", (3, 6, 6), 1, None)
    with pytest.raises(MorphingKeyError, match=r"do not match the key's domain shape \(B, 3, 8, 8\)") as excinfo:
        unmorph(torch.ones(2, 3, 6, 6), key)
    assert "\n" not in str(excinfo.value)
