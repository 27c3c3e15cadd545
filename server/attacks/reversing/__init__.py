"""Reversing attack: from the first layer ``C`` and a holder's AugConv ``C^ac = M^-1 C Pi``, recover ``Pi`` and ``M^-1``.

Whoever knows the first convolution (the server does when it pretrained it) and gets hold of a holder's
AugConv module proceeds in four steps, none of which needs the key or any image:

1. Read ``C^ac`` row by row: AugConv applied to the identity images of the domain (minus its output on
   an all-zero image, which is the bias) gives the rows of the fused matrix. ``C`` is read the same way
   from the plain convolution over the same domain.
2. Recover the channel order. Multiplying by ``M^-1`` on the left does not change the row space of a
   matrix, so the row space of ``C^ac`` is the row space of ``C`` with the channel groups of columns
   permuted by ``Pi``. Per output channel ``j`` the spectrum of ``Q_j Q_j^T`` (``Q`` an orthonormal
   basis of the row space, ``Q_j`` its coordinates in channel ``j``) is therefore the same for
   channel ``j`` of ``C^ac`` as for channel ``Pi(j)`` of ``C``: an assignment (Hungarian algorithm) on
   the distances between these spectra gives ``Pi``. This needs a proper row space: ``C`` must have
   full row rank ``N < beta*n^2``. To keep the work small, every channel's ``n^2`` columns are first
   compressed by one shared random ``n^2 x s`` projection, which commutes with the channel
   permutation; ``s`` is chosen so that the compressed matrix keeps about twice the rank ``N`` needs.
3. ``M^-1 = C^ac Pi^-1 C^+`` (least squares on the compressed matrices, exact when ``C`` has full row
   rank).
4. Decrypt: ``D = T M^-1``.

A convolution with a bias gives the order away directly: AugConv's output on an all-zero image is the
bias in the secret order. :func:`reversing_attack` reports whether that alone recovers the order.

Command: ``python -m server.attacks.reversing --help`` (in ``__main__.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from clients.augconv import AugConv
from clients.keys import HolderKey
from clients.morphing import morph
from server.attacks.common import image_specific_quality, normalized_images, public_mean_image, to_domain, to_pixels
from simulation.errors import UsageError

PROBE_CHUNK = 256
# Columns kept per channel relative to N / beta: twice the minimum for a proper row space.
COMPRESSION_FACTOR = 2.0


@dataclass
class ReversingResult:
    """What the attacker recovered, and what it cost."""

    order: list[int]  # AugConv output channel j is the convolution's channel order[j]
    inverse: torch.Tensor  # estimate of M^-1, N x N, float64
    rank: int  # numerical rank of the (compressed) convolution matrix
    domain_size: int  # N
    compressed_columns: int  # s per channel
    bias_order: list[int] | None  # the order read off the bias alone, when the layer has one
    seconds: float
    details: dict = field(default_factory=dict)

    @property
    def full_row_rank(self) -> bool:
        return self.rank == self.domain_size

    def decrypt(self, morphed: torch.Tensor) -> torch.Tensor:
        """Plaintext ``D = T M^-1`` of morphed images (domain layout, normalised units)."""
        rows = morphed.double().reshape(morphed.shape[0], -1)
        return (rows @ self.inverse).reshape(morphed.shape)


def reversing_attack(conv: nn.Conv2d, augconv: AugConv, *, seed: int = 0) -> ReversingResult:
    """Recover the channel order and ``M^-1`` from the plain first layer and a holder's AugConv."""
    start = time.perf_counter()
    domain = tuple(augconv.domain_shape)
    size = math.prod(domain)
    channels, plane = augconv.out_channels, math.prod(augconv.output_size)
    offset = _conv_offset(conv, augconv)
    weight = conv.weight.detach().double().cpu()
    if weight.shape[0] != channels or weight.shape[1] != domain[0]:
        raise UsageError(f"the convolution ({weight.shape[0]} x {weight.shape[1]} channels) does not match the AugConv; use the holder's first layer")

    # Each compressed column of C spans at most min(beta, alpha*p^2) independent directions (every channel's
    # map is a combination of the alpha*p^2 shifted images): keep enough columns for twice the rank needed.
    directions = min(channels, domain[0] * math.prod(conv.kernel_size))
    columns = min(plane, math.ceil(COMPRESSION_FACTOR * size / directions))
    projection = _projection(plane, columns, seed)
    fused = _read_rows(lambda x: augconv(x.float()).double(), domain, projection)  # (N, beta, s)
    plain = _read_rows(lambda x: F.conv2d(x, weight, padding=offset), domain, projection)

    plain_basis, plain_r = torch.linalg.qr(plain.reshape(size, -1).T)  # (beta*s, N), (N, N)
    fused_basis, _ = torch.linalg.qr(fused.reshape(size, -1).T)
    diagonal = plain_r.diagonal().abs()
    rank = int((diagonal > 1e-9 * diagonal.max()).sum())
    plain_spectra = _channel_spectra(plain_basis, channels, columns)
    fused_spectra = _channel_spectra(fused_basis, channels, columns)
    cost = torch.cdist(fused_spectra, plain_spectra).numpy()
    _, order = linear_sum_assignment(cost)
    matched = cost[np.arange(channels), order]
    runner_up = np.sort(cost, axis=1)[:, 1] if channels > 1 else matched

    # M^-1 C' = C^ac' Pi^-1: put AugConv's channels back in the convolution's order, then solve against C'.
    unpermuted = torch.empty_like(fused)
    unpermuted[:, torch.as_tensor(order)] = fused
    if rank == size:  # C' = R^T Q^T with R square and invertible: M^-1 = C^ac' Pi^-1 Q R^-T
        solution = torch.linalg.solve_triangular(plain_r, plain_basis.T @ unpermuted.reshape(size, -1).T, upper=True)
    else:  # C lacks full row rank: M^-1 is not determined; take the minimum-norm least-squares answer
        solution = torch.linalg.pinv(plain.reshape(size, -1).T) @ unpermuted.reshape(size, -1).T
    inverse = solution.T  # (N, N): rows of M^-1

    bias_order = _order_from_bias(conv, augconv)
    return ReversingResult(
        order=order.tolist(),
        inverse=inverse,
        rank=rank,
        domain_size=size,
        compressed_columns=columns,
        bias_order=bias_order,
        seconds=time.perf_counter() - start,
        details={"assignment_cost_max": float(matched.max()), "runner_up_cost_min": float(runner_up.min())},
    )


def evaluate_reversing(
    conv: nn.Conv2d,
    key: HolderKey,
    order: Sequence[int] | None,
    images,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    public_images=None,
) -> dict:
    """Build the holder's AugConv, attack it, and score the result against the truth.

    ``images`` (uint8 or normalised floats) are the holder's, decrypted from their float32 morphed form;
    ``public_images`` (default: ``images`` themselves) give the mean image of the null guess.
    """
    true_order = list(range(conv.out_channels)) if order is None else [int(c) for c in order]
    augconv = AugConv.from_conv(conv, key, true_order)
    result = reversing_attack(conv, augconv, seed=seed)
    normalized = normalized_images(images, mean, std)
    decrypted = to_pixels(result.decrypt(morph(normalized, key)), mean, std, key.padding)
    original = to_pixels(to_domain(normalized, key.padding), mean, std, key.padding)
    truth = key.matrix(inverse=True)
    return {
        "order_recovered": result.order == true_order,
        "channels_matched": int(sum(a == b for a, b in zip(result.order, true_order))),
        "channels": conv.out_channels,
        "bias_reveals_order": None if result.bias_order is None else result.bias_order == true_order,
        "full_row_rank": result.full_row_rank,
        "rank": result.rank,
        "domain_size": result.domain_size,
        "compressed_columns": result.compressed_columns,
        "inverse_matrix_error": float((result.inverse - truth).norm() / truth.norm()),
        **image_specific_quality(original, decrypted, public_mean_image(images if public_images is None else public_images, mean, std)),
        "decrypted_images": len(normalized),
        "seconds": result.seconds,
        **result.details,
    }


# ------------------------------------------------------------------------------------------ internals
def _conv_offset(conv: nn.Conv2d, augconv: AugConv) -> tuple[int, int]:
    """Zero padding the convolution adds around the morphing domain (0 when the key already padded)."""
    kernel = conv.kernel_size
    offset = tuple((out - side + k - 1) // 2 for out, side, k in zip(augconv.output_size, augconv.domain_shape[1:], kernel))
    if any(o < 0 for o in offset):
        raise UsageError("the convolution's kernel does not fit this AugConv; use the holder's first layer")
    return offset


def _projection(plane: int, columns: int, seed: int) -> torch.Tensor | None:
    """A random ``plane x columns`` matrix with orthonormal columns (None: keep all columns)."""
    if columns == plane:
        return None
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(plane, columns, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q


def _read_rows(layer, domain: tuple[int, ...], projection: torch.Tensor | None) -> torch.Tensor:
    """Rows of the linear part of ``layer`` over the domain: ``(N, beta, s)``, each channel compressed."""
    size = math.prod(domain)
    with torch.no_grad():
        bias = layer(torch.zeros(1, *domain, dtype=torch.float64))
        rows = []
        for start in range(0, size, PROBE_CHUNK):
            stop = min(size, start + PROBE_CHUNK)
            probes = torch.zeros(stop - start, size, dtype=torch.float64)
            probes[torch.arange(stop - start), torch.arange(start, stop)] = 1
            out = (layer(probes.reshape(-1, *domain)) - bias).flatten(2)  # (chunk, beta, n^2)
            rows.append(out if projection is None else out @ projection)
    return torch.cat(rows)


def _channel_spectra(basis: torch.Tensor, channels: int, columns: int) -> torch.Tensor:
    """Sorted eigenvalues of ``Q_j Q_j^T`` for every channel ``j``: invariant under ``M^-1``."""
    per_channel = basis.reshape(channels, columns, -1)
    return torch.linalg.eigvalsh(per_channel @ per_channel.transpose(1, 2)).float()


def _order_from_bias(conv: nn.Conv2d, augconv: AugConv) -> list[int] | None:
    if conv.bias is None or augconv.bias is None:
        return None
    plain = conv.bias.detach().double().cpu()
    fused = augconv.bias.detach().double().cpu()
    _, order = linear_sum_assignment(torch.cdist(fused[:, None], plain[:, None]).numpy())
    return order.tolist()
