"""What a holder reads back and what it accepts, check by check: key files (permissions, no pickles, layout,
version), secrets files (lengths), and the holder's security floor (its own settings). Each test here was written
against a mutant that the rest of the suite let through (benchmarks/mutation.py)."""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.floor import SecurityFloor
from clients.keys import FAMILIES, HolderKey, MorphingKeyError
from clients.secrets import SECRET_BYTES, HolderSecrets, channel_order, draw_key, provision_holders
from simulation.errors import UsageError


def rewritten(path: Path, **entries: bytes) -> Path:
    """The key file at `path` with some of its entries replaced (a planted or damaged file)."""
    with zipfile.ZipFile(path) as archive:
        content = {name: archive.read(name) for name in archive.namelist()}
    content.update(entries)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in content.items():
            archive.writestr(name, data)
    return path


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


@pytest.fixture
def key_file(tmp_path) -> Path:
    return HolderKey.generate((1, 4, 4), family="blocks", block_size=4, seed=3).save(tmp_path / "key.mple")


def test_a_key_file_others_can_read_is_warned_about_and_an_owner_only_one_is_not(key_file):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HolderKey.load(key_file)  # 0600, as saved
    os.chmod(key_file, 0o640)
    with pytest.warns(UserWarning, match=r"accessible to other users; restrict it with 'chmod 600"):
        HolderKey.load(key_file)


class _Runs:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mple-planted-by-a-key-file",))


def test_a_key_file_holding_a_pickle_is_refused_without_running_it(key_file):
    marker = Path("/tmp/mple-planted-by-a-key-file")
    marker.unlink(missing_ok=True)
    rewritten(key_file, **{"blocks.npy": npy(np.array([_Runs()], dtype=object), allow_pickle=True)})
    with pytest.raises(MorphingKeyError, match="truncated or not a key file"):
        HolderKey.load(key_file)
    assert not marker.exists()


@pytest.mark.parametrize("blocks, refusal", [
    (np.eye(4, dtype=np.float32)[None].repeat(4, 0), "dtype float32"),
    (np.eye(4)[None].repeat(4, 0)[0], "2 dimensions"),
])
def test_a_key_file_with_blocks_of_another_type_or_shape_is_refused(key_file, blocks, refusal):
    rewritten(key_file, **{"blocks.npy": npy(blocks)})
    with pytest.raises(MorphingKeyError, match=f"invalid .*{refusal}"):
        HolderKey.load(key_file)


def test_a_key_file_of_another_format_version_or_entries_is_refused_naming_it(key_file):
    with zipfile.ZipFile(key_file) as archive:
        meta = json.loads(archive.read("meta.json"))
    rewritten(key_file, **{"meta.json": json.dumps({**meta, "format_version": 99}).encode()})
    with pytest.raises(MorphingKeyError, match="format version 99"):
        HolderKey.load(key_file)
    rewritten(key_file, **{"extra.bin": b"x"})
    with pytest.raises(MorphingKeyError, match=r"entries \['blocks.npy', 'extra.bin', 'meta.json'\]"):
        HolderKey.load(key_file)


def test_a_key_file_that_fails_its_fingerprint_names_both(key_file):
    key = HolderKey.load(key_file)
    with zipfile.ZipFile(key_file) as archive:
        meta = json.loads(archive.read("meta.json"))
    rewritten(key_file, **{"meta.json": json.dumps({**meta, "fingerprint": "0" * 16}).encode()})
    with pytest.raises(MorphingKeyError, match=f"fingerprint {key.fingerprint} does not match the recorded 0{{16}}"):
        HolderKey.load(key_file)


def secrets_file(tmp_path, **record) -> Path:
    path = tmp_path / "secrets.json"
    base = {"version": 1, "holder": "ab" * SECRET_BYTES, "federation": None, "source": "entropy"}
    path.write_text(json.dumps({**base, **record}))
    return path


def test_secrets_files_must_hold_secrets_of_the_full_length(tmp_path):
    assert HolderSecrets.load(secrets_file(tmp_path)).federation is None
    assert HolderSecrets.load(secrets_file(tmp_path, federation="cd" * SECRET_BYTES)).federation == b"\xcd" * SECRET_BYTES
    for record in ({"holder": "ab" * (SECRET_BYTES - 1)}, {"federation": "cd" * (SECRET_BYTES - 1)}):
        with pytest.raises(UsageError, match=r"damaged \(wrong secret length\)"):
            HolderSecrets.load(secrets_file(tmp_path, **record))
    with pytest.raises(UsageError, match=r"damaged \(version 7\)"):
        HolderSecrets.load(secrets_file(tmp_path, version=7))


@pytest.mark.parametrize("families, minimum, refusal", [
    (("dense", "planted"), 4, r"key families must be among dense, blocks, repeated, got dense, planted"),
    ((), 4, r"got none"),
    (FAMILIES, 1, r"smallest block size must be an integer of at least 2 .* got 1"),
    (FAMILIES, True, r"got True"),
    (FAMILIES, 4.0, r"got 4.0"),
])
def test_a_holders_floor_refuses_settings_that_are_no_floor(families, minimum, refusal):
    with pytest.raises(UsageError, match=refusal):
        SecurityFloor(families, minimum)


def test_a_nodes_floor_is_read_from_its_node_config_and_the_defaults_fill_what_it_leaves_out():
    assert SecurityFloor.from_node_config({}) == SecurityFloor() == SecurityFloor(FAMILIES, 4)
    assert SecurityFloor.from_node_config({"key-families": " blocks, dense ,", "min-block-size": "16"}) == \
        SecurityFloor(("blocks", "dense"), 16)
    assert SecurityFloor.from_node_config({"key-families": "  ", "min-block-size": 8}) == SecurityFloor(FAMILIES, 8)
    for bad in ("sixteen", None):
        with pytest.raises(UsageError, match=f"node config min-block-size must be an integer, got {bad!r}"):
            SecurityFloor.from_node_config({"min-block-size": bad})
    with pytest.raises(UsageError, match="got planted"):
        SecurityFloor.from_node_config({"key-families": "planted"})


def test_a_floor_of_q_2_is_the_weakest_allowed_and_it_holds():
    floor = SecurityFloor(("blocks",), 2)
    floor.check_key(HolderKey.generate((1, 4, 4), family="blocks", block_size=2, seed=1))
    with pytest.raises(UsageError, match="refuses a repeated key"):
        floor.check_request("repeated", 2, (1, 4, 4), 0)


def test_channel_orders_none_federation_wide_or_per_holder():
    first, second = HolderSecrets.from_holder_seed(5, 0), HolderSecrets.from_holder_seed(5, 1)
    assert channel_order(first, "none", 16).tolist() == list(range(16))
    shared = channel_order(first, "federation", 16)
    assert shared.tolist() == channel_order(second, "federation", 16).tolist() != list(range(16))
    own = channel_order(first, "holder", 16)
    assert own.tolist() != channel_order(second, "holder", 16).tolist()
    assert own.tolist() != shared.tolist() and sorted(own.tolist()) == list(range(16))


def test_a_provision_reads_back_what_it_handed_out_and_says_where_secrets_came_from(tmp_path):
    seeded = provision_holders(tmp_path / "seeded", holder_seed=3)
    assert provision_holders(tmp_path / "seeded") == seeded and seeded.holder_seed is not None
    assert provision_holders(tmp_path / "seeded", holder_seed=3) == seeded
    secrets = seeded.secrets_for(tmp_path / "seeded" / "holder-0000", 0)
    assert secrets.source == "holder-seed" and repr(secrets) == "HolderSecrets(source='holder-seed', federation=yes)"
    drawn = provision_holders(tmp_path / "drawn")
    assert drawn.holder_seed is None and len(bytes.fromhex(drawn.federation_secret)) == SECRET_BYTES
    assert repr(HolderSecrets.fresh()) == "HolderSecrets(source='entropy', federation=no)"
    assert len(HolderSecrets.fresh().holder) == SECRET_BYTES


def test_a_holders_key_is_drawn_with_the_settings_asked_for_from_its_own_secret():
    first, second = HolderSecrets.from_holder_seed(5, 0), HolderSecrets.from_holder_seed(5, 1)
    key = draw_key(first, (1, 6, 6), family="blocks", block_size=4, entries="integer", padding=1)
    assert (key.family, key.block_size, key.entries, key.padding, key.image_shape) == ("blocks", 4, "integer", 1,
                                                                                      (1, 6, 6))
    again = draw_key(first, (1, 6, 6), family="blocks", block_size=4, entries="integer", padding=1)
    other = draw_key(second, (1, 6, 6), family="blocks", block_size=4, entries="integer", padding=1)
    assert again == key and other != key
    assert first.seed("key") != first.seed("order") != first.seed("batches", 1) != first.seed("batches", 2)
    seeds = [HolderSecrets.from_holder_seed(5, holder).seed("key") for holder in range(200)]
    assert all(0 <= seed < 2**63 for seed in seeds) and max(seeds) >= 2**62  # 63 bits, all of them used


@pytest.mark.parametrize("seed", [True, -1, "seven", 1.5])
def test_a_holder_seed_must_be_a_non_negative_integer(seed):
    with pytest.raises(UsageError, match="holder-seed must be a non-negative integer"):
        HolderSecrets.from_holder_seed(seed, 0)


def test_a_holder_without_a_federation_secret_saves_and_reads_its_secrets(tmp_path):
    alone = HolderSecrets.fresh()
    alone.save(tmp_path / "secrets.json")
    assert HolderSecrets.load(tmp_path / "secrets.json") == alone


def test_the_floor_checks_the_keys_own_q_and_counts_pixels_mixed_per_row():
    floor = SecurityFloor(("blocks",), 8)
    with pytest.raises(UsageError, match="q = 4"):
        floor.check_key(HolderKey.generate((1, 8, 8), family="blocks", block_size=4, seed=1))
    pairs = np.zeros((1, 4, 4))
    for row in range(4):  # two pixels mixed in each row: weak, but no permutation
        pairs[0, row, row], pairs[0, row, (row + 1) % 4] = 2.0, 1.0
    SecurityFloor(("repeated",), 4).check_key(HolderKey("repeated", pairs, (1, 2, 2), 0, "uniform"))
    with pytest.raises(UsageError, match="scaled permutations"):
        SecurityFloor(("repeated",), 4).check_key(HolderKey("repeated", 3 * np.eye(4)[None, ::-1], (1, 2, 2), 0,
                                                            "uniform"))


def test_the_condition_number_of_large_blocks_from_eigenvalues_is_the_svds():
    from clients.keys import LARGE_BLOCK, condition_number

    rng = np.random.default_rng(0)
    block = rng.normal(size=(LARGE_BLOCK, LARGE_BLOCK)) + 4 * np.eye(LARGE_BLOCK)
    assert condition_number(block) == pytest.approx(np.linalg.cond(block), rel=1e-6)
    scaled = np.diag(np.linspace(1.0, 250.0, LARGE_BLOCK))
    assert condition_number(scaled) == pytest.approx(250.0, rel=1e-9)
    singular = scaled.copy()
    singular[:, 0] = 0
    assert condition_number(singular) == float("inf")


@pytest.mark.parametrize("shape, blocks, refusal", [
    ((1, 4, 4), np.ones((4, 4, 3)), "must be square"),
    ((1, 4, 4), np.eye(4)[None].repeat(3, 0), "needs 4 stored blocks, got 3"),
    ((1, 4, 4), np.eye(4), "must be square"),
])
def test_a_key_of_blocks_that_do_not_fit_is_refused(shape, blocks, refusal):
    with pytest.raises(MorphingKeyError, match=refusal):
        HolderKey("blocks", blocks, shape, 0, "uniform")


@pytest.mark.parametrize("shape, block_size", [((1, 0, 4), None), ((1, 4.5, 4), None), ((1, 4), None),
                                               ((1, 4, 4), True), ((1, 4, 4), 3), ((1, 4, 4), 0)])
def test_image_shapes_and_block_sizes_that_make_no_key_are_refused(shape, block_size):
    with pytest.raises(MorphingKeyError, match="image_shape must be|block size q"):
        HolderKey.generate(shape, family="blocks", block_size=block_size, seed=0)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_augconv_reads_a_convolutions_padding_given_by_name(padding):
    from clients.augconv import AugConv
    from clients.morphing import morph

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 3, (3, 5), padding=padding).double()
    key = HolderKey.generate((1, 6, 6), family="repeated", seed=2)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    augconv = AugConv.from_conv(conv, key, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(augconv(morph(x, key)), conv(x), atol=1e-9)


def test_the_floor_counts_a_dense_keys_q_as_every_pixel():
    SecurityFloor(("dense",), 64).check_request("dense", None, (1, 8, 8), 0)  # q = N = 64, not the width
    with pytest.raises(UsageError, match="q = 8"):
        SecurityFloor(("blocks",), 64).check_request("blocks", None, (1, 8, 8), 0)


def test_a_key_of_one_pixel_blocks_is_a_key_and_only_the_floor_refuses_it():
    scalar = HolderKey.generate((1, 4, 4), family="blocks", block_size=1, seed=0)
    assert scalar.block_size == 1 and scalar.num_blocks == 16
    with pytest.raises(UsageError, match="q = 1"):
        SecurityFloor(("blocks",), 2).check_key(scalar)
