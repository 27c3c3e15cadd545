"""What the attacks share: moving images between pixel units and the morphing domain, results files, commands.

Units. A holder morphs normalised images (``(x / 255 - mean) / std`` per channel), zero-padded to the
key's domain when the key pads; that padded, normalised image is the plaintext ``D``. Attacks recover
``D`` and are scored in pixel units: ``D * std + mean`` (values in [0, 1], the padding becoming the mean
colour), cropped back to the image, clamped to [0, 1], against the original, with data range 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simulation.data import normalize
from simulation.errors import UsageError
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    return path


def display_image(image: torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` image in [0, 1] as something ``imshow`` draws: ``(H, W)`` grey or ``(H, W, 3)`` colour."""
    array = image.detach().double().clamp(0, 1).cpu().numpy()
    return array[0] if array.shape[0] == 1 else np.moveaxis(array[:3], 0, -1)


# ------------------------------------------------------------------------------------------ commands
def run_command(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a command's body; a UsageError becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def parse_counts(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. ``1,2,4,8``."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return counts


def _int_at_least(minimum: int, expected: str):
    """An argparse type for integers of at least `minimum`; `expected` names them in the error."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


positive_int = _int_at_least(1, "a positive integer")
holder_index = _int_at_least(0, "a holder id (0, 1, ...)")


def new_output_folder(path: Path, results: Sequence[str]) -> Path:
    """Refuse an --out that is a file or that already holds results, so that earlier results are never overwritten."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; give a folder")
    existing = [name for name in results if (path / name).exists()]
    if existing:
        raise UsageError(f"--out {path} already holds {existing[0]} from an earlier run; choose a new --out")
    return path


def attack_parser(name: str, description: str, *, holder_help: str) -> argparse.ArgumentParser:
    """The arguments every single-holder attack command shares: the experiment set-up, which holder, where to
    write (results/attacks/NAME by default)."""
    from simulation.keys import add_setup_arguments

    parser = argparse.ArgumentParser(prog=f"python -m server.attacks.{name}", description=description)
    add_setup_arguments(parser)
    parser.add_argument("--holder", type=holder_index, default=0, help=f"{holder_help} (default 0)")
    parser.add_argument("--out", type=Path, default=Path(f"results/attacks/{name}"),
                        help=f"output folder for {name}.json and its figure (default results/attacks/{name})")
    return parser
