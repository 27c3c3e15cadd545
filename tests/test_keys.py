"""Holder keys: deterministic generation, condition bound, entry distributions, key files, imports, secrecy."""

import io
import json
import re
import stat
import warnings
import zipfile

import numpy as np
import pytest
import torch

from clients.keys import (
    FLOAT32_MAX_CONDITION,
    FORMAT_VERSION,
    HolderKey,
    MorphingKeyError,
    default_max_condition,
)
from simulation.errors import UsageError

FAMILIES = ("dense", "blocks", "repeated")


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def rewrite_key_file(path, *, meta_change=None, blocks_change=None) -> None:
    """Rewrite a saved key file with its metadata and/or blocks altered, keeping a valid zip."""
    with zipfile.ZipFile(path) as archive:
        meta = json.loads(archive.read("meta.json"))
        blocks = np.load(io.BytesIO(archive.read("blocks.npy")))
    if meta_change:
        meta_change(meta)
    if blocks_change:
        blocks = blocks.copy()
        blocks_change(blocks)
    array = io.BytesIO()
    np.save(array, blocks)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("meta.json", json.dumps(meta))
        archive.writestr("blocks.npy", array.getvalue())


def conditioned_matrix(size: int, condition: float, seed: int = 0) -> torch.Tensor:
    """A random matrix whose singular values spread evenly (in log) from 1 to `condition`."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    singular = torch.logspace(0, np.log10(condition), size, dtype=torch.float64)
    return (left * singular) @ right.T


# ------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_the_same_key_and_another_seed_a_different_one(family):
    first = HolderKey.generate((3, 6, 6), family=family, seed=7)
    again = HolderKey.generate((3, 6, 6), family=family, seed=7)
    other = HolderKey.generate((3, 6, 6), family=family, seed=8)
    assert first == again and first.fingerprint == again.fingerprint
    assert torch.equal(first.blocks(), again.blocks())
    assert first != other and first.fingerprint != other.fingerprint


@pytest.mark.parametrize(
    "family, block_size, padding, expected_q, expected_stored",
    [
        ("dense", None, 0, 108, 1),
        ("dense", 108, 0, 108, 1),
        ("dense", None, 1, 192, 1),
        ("blocks", None, 0, 6, 18),  # default: one block per domain row
        ("blocks", None, 1, 8, 24),
        ("blocks", 27, 0, 27, 4),  # a block that spans rows and crosses a channel plane
        ("repeated", None, 0, 6, 1),
        ("repeated", 3, 1, 3, 1),
    ],
)
def test_block_geometry(family, block_size, padding, expected_q, expected_stored):
    key = HolderKey.generate((3, 6, 6), family=family, block_size=block_size, padding=padding, seed=0)
    side = 6 + 2 * padding
    assert key.domain_shape == (3, side, side)
    assert key.size == 3 * side * side
    assert key.block_size == expected_q
    assert key.num_blocks == key.size // expected_q
    assert key.num_distinct_blocks == expected_stored
    assert tuple(key.blocks().shape) == (expected_stored, expected_q, expected_q)


@pytest.mark.parametrize("family", FAMILIES)
def test_matrix_is_block_diagonal_and_inverts(family):
    key = HolderKey.generate((1, 6, 6), family=family, block_size=None if family == "dense" else 9, seed=3)
    matrix, inverse = key.matrix(), key.matrix(inverse=True)
    assert matrix.shape == (36, 36) and matrix.dtype == torch.float64
    assert torch.allclose(matrix @ inverse, torch.eye(36, dtype=torch.float64), atol=1e-9)
    blocks = key.blocks()
    for index in range(key.num_blocks):
        rows = slice(index * 9, (index + 1) * 9) if family != "dense" else slice(None)
        assert torch.equal(matrix[rows, rows], blocks[key.block_for(index)])
    if family != "dense":
        off_diagonal = matrix.clone()
        for index in range(key.num_blocks):
            off_diagonal[index * 9 : (index + 1) * 9, index * 9 : (index + 1) * 9] = 0
        assert not off_diagonal.any()
    if family == "repeated":
        assert torch.equal(matrix, torch.kron(torch.eye(4, dtype=torch.float64), blocks[0]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("entries", ["uniform", "integer"])
def test_default_condition_bound_holds(family, entries):
    key = HolderKey.generate((3, 6, 6), family=family, entries=entries, seed=11)
    assert key.worst_condition <= default_max_condition(key.block_size)
    assert np.allclose(key.condition_numbers, np.linalg.cond(key.blocks().numpy()))
    assert key.expected_float32_error() < 1e-4


@pytest.mark.parametrize("entries", ["uniform", "integer"])
def test_tight_condition_bound_redraws_deterministically(entries):
    unbounded = HolderKey.generate((1, 8, 8), family="blocks", entries=entries, seed=5, max_condition=1e12)
    bound = float(np.median(unbounded.condition_numbers))  # about half the blocks must be redrawn
    bounded = HolderKey.generate((1, 8, 8), family="blocks", entries=entries, seed=5, max_condition=bound)
    assert bounded.worst_condition <= bound < unbounded.worst_condition
    assert bounded != unbounded
    assert bounded == HolderKey.generate((1, 8, 8), family="blocks", entries=entries, seed=5, max_condition=bound)


def test_unreachable_condition_bound_is_refused():
    with pytest.raises(MorphingKeyError, match="raise max_condition") as excinfo:
        HolderKey.generate((1, 4, 4), family="repeated", block_size=4, seed=0, max_condition=1.0)
    one_line_error(excinfo)
    with pytest.raises(MorphingKeyError, match="at least 1"):
        HolderKey.generate((1, 4, 4), seed=0, max_condition=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_entry_distributions(family):
    integer = HolderKey.generate((3, 6, 6), family=family, entries="integer", seed=1).blocks()
    assert torch.equal(integer, integer.round())
    assert integer.min() >= 1 and integer.max() <= 255
    assert len(torch.unique(integer)) > min(200, integer.numel() // 2)  # spread over the range, not a constant
    uniform = HolderKey.generate((3, 6, 6), family=family, entries="uniform", seed=1).blocks()
    assert uniform.min() >= 0 and uniform.max() < 1
    assert not torch.equal(uniform, uniform.round())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(family="blocks", block_size=7), r"q = 7 does not divide N = 108"),
        (dict(family="repeated", block_size=0), r"does not divide N = 108"),
        (dict(family="dense", block_size=6), r"dense key has one 108 x 108 block"),
        (dict(family="sparse"), r"unknown key family 'sparse'"),
        (dict(entries="gaussian"), r"unknown entry distribution 'gaussian'"),
        (dict(seed=-1), r"non-negative integer"),
        (dict(seed=1.5), r"non-negative integer"),
        (dict(padding=-1), r"padding must be a non-negative integer"),
        (dict(image_shape=(6, 6)), r"image_shape must be \(channels, height, width\)"),
    ],
)
def test_bad_generate_arguments_raise_one_line_errors(kwargs, message):
    arguments = dict(image_shape=(3, 6, 6), seed=0) | kwargs
    with pytest.raises(MorphingKeyError, match=message) as excinfo:
        HolderKey.generate(arguments.pop("image_shape"), **arguments)
    one_line_error(excinfo)
    assert isinstance(excinfo.value, UsageError)


def test_block_size_error_lists_valid_choices():
    with pytest.raises(MorphingKeyError) as excinfo:
        HolderKey.generate((1, 4, 4), family="blocks", block_size=5, seed=0)
    assert "choose one of 1, 2, 4, 8, 16" in one_line_error(excinfo)


# ----------------------------------------------------------------------------------- files
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_keeps_the_key(tmp_path, family):
    key = HolderKey.generate((3, 6, 6), family=family, entries="integer", padding=1, seed=2)
    path = key.save(tmp_path / "nested" / "holder.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = HolderKey.load(path, image_shape=(3, 6, 6))
    assert loaded == key
    assert loaded.fingerprint == key.fingerprint
    assert loaded.summary() == key.summary()
    assert [p.name for p in path.parent.iterdir()] == ["holder.key"]  # no temporary file left behind


def test_save_overwrites_and_stays_owner_only(tmp_path):
    path = tmp_path / "holder.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    key = HolderKey.generate((1, 6, 6), seed=0)
    key.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert HolderKey.load(path) == key


def test_loading_a_key_readable_by_others_warns(tmp_path):
    path = HolderKey.generate((1, 6, 6), seed=0).save(tmp_path / "holder.key")
    path.chmod(0o644)
    with pytest.warns(UserWarning, match="chmod 600"):
        HolderKey.load(path)


@pytest.fixture
def saved_key(tmp_path):
    key = HolderKey.generate((3, 6, 6), family="blocks", seed=4)
    return key, key.save(tmp_path / "holder.key")


def test_truncated_key_file_is_refused(saved_key):
    _, path = saved_key
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MorphingKeyError, match="truncated or not a key file") as excinfo:
        HolderKey.load(path)
    one_line_error(excinfo)


@pytest.mark.parametrize("content", [b"", b"not a zip file at all"])
def test_non_key_file_is_refused(tmp_path, content):
    path = tmp_path / "holder.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(MorphingKeyError, match="truncated or not a key file") as excinfo:
        HolderKey.load(path)
    one_line_error(excinfo)


def test_missing_key_file_is_refused(tmp_path):
    with pytest.raises(MorphingKeyError, match="does not exist") as excinfo:
        HolderKey.load(tmp_path / "absent.key")
    one_line_error(excinfo)


def test_flipped_byte_in_the_blocks_is_detected(saved_key):
    key, path = saved_key
    data = bytearray(path.read_bytes())
    last_entry = data.rindex(key.blocks()[-1, -1, -1].numpy().tobytes())  # the last stored key entry
    data[last_entry] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(MorphingKeyError) as excinfo:
        HolderKey.load(path)
    one_line_error(excinfo)


def test_tampered_blocks_fail_the_integrity_check(saved_key):
    _, path = saved_key

    def nudge(blocks):
        blocks[0, 0, 0] += 1e-9

    rewrite_key_file(path, blocks_change=nudge)
    with pytest.raises(MorphingKeyError, match="failed its integrity check") as excinfo:
        HolderKey.load(path)
    one_line_error(excinfo)


def test_tampered_metadata_fails_the_integrity_check(saved_key):
    _, path = saved_key
    rewrite_key_file(path, meta_change=lambda meta: meta.update(padding=1, image_shape=[3, 4, 4]))
    with pytest.raises(MorphingKeyError, match="failed its integrity check"):
        HolderKey.load(path)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, None, "1"])
def test_wrong_format_version_is_refused(saved_key, version):
    _, path = saved_key
    rewrite_key_file(path, meta_change=lambda meta: meta.update(format_version=version))
    with pytest.raises(MorphingKeyError, match="format version") as excinfo:
        HolderKey.load(path)
    one_line_error(excinfo)


def test_key_file_with_wrong_blocks_is_refused(saved_key):
    _, path = saved_key
    with zipfile.ZipFile(path) as archive:
        meta = archive.read("meta.json")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("meta.json", meta)
        array = io.BytesIO()
        np.save(array, np.ones((2, 6, 6), dtype=np.float32))
        archive.writestr("blocks.npy", array.getvalue())
    with pytest.raises(MorphingKeyError, match="invalid") as excinfo:
        HolderKey.load(path)
    one_line_error(excinfo)


def test_key_file_with_extra_entries_is_refused(saved_key):
    _, path = saved_key
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("extra.txt", "hello")
    with pytest.raises(MorphingKeyError, match="not a key file"):
        HolderKey.load(path)


def test_loading_for_other_images_is_refused(saved_key):
    _, path = saved_key
    with pytest.raises(MorphingKeyError, match=r"is for images of shape \(3, 6, 6\), not \(1, 6, 6\)") as excinfo:
        HolderKey.load(path, image_shape=(1, 6, 6))
    one_line_error(excinfo)


# --------------------------------------------------------------------------------- imports
def test_mole_style_matrix_imports_as_a_dense_key():
    # The MoLe code draws torch.rand(N, N) in float32 over the padded image; a 3x10x10 analogue.
    generator = torch.Generator().manual_seed(0)
    matrix = torch.rand(432, 432, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matrix this well conditioned imports silently
        key = HolderKey.from_matrix(matrix, (3, 10, 10), padding=1)
    assert (key.family, key.entries, key.block_size, key.domain_shape) == ("dense", "imported", 432, (3, 12, 12))
    assert torch.equal(key.matrix(), matrix.double())
    assert key.worst_condition == pytest.approx(float(np.linalg.cond(matrix.double().numpy())))
    assert HolderKey.from_matrix(matrix.numpy(), (3, 10, 10), padding=1) == key


def test_badly_conditioned_matrix_imports_with_a_warning():
    matrix = conditioned_matrix(48, 1e6)
    with pytest.warns(UserWarning, match=r"badly conditioned \(condition number 1\.0e\+06\)"):
        key = HolderKey.from_matrix(matrix, (3, 4, 4))
    assert key.expected_float32_error() > 1e-4


def test_matrix_beyond_float32_is_refused():
    with pytest.raises(MorphingKeyError, match="beyond what float32 can carry") as excinfo:
        HolderKey.from_matrix(conditioned_matrix(48, 10 * FLOAT32_MAX_CONDITION), (3, 4, 4))
    one_line_error(excinfo)


@pytest.mark.parametrize("defect", ["repeated row", "zero column"])
def test_singular_matrix_is_refused(defect):
    matrix = torch.rand(36, 36, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if defect == "repeated row":
        matrix[5] = matrix[3]
    else:
        matrix[:, 7] = 0
    with pytest.raises(MorphingKeyError, match="singular") as excinfo:
        HolderKey.from_matrix(matrix, (1, 6, 6))
    one_line_error(excinfo)


@pytest.mark.parametrize(
    "matrix, message",
    [
        (np.eye(36), r"shape \(36, 36\), but images \(1, 6, 6\) with padding 1 need 64 x 64"),
        (np.full((64, 64), np.nan), "NaN or infinite"),
        (np.array([["a"] * 64] * 64), "must be numeric"),
    ],
)
def test_bad_matrix_import_raises_one_line_errors(matrix, message):
    with pytest.raises(MorphingKeyError, match=message) as excinfo:
        HolderKey.from_matrix(matrix, (1, 6, 6), padding=1)
    one_line_error(excinfo)


# ---------------------------------------------------------------------------------- secrecy
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("entries", ["uniform", "integer"])
def test_summary_and_repr_hold_no_key_entries(family, entries):
    key = HolderKey.generate((1, 6, 6), family=family, entries=entries, seed=9)
    summary = key.summary()
    assert set(summary) == {
        "fingerprint", "family", "block_size", "entries", "image_shape", "padding", "domain_shape", "worst_condition"
    }
    json.dumps(summary)  # safe to write to a results folder
    block_entries = key.blocks().flatten().tolist()
    assert summary["worst_condition"] not in block_entries
    if entries == "uniform":
        text = json.dumps(summary) + repr(key)
        assert not any(f"{value:.8f}"[1:] in text for value in block_entries)  # e.g. ".12345678"
    assert len(repr(key)) < 200 and key.fingerprint in repr(key)


def test_fingerprint_is_short_hex_and_follows_every_entry():
    matrix = torch.rand(36, 36, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    key = HolderKey.from_matrix(matrix, (1, 6, 6))
    assert re.fullmatch(r"[0-9a-f]{16}", key.fingerprint)  # 64 bits: cannot carry 1296 entries
    nudged = matrix.clone()
    nudged[35, 35] += 1e-12
    assert HolderKey.from_matrix(nudged, (1, 6, 6)).fingerprint != key.fingerprint
    # The same entries as a key for other images is another key.
    assert HolderKey.from_matrix(matrix, (4, 3, 3)).fingerprint != key.fingerprint


def test_keys_are_not_hashable():
    with pytest.raises(TypeError):
        hash(HolderKey.generate((1, 6, 6), seed=0))
