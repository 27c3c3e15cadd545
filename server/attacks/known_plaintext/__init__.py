"""Known-plaintext attack: from ``k`` pairs (image, morphed image) of one holder, solve ``T = D M`` for ``M``.

The attacker knows the scheme (family and block size ``q`` are configuration, not secrets) and the
dataset's normalisation statistics, and has ``k`` of the holder's images together with their morphed
versions. Least squares is structure-aware:

* ``repeated``: every block of every known image is one equation ``d M' = t`` for the same ``q x q``
  block, so the ``k * N/q`` block rows are stacked into one system;
* ``blocks``: each block position is its own system of ``k`` rows;
* ``dense``: one system of ``k`` rows and ``N`` unknowns per column.

Each system is solved for its minimum-norm solution, which is exact on the span of the known rows;
the holder's other morphed images are then decrypted by least squares against the recovered matrix.
Images that fall outside the span (too few known images) come back as their projection onto it.

How many known images that takes depends on the images: :func:`known_images_needed` is the count for
generic images; real ones can span less (most of digits' 8x8 images have background in their first
and last columns, so every row of a ``repeated`` key's system has the same value there), so
:func:`plaintext_rank` and :func:`known_images_spanning` measure it on the images at hand.

Command: ``python -m server.attacks.known_plaintext --help`` (in ``__main__.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from clients.keys import HolderKey
from clients.morphing import morph
from server.attacks.common import (
    data_coordinates,
    image_specific_quality,
    normalized_images,
    public_mean_image,
    to_domain,
    to_pixels,
)
from simulation.errors import UsageError

# Morphed images travel as float32 (rounding error 6e-8 of each value): along directions of the known
# plaintext whose singular value is below this fraction of the largest, the solution would be mostly
# amplified rounding noise, so they are left out. 1e-6 gave the best decryptions on CIFAR-10 and
# PneumoniaMNIST with exactly N known images (1e-7 lost up to 30 dB there; 1e-5 lost 25 dB for blocks).
RELATIVE_CUTOFF = 1e-6


@dataclass(frozen=True)
class RecoveredKey:
    """The attacker's estimate of a holder's matrix, one factored estimate per stored block.

    Block ``b`` is ``basis[b] @ coefficients[b]``: ``basis`` spans the known plaintext rows (``q x r``,
    orthonormal columns) and ``coefficients`` is ``r x q``. With enough known images ``r = q`` and the
    estimate is the whole block.
    """

    family: str
    basis: tuple[torch.Tensor, ...]
    coefficients: tuple[torch.Tensor, ...]
    known_images: int

    @property
    def rank(self) -> int:
        """Directions of the plaintext the known images determined, summed over the stored blocks."""
        return sum(v.shape[1] for v in self.basis)

    @property
    def blocks(self) -> torch.Tensor:
        """The estimated blocks, ``(count, q, q)`` float64."""
        return torch.stack([v @ w for v, w in zip(self.basis, self.coefficients)])

    def decrypt(self, morphed: torch.Tensor) -> torch.Tensor:
        """Least-squares plaintext ``D`` (domain layout, normalised units) of morphed images."""
        q = self.basis[0].shape[0]
        rows = morphed.double().reshape(morphed.shape[0], -1, q)
        if len(self.basis) == 1:  # one block for every position: solve all block rows at once
            plain = _solve_rows(rows.reshape(-1, q), self.basis[0], self.coefficients[0])
        else:
            plain = torch.stack([_solve_rows(rows[:, b], v, w) for b, (v, w) in enumerate(zip(self.basis, self.coefficients))], dim=1)
        return plain.reshape(morphed.shape)


def known_images_needed(family: str, block_size: int, image_shape: Sequence[int], padding: int = 0) -> int:
    """How many known images determine the matrix on all image-data coordinates, for generic images.

    A ``q x q`` block is fixed by ``q`` independent rows. Padding coordinates are always zero, so
    they need no equations (and cannot be recovered; they are never needed to decrypt). With
    ``padding = 0``: ``repeated`` needs ``ceil(q / (N/q))`` images (one image gives ``N/q`` block
    rows), ``blocks`` needs ``q`` and ``dense`` ``N``. Real images can be less generic (constant
    rows, or columns that are always background), so :func:`known_images_spanning` and the
    demonstration by :func:`attack_curve` are the measured figures.
    """
    mask = data_coordinates(image_shape, padding).reshape(-1, block_size)  # (N/q, q)
    if family == "dense":
        return int(mask.sum())
    if family == "blocks":
        return int(mask.sum(dim=1).max())
    if family == "repeated":
        unknowns = int(mask.any(dim=0).sum())
        rows_per_image = int(mask.any(dim=1).sum())
        return math.ceil(unknowns / rows_per_image)
    raise UsageError(f"unknown key family {family!r}; choose one of dense, blocks, repeated")


def full_rank(family: str, block_size: int, image_shape: Sequence[int], padding: int = 0) -> int:
    """The :func:`plaintext_rank` that determines the matrix on all image-data coordinates (padding excluded)."""
    mask = data_coordinates(image_shape, padding).reshape(-1, block_size)  # (N/q, q)
    if family == "repeated":  # one block for all positions: a direction per column that some position fills
        return int(mask.any(dim=0).sum())
    if family in ("blocks", "dense"):
        return int(mask.sum())
    raise UsageError(f"unknown key family {family!r}; choose one of dense, blocks, repeated")


def plaintext_rank(plain: torch.Tensor, *, family: str, block_size: int) -> int:
    """Rank of the equations that known plaintexts ``(k, C, H, W)`` (domain layout) give the attack, summed over the
    systems it solves, with its cut-off: the matrix is recovered on that many directions, and another image
    decrypts exactly when adding it leaves the rank unchanged."""
    return sum(_rank(a) for a in _systems(plain, family, block_size))


def known_images_spanning(known: torch.Tensor, targets: torch.Tensor, *, family: str, block_size: int,
                          start: int = 1) -> int | None:
    """The smallest ``k`` for which the first ``k`` of ``known`` span the equations of ``targets`` (both plaintexts in
    the domain layout), so that the targets decrypt exactly; None when all of ``known`` do not.

    The span only grows with ``k``. ``start`` (the computed count is a good guess) and one less are tried first; only
    when the answer lies elsewhere does this double and bisect: a few SVDs, not one per count (a dense key's system
    has ``N`` columns).
    """
    target_systems = _systems(targets, family, block_size)

    def spans(count: int) -> bool:
        pairs = zip(_systems(known[:count], family, block_size), target_systems)
        return all(_rank(torch.cat([a, extra])) == _rank(a) for a, extra in pairs)

    available = len(known)
    start = min(max(start, 1), available)
    if available == 0 or not spans(available):
        return None
    if spans(start):
        if start == 1 or not spans(start - 1):
            return start
        low, high = 0, start - 1  # images that span little: fewer than the guess suffice
    else:
        low, high = start, min(2 * start, available)
        while not spans(high):
            low, high = high, min(2 * high, available)
    # spans(high) holds; spans(low) does not (or low = 0)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if spans(middle) else (middle, high)
    return high


def recover_key(plain: torch.Tensor, morphed: torch.Tensor, *, family: str, block_size: int) -> RecoveredKey:
    """Solve ``morphed = plain M`` by least squares; both ``(k, C, H, W)`` in the domain layout."""
    if plain.shape != morphed.shape or plain.dim() != 4:
        raise UsageError(f"known images {tuple(plain.shape)} and morphed images {tuple(morphed.shape)} must be matching (k, C, H, W) batches")
    systems = zip(_systems(plain, family, block_size), _systems(morphed, family, block_size))
    factors = [_least_squares(a, b) for a, b in systems]
    return RecoveredKey(family, tuple(v for v, _ in factors), tuple(w for _, w in factors), plain.shape[0])


def matrix_error(recovered: RecoveredKey, key: HolderKey) -> float:
    """Relative Frobenius error of the recovered blocks on the rows that image data reach (for evaluation)."""
    truth = key.blocks().expand_as(recovered.blocks) if key.family != "blocks" else key.blocks()
    rows = data_coordinates(key.image_shape, key.padding).reshape(-1, key.block_size)
    if key.family != "blocks":
        rows = rows.any(dim=0, keepdim=True)
    difference = (recovered.blocks - truth)[rows]
    return float(difference.norm() / truth[rows].norm())


def attack_curve(
    key: HolderKey,
    images,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    known_counts: Sequence[int],
    test_images: int,
    public_images=None,
) -> list[dict]:
    """Run the attack with each number of known images; score the decryption of other images.

    ``images`` (uint8, or already normalised floats) are this holder's: the first ``max(known_counts)``
    are the known pairs, the last ``test_images`` are decrypted and scored (PSNR and SSIM in pixel
    units, see :mod:`server.attacks.common`) beside the null guess, the mean of ``public_images`` (default: every
    image but the decrypted ones). The holder morphs in float32, as in training. Each point
    has the ``rank`` the known images reached (out of :func:`full_rank`): below it, the images they do
    not span come back as projections.
    """
    normalized = normalized_images(images, mean, std)
    largest = max(known_counts)
    if largest + test_images > len(normalized):
        raise UsageError(
            f"{largest} known and {test_images} test images need {largest + test_images} images, only {len(normalized)} given; "
            "lower the known counts or the test images, or use a larger dataset"
        )
    null_mean = public_mean_image(normalized[:-test_images] if public_images is None else public_images, mean, std)
    normalized = torch.cat([normalized[:largest], normalized[-test_images:]])  # morph only the images used
    morphed = morph(normalized, key)  # float32, what the holder hands to training
    plain = to_domain(normalized, key.padding)
    test_morphed, test_original = morphed[-test_images:], to_pixels(plain[-test_images:], mean, std, key.padding)
    curve = []
    for count in sorted(known_counts):
        start = time.perf_counter()
        recovered = recover_key(plain[:count], morphed[:count], family=key.family, block_size=key.block_size)
        decrypted = to_pixels(recovered.decrypt(test_morphed), mean, std, key.padding)
        seconds = time.perf_counter() - start
        curve.append(
            {
                "known_images": count,
                "rank": recovered.rank,
                **image_specific_quality(test_original, decrypted, null_mean),
                "matrix_error": matrix_error(recovered, key),
                "seconds": seconds,
            }
        )
    return curve


def default_known_counts(needed: int, available: int) -> list[int]:
    """Powers of two up to twice the images needed, plus the count needed and one less, within what is available."""
    counts = {needed, max(needed - 1, 1)}
    power = 1
    while power <= 2 * needed:
        counts.add(power)
        power *= 2
    return sorted(c for c in counts if c <= available)


def plot_curve(curve: list[dict], path: Path, *, title: str, needed: int) -> Path:
    """PSNR and SSIM of the decrypted images against the number of known images (log scale)."""

    from matplotlib.figure import Figure  # here, so that a command pays for matplotlib only when it plots
    from matplotlib.ticker import FuncFormatter

    counts = [point["known_images"] for point in curve]
    figure = Figure(figsize=(8, 3.4), layout="constrained")
    for axes, field, label in zip(figure.subplots(1, 2), ("psnr_db", "ssim"),
                                  ("PSNR (dB, capped at 150)", "SSIM")):
        values = [min(point[field], 150.0) for point in curve]
        axes.plot(counts, values, marker="o", label="mean over the attacked images")
        axes.axvline(needed, color="grey", linestyle="--", label=f"needed for generic images (computed): {needed}")
        axes.set_xscale("log", base=2)
        axes.set_xticks(counts)
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.ticklabel_format(axis="y", useOffset=False, style="plain")
        if field == "ssim":
            axes.set_ylim(min(0.0, min(values) - 0.05), 1.05)
        axes.set_xlabel("known (image, morphed image) pairs")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right", fontsize=7)
    figure.suptitle(f"{title}\nPSNR and SSIM of the holder's other images, decrypted with the matrix recovered from "
                    "k known pairs", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _systems(domain: torch.Tensor, family: str, block_size: int) -> list[torch.Tensor]:
    """The rows of the systems the attack solves, from ``(k, C, H, W)`` images in the domain layout: all block rows
    for ``repeated``, one system per block position for ``blocks``, whole images for ``dense``."""
    q = block_size
    rows = domain.double().reshape(domain.shape[0], -1, q)  # (k, N/q, q)
    if family == "repeated":
        return [rows.reshape(-1, q)]
    if family == "blocks":
        return [rows[:, index] for index in range(rows.shape[1])]
    if family == "dense":
        return [rows[:, 0]]
    raise UsageError(f"unknown key family {family!r}; choose one of dense, blocks, repeated")


def _rank(a: torch.Tensor) -> int:
    """Numerical rank with the least squares' cut-off (0 for an all-zero system, such as an all-padding block)."""
    s = torch.linalg.svdvals(a)
    return int((s > RELATIVE_CUTOFF * s[0]).sum()) if s.numel() and s[0] > 0 else 0


def _solve_rows(rows: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Minimum-norm ``d`` with ``d @ basis @ coefficients = t`` for each row ``t``."""
    if basis.shape[1] == 0:  # a block the known images never reached (all padding): its plaintext is zero
        return torch.zeros_like(rows)
    weights = torch.linalg.lstsq(coefficients.T, rows.T).solution.T
    return weights @ basis.T


def _least_squares(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-norm solution of ``a x = b`` as ``x = basis @ coefficients``, tiny singular values of ``a`` cut off."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    rank = int((s > RELATIVE_CUTOFF * s[0]).sum()) if s.numel() and s[0] > 0 else 0  # as _rank, from the same SVD
    basis = vh[:rank].T  # (q, r)
    coefficients = (u[:, :rank].T @ b) / s[:rank, None]  # (r, q)
    return basis, coefficients
