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

Command: ``python -m server.attacks.known_plaintext --help``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clients.keys import HolderKey
from clients.morphing import morph
from server.attacks.common import (
    attack_parser,
    data_coordinates,
    normalized_images,
    parse_counts,
    positive_int,
    reconstruction_quality,
    run_command,
    to_domain,
    to_pixels,
    write_json,
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
    rows, for instance), so the demonstration by :func:`attack_curve` is the measured figure.
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


def recover_key(plain: torch.Tensor, morphed: torch.Tensor, *, family: str, block_size: int) -> RecoveredKey:
    """Solve ``morphed = plain M`` by least squares; both ``(k, C, H, W)`` in the domain layout."""
    if plain.shape != morphed.shape or plain.dim() != 4:
        raise UsageError(f"known images {tuple(plain.shape)} and morphed images {tuple(morphed.shape)} must be matching (k, C, H, W) batches")
    known = plain.shape[0]
    q = block_size
    d = plain.double().reshape(known, -1, q)  # (k, N/q, q)
    t = morphed.double().reshape(known, -1, q)
    if family == "repeated":
        systems = [(d.reshape(-1, q), t.reshape(-1, q))]
    elif family == "blocks":
        systems = [(d[:, index], t[:, index]) for index in range(d.shape[1])]
    elif family == "dense":
        systems = [(d[:, 0], t[:, 0])]
    else:
        raise UsageError(f"unknown key family {family!r}; choose one of dense, blocks, repeated")
    factors = [_least_squares(a, b) for a, b in systems]
    return RecoveredKey(family, tuple(v for v, _ in factors), tuple(w for _, w in factors), known)


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
) -> list[dict]:
    """Run the attack with each number of known images; score the decryption of other images.

    ``images`` (uint8, or already normalised floats) are this holder's: the first ``max(known_counts)``
    are the known pairs, the last ``test_images`` are decrypted and scored (PSNR and SSIM in pixel
    units, see :mod:`server.attacks.common`). The holder morphs in float32, as in training.
    """
    normalized = normalized_images(images, mean, std)
    largest = max(known_counts)
    if largest + test_images > len(normalized):
        raise UsageError(
            f"{largest} known and {test_images} test images need {largest + test_images} images, only {len(normalized)} given; "
            "lower the known counts or the test images, or use a larger dataset"
        )
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
                **reconstruction_quality(test_original, decrypted),
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
    from matplotlib.figure import Figure

    counts = [point["known_images"] for point in curve]
    figure = Figure(figsize=(8, 3.4), layout="constrained")
    for axes, field, label in zip(figure.subplots(1, 2), ("psnr_db", "ssim"), ("PSNR (dB)", "SSIM")):
        values = [min(point[field], 150.0) for point in curve]
        axes.plot(counts, values, marker="o")
        axes.axvline(needed, color="grey", linestyle="--", label=f"needed (computed): {needed}")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("known (image, morphed image) pairs")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right", fontsize=8)
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _solve_rows(rows: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Minimum-norm ``d`` with ``d @ basis @ coefficients = t`` for each row ``t``."""
    if basis.shape[1] == 0:  # a block the known images never reached (all padding): its plaintext is zero
        return torch.zeros_like(rows)
    weights = torch.linalg.lstsq(coefficients.T, rows.T).solution.T
    return weights @ basis.T


def _least_squares(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-norm solution of ``a x = b`` as ``x = basis @ coefficients``, tiny singular values of ``a`` cut off."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    rank = int((s > RELATIVE_CUTOFF * s[0]).sum()) if s.numel() and s[0] > 0 else 0  # 0 for an all-padding block
    basis = vh[:rank].T  # (q, r)
    coefficients = (u[:, :rank].T @ b) / s[:rank, None]  # (r, q)
    return basis, coefficients


# ------------------------------------------------------------------------------------------ command
def _parser() -> argparse.ArgumentParser:
    parser = attack_parser(
        "known_plaintext",
        "Known-plaintext attack on one holder's key: recover it from k known (image, morphed image) "
        "pairs by least squares, decrypt other images, and plot PSNR/SSIM against k.",
        holder_help="which holder's key to attack",
    )
    parser.add_argument("--known", type=parse_counts, default=None, help="known-image counts, e.g. 1,2,4 (default: powers of two up to twice the number needed)")
    parser.add_argument("--test-images", type=positive_int, default=32, help="images decrypted and scored at each point (default 32)")
    return parser


def _main(argv: list[str] | None) -> int:
    from simulation.keys import setup_from_arguments

    args = _parser().parse_args(argv)
    setup = setup_from_arguments(args, holders=args.holder + 1, with_model=False)
    key = setup.keys[args.holder]
    dataset = setup.dataset
    needed = known_images_needed(key.family, key.block_size, key.image_shape, key.padding)
    images = np.concatenate([dataset.train.images, dataset.test.images])
    counts = args.known or default_known_counts(needed, len(images) - args.test_images)
    curve = attack_curve(key, torch.from_numpy(images), mean=dataset.mean, std=dataset.std, known_counts=counts, test_images=args.test_images)
    for point in curve:
        print(f"k = {point['known_images']:>5}: PSNR {point['psnr_db']:7.2f} dB  SSIM {point['ssim']:.4f}  matrix error {point['matrix_error']:.2e}")
    summary = {"attack": "known_plaintext", **setup.describe(), "holder": args.holder, "key": key.summary(), "known_images_needed": needed, "test_images": args.test_images, "curve": curve}
    write_json(args.out / "known_plaintext.json", summary)
    title = f"known plaintext on {dataset.name}: {key.family} key, q = {key.block_size}, {key.entries} entries, padding {key.padding}"
    plot_curve(curve, args.out / "known_plaintext.png", title=title, needed=needed)
    print(f"wrote {args.out / 'known_plaintext.json'} and {args.out / 'known_plaintext.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
