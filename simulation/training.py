"""Training and evaluation loops shared by the holders (morphed data, frozen AugConv) and the server's phase 0."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from simulation.errors import UsageError

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def train_epochs(
    first: nn.Module,
    backbone: nn.Module,
    batches: Batches,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    proximal_mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, float, int]:
    """Train `backbone` (and `first`, if it has trainable parameters) with SGD; returns the last epoch's (mean loss,
    accuracy, examples), so that with several local epochs the loss is the one the holder ends the round on. With `proximal_mu` > 0 adds FedProx's (mu/2)||w - w_global||^2 over the
    `anchor` parameters (the received global ones)."""
    parameters = [p for p in (*first.parameters(), *backbone.parameters()) if p.requires_grad]
    optimizer = SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    criterion = nn.CrossEntropyLoss()
    anchored = _anchored(backbone, proximal_mu, anchor)
    first.train(any(p.requires_grad for p in first.parameters()))
    backbone.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        for inputs, labels in batches():
            optimizer.zero_grad(set_to_none=True)
            logits = backbone(first(inputs))
            loss = criterion(logits, labels)
            objective = loss
            if anchored:
                objective = loss + proximal_mu / 2 * sum((p - g).pow(2).sum() for p, g in anchored)
            objective.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    if seen == 0:
        return float("nan"), float("nan"), 0
    return loss_sum / seen, correct / seen, seen


def train_epochs_dp(
    first: nn.Module,
    backbone: nn.Module,
    batches: Batches,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    noise_multiplier: float,
    clip: float,
    expected_batch_size: float,
    noise_seed: int,
    proximal_mu: float = 0.0,
    anchor: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, float, int, int]:
    """DP-SGD with Opacus on `backbone` behind the frozen `first`: each example's gradient clipped to L2 norm `clip`,
    the clipped sum plus Gaussian noise of standard deviation `noise_multiplier * clip` (drawn from `noise_seed`),
    divided by `expected_batch_size`, then torch's SGD step. `batches` must be Poisson-sampled (each example taken
    with the accountant's sample rate, independently; a batch may be empty), or the accounting does not hold. FedProx's
    proximal gradient mu (w - w_global) needs no data, so it is added after the noise. Returns the last epoch's (mean
    loss, accuracy, examples) and the number of noised steps taken."""
    from opacus import GradSampleModule  # 3 s of import, paid only by holders that train with DP
    from opacus.optimizers import DPOptimizer

    if any(p.requires_grad for p in first.parameters()):
        raise ValueError("DP-SGD here trains the backbone behind a frozen first layer")
    parameters = [p for p in backbone.parameters() if p.requires_grad]
    model = GradSampleModule(backbone)  # refuses BatchNorm (build the model with dp_sgd=True)
    device = parameters[0].device
    optimizer = DPOptimizer(
        torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay),
        noise_multiplier=noise_multiplier, max_grad_norm=clip, expected_batch_size=expected_batch_size,
        generator=torch.Generator(device=device).manual_seed(noise_seed),
    )
    criterion = nn.CrossEntropyLoss()
    anchored = _anchored(backbone, proximal_mu, anchor)
    first.eval()
    backbone.train()
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    try:
        with warnings.catch_warnings():
            # The backbone's input (the frozen first layer's output) needs no gradient; torch says so at every hook.
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            for _ in range(epochs):
                loss_sum, correct, seen = 0.0, 0, 0
                for inputs, labels in batches():
                    optimizer.zero_grad(set_to_none=True)
                    if len(labels):
                        # In the standard layout: on another (the baseline's plain frozen convolution gave one on
                        # PneumoniaMNIST; channels-last does it too) Opacus' per-sample gradients of the next
                        # convolution came out zero while its ordinary gradient was right.
                        logits = model(first(inputs).contiguous(memory_format=torch.contiguous_format))
                        loss = criterion(logits, labels)
                        loss.backward()
                        loss_sum += loss.item() * len(labels)
                        correct += (logits.argmax(1) == labels).sum().item()
                        seen += len(labels)
                    else:  # an empty Poisson batch: a step of noise alone, as Opacus' own data loader gives
                        for parameter in parameters:
                            parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
                    optimizer.pre_step()  # clip, sum, noise, scale: p.grad
                    with torch.no_grad():
                        for parameter, global_value in anchored:
                            parameter.grad.add_(parameter - global_value, alpha=proximal_mu)
                    optimizer.original_optimizer.step()
                    steps += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.cleanup()  # the backbone is reused for the next message: no hooks, no per-sample attributes
    if seen == 0:
        return float("nan"), float("nan"), 0, steps
    return loss_sum / seen, correct / seen, seen, steps


def _anchored(backbone: nn.Module, proximal_mu: float, anchor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FedProx: (parameter, its received global value) pairs, or none without a proximal term."""
    if not (proximal_mu > 0 and anchor):
        return []
    named = dict(backbone.named_parameters())
    return [(named[name], value.detach().clone()) for name, value in anchor.items() if name in named]


class SGD:
    """torch.optim.SGD's update (momentum without dampening or Nesterov, L2 weight decay), step for step the same
    arithmetic, so the same numbers (a test compares them). Its first use in a process imports torch._dynamo, which
    takes about 3 s, and every holder process (a Ray actor, a SuperNode's ClientApp process per message) pays it."""

    def __init__(self, parameters: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.parameters = list(parameters)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.parameters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.parameters:
            if set_to_none:
                parameter.grad = None
            elif parameter.grad is not None:
                parameter.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for index, parameter in enumerate(self.parameters):
            if parameter.grad is None:
                continue
            step = parameter.grad
            if self.weight_decay != 0:
                step = step.add(parameter, alpha=self.weight_decay)
            if self.momentum != 0:
                buffer = self.buffers[index]
                if buffer is None:
                    buffer = self.buffers[index] = torch.clone(step).detach()
                else:
                    buffer.mul_(self.momentum).add_(step)
                step = buffer
            parameter.add_(step, alpha=-self.lr)


@torch.no_grad()
def evaluate(first: nn.Module, backbone: nn.Module, batches: Batches) -> tuple[float, float, int]:
    """(mean cross-entropy, accuracy, examples)."""
    first.eval()
    backbone.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0, 0
    for inputs, labels in batches():
        logits = backbone(first(inputs))
        loss_sum += criterion(logits, labels).item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    if seen == 0:
        return float("nan"), float("nan"), 0
    return loss_sum / seen, correct / seen, seen


def pick_device(gpus: float, *, required: bool = True) -> torch.device:
    """CUDA where the run grants GPUs, else the CPU. A holder granted GPUs that torch cannot see stops with one
    line (`required`), never falling back to the CPU behind the user's back; the server's phase 0 (`required=False`)
    uses CUDA only where its own machine has it."""
    if gpus <= 0:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not required:
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise UsageError(f"this holder was granted {gpus:g} GPU but torch sees no CUDA device here "
                     f"(CUDA_VISIBLE_DEVICES={visible!r}, torch {torch.__version__}, built for CUDA "
                     f"{torch.version.cuda or 'none'}); install a CUDA build of torch on the holders' machines or run "
                     "without --gpus-per-holder")
