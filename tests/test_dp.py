"""--dp holder: DP-SGD at each holder with Opacus. Epsilon is reported per holder and round, grows, equals Opacus'
accountant for the same (sigma, q, steps), stays within a target epsilon, survives in the holder's folder; per-sample
clipping bounds each example's part of an update; every model trains behind a frozen AugConv."""

from __future__ import annotations

import copy
import json
import math
import stat

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator
from torch import nn

from clients.augconv import AugConv
from clients.holder import holder_home
from clients.keys import HolderKey
from clients.morphing import morph
from clients.privacy import DPPlan, PrivacyLedger
from simulation.config import build_config
from simulation.errors import UsageError
from simulation.models import MODEL_NAMES, build_model, permute_first_layer_channels
from simulation.report import CSV_COLUMNS, _csv, plot_curves
from simulation.training import train_epochs_dp

from .inprocess import run_in_process


def epsilons(metrics) -> list[dict[str, float]]:
    return [{h: v["dp_epsilon"] for h, v in row["per_holder"].items()} for row in metrics["rounds"]]


def test_epsilon_is_reported_per_holder_grows_with_rounds_and_equals_opacus_accountant(tmp_path):
    metrics, _, _ = run_in_process(tmp_path, 2, rounds=2, dp="holder", dp_noise=1.2, batch_size=64)
    spent = epsilons(metrics)
    assert all(len(row) == 2 for row in spent)
    for holder in ("0", "1"):
        assert 0 < spent[0][holder] < spent[1][holder]
    for row, by_holder in zip(metrics["rounds"], spent):
        assert row["dp_epsilon"] == max(by_holder.values())
    # Opacus' accountant for the same sigma, q = B / n and rounds x ceil(n / B) steps gives the same epsilon.
    examples = metrics["rounds"][0]["per_holder"]["0"]["num_examples"]
    accountant = RDPAccountant()
    accountant.history = [(1.2, 64 / examples, 2 * math.ceil(examples / 64))]
    assert spent[1]["0"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert metrics["final"]["dp_epsilon"] == metrics["rounds"][-1]["dp_epsilon"] and metrics["final"]["dp_delta"] == 1e-5
    # Each holder keeps its history in its own folder, owner-only JSON, and reads back the same epsilon.
    path = holder_home(tmp_path / "run", 0) / "dp-mple.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(json.loads(path.read_text())["rounds"]) == ["1", "2"]
    assert PrivacyLedger(path).epsilon(1e-5) == spent[1]["0"]


def test_a_target_epsilon_is_met_not_exceeded_and_the_csv_and_curves_show_it(tmp_path):
    metrics, _, _ = run_in_process(tmp_path, 2, rounds=2, dp="holder", dp_epsilon=3.0)
    final = metrics["final"]["dp_epsilon"]
    assert 2.9 < final <= 3.0
    noise = {v["dp_noise"] for row in metrics["rounds"] for v in row["per_holder"].values()}
    assert all(sigma > 0.3 for sigma in noise)
    text = _csv({"mple": metrics})
    assert "dp_epsilon" in CSV_COLUMNS and f"{final}" in text.splitlines()[-1].split(",")
    plot_curves({"mple": metrics}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_epsilon_survives_resume_and_mple_equals_its_baseline(tmp_path):
    with pytest.raises(SystemExit):
        run_in_process(tmp_path / "a", 2, rounds=2, dp="holder", dp_noise=1.0, stop_after_round=1)
    resumed, _, _ = run_in_process(tmp_path / "a", 2, rounds=2, dp="holder", dp_noise=1.0)
    examples = resumed["rounds"][0]["per_holder"]["0"]["num_examples"]
    accountant = RDPAccountant()
    for done, row in enumerate(epsilons(resumed), 1):  # round 2, after the resume, counts round 1's steps once
        accountant.history = [(1.0, 32 / examples, done * math.ceil(examples / 32))]
        assert row["0"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    baseline, _, _ = run_in_process(tmp_path / "b", 2, rounds=1, dp="holder", dp_noise=1.0, variant="baseline")
    mple = resumed["rounds"][0]
    assert baseline["rounds"][0]["train_loss"] == pytest.approx(mple["train_loss"], rel=1e-4)
    assert epsilons(baseline)[0] == epsilons(resumed)[0]


def test_a_round_trained_again_replaces_its_entry(tmp_path):
    ledger = PrivacyLedger(tmp_path / "dp.json")
    plan = DPPlan(sample_rate=0.1, steps_per_epoch=10, noise_multiplier=1.0, clip=1.0, delta=1e-5, examples=100)
    ledger.record(1, plan, 10)
    once = ledger.epsilon(1e-5)
    ledger.record(1, plan, 10)
    assert PrivacyLedger(tmp_path / "dp.json").epsilon(1e-5) == once
    ledger.record(2, plan, 10)
    assert PrivacyLedger(tmp_path / "dp.json").epsilon(1e-5) > once
    # Two processes (Ray workers) that each hold this holder: neither loses the other's rounds.
    elsewhere = PrivacyLedger(tmp_path / "dp.json")
    elsewhere.record(3, plan, 10)
    ledger.record(4, plan, 10)
    assert sorted(PrivacyLedger(tmp_path / "dp.json").rounds) == [1, 2, 3, 4]
    (tmp_path / "dp.json").write_text('{"version": 1, "accountant": "rdp", "rounds": {"1": [1.0, 7, 10]}}')
    with pytest.raises(UsageError, match="cannot be read"):
        PrivacyLedger(tmp_path / "dp.json")


def _one_step(backbone, inputs, labels, *, noise=0.0, expected=4.0, clip=1.0):
    before = [p.detach().clone() for p in backbone.parameters()]
    train_epochs_dp(nn.Identity(), backbone, lambda: [(inputs, labels)], epochs=1, lr=1.0, momentum=0.0,
                    weight_decay=0.0, noise_multiplier=noise, clip=clip, expected_batch_size=expected, noise_seed=0)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(backbone.parameters(), before)])


def test_per_sample_clipping_bounds_each_examples_contribution():
    torch.manual_seed(0)
    inputs, labels = torch.randn(4, 10), torch.tensor([0, 1, 0, 1])
    base, far = nn.Linear(10, 2), 1000 * torch.randn(1, 10)
    wrong = 1 - base(far).argmax(1)  # confidently wrong: its gradient is huge
    outlier = torch.cat([inputs, far]), torch.cat([labels, wrong])
    updates = []
    for batch in ((inputs, labels), outlier):
        model = nn.Linear(10, 2)
        model.load_state_dict(base.state_dict())
        updates.append(_one_step(model, *batch))
    # lr 1, expected batch 4, clip 1: every example moves the weights by at most 1 / 4, the outlier included.
    assert updates[0].norm() <= 4 * 1.0 / 4 + 1e-5
    assert (updates[1] - updates[0]).norm() <= 1.0 / 4 + 1e-5
    assert (updates[1] - updates[0]).norm() > 0.2  # its gradient is large: clipped to the bound, not below it
    # An empty Poisson batch is a step of noise alone, of standard deviation noise * clip / expected batch.
    model = nn.Linear(100, 100)
    step = _one_step(model, torch.empty(0), torch.empty(0, dtype=torch.long), noise=2.0, expected=8.0, clip=0.5)
    assert step.std().item() == pytest.approx(2.0 * 0.5 / 8.0, rel=0.05)


def test_fedprox_proximal_gradient_is_added_after_the_noise():
    torch.manual_seed(0)
    inputs, labels = torch.randn(4, 10), torch.tensor([0, 1, 0, 1])
    base = nn.Linear(10, 2)
    steps = []
    for mu in (0.0, 0.5):
        model = nn.Linear(10, 2)
        model.load_state_dict(base.state_dict())
        before = [p.detach().clone() for p in model.parameters()]
        train_epochs_dp(nn.Identity(), model, lambda: [(inputs, labels)], epochs=1, lr=1.0, momentum=0.0,
                        weight_decay=0.0, noise_multiplier=1.0, clip=1.0, expected_batch_size=4.0, noise_seed=3,
                        proximal_mu=mu, anchor={name: torch.zeros_like(p) for name, p in model.named_parameters()})
        steps.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    # The same noise (same seed); the proximal term pulls towards the anchor by lr * mu * (w - anchor).
    weights = torch.cat([p.detach().flatten() for p in base.parameters()])
    assert torch.allclose(steps[1] - steps[0], -0.5 * weights, atol=1e-6)


def test_the_first_layers_memory_layout_does_not_change_the_per_sample_gradients():
    # The baseline's plain frozen convolution hands the backbone a tensor whose layout made Opacus' per-sample
    # gradients of the next convolution zero (PneumoniaMNIST); a channels-last input does the same.
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.Flatten(), nn.LazyLinear(2))
    inputs, labels = torch.randn(6, 4, 12, 12), torch.tensor([0, 1, 0, 1, 1, 0])
    backbone(inputs)
    steps = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = copy.deepcopy(backbone)
        steps.append(_one_step(model, inputs.to(memory_format=layout), labels, expected=6.0, clip=0.1))
    assert torch.allclose(steps[0], steps[1], atol=1e-6) and steps[0].norm() > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_a_dp_step_behind_a_frozen_augconv(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=3, image_size=8, dp_sgd=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model.backbone, strict=False) == []
    # A secret channel order does not change what the model computes (one group per channel where it matters).
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    before = model(x)
    permute_first_layer_channels(model, torch.randperm(model.first.out_channels))
    assert torch.allclose(model(x), before, atol=1e-4)
    key = HolderKey.generate((1, 8, 8), family="repeated", seed=1)
    first = AugConv.from_conv(model.first, key)
    images, labels = morph(torch.randn(3, 1, 8, 8), key), torch.tensor([0, 1, 2])
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    loss, _, seen, steps = train_epochs_dp(first, model.backbone, lambda: [(images, labels)], epochs=1, lr=0.1,
                                           momentum=0.9, weight_decay=5e-4, noise_multiplier=1.0, clip=1.0,
                                           expected_batch_size=3.0, noise_seed=0)
    assert math.isfinite(loss) and seen == 3 and steps == 1
    assert any(not torch.equal(state[k], v) for k, v in model.backbone.state_dict().items())
    assert not any(hasattr(p, "grad_sample") for p in model.backbone.parameters())  # Opacus' hooks are gone


@pytest.mark.parametrize("settings, fragments", [
    ({"dp": "holder"}, ["needs --dp-noise above 0", "--dp-epsilon"]),
    ({"dp": "holder", "dp_noise": 1.0, "dp_epsilon": 4.0}, ["--dp-noise or a target --dp-epsilon, not both"]),
    ({"dp": "server", "dp_epsilon": 4.0}, ["--dp-epsilon", "add --dp holder"]),
    ({"dp": "holder", "dp_epsilon": 4.0, "dp_delta": 1.5}, ["--dp-delta must lie in (0.0, 1.0)"]),
    ({"dp": "holder", "dp_noise": 1.0, "strategy": "qfedavg"}, ["qfedavg", "not privatise", "another strategy"]),
])
def test_settings_that_make_no_sense_are_one_line_naming_the_fix(settings, fragments):
    with pytest.raises(UsageError) as raised:
        build_config(settings)
    assert all(fragment in str(raised.value) for fragment in fragments), raised.value


def test_holder_dp_defaults_and_a_delta_too_large_for_the_holders(tmp_path):
    from server.plan import plan_run

    config = build_config({"dp": "holder", "dp_noise": 1.0})
    assert config.dp_clip == 1.0 and build_config({"dp": "server"}).dp_clip == 10.0
    assert all(not isinstance(m, nn.BatchNorm2d) for m in plan_run(config).model.modules())
    with pytest.raises(UsageError, match=r"--dp-delta 0.01 is not below 1 / \d+ .*use --dp-delta 0.0001"):
        plan_run(build_config({"dp": "holder", "dp_noise": 1.0, "dp_delta": 0.01}))
