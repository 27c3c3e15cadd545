"""The federation end to end: the real ClientApp, ServerApp and strategies, in process and on Flower's Ray engine."""

from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.augconv import AugConv
from clients.holder import KEY_FILE, holder_home
from clients.keys import HolderKey
from clients.secrets import SECRETS_FILE, HolderSecrets
from simulation.config import build_config
from simulation.run import main
from simulation.run_folder import CHECKPOINT_FILE, prepare_run_dir

from .inprocess import InProcessGrid, run_in_process

BUILTIN = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian", "fedtrimmedavg",
           "krum", "multikrum", "bulyan", "qfedavg")


def without_times(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


@pytest.mark.parametrize("strategy", BUILTIN)
def test_every_builtin_strategy_trains_the_backbone_only(tmp_path, strategy):
    metrics, grid, federation = run_in_process(tmp_path, strategy=strategy)
    assert [row["round"] for row in metrics["rounds"]] == [1, 2]
    assert all(row["holders_trained"] == 3 and math.isfinite(row["train_loss"]) for row in metrics["rounds"])
    shared = set(federation.plan.shared)
    backbone = set(federation.plan.model.backbone.state_dict())
    for message, reply in grid.log:
        if "arrays" in message.content:
            assert set(message.content["arrays"].keys()) == shared
        if not reply.has_error() and "arrays" in reply.content:
            assert set(reply.content["arrays"].keys()) == shared
    assert shared < backbone  # integer buffers at least stay home
    assert set(federation.loop.state.arrays.keys()) == shared


def test_holder_local_layers_never_reach_the_server(tmp_path):
    metrics, grid, federation = run_in_process(tmp_path, shuffle="holder", local_layers=["classifier.3"])
    local = {name for name in federation.plan.model.backbone.state_dict() if name not in federation.plan.shared}
    assert {"classifier.3.weight", "classifier.3.bias", "features.1.weight"} <= local  # BN after conv 1: order
    for message, reply in grid.log:
        for content in (message.content, None if reply.has_error() else reply.content):
            if content is not None and "arrays" in content:
                assert not local & set(content["arrays"].keys())
    saved = torch.load(sorted(holder_home(federation.settings.run_dir, 0).glob("local-mple-r*.pt"))[-1])
    assert {"classifier.3.weight", "features.1.weight"} <= set(saved)
    assert metrics["final"]["accuracy"] > 0.3


def test_no_message_carries_a_key_or_an_augconv(tmp_path):
    metrics, grid, federation = run_in_process(tmp_path)
    assert all(row["holders_trained"] == 3 and row["train_failures"] == 0 for row in metrics["rounds"])
    secrets = []
    for holder in range(3):
        home = holder_home(federation.settings.run_dir, holder)
        key = HolderKey.load(home / KEY_FILE)
        secrets += [key.blocks(dtype=torch.float32), key.blocks(dtype=torch.float32, inverse=True)]
        (augconv_file,) = home.glob("augconv-*.pt")
        holder_secrets = HolderSecrets.load(home / SECRETS_FILE)
        secrets.append(AugConv.load(augconv_file, auth_key=holder_secrets.file_key).weight)
        assert stat.S_IMODE((home / KEY_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE(augconv_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
    secret_shapes = {tuple(secret.shape) for secret in secrets}
    for message, reply in grid.log:
        for content in (message.content, None if reply.has_error() else reply.content):
            if content is None:
                continue
            for record in content.array_records.values():
                for tensor in record.to_torch_state_dict().values():
                    if tuple(tensor.shape) in secret_shapes:
                        assert not any(torch.equal(tensor.float(), secret.float()) for secret in secrets
                                       if secret.shape == tensor.shape)
            for record in content.config_records.values():
                assert all(not isinstance(value, bytes) for value in record.values())


def test_fedprox_holders_apply_the_proximal_term(tmp_path):
    def update_norm(mu):
        config = {"strategy": "fedprox", "strategy_args": {"proximal_mu": mu}, "rounds": 1, "lr": 0.1}
        _, grid, federation = run_in_process(tmp_path / f"mu{mu}", **config)
        (sent, reply) = next((m, r) for m, r in grid.log if m.metadata.message_type == "train")
        before = sent.content["arrays"].to_torch_state_dict()
        after = reply.content["arrays"].to_torch_state_dict()
        return math.sqrt(sum((after[n] - before[n]).pow(2).sum().item() for n in before))

    assert update_norm(5.0) < 0.9 * update_norm(0.0)


def test_failed_holders_are_counted_and_the_round_goes_on(tmp_path):
    metrics, _, _ = run_in_process(tmp_path / "a", holders=4, fail_holders=[1, 2])
    for row in metrics["rounds"]:
        assert (row["holders_trained"], row["train_failures"]) == (2, 2)
        assert row["counted"] and any("failed on purpose" in reason for reason in row["failure_reasons"])
    strict, _, federation = run_in_process(tmp_path / "b", holders=4, fail_holders=[1], min_holders=4, shuffle="none")
    assert not any(row["counted"] for row in strict["rounds"])
    initial = torch.load(federation.settings.run_dir / "first_layer.pt")["backbone"]
    for name, value in federation.loop.state.arrays.to_torch_state_dict().items():
        assert torch.allclose(value, initial[name].float())


def test_same_seed_same_metrics_and_resume_matches(tmp_path):
    first, _, _ = run_in_process(tmp_path / "a", rounds=3)
    second, _, _ = run_in_process(tmp_path / "b", rounds=3)
    assert without_times(first["rounds"]) == without_times(second["rounds"])
    assert first["final"] == second["final"]
    with pytest.raises(SystemExit):
        run_in_process(tmp_path / "c", rounds=3, stop_after_round=1)
    assert (tmp_path / "c" / "run" / "mple" / CHECKPOINT_FILE).exists()
    resumed, _, _ = run_in_process(tmp_path / "c", rounds=3)
    assert without_times(resumed["rounds"]) == without_times(first["rounds"])
    assert resumed["final"] == first["final"]


def test_holder_shuffle_gives_each_holder_its_own_order_and_training_still_works(tmp_path):
    from clients.secrets import HolderSecrets, channel_order

    orders = [channel_order(HolderSecrets.from_holder_seed(0, holder), "holder", 32) for holder in range(3)]
    assert not torch.equal(orders[0], orders[1])
    assert all(torch.equal(order.sort().values, torch.arange(32)) for order in orders)
    metrics, _, _ = run_in_process(tmp_path, shuffle="holder")
    assert metrics["final"]["accuracy"] > 0.3


@pytest.mark.parametrize("family", ["dense", "blocks", "repeated"])
def test_mple_matches_its_baseline_for_every_key_family(tmp_path, family):
    mple, _, _ = run_in_process(tmp_path, rounds=1, key_family=family)
    baseline, _, _ = run_in_process(tmp_path, rounds=1, key_family=family, variant="baseline")
    loss, base_loss = mple["rounds"][0]["train_loss"], baseline["rounds"][0]["train_loss"]
    assert abs(loss - base_loss) / base_loss < 1e-3
    assert abs(mple["final"]["accuracy"] - baseline["final"]["accuracy"]) <= 0.01


def test_cli_runs_on_flowers_ray_engine_and_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--holders", "3", "--rounds", "2", "--pretrain-epochs", "1", "--baseline", "--holder-seed", "1",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "round   2/2" in printed.out and "DEPRECATED" not in printed.out + printed.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["round"] for row in metrics["rounds"]] == [1, 2]
    assert all({"round", "loss", "accuracy"} <= set(row) for row in metrics["rounds"])
    final = metrics["final"]
    assert 0.5 < final["accuracy"] <= 1 and "baseline_accuracy" in final
    assert final["first_round_loss_relative_difference"] < 1e-3
    assert abs(final["difference_pp"]) <= 1.0
    for name in ("config.json", "metrics.csv", "curves.png", "keys.json", "class_counts.png", "first_layer.pt"):
        assert (out / name).stat().st_size > 0
    keys = json.loads((out / "keys.json").read_text())["holders"]
    assert len({row["fingerprint"] for row in keys}) == 3
    assert all(not isinstance(value, (list, dict)) or len(value) < 8 for row in keys for value in row.values())
    assert (out / "morph.png").stat().st_size > 0
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * 2
    metric_names = set(csv_lines[0].split(",")) | set(metrics["final"]) | {
        name for row in metrics["rounds"] for table in (row, *row["per_holder"].values(), *row["per_holder_eval"].values())
        for name in table}
    assert {"num_examples", "train_accuracy", "val_accuracy", "eval_loss"} <= metric_names
    assert all(re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", name) for name in metric_names), sorted(metric_names)
    from server.attacks.cross_key import cross_key_for_run

    accuracy, _ = cross_key_for_run(out)
    off_diagonal = accuracy[~np.eye(3, dtype=bool)]
    assert np.diag(accuracy).min() > off_diagonal.max()


def test_cli_refuses_to_overwrite_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert main(["--holders", "2", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exists" in error
    assert (out / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("mode", ["server", "client"])
def test_differential_privacy_clips_backbone_updates(tmp_path, mode):
    clip = 0.5
    metrics, grid, federation = run_in_process(tmp_path, rounds=1, dp=mode, dp_clip=clip, dp_noise=0.0, lr=0.1)
    assert metrics["strategy"]["differential_privacy"]["clipping_norm"] == clip
    norms, sent = [], None
    for message, reply in grid.log:
        if message.metadata.message_type == "train" and not reply.has_error():
            before = sent = message.content["arrays"].to_torch_state_dict()
            after = reply.content["arrays"].to_torch_state_dict()
            norms.append(math.sqrt(sum((after[n] - before[n]).pow(2).sum().item() for n in before)))
    assert len(norms) == 3
    if mode == "client":  # the holders clip before replying
        assert max(norms) <= clip * (1 + 1e-4)
    else:  # the server clips while aggregating: the raw replies are larger, the aggregate moves at most `clip`
        assert max(norms) > clip
    aggregate = federation.loop.state.arrays.to_torch_state_dict()
    moved = math.sqrt(sum((aggregate[n] - sent[n]).pow(2).sum().item() for n in sent))
    assert 0 < moved <= clip * (1 + 1e-4)


def test_a_user_strategy_from_a_file_runs_the_federation(tmp_path):
    spec = f"{Path(__file__).resolve().parents[1] / 'strategies/examples/accuracy_weighted.py'}:AccuracyWeightedFedAvg"
    metrics, _, federation = run_in_process(tmp_path, strategy=spec, strategy_args={"temperature": 0.05})
    assert type(federation.loop.strategy).__name__ == "AccuracyWeightedFedAvg"
    assert "AccuracyWeightedFedAvg" in json.dumps(metrics["strategy"])
    assert all(row["holders_trained"] == 3 for row in metrics["rounds"])


def test_each_holder_builds_its_key_and_augconv_once(tmp_path, monkeypatch):
    from clients.augconv import AugConv
    from clients.keys import HolderKey as Key

    built = {"augconv": 0, "key": 0}
    original_build, original_generate = AugConv.from_conv.__func__, Key.generate.__func__

    def counting_build(cls, *args, **kwargs):
        built["augconv"] += 1
        return original_build(cls, *args, **kwargs)

    def counting_generate(cls, *args, **kwargs):
        built["key"] += 1
        return original_generate(cls, *args, **kwargs)

    monkeypatch.setattr(AugConv, "from_conv", classmethod(counting_build))
    monkeypatch.setattr(Key, "generate", classmethod(counting_generate))
    metrics, grid, _ = run_in_process(tmp_path, rounds=3)
    assert sum(message.metadata.message_type == "train" for message, _ in grid.log) == 9
    assert all(row["holders_trained"] == 3 and row["train_failures"] == 0 for row in metrics["rounds"])
    assert built == {"augconv": 3, "key": 3}


def test_gpus_without_a_gpu_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--gpus-per-holder", "0.5", "--out", str(tmp_path / "run")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_round_metrics_are_weighted_by_each_holders_examples():
    from flwr.app import Message, MetricRecord, RecordDict

    from server.rounds import weighted_mean

    InProcessGrid(1)
    replies = [Message(RecordDict({"metrics": MetricRecord({"num_examples": n, "train_loss": loss})}), dst_node_id=1,
                       message_type="train") for n, loss in ((1, 1.0), (3, 3.0))]
    assert weighted_mean(replies, "train_loss") == pytest.approx((1 * 1.0 + 3 * 3.0) / 4)  # not (1 + 3) / 2
    assert weighted_mean([], "train_loss") is None


def test_server_side_updates_never_leave_a_negative_batchnorm_variance():
    from server.rounds import valid_backbone

    state = {"bn.running_var": torch.tensor([-0.5, 0.2], dtype=torch.float64), "bn.weight": torch.tensor([-0.5, 1.0])}
    valid = valid_backbone(state, ["bn.running_var", "bn.weight"])
    assert valid["bn.running_var"].tolist() == [0.0, pytest.approx(0.2)] and valid["bn.running_var"].dtype == torch.float32
    assert valid["bn.weight"].tolist() == [-0.5, 1.0]  # only variances are clamped


def test_a_long_round_reports_how_many_holders_have_replied(monkeypatch):
    """Replies trickling in (a VGG-16 round on a CPU takes minutes): progress lines with the count and the rate, and
    the replies in the order the messages were sent, whatever order they arrived in."""
    from types import SimpleNamespace

    import server.rounds as rounds

    class Trickle:
        def push_messages(self, messages):
            self.queue = [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}")) for i in (2, 0, 1)]
            return ["m0", "m1", "m2"]

        def pull_messages(self, ids):
            return [self.queue.pop(0)] if self.queue else []

    monkeypatch.setattr(rounds, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(rounds, "PULL_INTERVAL_S", 0.0)
    lines = []
    loop = rounds.RoundLoop.__new__(rounds.RoundLoop)
    loop.grid, loop.progress = Trickle(), lines.append
    loop.config, loop.state = SimpleNamespace(round_timeout=None), SimpleNamespace(round=4)
    replies = loop._exchange([object()] * 3, "trained")
    assert [reply.metadata.reply_to_message_id for reply in replies] == ["m0", "m1", "m2"]
    assert lines and lines[0].startswith("  round 4: 1/3 holders trained (") and "holders/s" in lines[0]
