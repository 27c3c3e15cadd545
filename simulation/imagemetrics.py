"""Image similarity: PSNR and SSIM (Wang et al. 2004), and the scaling that makes morphed images comparable.

SSIM uses the parameters of Wang et al.: an 11-tap Gaussian window with sigma 1.5 (truncated at 3.5 sigma),
K1 = 0.01, K2 = 0.03, population (not sample) covariances, the filter extended at the borders by
reflection, and the mean taken over the map without a border of half a window. Multi-channel images
(channels first) get the mean of the per-channel values. This is what
``skimage.metrics.structural_similarity(a, b, data_range=R, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, channel_axis=0)`` computes. Images smaller than the window (MNIST-sized
images are fine; 8x8 digits are not) keep the same filter but drop a thinner border: half of the largest
odd window that fits, as skimage does when given that ``win_size``.

Inputs are numpy arrays or torch tensors, computed in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5: an 11-tap window, as scipy.ndimage rounds it


def psnr(reference, test, *, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB over the whole array; infinite for identical arrays."""
    reference, test = _pair(reference, test)
    mse = float(np.mean(np.square(reference - test)))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def psnr_per_image(reference, test, *, data_range: float) -> np.ndarray:
    """PSNR of each image of a batch ``(B, ...)``."""
    reference, test = _pair(reference, test)
    mse = np.square(reference - test).reshape(len(reference), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def ssim(reference, test, *, data_range: float) -> float:
    """Mean SSIM of one image, ``(H, W)`` or channels first ``(C, H, W)`` (mean over channels)."""
    reference, test = _pair(reference, test)
    if reference.ndim not in (2, 3):
        raise ValueError(f"ssim expects one (H, W) or (C, H, W) image, got shape {reference.shape}")
    return float(_ssim_channels(reference.reshape(-1, *reference.shape[-2:]), test.reshape(-1, *test.shape[-2:]), data_range).mean())


def ssim_per_image(reference, test, *, data_range: float) -> np.ndarray:
    """SSIM of each image of a batch ``(B, C, H, W)`` or ``(B, H, W)``."""
    reference, test = _pair(reference, test)
    if reference.ndim == 3:
        reference, test = reference[:, None], test[:, None]
    if reference.ndim != 4:
        raise ValueError(f"ssim_per_image expects a (B, C, H, W) or (B, H, W) batch, got shape {reference.shape}")
    return _ssim_channels(reference, test, data_range).mean(axis=1)


def scale_to_reference(images, reference) -> torch.Tensor:
    """Min-max scale each image of a batch to the value range of the matching reference image.

    Morphed images are not images: their values can lie anywhere. Scaling each one to its original's
    range is what makes PSNR and SSIM between an original and its morphed version meaningful.
    A constant image maps to the middle of the range.
    """
    images = torch.as_tensor(images, dtype=torch.float64)
    reference = torch.as_tensor(reference, dtype=torch.float64)
    flat, ref = images.flatten(1), reference.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    ref_low, ref_high = ref.min(dim=1, keepdim=True).values, ref.max(dim=1, keepdim=True).values
    span = high - low
    unit = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1), torch.full_like(flat, 0.5))
    return (ref_low + unit * (ref_high - ref_low)).reshape(images.shape)


# ------------------------------------------------------------------------------------------ internals
def _pair(reference, test) -> tuple[np.ndarray, np.ndarray]:
    reference, test = _as_array(reference), _as_array(test)
    if reference.shape != test.shape:
        raise ValueError(f"images of different shapes: {reference.shape} and {test.shape}")
    return reference, test


def _as_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    return np.asarray(images, dtype=np.float64)


def _gaussian_taps() -> np.ndarray:
    offsets = np.arange(-_RADIUS, _RADIUS + 1)
    taps = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _filter(images: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over the last two axes, borders extended by half-sample reflection."""
    taps = _gaussian_taps()
    for axis in (-2, -1):
        width = [(0, 0)] * images.ndim
        width[axis] = (_RADIUS, _RADIUS)
        padded = np.pad(images, width, mode="symmetric")
        length = images.shape[axis]
        images = sum(tap * np.take(padded, np.arange(i, i + length), axis=axis) for i, tap in enumerate(taps))
    return images


def _ssim_channels(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """SSIM of every channel of ``(..., H, W)`` images: the cropped mean of the SSIM map."""
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mean_x, mean_y = _filter(x), _filter(y)
    var_x = _filter(x * x) - mean_x**2
    var_y = _filter(y * y) - mean_y**2
    cov = _filter(x * y) - mean_x * mean_y
    ssim_map = (2 * mean_x * mean_y + c1) * (2 * cov + c2) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    height, width = x.shape[-2:]
    fitting = min(2 * _RADIUS + 1, *((side - 1) | 1 for side in (height, width)))
    border = (fitting - 1) // 2
    cropped = ssim_map[..., border : height - border, border : width - border]
    return cropped.mean(axis=(-2, -1))
