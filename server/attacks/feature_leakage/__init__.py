"""Feature leakage: how recognisable are AugConv's outputs?

AugConv turns a morphed image into the plain image's first-layer feature maps (in the secret channel
order, which hides which map is which but not what each map shows). Anyone who sees those outputs
(the training computation does) can simply look at them. For each channel this module measures how
close the map is to the grey original: SSIM after min-max scaling the map to [0, 1] (the better of the
map and its negative, since an inverted picture is just as recognisable), and the normalised (Pearson)
correlation. Maps of another size than the image are resized to it (bilinear).

Command: ``python -m server.attacks.feature_leakage --help`` (in ``__main__.py``; writes a grid of the maps as a PNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clients.augconv import AugConv
from server.attacks.common import display_image
from simulation.imagemetrics import ssim_per_image

GRID_COLUMNS = 8


def feature_maps(augconv: AugConv, morphed: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """AugConv's output maps for a batch of morphed images, resized to ``size`` (``(B, beta, H, W)``, float64)."""
    with torch.no_grad():
        maps = augconv(morphed.to(augconv.weight.dtype)).double()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps


def leakage(maps: torch.Tensor, originals: torch.Tensor) -> dict:
    """Similarity of every map to its grey original: ``maps`` ``(B, beta, H, W)``, ``originals`` ``(B, C, H, W)`` in [0, 1].

    Returns per-channel SSIM (sign-agnostic) and correlation, each ``(B, beta)``, and their summaries.
    """
    batch, channels = maps.shape[:2]
    grey = originals.double().mean(dim=1, keepdim=True).expand(-1, channels, -1, -1).reshape(batch * channels, 1, *maps.shape[-2:])
    scaled = _unit_range(maps.reshape(batch * channels, 1, *maps.shape[-2:]))
    ssim_positive = ssim_per_image(grey, scaled, data_range=1.0)
    ssim_negative = ssim_per_image(grey, 1 - scaled, data_range=1.0)
    ssim = np.maximum(ssim_positive, ssim_negative).reshape(batch, channels)
    correlation = _correlation(maps.reshape(batch * channels, -1), grey.reshape(batch * channels, -1)).reshape(batch, channels)
    best = ssim.argmax(axis=1)
    return {
        "ssim": ssim,
        "correlation": correlation,
        "best_channel_ssim_mean": float(ssim.max(axis=1).mean()),
        "channel_ssim_mean": float(ssim.mean()),
        "best_abs_correlation_mean": float(np.abs(correlation).max(axis=1).mean()),
        "abs_correlation_mean": float(np.abs(correlation).mean()),
        "best_channel": best.tolist(),
    }


def plot_feature_grid(original: torch.Tensor, maps: torch.Tensor, ssim: np.ndarray, path: Path, *, title: str) -> Path:
    """The original and every channel map of one image, each map titled with its SSIM to the original."""
    from matplotlib.figure import Figure

    channels = maps.shape[0]
    rows = 1 + -(-channels // GRID_COLUMNS)
    figure = Figure(figsize=(1.25 * GRID_COLUMNS, 1.35 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, GRID_COLUMNS, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(display_image(original), cmap="gray" if original.shape[0] == 1 else None, vmin=0, vmax=1)
    axes[0, 0].set_title("original", fontsize=7)
    for channel in range(channels):
        ax = axes[1 + channel // GRID_COLUMNS, channel % GRID_COLUMNS]
        ax.imshow(maps[channel].cpu().numpy(), cmap="gray")
        ax.set_title(f"ch {channel}: SSIM {ssim[channel]:.2f}", fontsize=6)
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """Min-max scale each image to [0, 1] (a constant image becomes 0.5)."""
    flat = images.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (flat - low) / span.clamp_min(1e-300), 0.5).reshape(images.shape)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denominator > 0, (a * b).sum(dim=1) / denominator.clamp_min(1e-300), 0.0).numpy()
