"""Ciphertext-only attack: from one holder's morphed images and public images of the same kind, estimate ``M^-1``.

The attacker (the party that trains for a holder, which sees its morphed images; never a plaintext of that
holder) knows the scheme (family and block size ``q`` are settings, not secrets) and the normalisation
statistics, and has public images of the same modality. Morphing maps every block row ``d`` (``q``
consecutive coordinates of the unrolled, normalised, padded image) at position ``p`` to ``t = d M_b(p)``:
one block for all positions of a ``repeated`` key, one per position for ``blocks``, and a single ``N x N``
block for ``dense``. So the decryption blocks ``W_b = M_b^-1`` turn the morphed images' block statistics
into the plaintext's, which public images estimate:

* per position ``p``: ``mean_T[p] W = mean_D[p]`` and ``W^T S_T[p] W = S_D[p]`` (second moments);
* between positions ``p`` and ``p + lag`` (the next block row of the image, and the same row of the next
  colour channel): ``W_b(p)^T X_T[p] W_b(p+lag) = X_D[p]``.

Two stages, both reported:

1. ``second_order`` (closed form). Per block, the pooled second moments fix ``W`` up to an orthogonal ``U``:
   ``W = S_T^-1/2 U S_D^1/2``. For a ``repeated`` key the per-position second moments, whitened, are
   ``U^T G_p U = H_p`` for every position: ``U`` maps the eigenvectors of a random combination of the ``G_p``
   onto those of the same combination of the ``H_p`` (joint diagonalisation, as in second-order blind source
   separation), and the per-position means fix each eigenvector's sign. A ``blocks`` or ``dense`` key has one
   position per block, so only the means constrain ``U`` (an orthogonal Procrustes fit to one vector).
2. ``refined``: L-BFGS over all decryption blocks at once, from stage 1, matching every statistic above
   (each term relative to its target's norm). It is skipped for blocks of more than ``REFINE_MAX_Q``
   coordinates (a dense key's ``N x N`` statistics make each step cost ``N^3``), and the result says so.

Scores (:func:`server.attacks.common.image_specific_quality`) compare the reconstructions of the attacked
morphed images with their true images, beside the null guess (the mean public image) and the identity guess
(each morphed image read as if it were the image, rescaled to the public images' mean and spread).

Command: ``python -m server.attacks.ciphertext_only --help`` (in ``__main__.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from clients.keys import HolderKey
from clients.morphing import morph
from server.attacks.common import (
    display_image,
    image_specific_quality,
    normalized_images,
    public_mean_image,
    to_domain,
    to_pixels,
    with_public_brightness,
)
from simulation.errors import UsageError

REFINE_MAX_Q = 256
REFINE_ITERATIONS = 300
EIGENVALUE_FLOOR = 1e-9  # relative: directions the images never vary along (padding) are left out, not inverted


@dataclass(frozen=True)
class BlockStatistics:
    """Moments of the block rows of a batch of domain-layout images, in float64."""

    mean: torch.Tensor  # (P, q): per position
    second: torch.Tensor  # (P, q, q): per position, not centred
    lagged: dict[int, torch.Tensor]  # lag -> (P - lag, q, q): E[d_p^T d_{p+lag}]
    images: int

    @classmethod
    def of(cls, domain: torch.Tensor, block_size: int, lags: Sequence[int]) -> "BlockStatistics":
        rows = domain.double().reshape(domain.shape[0], -1, block_size)
        count = rows.shape[0]
        second = torch.einsum("npi,npj->pij", rows, rows) / count
        lagged = {lag: torch.einsum("npi,npj->pij", rows[:, :-lag], rows[:, lag:]) / count for lag in lags}
        return cls(rows.mean(dim=0), second, lagged, count)


def statistic_lags(family: str, block_size: int, domain_shape: Sequence[int]) -> list[int]:
    """Position offsets whose cross moments the attack matches: the next block row, and the next colour channel."""
    if family == "dense":
        return []
    channels, height, width = domain_shape
    positions = channels * height * width // block_size
    lags = {max(width // block_size, 1)}  # the block straight below (the next row when q = width)
    if channels > 1:
        lags.add(height * width // block_size)
    return sorted(lag for lag in lags if lag < positions)


def position_blocks(family: str, positions: int) -> torch.Tensor:
    """Which decryption block each position uses."""
    return torch.arange(positions) if family == "blocks" else torch.zeros(positions, dtype=torch.long)


def decrypt(morphed: torch.Tensor, blocks: torch.Tensor, family: str) -> torch.Tensor:
    """Apply decryption blocks ``(count, q, q)`` to morphed domain-layout images."""
    q = blocks.shape[-1]
    rows = morphed.double().reshape(morphed.shape[0], -1, q)
    plain = rows @ blocks[0] if family != "blocks" else torch.einsum("npq,pqr->npr", rows, blocks)
    return plain.reshape(morphed.shape)


def second_order_estimate(morphed: BlockStatistics, public: BlockStatistics, family: str, *, seed: int = 0) -> torch.Tensor:
    """Stage 1: decryption blocks from pooled second moments, their per-position structure and the means."""
    owner = position_blocks(family, morphed.mean.shape[0])
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for block in range(int(owner.max()) + 1):
        at = owner == block
        (t_root_inv,) = _matrix_powers(morphed.second[at].mean(dim=0), -0.5)
        d_root_inv, d_root = _matrix_powers(public.second[at].mean(dim=0), -0.5, 0.5)
        whitened_t_means = morphed.mean[at] @ t_root_inv
        whitened_d_means = public.mean[at] @ d_root_inv
        if int(at.sum()) > 1:
            weights = torch.randn(int(at.sum()), generator=generator, dtype=torch.float64)
            g = torch.einsum("p,pij->ij", weights, t_root_inv @ morphed.second[at] @ t_root_inv)
            h = torch.einsum("p,pij->ij", weights, d_root_inv @ public.second[at] @ d_root_inv)
            _, v_g = torch.linalg.eigh((g + g.T) / 2)
            _, v_h = torch.linalg.eigh((h + h.T) / 2)
            signs = torch.sign(((whitened_t_means @ v_g) * (whitened_d_means @ v_h)).sum(dim=0))
            signs[signs == 0] = 1
            rotation = v_g @ torch.diag(signs) @ v_h.T
        else:
            rotation = _procrustes(whitened_t_means, whitened_d_means)
        estimates.append(t_root_inv @ rotation @ d_root)
    return torch.stack(estimates)


def refine(start: torch.Tensor, morphed: BlockStatistics, public: BlockStatistics, family: str,
           *, iterations: int = REFINE_ITERATIONS) -> torch.Tensor:
    """Stage 2: L-BFGS over the decryption blocks, matching means, second moments and lagged cross moments."""
    owner = position_blocks(family, morphed.mean.shape[0])
    blocks = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([blocks], max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-15)

    def relative(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (estimate - target).square().sum() / target.square().sum().clamp_min(1e-30)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        w = blocks[owner]
        value = relative(torch.einsum("pi,pij->pj", morphed.mean, w), public.mean)
        value = value + relative(w.transpose(1, 2) @ morphed.second @ w, public.second)
        for lag, cross in morphed.lagged.items():
            value = value + relative(w[:-lag].transpose(1, 2) @ cross @ w[lag:], public.lagged[lag])
        value.backward()
        return value

    optimizer.step(loss)
    return blocks.detach()


def attack(key: HolderKey, holder_images, public_images, *, mean: Sequence[float], std: Sequence[float],
           attacked: int | None = None, seed: int = 0) -> dict:
    """Run both stages with the given holder images (morphed by ``key``) and public images; score the
    reconstructions of the first ``attacked`` holder images (all by default). Returns the figures and the images."""
    holder = normalized_images(holder_images, mean, std)
    public = to_domain(normalized_images(public_images, mean, std), key.padding)
    if len(holder) < 2 or len(public) < 2:
        raise UsageError(f"the attack needs at least 2 holder images and 2 public images, got {len(holder)} and {len(public)}")
    morphed = morph(holder, key).double()  # float32, what the holder hands to training
    plain = to_domain(holder, key.padding)
    lags = statistic_lags(key.family, key.block_size, key.domain_shape)
    start = time.perf_counter()
    morphed_stats = BlockStatistics.of(morphed, key.block_size, lags)
    public_stats = BlockStatistics.of(public, key.block_size, lags)
    estimates = {"second_order": second_order_estimate(morphed_stats, public_stats, key.family, seed=seed)}
    refined = key.block_size <= REFINE_MAX_Q
    if refined:
        estimates["refined"] = refine(estimates["second_order"], morphed_stats, public_stats, key.family)
    seconds = time.perf_counter() - start
    scored = slice(0, attacked or len(holder))
    truth = to_pixels(plain[scored], mean, std, key.padding)
    public_mean = public_mean_image(public_images, mean, std)
    reconstructions = {name: to_pixels(decrypt(morphed[scored], blocks, key.family), mean, std, key.padding)
                       for name, blocks in estimates.items()}
    reconstructions["identity_guess"] = to_pixels(with_public_brightness(morphed[scored], public), mean, std, key.padding)
    stages = {name: image_specific_quality(truth, images, public_mean) for name, images in reconstructions.items()}
    best = "refined" if refined else "second_order"
    return {
        "result": {**stages[best], "stage": best, "refined": refined, "stages": stages,
                   "holder_images": len(holder), "public_images": len(public), "seconds": seconds},
        "truth": truth, "morphed": to_pixels(morphed[scored], mean, std, key.padding), "reconstruction": reconstructions[best],
    }


def plot_examples(truth: torch.Tensor, morphed: torch.Tensor, reconstruction: torch.Tensor, path: Path, *, title: str,
                  count: int = 6) -> Path:
    """True, morphed (min-max scaled) and reconstructed images side by side, one column per image."""
    count = min(count, len(truth))
    from matplotlib.figure import Figure  # here, so that a command pays for matplotlib only when it plots

    figure = Figure(figsize=(1.6 * count, 5.2), layout="constrained")
    axes = figure.subplots(3, count, squeeze=False)
    low = morphed.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
    high = morphed.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    shown = (morphed - low) / (high - low).clamp_min(1e-12)
    for row, (images, label) in enumerate(((truth, "true image"), (shown, "morphed (scaled)"), (reconstruction, "reconstructed"))):
        for column in range(count):
            axes[row][column].imshow(display_image(images[column]), cmap="gray", vmin=0, vmax=1)
            axes[row][column].set_xticks([])
            axes[row][column].set_yticks([])
        axes[row][0].set_ylabel(label, fontsize=8)
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _matrix_powers(matrix: torch.Tensor, *powers: float) -> tuple[torch.Tensor, ...]:
    """Symmetric matrix powers from one eigendecomposition; eigenvalues below the floor (directions never reached)
    are set to zero."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    keep = values > EIGENVALUE_FLOOR * values.max().clamp_min(1e-300)
    return tuple(vectors @ torch.diag(torch.where(keep, values.clamp_min(1e-300) ** power, torch.zeros_like(values))) @ vectors.T
                 for power in powers)


def _procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``U`` that brings the rows of ``source`` closest to those of ``target``."""
    u, _, vh = torch.linalg.svd(source.T @ target)
    return u @ vh
