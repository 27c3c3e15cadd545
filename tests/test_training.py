"""The holders' training loop: its SGD is torch.optim.SGD's arithmetic, number for number."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simulation.errors import UsageError
from simulation.training import SGD, pick_device


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def trained(make_optimizer, steps: int = 6) -> list[torch.Tensor]:
    model = small_model()
    model[0].bias.requires_grad_(False)  # a frozen parameter gets no gradient and must stay as it is
    generator = torch.Generator().manual_seed(1)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    for _ in range(steps):
        inputs = torch.randn(8, 1, 8, 8, generator=generator)
        labels = torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return [parameter.detach().clone() for parameter in model.parameters()]


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 5e-4), (0.9, 5e-4)])
def test_sgd_gives_torchs_sgd_numbers_exactly(momentum, weight_decay):
    ours = trained(lambda p: SGD(p, lr=0.1, momentum=momentum, weight_decay=weight_decay))
    reference = trained(lambda p: torch.optim.SGD(p, lr=0.1, momentum=momentum, weight_decay=weight_decay))
    untrained = [parameter.detach() for parameter in small_model().parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    assert not torch.equal(ours[0], untrained[0]) and torch.equal(ours[1], untrained[1])  # trained; frozen bias kept


def test_a_holder_granted_a_gpu_that_torch_cannot_see_stops_instead_of_training_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert pick_device(0) == torch.device("cpu")
    with pytest.raises(UsageError, match=r"granted 0.5 GPU but torch sees no CUDA device here \(CUDA_VISIBLE_DEVICES='1'"):
        pick_device(0.5)
    assert pick_device(0.5, required=False) == torch.device("cpu")  # the server's phase 0 on a machine without one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(0.5) == torch.device("cuda")
