"""The holder and its ClientApp one piece at a time, without a federation: its folder, key, batches, kept
evaluation and local state, the ClientApp's helpers and the DP ledger. Fast enough to run per mutant in
`python -m benchmarks.mutation --run holder`."""

from __future__ import annotations

import dataclasses
import json
import math
import stat
import warnings

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from clients import client_app
from clients import holder as holder_module
from clients.client_app import HolderSide, InjectedFailure, _finite, _reply, holder_folder, query, settings_of
from clients.floor import SecurityFloor
from clients.keys import MorphingKeyError
from clients.holder import (
    KEY_FILE,
    Holder,
    HolderCache,
    _permuted_frozen,
    conv_fingerprint,
    holder_folder_name,
    holder_home,
    holder_key,
    key_padding,
    load_own_data,
)
from clients.morphing import morph
from clients.privacy import DPPlan, PrivacyLedger, check_delta, dp_plan
from clients.secrets import HolderSecrets
from server.first_layer import initial_model
from simulation.config import build_config
from simulation.data import DataError, normalize
from simulation.errors import UsageError
from simulation.placement import placement_for
from simulation.run import holder_side
from simulation.models import permute_first_layer_channels
from simulation.protocol import (
    ACTION,
    ARRAYS,
    CONFIG,
    EVAL_ACCURACY,
    HOLDER_ID,
    HOLDER_INFO,
    INITIAL_LOCAL,
    METRICS,
    NUM_EXAMPLES,
    PLAIN_ORDER,
    SERVER_ROUND,
    SETTINGS,
    SPLIT,
    TRAIN_ACCURACY,
    TRAIN_LOSS,
    VAL_ACCURACY,
    HolderSettings,
)
from simulation.run_folder import HOLDERS_FOLDER

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def experiment():
    config = build_config({"holders": 4, "batch_size": 16})
    placement = placement_for(config)
    return config, placement, initial_model(config, placement).first


def make_holder(experiment, home, holder_id=0, variant="mple", seed=0, own_data=None, **changes):
    config, _, first = experiment
    settings = dataclasses.replace(HolderSettings.from_config(config, variant), **changes)
    return Holder(holder_id, settings, home, HolderSecrets.from_holder_seed(seed, holder_id), first, CPU,
                  own_data=own_data)


# ---------------------------------------------------------------- folders, fingerprints, key padding
def test_holder_folders_are_named_by_id_inside_the_run_folder(tmp_path):
    assert holder_folder_name(7) == "holder-0007" and holder_folder_name(12345) == "holder-12345"
    assert holder_home(tmp_path, 3) == tmp_path / HOLDERS_FOLDER / "holder-0003"


def test_a_first_layers_fingerprint_changes_with_each_of_its_weights_bias_kernel_and_padding():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    base = conv_fingerprint(conv)
    assert len(base) == 16 and base == conv_fingerprint(conv)
    variants = []
    for change in ("weight", "bias", "padding", "no bias"):
        other = nn.Conv2d(1, 4, 3, padding=1, bias=change != "no bias")
        other.load_state_dict({name: value for name, value in conv.state_dict().items()
                               if change != "no bias" or name == "weight"})
        with torch.no_grad():
            if change == "weight":
                other.weight[0, 0, 0, 0] += 1e-6
            if change == "bias":
                other.bias[3] += 1e-6
        if change == "padding":
            other.padding = (0, 0)
        variants.append(conv_fingerprint(other))
    assert len({base, *variants}) == 5


def test_key_padding_follows_the_first_layer_or_none():
    assert key_padding("none", nn.Conv2d(1, 2, 3, padding=1)) == 0
    assert key_padding("conv", nn.Conv2d(1, 2, 5, padding=2)) == 2
    assert key_padding("conv", nn.Conv2d(1, 2, 3)) == 0
    for conv in (nn.Conv2d(1, 2, 3, padding=(1, 0)), nn.Conv2d(1, 2, 3, padding="same")):
        with pytest.raises(UsageError, match="equal padding on both axes"):
            key_padding("conv", conv)


# ---------------------------------------------------------------- the key in the holder's folder
def key_inputs(experiment, **changes):
    """What holder_key takes besides a folder, padding and floor: holder 1's mple settings (with `changes`), its
    secrets and the experiment's image shape."""
    config, placement, _ = experiment
    settings = dataclasses.replace(HolderSettings.from_config(config, "mple"), **changes)
    return settings, HolderSecrets.from_holder_seed(0, 1), placement.dataset.image_shape


def test_a_holders_key_is_drawn_once_saved_owner_only_and_read_back(experiment, tmp_path):
    settings, secrets, shape = key_inputs(experiment)
    tmp_path.chmod(0o700)
    drawn = holder_key(settings, secrets, tmp_path, shape, 0, SecurityFloor())
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = path.read_bytes()
    again = holder_key(settings, secrets, tmp_path, shape, 0, SecurityFloor())
    assert path.read_bytes() == written and again.fingerprint == drawn.fingerprint
    assert np.array_equal(again.blocks(), drawn.blocks())
    (tmp_path / "other").mkdir()
    other = holder_key(settings, HolderSecrets.from_holder_seed(0, 2), tmp_path / "other", shape, 0, SecurityFloor())
    assert other.fingerprint != drawn.fingerprint


@pytest.mark.parametrize("change", ["family", "entries", "padding", "block size"])
def test_a_kept_key_made_for_other_settings_is_refused_naming_the_folder(experiment, tmp_path, change):
    settings, secrets, shape = key_inputs(experiment)
    holder_key(settings, secrets, tmp_path, shape, 0, SecurityFloor())
    padding = 0
    if change == "family":
        settings = dataclasses.replace(settings, key_family="blocks")
    elif change == "entries":
        settings = dataclasses.replace(settings, key_entries="integer")
    elif change == "padding":
        padding = 1
    else:
        settings = dataclasses.replace(settings, block_size=4)
    with pytest.raises(UsageError, match=f"holder folder {tmp_path} holds a .* that does not match"):
        holder_key(settings, secrets, tmp_path, shape, padding, SecurityFloor())


def test_a_kept_key_below_the_holders_floor_is_refused_even_if_it_matches(experiment, tmp_path):
    settings, secrets, shape = key_inputs(experiment, block_size=2)
    holder_key(settings, secrets, tmp_path, shape, 0, SecurityFloor(min_block_size=2))
    with pytest.raises(UsageError, match="floor"):
        holder_key(settings, secrets, tmp_path, shape, 0, SecurityFloor(min_block_size=4))


def test_a_kept_key_for_images_of_another_shape_is_refused(experiment, tmp_path):
    settings, secrets, shape = key_inputs(experiment)
    holder_key(settings, secrets, tmp_path, (1, 16, 16), 0, SecurityFloor())
    with pytest.raises(MorphingKeyError, match=r"is for images of shape \(1, 16, 16\), not \(1, 8, 8\)"):
        holder_key(settings, secrets, tmp_path, shape, 0, SecurityFloor())


def test_a_request_below_the_floor_is_refused_before_any_key_is_drawn(experiment, tmp_path, monkeypatch):
    settings, secrets, shape = key_inputs(experiment, block_size=2)
    monkeypatch.setattr(holder_module, "draw_key", lambda *a, **k: pytest.fail("a key was drawn for a refused request"))
    with pytest.raises(UsageError, match="floor refuses a repeated key with q = 2"):
        holder_key(settings, secrets, tmp_path, shape, 0, SecurityFloor())
    assert not (tmp_path / KEY_FILE).exists()


def test_a_holders_key_has_the_block_size_and_padding_its_settings_ask_for(experiment, tmp_path):
    _, _, first = experiment
    asked = make_holder(experiment, tmp_path / "q", block_size=16)
    assert asked.key.block_size == 16 != make_holder(experiment, tmp_path / "default").key.block_size
    padded = make_holder(experiment, tmp_path / "padded", key_padding="conv")
    plain = make_holder(experiment, tmp_path / "plain", variant="baseline")
    assert padded.key.padding == first.padding[0] == 1
    morphed, _ = next(iter(padded.batches("train")()))
    images, _ = next(iter(plain.batches("train")()))
    assert morphed.shape[-1] == images.shape[-1] + 2  # the zero-padded image is morphed
    assert torch.allclose(padded.first(morphed), plain.first(images), atol=1e-4)


# ---------------------------------------------------------------- what a holder hands the training code
def test_batches_are_the_holders_images_morphed_with_its_key_and_the_baseline_sees_them_plain(experiment, tmp_path):
    mple = make_holder(experiment, tmp_path / "a")
    baseline = make_holder(experiment, tmp_path / "b", variant="baseline")
    assert mple.key is not None and baseline.key is None and baseline.fingerprint is None
    assert mple.fingerprint == mple.key.fingerprint
    morphed = list(mple.batches("train")())
    plain = list(baseline.batches("train")())
    assert sum(len(labels) for _, labels in plain) == mple.num_examples("train") == len(mple._indices["train"])
    for (m_images, m_labels), (p_images, p_labels) in zip(morphed, plain, strict=True):
        assert torch.equal(m_labels, p_labels) and len(p_labels) <= 16
        assert torch.allclose(m_images, morph(p_images, mple.key), atol=1e-5)
        assert not torch.allclose(m_images, p_images)
    # The AugConv on morphed images gives the plain layer's features, in the holder's channel order.
    features = mple.first(morphed[0][0])
    assert torch.allclose(features, baseline.first(plain[0][0]), atol=1e-4)
    with pytest.raises(ValueError, match="split must be one of"):
        mple.batches("validation")


def test_a_shuffle_seed_draws_the_order_and_the_same_seed_the_same_order(experiment, tmp_path):
    holder = make_holder(experiment, tmp_path)
    labels = lambda seed: torch.cat([y for _, y in holder.batches("train", shuffle_seed=seed)()])  # noqa: E731
    ordered = torch.cat([y for _, y in holder.batches("train")()])
    assert torch.equal(labels(3), labels(3)) and not torch.equal(labels(3), labels(4))
    assert not torch.equal(labels(3), ordered) and torch.equal(labels(3).sort().values, ordered.sort().values)


def test_the_baseline_first_layer_is_the_plain_one_in_the_holders_channel_order_and_frozen(experiment):
    _, _, first = experiment
    order = torch.tensor([2, 0, 1] + list(range(3, first.out_channels)))
    frozen = _permuted_frozen(first, order)
    assert torch.equal(frozen.weight, first.weight[order]) and torch.equal(frozen.bias, first.bias[order])
    assert not frozen.weight.requires_grad and not frozen.bias.requires_grad
    assert first.weight.requires_grad and frozen is not first
    no_bias = nn.Conv2d(1, 3, 3, bias=False)
    assert _permuted_frozen(no_bias, torch.tensor([1, 2, 0])).bias is None


def test_the_holders_seeds_are_its_secrets_and_differ_by_purpose(experiment, tmp_path):
    holder = make_holder(experiment, tmp_path, seed=5)
    assert holder.local_seed("batches", 2) == HolderSecrets.from_holder_seed(5, 0).seed("batches", 2)
    assert len({holder.local_seed("batches", 2), holder.local_seed("batches", 3), holder.local_seed("dropout", 2)}) == 3


def test_poisson_batches_take_each_image_with_the_sample_rate(experiment, tmp_path):
    holder = make_holder(experiment, tmp_path)
    train = holder.num_examples("train")
    everything = list(holder.poisson_batches(1.0, 3, seed=0)())
    assert len(everything) == 3 and all(len(labels) == train for _, labels in everything)
    nothing = list(holder.poisson_batches(0.0, 2, seed=0)())
    assert len(nothing) == 2 and all(images.numel() == 0 and labels.numel() == 0 and labels.dtype == torch.long
                                     for images, labels in nothing)
    sizes = [len(labels) for _, labels in holder.poisson_batches(0.5, 40, seed=1)()]
    assert abs(np.mean(sizes) - 0.5 * train) < 4 * math.sqrt(0.25 * train / 40) and len(set(sizes)) > 1
    first = [labels for _, labels in holder.poisson_batches(0.5, 3, seed=2)()]
    second = [labels for _, labels in holder.poisson_batches(0.5, 3, seed=2)()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    augmented = make_holder(experiment, tmp_path / "augmented", augment=True)
    draws = [[images for images, _ in augmented.poisson_batches(0.5, 2, seed=3)()] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*draws, strict=True))  # augmentation too comes from the seed
    plain_first = next(iter(make_holder(experiment, tmp_path / "plain").poisson_batches(0.5, 1, seed=3)()))
    augmented_first = next(iter(augmented.poisson_batches(0.5, 1, seed=3)()))
    assert torch.equal(plain_first[1], augmented_first[1])  # the same images chosen, in the same order,
    assert not torch.equal(plain_first[0], augmented_first[0])  # augmented


# ---------------------------------------------------------------- what a holder keeps in its folder
def test_a_test_evaluation_is_kept_for_its_model_round_and_read_by_another_process(experiment, tmp_path):
    holder = make_holder(experiment, tmp_path)
    assert holder.test_evaluation_of(0) is None
    holder.remember_test_evaluation(2, 0.25, 0.75)
    path = tmp_path / "test-evaluation-mple.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"round": 2, "loss": 0.25, "accuracy": 0.75}
    assert holder.test_evaluation_of(2) == (0.25, 0.75) and holder.test_evaluation_of(1) is None
    other = make_holder(experiment, tmp_path)  # another worker's copy of the same holder
    assert other.test_evaluation_of(2) == (0.25, 0.75) and other.test_evaluation_of(3) is None
    holder.remember_test_evaluation(3, 0.5, 0.5)
    assert other.test_evaluation_of(3) == (0.5, 0.5)  # its own copy was stale: it reads the folder
    assert make_holder(experiment, tmp_path, variant="baseline").test_evaluation_of(3) is None
    for damage in ("{not json", '{"round": 3}', '{"round": "x", "loss": 1, "accuracy": 1}'):
        path.write_text(damage)
        assert make_holder(experiment, tmp_path).test_evaluation_of(3) is None


def test_local_state_keeps_the_last_two_rounds_and_loads_the_latest_before_a_round(experiment, tmp_path, monkeypatch):
    holder = make_holder(experiment, tmp_path)
    assert holder.load_local_state(5) is None
    for server_round in (1, 2, 3):
        holder.save_local_state(server_round, {"w": torch.full((2,), float(server_round), requires_grad=True)})
    kept = sorted(path.name for path in tmp_path.glob("local-*"))
    assert kept == ["local-mple-r00002.pt", "local-mple-r00003.pt"]
    assert all(stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600 for name in kept)
    assert holder.load_local_state(3)["w"].tolist() == [2.0, 2.0]
    assert holder.load_local_state(4)["w"].tolist() == [3.0, 3.0]
    assert holder.load_local_state(99)["w"].tolist() == [3.0, 3.0]
    assert holder.load_local_state(2) is None
    assert make_holder(experiment, tmp_path, variant="baseline").load_local_state(9) is None
    holder.save_local_state(10, {"w": torch.zeros(1)})
    assert [p.name for p in sorted(tmp_path.glob("local-*"))] == ["local-mple-r00010.pt"]
    # Another worker training the same holder may remove an old file between the listing and the removal.
    monkeypatch.setattr(Holder, "_saved_rounds", lambda self: [4, 10])
    holder.save_local_state(11, {"w": torch.ones(1)})
    assert torch.load(holder.local_state_path(11), weights_only=True)["w"].tolist() == [1.0]


def test_the_holder_cache_keeps_the_most_recently_used(experiment):
    created = []
    cache = HolderCache(2)
    for name in ("a", "b", "a", "c", "a", "b"):
        assert cache.get(name, lambda: created.append(name) or name.upper()) == name.upper()
    assert created == ["a", "b", "c", "b"] and len(cache) == 2
    assert HolderCache(1).get("x", lambda: 1) == 1


def test_an_augconv_is_built_once_and_read_back_from_the_holders_folder(experiment, tmp_path, monkeypatch):
    first = make_holder(experiment, tmp_path)
    files = list(tmp_path.glob("augconv-*.pt"))
    assert len(files) == 1 and first.first_layer_fingerprint in files[0].name and first.fingerprint in files[0].name
    from clients import augconv

    monkeypatch.setattr(augconv.AugConv, "from_conv", lambda *a, **k: pytest.fail("AugConv built again"))
    again = make_holder(experiment, tmp_path)
    sample = next(iter(first.batches("train")()))[0]
    assert torch.equal(again.first(sample), first.first(sample))


# ---------------------------------------------------------------- the ClientApp's pieces
def as_server_app() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # a Message needs the sending task's


def message_with(config: dict, node_id: int = 5) -> Message:
    as_server_app()
    return Message(content=RecordDict({CONFIG: ConfigRecord(config)}), dst_node_id=node_id, message_type="query")


def test_settings_are_parsed_once_per_text_and_validated(experiment):
    config, _, _ = experiment
    text = HolderSettings.from_config(config, "mple").to_json()
    parsed = settings_of(message_with({SETTINGS: text}))
    assert parsed == HolderSettings.from_config(config, "mple")
    assert settings_of(message_with({SETTINGS: text})) is parsed
    with pytest.raises(UsageError, match="not JSON"):
        settings_of(message_with({SETTINGS: "{"}))


def test_a_holders_folder_is_chosen_on_its_side_only(tmp_path, monkeypatch):
    def context(node_config):
        return Context(run_id=42, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    side = HolderSide(holders_root=str(tmp_path / "root"))
    assert holder_folder(context({"holder-dir": "~/mine"}), side, 3) == (tmp_path / "x").home() / "mine"
    assert holder_folder(context({"holder-dir": ""}), side, 3) == tmp_path / "root" / "holder-0003"
    assert holder_folder(context({}), HolderSide(), 3) == tmp_path / "flwr" / "mple-holders" / "run-42" / "holder-0003"
    monkeypatch.delenv("FLWR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert holder_folder(context({}), HolderSide(), 3) == tmp_path / "home" / ".flwr" / "mple-holders" / "run-42" / \
        "holder-0003"


def test_replies_carry_the_metrics_and_the_holder_and_arrays_only_when_given():
    incoming = message_with({"x": 1})
    reply = _reply(incoming, None, {"loss": 0.5}, 4)
    assert set(reply.content) == {METRICS, HOLDER_INFO}
    assert dict(reply.content[METRICS]) == {"loss": 0.5} and reply.content[HOLDER_INFO][HOLDER_ID] == 4
    assert reply.metadata.reply_to_message_id == incoming.metadata.message_id
    assert _finite(float("nan")) == 0.0 and _finite(0.25) == 0.25 and _finite(1) == 1.0
    assert isinstance(_finite(1), float) and isinstance(MetricRecord({"a": _finite(1)})["a"], float)


def test_identify_names_the_holder_and_an_unknown_query_is_refused():
    context = Context(run_id=1, node_id=9, node_config={"partition-id": 6}, state=RecordDict(), run_config={})
    reply = query(message_with({ACTION: "identify"}), context, HolderSide())
    assert set(reply.content) == {HOLDER_INFO} and reply.content[HOLDER_INFO][HOLDER_ID] == 6
    with pytest.raises(ValueError, match="unknown query action 'leak'"):
        query(message_with({ACTION: "leak"}), context, HolderSide())


def test_injected_failures_fire_for_the_listed_holders_at_the_listed_stage_only():
    job = object.__new__(client_app.HolderJob)
    job.side, job.holder_id = HolderSide(fail_holders=(2,), fail_stage="evaluate"), 2
    job.fail_if_injected("train")
    with pytest.raises(InjectedFailure, match="holder 2 failed on purpose during evaluate"):
        job.fail_if_injected("evaluate")
    job.holder_id = 3
    job.fail_if_injected("evaluate")


# ---------------------------------------------------------------- DP-SGD's plan and ledger
def test_delta_must_be_below_one_over_the_holders_images():
    check_delta(0.0099, 100)
    with pytest.raises(UsageError, match=r"--dp-delta 0.01 is not below 1 / 100 .* use --dp-delta 0.001"):
        check_delta(0.01, 100)


def test_a_dp_plan_samples_batch_over_images_for_ceil_steps(experiment):
    config, _, _ = experiment
    settings = HolderSettings(**{**HolderSettings.from_config(config, "mple").__dict__, "batch_size": 16,
                                 "dp_noise": 1.5, "dp_clip": 0.75, "dp_delta": 1e-5, "dp_epsilon": None})
    plan = dp_plan(settings, 100)
    assert plan == DPPlan(0.16, 7, 1.5, 0.75, 1e-5, 100) and plan.expected_batch_size == pytest.approx(16)
    assert dp_plan(settings, 10).sample_rate == 1.0 and dp_plan(settings, 10).steps_per_epoch == 1
    assert dp_plan(settings, 16).steps_per_epoch == 1 and dp_plan(settings, 17).steps_per_epoch == 2


def test_the_ledger_accumulates_rounds_replaces_a_round_trained_again_and_refuses_damage(tmp_path):
    path = tmp_path / "dp-mple.json"
    assert PrivacyLedger(path).epsilon(1e-5) == 0.0 and PrivacyLedger(path).history == []
    plan = DPPlan(0.1, 10, 1.0, 1.0, 1e-5, 100)
    ledger = PrivacyLedger(path)
    ledger.record(1, plan, 10)
    one = ledger.epsilon(1e-5)
    PrivacyLedger(path).record(2, plan, 10)  # another worker's copy of the same holder
    ledger.record(3, DPPlan(0.2, 5, 2.0, 1.0, 1e-5, 100), 5)
    assert ledger.history == [(1.0, 0.1, 10), (1.0, 0.1, 10), (2.0, 0.2, 5)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["rounds"]["3"] == [2.0, 0.2, 5]
    three = PrivacyLedger(path).epsilon(1e-5)
    assert 0 < one < three
    ledger.record(3, DPPlan(0.2, 5, 2.0, 1.0, 1e-5, 100), 5)
    assert PrivacyLedger(path).epsilon(1e-5) == three and len(PrivacyLedger(path).history) == 3
    record = json.loads(path.read_text())
    for damage in ({**record, "version": 2}, {**record, "accountant": "prv"}, {**record, "rounds": {"1": [1, 0, 1]}},
                   {**record, "rounds": {"1": [-1, 0.1, 1]}}, {**record, "rounds": {"1": [1, 1.5, 1]}},
                   {**record, "rounds": {"1": [1, 0.1, -1]}}, {"version": 1}, [1]):
        path.write_text(json.dumps(damage))
        with pytest.raises(UsageError, match=f"the privacy accountant {path} cannot be read"):
            PrivacyLedger(path)
    path.write_text(json.dumps({**record, "rounds": {"1": [0, 1.0, 0]}}))
    assert PrivacyLedger(path).history == [(0.0, 1.0, 0)]


def test_a_target_epsilon_calibrates_the_noise_for_every_step_of_the_run(experiment):
    from opacus.accountants import RDPAccountant

    config, _, _ = experiment
    base = {**HolderSettings.from_config(config, "mple").__dict__, "batch_size": 10, "dp_delta": 1e-4, "rounds": 2,
            "local_epochs": 3, "dp_noise": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the search's notice about its largest RDP order is Opacus' and expected
        plan = dp_plan(HolderSettings(**{**base, "dp_epsilon": 4.0}), 100)
    assert plan.noise_multiplier > 0.1 and plan.steps_per_epoch == 10 and plan.sample_rate == 0.1
    accountant = RDPAccountant()
    accountant.history = [(plan.noise_multiplier, 0.1, 2 * 3 * 10)]
    assert 3.9 < accountant.get_epsilon(delta=1e-4) <= 4.0  # spent over rounds x epochs x steps, at most the target
    with pytest.raises(UsageError, match=r"--dp-epsilon 1e-06 is too small for 60 DP-SGD steps at sample rate 0.1"):
        dp_plan(HolderSettings(**{**base, "dp_epsilon": 1e-6}), 100)


# ---------------------------------------------------------------- a holder's own data (node config `dataset`)
def own_npz(path, images, labels):
    np.savez(path, train_images=images, train_labels=labels, test_images=images[:2], test_labels=labels[:2])
    return f"npz:{path}"


def test_a_holders_own_data_is_read_with_the_experiments_size_and_folder_and_never_downloaded(tmp_path):
    config = build_config({"holders": 2, "image_size": 8})
    settings = HolderSettings.from_config(config, "mple")
    digits = placement_for(config).dataset
    larger = np.repeat(np.repeat(digits.train.images[:6, 0], 2, axis=1), 2, axis=2)  # 16x16: resized to the 8x8
    own = load_own_data(own_npz(tmp_path / "own.npz", larger, np.arange(6) % 10), settings, digits)
    assert own.image_shape == digits.image_shape and len(own.train) == 6
    on_the_edge = own_npz(tmp_path / "edge.npz", digits.train.images[:4, 0], np.full(4, digits.num_classes))
    with pytest.raises(UsageError, match=f"label {digits.num_classes}; .* has {digits.num_classes} classes"):
        load_own_data(on_the_edge, settings, digits)
    # A MedMNIST spec is looked for in the run's data folder, and a holder never downloads.
    empty = dataclasses.replace(settings, data_dir=str(tmp_path))
    with pytest.raises(DataError, match=f"{tmp_path / 'breastmnist.npz'} not found and download is off"):
        load_own_data("medmnist:breastmnist", empty, digits)


def test_a_holder_with_its_own_data_trains_and_tests_on_its_own_images(experiment, tmp_path):
    _, placement, _ = experiment
    digits = placement.dataset
    images, labels = digits.train.images[-6:, 0], (np.arange(6) + 3) % digits.num_classes
    spec = own_npz(tmp_path / "own.npz", images, labels)
    holder = make_holder(experiment, tmp_path / "holder", holder_id=1, variant="baseline", own_data=spec)
    own = load_own_data(spec, holder.settings, digits)
    for split, expected in (("train", own.train), ("test", own.test)):
        batches = list(holder.batches(split)())
        assert holder.num_examples(split) == len(expected)
        assert torch.equal(torch.cat([y for _, y in batches]), torch.as_tensor(expected.labels))
        normalised = normalize(torch.as_tensor(expected.images), digits.mean, digits.std)
        assert torch.equal(torch.cat([x for x, _ in batches]), normalised)
    assert holder.num_examples("global") == len(placement.official_test(1))


def test_a_fresh_worker_process_sets_torchs_threads_once_and_fills_its_caches(tmp_path, monkeypatch):
    from tests.inprocess import run_in_process

    fresh = client_app._ProcessState()
    assert (fresh.holders, fresh.skeletons, fresh.settings, fresh.threads_set) == (None, {}, {}, False)
    monkeypatch.setattr(client_app, "_STATE", fresh)
    calls = []
    monkeypatch.setattr(client_app.torch, "set_num_threads", calls.append)
    run_in_process(tmp_path, 2, rounds=1, cpus_per_holder=1)
    assert calls == [1] and fresh.threads_set
    assert len(fresh.holders) == 2 and len(fresh.skeletons) == 1 and len(fresh.settings) == 1


# ---------------------------------------------------------------- a message's model, assembled on the holder's side
def assembling(holder, model, message_type, server_round, received, initial_local, plain_order=None):
    job = object.__new__(client_app.HolderJob)
    job.holder, job.model, job.backbone = holder, model, model.backbone
    job.message_type, job.server_round, job.received = message_type, server_round, received
    config = {} if plain_order is None else {PLAIN_ORDER: plain_order}
    as_server_app()
    message = Message(content=RecordDict({CONFIG: ConfigRecord(config), INITIAL_LOCAL: ArrayRecord(initial_local)}),
                      dst_node_id=1, message_type=message_type)
    job._assemble(message)
    return {name: value.clone() for name, value in model.backbone.state_dict().items()}


def test_a_message_is_assembled_in_the_holders_channel_order_with_its_local_entries_of_the_right_round(
        experiment, tmp_path):
    config, placement, _ = experiment
    holder = make_holder(experiment, tmp_path, shuffle="holder")
    assert not torch.equal(holder.order, torch.arange(len(holder.order)))
    model = initial_model(config, placement)
    plain = {name: value.clone() for name, value in model.backbone.state_dict().items()}
    local_names = [name for name in plain if name.startswith("classifier")][-2:]
    received = {name: value + 0.5 if value.is_floating_point() else value.clone() for name, value in plain.items()
                if name not in local_names}
    initial_local = {name: plain[name] for name in local_names}

    # Alignment: the server's backbone arrives in the plain order and is brought into the holder's.
    aligned = assembling(holder, model, MessageType.QUERY, 0, received, initial_local, plain_order=True)
    reference = initial_model(config, placement)
    reference.backbone.load_state_dict({**received, **initial_local}, strict=False)
    permute_first_layer_channels(reference, holder.order)
    expected = reference.backbone.state_dict()
    assert all(torch.equal(aligned[name], expected[name]) for name in aligned)
    assert any(not torch.equal(aligned[name], received[name]) for name in received)

    # A round's arrays are in the holder's order already; without local state yet, the initial local entries.
    first_round = assembling(holder, model, MessageType.TRAIN, 1, received, initial_local)
    assert all(torch.equal(first_round[name], received[name]) for name in received)
    for plain_order in (False, None):
        assert all(torch.equal(assembling(holder, model, MessageType.TRAIN, 1, received, initial_local,
                                          plain_order)[name], first_round[name]) for name in first_round)

    # Training round r starts from the local entries of round r - 1, evaluating round r uses round r's (a round
    # trained again after a resume finds its own file of the interrupted try, which it must not use).
    for server_round in (2, 3):
        holder.save_local_state(server_round, {name: torch.full_like(plain[name], float(server_round))
                                               for name in local_names})
    training = assembling(holder, model, MessageType.TRAIN, 3, received, initial_local)
    evaluating = assembling(holder, model, MessageType.EVALUATE, 3, received, initial_local)
    assert all((training[name] == 2.0).all() and (evaluating[name] == 3.0).all() for name in local_names)
    assert all(torch.equal(training[name], received[name]) for name in received)
    assert (assembling(holder, model, MessageType.EVALUATE, 2, received, initial_local)[local_names[0]] == 2.0).all()


def test_a_jobs_seeds_are_the_holders_for_this_purpose_and_round(experiment, tmp_path):
    job = object.__new__(client_app.HolderJob)
    job.holder, job.server_round = make_holder(experiment, tmp_path), 2
    assert job.local_seed("batches") == job.holder.local_seed("batches", 2)
    seeds = {job.local_seed("batches"), job.local_seed("dropout")}
    job.server_round = 3
    seeds.add(job.local_seed("batches"))
    assert len(seeds) == 3


def test_a_holder_evaluates_each_model_once_and_training_reports_the_evaluation_of_the_model_it_starts_from(
        tmp_path, monkeypatch):
    from tests.inprocess import run_in_process

    evaluated = []
    real = client_app.evaluate
    monkeypatch.setattr(client_app, "evaluate", lambda *args: evaluated.append(1) or real(*args))
    _, grid, _ = run_in_process(tmp_path, 2, rounds=2, fraction_train=1.0, fraction_evaluate=1.0)
    # Per holder: the model before round 1, after round 1 (its training in round 2 reuses it), after round 2, and
    # the final model on the official test split.
    assert len(evaluated) == 2 * 4
    replies = {(str(m.metadata.message_type), int(m.content[CONFIG][SERVER_ROUND]),
                r.content[HOLDER_INFO][HOLDER_ID]): r.content[METRICS] for m, r in grid.log
               if str(m.metadata.message_type) in (MessageType.TRAIN, MessageType.EVALUATE)
               and m.content[CONFIG].get(SPLIT, "test") == "test"}
    for holder in range(2):
        assert replies[(MessageType.TRAIN, 2, holder)][VAL_ACCURACY] == \
            replies[(MessageType.EVALUATE, 1, holder)][EVAL_ACCURACY]


def test_a_holder_reads_its_kept_evaluation_from_its_folder_only_when_its_own_copy_is_stale(experiment, tmp_path,
                                                                                            monkeypatch):
    holder = make_holder(experiment, tmp_path)
    reads = []
    read = Holder._read_test_evaluation
    monkeypatch.setattr(Holder, "_read_test_evaluation", lambda self: reads.append(1) or read(self))
    holder.remember_test_evaluation(2, 0.25, 0.75)
    assert holder.test_evaluation_of(2) == (0.25, 0.75) and holder.test_evaluation_of(2) == (0.25, 0.75)
    assert reads == []
    other = make_holder(experiment, tmp_path)
    assert other.test_evaluation_of(2) == (0.25, 0.75) and other.test_evaluation_of(2) == (0.25, 0.75)
    assert reads == [1]  # once, then from its own copy
    assert other.test_evaluation_of(3) is None and reads == [1, 1]


def test_the_profile_names_every_phase_of_a_holders_messages(tmp_path, monkeypatch):
    """benchmarks.simulation breaks the engine's overhead down by these names (MPLE_PROFILE)."""
    from simulation.profile import PROFILE_ENV, read_profile
    from tests.inprocess import run_in_process

    path = tmp_path / "profile.jsonl"
    monkeypatch.setenv(PROFILE_ENV, str(path))
    run_in_process(tmp_path, 2, rounds=1)
    lines = read_profile(path)
    assert {line["side"] for line in lines} == {"holder", "server"}
    assert {line["phase"] for line in lines if line["side"] == "holder"} == {
        "train message", "evaluate message", "settings", "decode", "holder set-up and cache",
        "local state and state dicts", "compute", "reply"}
    assert all(line["s"] >= 0 for line in lines)


def test_a_holders_training_is_local_sgd_on_its_morphed_batches_with_the_rounds_settings(tmp_path):
    from simulation.training import train_epochs
    from tests.inprocess import run_in_process

    _, grid, run = run_in_process(tmp_path, 2, rounds=1, local_epochs=2, momentum=0.5, weight_decay=1e-3)
    message, reply = next((m, r) for m, r in grid.log if str(m.metadata.message_type) == MessageType.TRAIN
                          and r.content[HOLDER_INFO][HOLDER_ID] == 0)
    context = grid._contexts[1000]  # holder 0's node
    settings = run.settings.config
    side = holder_side(settings, run.settings.run_dir, holder_seed=0)  # the run's: its holders' kept provision

    def by_hand(lr: float) -> tuple[dict, float, float, int]:
        job = client_app.HolderJob(message, context, side)
        torch.manual_seed(job.local_seed("dropout"))
        loss, accuracy, _ = train_epochs(
            job.holder.first, job.backbone, job.holder.batches("train", shuffle_seed=job.local_seed("batches")),
            epochs=2, lr=lr, momentum=0.5, weight_decay=1e-3, proximal_mu=0.0, anchor=None)
        return job.reply_arrays().to_torch_state_dict(), loss, accuracy, job.holder.num_examples("train")

    sent = reply.content[ARRAYS].to_torch_state_dict()
    arrays, loss, accuracy, examples = by_hand(settings.lr)
    assert sent.keys() == arrays.keys() and all(torch.equal(sent[name], arrays[name]) for name in sent)
    metrics = reply.content[METRICS]
    assert (metrics[TRAIN_LOSS], metrics[TRAIN_ACCURACY], metrics[NUM_EXAMPLES]) == (loss, accuracy, examples)

    # An evaluation sent again (a resumed run's) gets the same reply, from the holder's kept result.
    evaluation, evaluated = next((m, r) for m, r in grid.log if str(m.metadata.message_type) == MessageType.EVALUATE
                                 and r.content[HOLDER_INFO][HOLDER_ID] == 0)
    again = client_app.evaluate_holder(evaluation, context, side)
    assert dict(again.content[METRICS]) == dict(evaluated.content[METRICS])
    # A strategy may set the round's learning rate; the holder trains with it.
    message.content[CONFIG]["lr"] = 2 * settings.lr
    faster = client_app.train(message, context, side)
    arrays, loss, _, _ = by_hand(2 * settings.lr)
    faster_arrays = faster.content[ARRAYS].to_torch_state_dict()
    assert all(torch.equal(faster_arrays[name], arrays[name]) for name in arrays)
    assert faster.content[METRICS][TRAIN_LOSS] == loss and loss != metrics[TRAIN_LOSS]

    # A holder granted a GPU that torch cannot see fails its message; it never trains on the CPU instead.
    if not torch.cuda.is_available():
        granted = json.loads(str(message.content[CONFIG][SETTINGS]))
        message.content[CONFIG][SETTINGS] = json.dumps({**granted, "gpus_per_holder": 0.5}, sort_keys=True)
        with pytest.raises(UsageError, match="granted 0.5 GPU but torch sees no CUDA device"):
            client_app.train(message, context, side)


def test_a_worker_builds_one_skeleton_per_model_and_dp_mode_with_groupnorms_under_holder_dp(experiment, monkeypatch):
    config, placement, _ = experiment
    monkeypatch.setattr(client_app, "_STATE", client_app._ProcessState())
    plain = HolderSettings.from_config(config, "mple")
    dp = dataclasses.replace(plain, dp="holder")
    shape, classes = placement.dataset.image_shape, placement.dataset.num_classes
    skeleton, dp_skeleton = client_app._skeleton(plain, shape, classes), client_app._skeleton(dp, shape, classes)
    assert client_app._skeleton(plain, shape, classes) is skeleton and skeleton is not dp_skeleton
    kinds = lambda model: {type(module) for module in model.modules()}  # noqa: E731
    assert nn.BatchNorm2d in kinds(skeleton) and nn.GroupNorm not in kinds(skeleton)
    assert nn.GroupNorm in kinds(dp_skeleton) and nn.BatchNorm2d not in kinds(dp_skeleton)


@pytest.mark.parametrize("own", ["holder-seed", "federation-secret"])
def test_a_nodes_own_secret_wins_over_the_launchers_provision(tmp_path, own):
    from clients.secrets import SECRETS_FILE
    from tests.inprocess import run_in_process

    node_config = {"holder-seed": 7} if own == "holder-seed" else {"federation-secret": "ab" * 32}
    _, _, run = run_in_process(tmp_path, 2, rounds=1, node_config=node_config)  # the launcher provisions seed 0
    run_dir = run.settings.run_dir
    for holder in range(2):
        kept = HolderSecrets.load(holder_home(run_dir, holder) / SECRETS_FILE)
        provisioned = HolderSecrets.from_holder_seed(0, holder)
        assert kept.holder != provisioned.holder
        if own == "holder-seed":
            assert (kept.holder, kept.federation) == (HolderSecrets.from_holder_seed(7, holder).holder,
                                                      HolderSecrets.from_holder_seed(7, holder).federation)
        else:
            assert kept.federation == bytes.fromhex("ab" * 32) and kept.source == "entropy"


@pytest.mark.parametrize("node_floor, side_floor, refused", [
    ({"min-block-size": 8}, None, True),  # the node's own floor refuses q = 4
    ({}, (("repeated",), 8), True),  # without one, the launcher's does
    ({"min-block-size": 2}, (("repeated",), 8), False),  # a node that names its floor uses its own
])
def test_a_nodes_own_floor_is_used_where_its_node_config_names_one(tmp_path, node_floor, side_floor, refused):
    from tests.inprocess import run_in_process

    metrics, _, _ = run_in_process(tmp_path, 2, rounds=1, block_size=4, shuffle="holder", holder_floor=side_floor,
                                   node_config=node_floor)
    (row,) = metrics["rounds"]
    assert (row["holders_trained"], row["train_failures"]) == ((0, 2) if refused else (2, 0))
    if refused:
        assert any("floor refuses a repeated key with q = 4" in reason for reason in row["failure_reasons"])


class _Planted:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_local_state_file_is_refused_without_running_it(experiment, tmp_path):
    holder = make_holder(experiment, tmp_path / "holder")
    marker = tmp_path / "ran"
    torch.save({"w": _Planted(marker)}, holder.local_state_path(1))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        holder.load_local_state(2)
    assert not marker.exists()
