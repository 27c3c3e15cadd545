"""Secrets start at the holder: nothing the server holds determines a holder's key, channel order or local
randomness, and what a holder is told is only its slice of the settings."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.holder import KEY_FILE, holder_home
from clients.keys import HolderKey
from clients.secrets import SECRETS_FILE, HolderSecrets, channel_order, holder_secrets, provision_holders
from simulation.errors import UsageError
from simulation.protocol import CONFIG, HOLDER_FIELDS, SETTINGS, HolderSettings
from simulation.seeds import derive_seed

from .inprocess import run_in_process

HOLDERS = 3


def server_view(run_dir: Path, grid) -> dict:
    """Everything a curious server holds after a run: every message both ways, the run configuration, config.json,
    the first layer, checkpoints and progress files (but nothing under holders/)."""
    files = {path.relative_to(run_dir).as_posix(): path for path in run_dir.rglob("*")
             if path.is_file() and "holders" not in path.relative_to(run_dir).parts}
    return {"messages": grid.log, "config": json.loads((run_dir / "config.json").read_text()), "files": files}


def integers_in(value) -> set[int]:
    """Every integer the server could try as a seed: numbers anywhere in its JSON and its messages' configs. (A
    holder seed is a password: one as small as these would fall to a search, which is why the test's is not.)"""
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, dict):
        return set().union(*(integers_in(item) for item in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(integers_in(item) for item in value)) if value else set()
    if isinstance(value, str):
        try:
            return integers_in(json.loads(value))
        except ValueError:
            return set()
    return set()


def seed_candidates(view: dict) -> set[int]:
    candidates = integers_in(view["config"])
    for message, reply in view["messages"]:
        for content in (message.content, None if reply.has_error() else reply.content):
            if content is not None:
                for record in content.config_records.values():
                    candidates |= integers_in(dict(record))
    return candidates


def try_to_recompute(view: dict, holder: int, image_shape, channels: int) -> tuple[set[str], list[list[int]]]:
    """Every key fingerprint and channel order the server can derive from the seeds it knows, by the experiment's
    own seed derivation and by the holder-seed derivation."""
    config = view["config"]
    fingerprints, orders = set(), []
    for seed in seed_candidates(view):
        derived = [derive_seed(seed, "key", holder)]
        secrets = HolderSecrets.from_holder_seed(seed, holder)
        derived.append(secrets.seed("key"))
        for key_seed in derived:
            key = HolderKey.generate(image_shape, family=config["key_family"], block_size=config["block_size"],
                                     entries=config["key_entries"], seed=key_seed)
            fingerprints.add(key.fingerprint)
        for labels in (("order",), ("order", holder)):
            generator = torch.Generator().manual_seed(derive_seed(seed, *labels))
            orders.append(torch.randperm(channels, generator=generator).tolist())
        orders.append(channel_order(secrets, "holder", channels).tolist())
        orders.append(channel_order(secrets, "federation", channels).tolist())
    return fingerprints, orders


@pytest.mark.parametrize("shuffle", ["federation", "holder"])
@pytest.mark.parametrize("holder_seed", [None, 982451653])
def test_a_curious_server_cannot_recompute_any_holders_key_or_channel_order(tmp_path, shuffle, holder_seed):
    metrics, grid, run = run_in_process(tmp_path, HOLDERS, rounds=1, holder_seed=holder_seed, shuffle=shuffle)
    assert all(row["holders_trained"] == HOLDERS for row in metrics["rounds"])  # the holders really trained
    run_dir = run.settings.run_dir
    view = server_view(run_dir, grid)
    assert {"config.json", "first_layer.pt", "mple/checkpoint.pt"} <= set(view["files"])
    image_shape = run.plan.placement.dataset.image_shape
    channels = run.plan.model.first.out_channels
    for holder in range(HOLDERS):
        home = holder_home(run_dir, holder)
        actual_key = HolderKey.load(home / KEY_FILE)
        actual_order = channel_order(HolderSecrets.load(home / SECRETS_FILE), shuffle, channels).tolist()
        fingerprints, orders = try_to_recompute(view, holder, image_shape, channels)
        assert actual_key.fingerprint not in fingerprints
        assert actual_order not in orders
        assert actual_order != list(range(channels))


def test_what_the_server_sends_a_holder_is_its_slice_of_the_settings(tmp_path):
    _, grid, _ = run_in_process(tmp_path, 2, rounds=1, holder_seed=9, fail_holders=[1], strategy="fedprox",
                                strategy_args={"proximal_mu": 0.1})
    for message, _ in grid.log:
        config = message.content[CONFIG]
        settings = json.loads(str(config[SETTINGS]))
        assert set(settings) == set(HOLDER_FIELDS)
        text = json.dumps({name: value for name, value in dict(config).items()})
        for leaked in ("holder_seed", "fail_holders", "ray_address", "out", "strategy_args", "run-dir", str(tmp_path)):
            assert leaked not in text


def test_two_runs_with_the_same_server_settings_but_other_holder_secrets_get_other_keys(tmp_path):
    def fingerprints(name: str, holder_seed):
        _, _, run = run_in_process(tmp_path / name, 2, rounds=1, holder_seed=holder_seed)
        return [HolderKey.load(holder_home(run.settings.run_dir, h) / KEY_FILE).fingerprint for h in range(2)]

    fresh_a, fresh_b = fingerprints("fresh-a", None), fingerprints("fresh-b", None)
    seeded_1, seeded_1_again, seeded_2 = fingerprints("s1", 1), fingerprints("s1-again", 1), fingerprints("s2", 2)
    assert not set(fresh_a) & set(fresh_b)  # same --seed, no --holder-seed: new keys every run
    assert seeded_1 == seeded_1_again  # the same holder seed repeats them
    assert not set(seeded_1) & set(seeded_2)
    assert len(set(seeded_1)) == 2  # and every holder has its own


def test_secrets_files_are_owner_only_json_and_damage_is_one_clear_error(tmp_path):
    provision = provision_holders(tmp_path / "holders")
    assert stat.S_IMODE((tmp_path / "holders" / "provision.json").stat().st_mode) == 0o600
    secrets = provision.secrets_for(tmp_path / "holders" / "holder-0000", 0)
    path = tmp_path / "holders" / "holder-0000" / SECRETS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert HolderSecrets.load(path) == secrets and secrets.source == "entropy"
    assert secrets.holder.hex() not in repr(secrets)
    assert provision_holders(tmp_path / "holders") == provision  # a resumed run hands out the same
    with pytest.raises(UsageError, match="another holder seed"):
        provision_holders(tmp_path / "holders", holder_seed=3)
    path.write_text('{"version": 1, "holder": "00"}')
    with pytest.raises(UsageError, match="damaged"):
        holder_secrets(path.parent, 0)


def test_a_federation_order_without_a_shared_secret_is_refused():
    with pytest.raises(UsageError, match="shared by the holders"):
        channel_order(HolderSecrets.fresh(), "federation", 8)


def test_holder_settings_refuse_unexpected_or_invalid_fields():
    from simulation.config import build_config

    settings = HolderSettings.from_config(build_config({}), "mple")
    assert HolderSettings.from_json(settings.to_json()) == settings
    extra = json.loads(settings.to_json()) | {"holder_seed": 1}
    with pytest.raises(UsageError, match="unexpected fields"):
        HolderSettings.from_json(json.dumps(extra))
    bad = json.loads(settings.to_json()) | {"key_family": "scalar"}
    with pytest.raises(UsageError, match="key-family"):
        HolderSettings.from_json(json.dumps(bad))


# ------------------------------------------------------------------------------------------ a holder trusts nothing
def holder_parts(tmp_path, **overrides):
    from clients.holder import Holder
    from server.first_layer import initial_model
    from simulation.config import build_config
    from simulation.placement import placement_for

    config = build_config({"holders": 2, **overrides})
    model = initial_model(config, placement_for(config))
    settings = HolderSettings.from_config(config, "mple")
    home = tmp_path / "holder-0000"
    secrets = holder_secrets(home, 0, holder_seed=982451653)

    def open_holder(**kwargs):
        return Holder(0, settings, home, secrets, model.first, torch.device("cpu"), **kwargs)

    return home, secrets, open_holder


def test_a_planted_or_edited_key_file_is_refused(tmp_path):
    import io
    import zipfile

    home, secrets, open_holder = holder_parts(tmp_path)
    planted = HolderKey.generate((1, 8, 8), family="repeated", seed=1)  # a key the attacker knows
    planted.save(home / KEY_FILE)
    with pytest.raises(UsageError, match="authentication tag"):
        open_holder()
    planted.save(home / KEY_FILE, auth_key=HolderSecrets.fresh().file_key)  # tagged, by another secret
    with pytest.raises(UsageError, match="authentication tag"):
        open_holder()
    (home / KEY_FILE).unlink()
    honest = open_holder().key
    with zipfile.ZipFile(home / KEY_FILE) as archive:  # edit the blocks, keep the tag and fingerprint entries
        entries = {name: archive.read(name) for name in archive.namelist()}
    blocks = np.load(io.BytesIO(entries["blocks.npy"]))
    blocks[0, 0, 0] += 1.0
    buffer = io.BytesIO()
    np.save(buffer, blocks)
    meta = json.loads(entries["meta.json"])
    meta["fingerprint"] = HolderKey("repeated", blocks, honest.image_shape, 0, honest.entries).fingerprint
    entries.update({"blocks.npy": buffer.getvalue(), "meta.json": json.dumps(meta, sort_keys=True).encode()})
    with zipfile.ZipFile(home / KEY_FILE, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(UsageError, match="authentication tag"):
        open_holder()


class _Planted:
    """Unpickling this runs code: it writes a marker file."""

    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, on the planted pickle it refuses
def test_a_holder_never_unpickles_a_planted_augconv_file(tmp_path):
    import pickle

    home, secrets, open_holder = holder_parts(tmp_path)
    holder = open_holder()
    (augconv_file,) = home.glob("augconv-*.pt")
    _Planted.marker = str(tmp_path / "marker")
    augconv_file.write_bytes(pickle.dumps(_Planted()))
    reopened = open_holder()
    assert not (tmp_path / "marker").exists()
    assert torch.equal(reopened.first.weight, holder.first.weight)  # rebuilt from the key, and saved again
    assert torch.load(augconv_file, weights_only=True)["tag"]


def test_a_holder_refuses_keys_below_its_own_floor(tmp_path):
    from clients.floor import SecurityFloor

    _, _, open_holder = holder_parts(tmp_path / "a", block_size=1)
    with pytest.raises(UsageError, match="floor refuses a repeated key with q = 1"):
        open_holder()
    _, _, open_holder = holder_parts(tmp_path / "b", key_family="dense")
    with pytest.raises(UsageError, match="floor refuses a dense key"):
        open_holder(floor=SecurityFloor(("blocks", "repeated")))
    permutation = HolderKey.from_matrix(torch.eye(64)[torch.randperm(64)] * 3.0, (1, 8, 8))
    with pytest.raises(UsageError, match="scaled permutations"):
        SecurityFloor().check_key(permutation)


def test_holders_refuse_a_weak_key_the_server_asks_for_and_the_round_counts_them_failed(tmp_path):
    metrics, _, _ = run_in_process(tmp_path, 2, rounds=1, shuffle="holder", block_size=2,
                                   holder_floor=(("repeated",), 4))
    (row,) = metrics["rounds"]
    assert (row["holders_trained"], row["train_failures"]) == (0, 2)
    assert any("floor refuses a repeated key with q = 2" in reason for reason in row["failure_reasons"])


def test_checkpoints_are_owner_only_and_hold_no_pickled_object(tmp_path):
    _, _, run = run_in_process(tmp_path, 2, rounds=1, strategy="fedadam")
    checkpoint = run.settings.run_dir / "mple" / "checkpoint.pt"
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o600
    saved = torch.load(checkpoint, weights_only=True)  # tensors, numbers and strings only
    assert "strategy" not in saved and {"m_t", "v_t"} <= {key.split("/")[0] for key in saved["strategy_tensors"]}


def test_a_federation_secret_from_node_config_must_be_32_bytes_of_hex_and_is_shared(tmp_path):
    shared = "ab" * 32
    first = holder_secrets(tmp_path / "a", 0, federation_secret=shared)
    second = holder_secrets(tmp_path / "b", 1, federation_secret=shared)
    assert first.federation == second.federation == bytes.fromhex(shared) and first.holder != second.holder
    assert torch.equal(channel_order(first, "federation", 16), channel_order(second, "federation", 16))
    for bad in ("ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(UsageError, match="64 hex digits"):
            holder_secrets(tmp_path / f"bad-{len(bad)}-{bad[:2]}", 0, federation_secret=bad)
    assert repr(first) == "HolderSecrets(source='entropy', federation=yes)"


def test_a_holders_last_test_evaluation_is_reused_by_another_worker_for_that_model_only(tmp_path):
    """Ray sends a holder's messages to any worker: the evaluation that round r's evaluate message made is the one
    round r+1's training starts from, wherever it runs, so it is kept in the holder's folder (owner-only)."""
    home, _, open_holder = holder_parts(tmp_path)
    first_worker, second_worker = open_holder(), open_holder()
    assert first_worker.test_evaluation_of(2) is None
    first_worker.remember_test_evaluation(2, 0.5, 0.75)
    assert second_worker.test_evaluation_of(2) == (0.5, 0.75)
    assert second_worker.test_evaluation_of(1) is None and second_worker.test_evaluation_of(3) is None
    assert stat.S_IMODE((home / "test-evaluation-mple.json").stat().st_mode) == 0o600
    (home / "test-evaluation-mple.json").write_text("{damaged")
    assert open_holder().test_evaluation_of(2) is None  # evaluated again, never an error
