"""What the attacks share: moving images between pixel units and the morphing domain, results files.

(What the attack *commands* share, the set-up of keys and argument helpers, is in :mod:`simulation.cli`.)

Units. A holder morphs normalised images (``(x / 255 - mean) / std`` per channel), zero-padded to the
key's domain when the key pads; that padded, normalised image is the plaintext ``D``. Attacks recover
``D`` and are scored in pixel units: ``D * std + mean`` (values in [0, 1], the padding becoming the mean
colour), cropped back to the image, clamped to [0, 1], against the original, with data range 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simulation.data import normalize
from simulation.errors import UsageError
from simulation.files import atomic_write_json
from simulation.imagemetrics import psnr_per_image, ssim_per_image


def normalized_images(images, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Float images as a holder morphs them: uint8 images get normalised, float ones are taken as normalised."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return normalize(images, mean, std)
    if not images.is_floating_point():
        raise UsageError(f"images must be uint8 or normalised floats, got {images.dtype}")
    return images.float()


def to_domain(normalized: torch.Tensor, padding: int) -> torch.Tensor:
    """The plaintext ``D`` in the key's domain layout: the normalised image, zero-padded as morphing does."""
    return F.pad(normalized, (padding,) * 4) if padding else normalized


def to_pixels(domain: torch.Tensor, mean: Sequence[float], std: Sequence[float], padding: int = 0) -> torch.Tensor:
    """Normalised domain-layout images back to pixel units ([0, 1] for real images), padding cropped when asked."""
    shape = (1, -1, 1, 1)
    pixels = domain.double() * torch.tensor(std, dtype=torch.float64).view(shape) + torch.tensor(mean, dtype=torch.float64).view(shape)
    return crop(pixels, padding)


def crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    return images[..., padding:-padding, padding:-padding] if padding else images


def reconstruction_quality(original_pixels: torch.Tensor, recovered_pixels: torch.Tensor) -> dict:
    """Mean PSNR (dB) and SSIM of reconstructions, clamped to [0, 1], against the originals (data range 1)."""
    recovered = recovered_pixels.double().clamp(0, 1)
    original = original_pixels.double()
    return {
        "psnr_db": float(np.mean(psnr_per_image(original, recovered, data_range=1.0))),
        "ssim": float(np.mean(ssim_per_image(original, recovered, data_range=1.0))),
    }


def with_public_brightness(images: torch.Tensor, public: torch.Tensor) -> torch.Tensor:
    """Each image standardised, then given the public images' mean and spread (all in normalised units): for
    reconstructions whose brightness and contrast the attack cannot know (batch-norm hides them from a gradient;
    a morphed image read as an image has a key's scale), the public images are the attacker's prior."""
    flat = images.double().flatten(1)
    standard = (flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True).clamp_min(1e-12)
    reference = public.double().flatten(1)
    return (standard * reference.std(dim=1).mean() + reference.mean()).reshape(images.shape)


def public_mean_image(images, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The null guess of a modality: the mean of public images (uint8 or normalised), in pixel units."""
    return to_pixels(normalized_images(images, mean, std).double().mean(dim=0, keepdim=True), mean, std)[0]


def image_specific_quality(original_pixels: torch.Tensor, recovered_pixels: torch.Tensor, public_mean_pixels: torch.Tensor) -> dict:
    """What a reconstruction reveals about each image beyond what the modality's mean image already gives.

    Medical images of one modality look alike, so SSIM or correlation alone says little. Beside the mean
    PSNR, SSIM and pixel correlation (per image, then averaged) this reports the same figures for the null
    guess (the mean public image for every image), the residual correlation (reconstruction minus the mean
    public image against truth minus the same mean, pooled over all attacked images) and the
    re-identification rate: the share of reconstructions whose own true image is the closest, by residual
    correlation, among all the attacked images, with its chance level ``1 / images``. All inputs are in pixel
    units ([0, 1]); reconstructions are clamped to [0, 1].
    """
    original = original_pixels.double()
    recovered = recovered_pixels.double().clamp(0, 1)
    mean_image = public_mean_pixels.double().reshape(original.shape[1:])
    null = mean_image.expand_as(original)
    count = len(original)
    residual_true = (original - mean_image).reshape(count, -1)
    residual_recovered = (recovered - mean_image).reshape(count, -1)
    similarity = _unit_rows(residual_recovered) @ _unit_rows(residual_true).T  # (reconstruction, true image)
    own = similarity.diagonal()
    others = similarity.masked_fill(torch.eye(count, dtype=torch.bool), -math.inf)  # a tie is not a re-identification
    return {
        **reconstruction_quality(original, recovered),
        "correlation": _mean_correlation(original, recovered),
        "null_psnr_db": float(np.mean(psnr_per_image(original, null, data_range=1.0))),
        "null_ssim": float(np.mean(ssim_per_image(original, null, data_range=1.0))),
        "null_correlation": _mean_correlation(original, null),
        "residual_correlation": _correlation(residual_recovered.reshape(-1), residual_true.reshape(-1)),
        "reidentification": float((own > others.max(dim=1).values).double().mean()) if count > 1 else None,
        "chance": 1.0 / count,
        "images": count,
    }


def rate_text(value: float | None) -> str:
    """A re-identification rate for a table: ``-`` where there is none (a single attacked image)."""
    return "-" if value is None else f"{value:.2f}"


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    centred = rows - rows.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two flat arrays; 0 when either is constant (nothing to correlate)."""
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def _mean_correlation(original: torch.Tensor, test: torch.Tensor) -> float:
    return float(np.mean([_correlation(o.reshape(-1), t.reshape(-1)) for o, t in zip(original, test)]))


def apply_blocks(rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Multiply ``(B, N)`` row vectors by a block-diagonal matrix given as ``(count, q, q)`` blocks.

    One block is repeated along the diagonal (``repeated`` and ``dense`` keys); several are used in turn.
    """
    count, q, _ = blocks.shape
    split = rows.reshape(rows.shape[0], -1, q)
    out = split @ blocks[0] if count == 1 else torch.einsum("bkq,kqr->bkr", split, blocks)
    return out.reshape(rows.shape)


def data_coordinates(image_shape: Sequence[int], padding: int) -> torch.Tensor:
    """Which coordinates of the unrolled domain hold image data (the others are always-zero padding)."""
    channels, height, width = image_shape
    mask = torch.zeros(channels, height + 2 * padding, width + 2 * padding, dtype=torch.bool)
    mask[:, padding : padding + height, padding : padding + width] = True
    return mask.reshape(-1)


# ------------------------------------------------------------------------------------------ results files
def jsonable(value):
    """Plain JSON values: numpy scalars and arrays become numbers and lists, non-finite floats strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_json(path: Path, payload) -> Path:
    return atomic_write_json(path, jsonable(payload))


def display_image(image: torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` image in [0, 1] as something ``imshow`` draws: ``(H, W)`` grey or ``(H, W, 3)`` colour."""
    array = image.detach().double().clamp(0, 1).cpu().numpy()
    return array[0] if array.shape[0] == 1 else np.moveaxis(array[:3], 0, -1)
