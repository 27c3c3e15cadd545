"""Morph images with a holder's key, ``T = D M`` (and back, for the holder's own checks).

Both functions are batched, run on the images' device and dtype, and use the block structure of
the key: ``blocks`` and ``repeated`` keys never become a dense ``N x N`` matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clients.keys import HolderKey, MorphingKeyError


def morph(images: torch.Tensor, key: HolderKey) -> torch.Tensor:
    """Morph ``(B, C, H, W)`` images; returns ``(B, C, H', W')`` in the key's domain layout.

    For keys over the padded image (``key.padding > 0``) the images are zero-padded first, so
    the result has the padded shape, as in the MoLe reference code.
    """
    _check_images(images, key.image_shape, "images", "the key's image shape")
    if key.padding:
        images = F.pad(images, (key.padding,) * 4)
    return _apply_blocks(images, key, inverse=False)


def unmorph(morphed: torch.Tensor, key: HolderKey) -> torch.Tensor:
    """Invert :func:`morph`: ``D = T M^-1``, with the padding removed again."""
    _check_images(morphed, key.domain_shape, "morphed images", "the key's domain shape")
    images = _apply_blocks(morphed, key, inverse=True)
    if key.padding:
        p = key.padding
        images = images[..., p:-p, p:-p]
    return images


def _apply_blocks(images: torch.Tensor, key: HolderKey, inverse: bool) -> torch.Tensor:
    batch = images.shape[0]
    blocks = key.blocks(device=images.device, dtype=images.dtype, inverse=inverse)
    rows = images.reshape(batch, key.num_blocks, key.block_size)
    if key.family == "blocks":
        out = torch.einsum("bkq,kqr->bkr", rows, blocks)
    else:
        out = rows @ blocks[0]
    return out.reshape(images.shape)


def _check_images(images: torch.Tensor, expected: tuple[int, ...], what: str, reference: str) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise MorphingKeyError(f"{what} must be a floating-point torch tensor, got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(expected):
        raise MorphingKeyError(
            f"{what} of shape {tuple(images.shape)} do not match {reference} (B, {', '.join(map(str, expected))}); "
            "use the key made for these images"
        )
    if not torch.isfinite(images).all():
        raise MorphingKeyError(f"{what} contain NaN or infinite values; clean the data before morphing")
