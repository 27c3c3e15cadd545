"""Gradient inversion, as the curious server: from one holder's reply in round 1, reconstruct its training images.

What the server holds, and nothing else: the model it built (the first layer ``C``, the initial backbone in the
plain channel order), every message it sent (the backbone entries, the initial values of holder-local entries,
the round's settings: learning rate, momentum, weight decay, batch size), the ``align`` reply that brought the
initial backbone into the federation's channel order (``--shuffle federation``), and the holder's reply: its
shared backbone entries after local training. The holder's key, channel order, images, labels and batch order
stay with it. The labels are given to the attack, per local step as the holder took them (an upper bound on the
attacker: Inverting Gradients does the same for batches; with one image the label can be read off the last layer's
update).

Why the server can work in the plain channel order. AugConv's output is ``C D`` in the holder's channel order
``Pi``, and the backbone entries indexed by the first layer's channels are in the same order, so the holder's
model computes exactly the plain model's function and every update it sends is the plain model's update, with
the order-sensitive entries reindexed by ``Pi``:

* ``--shuffle federation``: the ``align`` reply is the server's own initial backbone reindexed by ``Pi``; matching
  its order-sensitive entries (the second convolution's input slices) against the originals reads ``Pi``
  exactly (:func:`order_from_alignment`). The attack then runs in the aligned order.
* ``--shuffle holder``: the order-sensitive entries are holder-local and never sent; their values in round 1
  are the initial values the server sent, reindexed by the holder's own ``Pi_i``, which changes nothing the
  shared entries see. The attack runs in the plain order.
* ``--local-layers``: in round 1 the local entries start from the initial values the server sent; they are
  simulated and left out of the comparison.
* ``--dp client``: Flower's client-side fixed clipping scales the update to at most the clipping norm and the
  *server* adds the noise to the aggregate, so the server sees the clipped update itself, noise-free; the
  cosine objective is blind to the scale. The ``released`` view adds that noise (``noise * clip`` per
  coordinate, one sampled holder) to show what a party that only sees the new global model could do.
* ``--dp server``: the server clips and noises the aggregate itself; it sees the raw update.

The attack (Geiping et al. 2020, "Inverting Gradients"): dummy images in the valid pixel box, the holder's local
training simulated on them (``steps`` SGD steps with momentum and weight decay, batch-norm in training mode,
dropout at its expectation because the holder's masks are secret), unrolled and differentiated; the objective
is one minus the cosine similarity between the simulated and the observed update of the shared parameters,
plus a total-variation prior; Adam with step decay, several random restarts, the restart with the lowest
objective kept (the server cannot see the truth). Scores: each true image's best-matching reconstruction
(SSIM and PSNR), and the image-specific figures (:func:`server.attacks.common.image_specific_quality`) on a
one-to-one assignment of reconstructions to true images.

Command: ``python -m server.attacks.gradient_inversion --help`` (in ``__main__.py``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.func import functional_call

from clients.augconv import AugConv
from clients.keys import HolderKey
from clients.morphing import morph
from server.attacks.common import display_image, image_specific_quality, to_pixels
from simulation.errors import UsageError
from simulation.imagemetrics import psnr_per_image, ssim_per_image
from simulation.models import SplitModel, channel_dim, order_sensitive_keys, permute_first_layer_channels
from simulation.training import train_epochs

SHUFFLE_VIEWS = ("federation", "holder", "none")


@dataclass(frozen=True)
class LocalTraining:
    """The round's settings, which the server sends: what the holder runs on its images."""

    batch_size: int
    steps: int
    lr: float
    momentum: float
    weight_decay: float


@dataclass(frozen=True)
class ServerView:
    """What the server has after the holder's reply, in the order the attack works in."""

    start: dict[str, torch.Tensor]  # the backbone the holder started from (sent entries and initial local ones)
    update: dict[str, torch.Tensor]  # observed: shared parameters after local training minus as sent
    order: torch.Tensor  # the channel order the attack applies to C's output


@dataclass(frozen=True)
class Inversion:
    reconstruction: torch.Tensor  # normalised images, (B * steps, C, H, W)
    objective: float
    objectives: list[float]  # per restart
    seconds: float


# ------------------------------------------------------------------------------------------ the holder's round
def holder_round(model: SplitModel, images: torch.Tensor, labels: torch.Tensor, training: LocalTraining, *,
                 key: HolderKey | None, order: Sequence[int], shuffle: str, shared: Sequence[str],
                 seed: int) -> tuple[dict, dict, dict]:
    """Run one holder's round-1 training as the holder does (morphing and AugConv for MpLe, the frozen first layer
    in its channel order for the baseline, local entries reindexed into its order) on ``images`` (normalised,
    ``batch_size * steps`` of them). Returns (the backbone the server sent, the align reply or {}, the reply)."""
    if shuffle not in SHUFFLE_VIEWS:
        raise UsageError(f"shuffle must be one of {', '.join(SHUFFLE_VIEWS)}, got {shuffle!r}")
    conv = copy.deepcopy(model.first)
    sent = {name: value.clone() for name, value in model.backbone.state_dict().items()}
    holder = copy.deepcopy(model)
    order = torch.as_tensor(order if shuffle != "none" else range(conv.out_channels), dtype=torch.long)
    permute_first_layer_channels(holder, order)  # local entries and, for the federation, the aligned backbone
    aligned = {}
    if shuffle == "federation":
        aligned = {name: value.clone() for name, value in holder.backbone.state_dict().items()}
        sent = dict(aligned)
    first = AugConv.from_conv(conv, key, order) if key is not None else holder.first.requires_grad_(False)
    inputs = morph(images, key) if key is not None else images
    batches = [(inputs[index], labels[index]) for index in holder_batch_order(len(images), seed).split(training.batch_size)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the holder's dropout masks
        train_epochs(first, holder.backbone, lambda: batches, epochs=1, lr=training.lr, momentum=training.momentum,
                     weight_decay=training.weight_decay)
    reply = {name: value.clone() for name, value in holder.backbone.state_dict().items() if name in set(shared)}
    return sent, aligned, reply


def holder_batch_order(count: int, seed: int) -> torch.Tensor:
    """The order in which the holder of :func:`holder_round` takes its images into local steps. The attack is given
    the labels in this order (``labels[holder_batch_order(...)]``): each simulated step then has the labels of the
    holder's step, an upper bound on an attacker who knows only which labels the holder has."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def order_from_alignment(model: SplitModel, aligned: dict[str, torch.Tensor]) -> torch.Tensor:
    """The channel order ``Pi`` with ``aligned[j] = plain[Pi[j]]`` on every order-sensitive entry, by a one-to-one
    assignment of the aligned channel slices to the server's own plain ones (exact for distinct slices)."""
    plain = model.backbone.state_dict()
    slices_plain, slices_aligned = [], []
    for name in order_sensitive_keys(model):
        if plain[name].dim() == 0:  # batch-norm's step counter: not indexed by channel
            continue
        dim = channel_dim(model, name)
        slices_plain.append(plain[name].double().movedim(dim, 0).reshape(plain[name].shape[dim], -1))
        slices_aligned.append(aligned[name].double().movedim(dim, 0).reshape(plain[name].shape[dim], -1))
    cost = torch.cdist(torch.cat(slices_aligned, dim=1), torch.cat(slices_plain, dim=1))
    _, order = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(order, dtype=torch.long)


def server_view(model: SplitModel, sent: dict, aligned: dict, reply: dict, *, shuffle: str,
                clip: float | None = None, noise: float = 0.0, seed: int = 0) -> tuple[ServerView, torch.Tensor | None]:
    """The observed update, clipped to ``clip`` as Flower's client-side clipping does (over every array sent) and,
    with ``noise``, with the Gaussian noise the server adds to one holder's aggregate. Returns the view and, for
    the federation's order, the order read from the align reply."""
    update = {name: reply[name].double() - sent[name].double() for name in reply}
    if clip is not None:
        norm = math.sqrt(sum(float(value.square().sum()) for value in update.values()))
        update = {name: value * min(1.0, clip / norm) if norm > 0 else value for name, value in update.items()}
    if noise > 0 and clip is None:
        raise UsageError("the noise of differential privacy is a multiple of the clipping norm; give clip with noise")
    if noise > 0:
        generator = torch.Generator().manual_seed(seed)
        update = {name: value + noise * clip * torch.randn(value.shape, generator=generator, dtype=torch.float64)
                  for name, value in update.items()}
    trainable = {name for name, _ in model.backbone.named_parameters()}
    update = {name: value for name, value in update.items() if name in trainable}
    if not update:
        raise UsageError("the reply carries no trainable backbone parameter: nothing to invert")
    recovered = order_from_alignment(model, aligned) if shuffle == "federation" else None
    order = recovered if recovered is not None else torch.arange(model.first.out_channels)
    start = dict(aligned) if shuffle == "federation" else {name: value.clone() for name, value in model.backbone.state_dict().items()}
    return ServerView(start, update, order), recovered


# ------------------------------------------------------------------------------------------ the attack
def simulate_update(model: SplitModel, view: ServerView, images: torch.Tensor, labels: torch.Tensor,
                    training: LocalTraining) -> dict[str, torch.Tensor]:
    """The update the holder would send for ``images`` (differentiable in them): the local SGD steps unrolled."""
    backbone = model.backbone
    names = [name for name, _ in backbone.named_parameters()]
    # fresh copies per call: batch-norm's running statistics are updated in place and would chain the calls' graphs
    start = {name: view.start[name].detach().to(images.dtype, copy=True).requires_grad_(True) for name in names}
    buffers = {name: value.detach().to(images.dtype if value.is_floating_point() else value.dtype, copy=True)
               for name, value in view.start.items() if name not in start}
    params, velocity = dict(start), {}
    features = model.first(images)[:, view.order]
    for step, (batch, batch_labels) in enumerate(zip(features.split(training.batch_size), labels.split(training.batch_size))):
        loss = F.cross_entropy(functional_call(backbone, {**params, **buffers}, (batch,)), batch_labels)
        grads = torch.autograd.grad(loss, [params[name] for name in names], create_graph=True)
        for name, grad in zip(names, grads):
            grad = grad + training.weight_decay * params[name]
            velocity[name] = grad if step == 0 else training.momentum * velocity[name] + grad
            params[name] = params[name] - training.lr * velocity[name]
    return {name: params[name] - start[name] for name in view.update}


def attacker_model(model: SplitModel) -> SplitModel:
    """The server's copy of the holder's model for simulating its training: batch-norm in training mode as the
    holder runs it, dropout at its expectation (the holder's masks are secret), the first layer frozen."""
    attacker = copy.deepcopy(model)
    attacker.first.requires_grad_(False)
    attacker.backbone.train()
    for module in attacker.backbone.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return attacker


def invert(model: SplitModel, view: ServerView, labels: torch.Tensor, training: LocalTraining, *, image_shape,
           mean: Sequence[float], std: Sequence[float], restarts: int = 4, iterations: int = 400, lr: float = 0.1,
           tv_weight: float = 1e-2, seed: int = 0, progress=None) -> Inversion:
    """Inverting Gradients with restarts; keeps the restart whose simulated update matches best."""
    attacker = attacker_model(model)
    target = torch.cat([view.update[name].reshape(-1) for name in view.update]).float()
    shape = (1, -1, 1, 1)
    low = ((0 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)).view(shape).float()
    high = ((1 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)).view(shape).float()
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    best, objectives = None, []
    for restart in range(restarts):
        dummy = (low + (high - low) * torch.rand(len(labels), *image_shape, generator=generator))
        dummy.requires_grad_(True)
        optimizer = torch.optim.Adam([dummy], lr=lr)
        milestones = [int(iterations * fraction) for fraction in (3 / 8, 5 / 8, 7 / 8)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        for _ in range(iterations):
            optimizer.zero_grad()
            simulated = simulate_update(attacker, view, dummy, labels, training)
            flat = torch.cat([simulated[name].reshape(-1) for name in view.update])
            objective = 1 - F.cosine_similarity(flat, target, dim=0) + tv_weight * total_variation(dummy)
            objective.backward()
            dummy.grad.sign_()  # signed gradients, as Inverting Gradients
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                dummy.copy_(torch.max(torch.min(dummy, high), low))
        final = float(objective.detach())
        objectives.append(final)
        if progress is not None:
            progress(f"  restart {restart + 1}/{restarts}: objective {final:.4f}")
        if best is None or final < best[0]:
            best = (final, dummy.detach().clone())
    return Inversion(best[1], best[0], objectives, time.perf_counter() - started)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (images[..., :, 1:] - images[..., :, :-1]).abs().mean()


def score(truth_pixels: torch.Tensor, reconstruction_pixels: torch.Tensor, public_mean_pixels: torch.Tensor) -> dict:
    """Best match per true image (SSIM, PSNR) and the image-specific figures on a one-to-one assignment by SSIM."""
    count = len(truth_pixels)
    recovered = reconstruction_pixels.double().clamp(0, 1)
    truth = truth_pixels.double()
    pairs_truth = truth.repeat_interleave(count, dim=0)
    pairs_recovered = recovered.repeat(count, 1, 1, 1)
    ssim = ssim_per_image(pairs_truth, pairs_recovered, data_range=1.0).reshape(count, count)
    psnr = psnr_per_image(pairs_truth, pairs_recovered, data_range=1.0).reshape(count, count)
    _, assigned = linear_sum_assignment(-ssim)
    assignment = torch.as_tensor(assigned, dtype=torch.long)
    specific = image_specific_quality(truth, recovered[assignment], public_mean_pixels)
    return {
        **specific,
        "ssim": float(ssim.max(axis=1).mean()),
        "psnr_db": float(psnr.max(axis=1).mean()),
        "ssim_per_image": ssim.max(axis=1).tolist(),
        "psnr_per_image": psnr.max(axis=1).tolist(),
        "assigned_ssim": float(ssim[np.arange(count), assigned].mean()),
        "assignment": assigned.tolist(),
    }


def plot_reconstructions(truth: torch.Tensor, reconstruction: torch.Tensor, assignment: Sequence[int], path: Path, *,
                         title: str, count: int = 8) -> Path:
    """True images above their assigned reconstructions."""
    count = min(count, len(truth))
    from matplotlib.figure import Figure  # here, so that a command pays for matplotlib only when it plots

    figure = Figure(figsize=(max(1.5 * count, 5.0), 4.0), layout="constrained")
    axes = figure.subplots(2, count, squeeze=False)
    for column in range(count):
        for row, image in enumerate((truth[column], reconstruction[assignment[column]])):
            axes[row][column].imshow(display_image(image), cmap="gray", vmin=0, vmax=1)
            axes[row][column].set_xticks([])
            axes[row][column].set_yticks([])
    axes[0][0].set_ylabel("true image", fontsize=8)
    axes[1][0].set_ylabel("reconstructed", fontsize=8)
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path

