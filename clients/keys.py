"""A data holder's secret morphing key ``M`` (DESIGN.md section 1).

``M`` acts on an image unrolled to a row vector ``D`` of length ``N`` (channel-major, then row, then
column), over the morphing domain: the image as is (``padding=0``) or the image zero-padded by
``padding`` pixels on each side, as the MoLe reference code does. The morphed image is ``T = D M``.

Three families share one representation, a stack of ``q x q`` blocks on the diagonal of ``M``:

* ``dense``: one ``N x N`` block (``q = N``);
* ``blocks``: ``N / q`` independent blocks;
* ``repeated``: one block ``M'`` used ``N / q`` times (``M = I kron M'``).

A key is a secret: its ``repr`` and :meth:`HolderKey.summary` show only the public fingerprint, and
key files are written owner-only.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import os
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from simulation.errors import UsageError
from simulation.files import atomic_write_bytes

FAMILIES = ("dense", "blocks", "repeated")
ENTRY_DISTRIBUTIONS = ("uniform", "integer")
FORMAT_VERSION = 1
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
# Beyond this condition number float32 keeps no correct digit in the worst case.
FLOAT32_MAX_CONDITION = 1.0 / FLOAT32_UNIT_ROUNDOFF
SINGULAR_CONDITION = 1e12
# The float32 error (relative to the output's scale) above which an imported key gets a warning.
FLOAT32_ERROR_WARNING = 1e-4
MAX_REDRAWS = 1000
LARGE_BLOCK = 512
_FILE_ENTRIES = {"meta.json", "blocks.npy"}
_TAG_ENTRY = "tag"


class MorphingKeyError(UsageError):
    """A key that cannot be built, loaded or used as asked."""


def default_max_condition(block_size: int) -> float:
    """Largest accepted condition number for a random ``q x q`` block.

    The median condition number of a random block with uniform or integer entries is about
    ``3 q^1.5``; the bound ``30 q^1.5`` keeps float32 errors small while rejecting only the
    heavy tail (about 5% of draws).
    """
    return 30.0 * block_size**1.5


class HolderKey:
    """A data holder's morphing key. Create with :meth:`generate`, :meth:`from_matrix` or :meth:`load`."""

    def __init__(
        self,
        family: str,
        blocks: np.ndarray,
        image_shape: Sequence[int],
        padding: int,
        entries: str,
    ):
        self.family = family
        self.image_shape = tuple(int(v) for v in image_shape)
        self.padding = int(padding)
        self.entries = entries
        self._blocks = np.ascontiguousarray(blocks, dtype=np.float64)
        self._blocks.setflags(write=False)
        self._validate()
        self._torch_cache: dict[tuple[str, torch.dtype, bool], torch.Tensor] = {}
        self._conditions: np.ndarray | None = None

    # ----------------------------------------------------------------- creation
    @classmethod
    def generate(
        cls,
        image_shape: Sequence[int],
        *,
        family: str = "repeated",
        block_size: int | None = None,
        entries: str = "uniform",
        padding: int = 0,
        seed: int,
        max_condition: float | None = None,
    ) -> "HolderKey":
        """Draw a key deterministically from ``seed``.

        ``block_size`` defaults to the width of the morphing domain (one block per image row) for
        ``blocks`` and ``repeated`` keys, and must be ``N`` (or left out) for ``dense`` keys. Each
        block whose condition number exceeds ``max_condition`` (default
        :func:`default_max_condition`) is redrawn from the same random stream.
        """
        _check_choice("key family", family, FAMILIES)
        _check_choice("entry distribution", entries, ENTRY_DISTRIBUTIONS)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise MorphingKeyError(f"key seed must be a non-negative integer, got {seed!r}")
        domain = _domain_shape(image_shape, padding)
        size = math.prod(domain)
        q = _resolve_block_size(family, block_size, domain)
        bound = default_max_condition(q) if max_condition is None else float(max_condition)
        if not bound >= 1.0:
            raise MorphingKeyError(f"max_condition must be at least 1, got {max_condition!r}")
        rng = np.random.default_rng(int(seed))
        count = size // q if family == "blocks" else 1
        blocks, conditions = zip(*(_draw_block(rng, q, entries, bound) for _ in range(count)))
        key = cls(family, np.stack(blocks), image_shape, padding, entries)
        key._conditions = np.array(conditions)  # already computed to check the bound; a dense one costs an SVD
        return key

    @classmethod
    def from_matrix(cls, matrix, image_shape: Sequence[int], padding: int = 0) -> "HolderKey":
        """Import an explicit ``N x N`` morphing matrix as a ``dense`` key.

        This is how users of the MoLe reference code bring their keys:
        ``HolderKey.from_matrix(torch.load("morphing_matrix.pt", weights_only=True), (3, 32, 32), padding=1)``.
        A singular matrix is refused; a badly conditioned one is accepted with a warning that
        states the float32 error to expect, and refused only beyond what float32 can carry.
        """
        if isinstance(matrix, torch.Tensor):
            matrix = matrix.detach().cpu().numpy()
        matrix = np.asarray(matrix)
        if not np.issubdtype(matrix.dtype, np.number):
            raise MorphingKeyError(f"morphing matrix must be numeric, got dtype {matrix.dtype}")
        matrix = matrix.astype(np.float64)
        domain = _domain_shape(image_shape, padding)
        size = math.prod(domain)
        if matrix.shape != (size, size):
            raise MorphingKeyError(
                f"morphing matrix has shape {tuple(matrix.shape)}, but images {tuple(image_shape)} with "
                f"padding {padding} need {size} x {size} (N = {' * '.join(map(str, domain))}); "
                "check image_shape and padding"
            )
        _check_finite(matrix, "morphing matrix")
        condition = condition_number(matrix)
        if not math.isfinite(condition) or condition > SINGULAR_CONDITION:
            raise MorphingKeyError(
                f"morphing matrix is singular (condition number {condition:.1e}): a key must be invertible"
            )
        if condition > FLOAT32_MAX_CONDITION:
            raise MorphingKeyError(
                f"morphing matrix condition number {condition:.1e} is beyond what float32 can carry "
                f"({FLOAT32_MAX_CONDITION:.1e}): AugConv outputs would keep no correct digit; use a better-conditioned matrix"
            )
        key = cls("dense", matrix[None], image_shape, padding, "imported")
        key._conditions = np.array([condition])
        error = key.expected_float32_error()
        if error > FLOAT32_ERROR_WARNING:
            warnings.warn(
                f"morphing matrix is badly conditioned (condition number {condition:.1e}): expect float32 "
                f"AugConv outputs to be off by about {error:.1e} of their scale (float64 stays exact)",
                stacklevel=2,
            )
        return key

    # ------------------------------------------------------------- properties
    @property
    def domain_shape(self) -> tuple[int, int, int]:
        """Shape of the morphed image: the image, zero-padded by ``padding`` on each side."""
        return _domain_shape(self.image_shape, self.padding)

    @property
    def size(self) -> int:
        """``N``, the length of the unrolled morphing domain."""
        return math.prod(self.domain_shape)

    @property
    def block_size(self) -> int:
        """``q``, the side of each diagonal block."""
        return self._blocks.shape[-1]

    @property
    def num_blocks(self) -> int:
        """How many ``q x q`` blocks lie on the diagonal of ``M`` (``N / q``)."""
        return self.size // self.block_size

    @property
    def num_distinct_blocks(self) -> int:
        """How many blocks are stored: ``N / q`` for ``blocks`` keys, else 1."""
        return self._blocks.shape[0]

    @property
    def fingerprint(self) -> str:
        """A short hash that identifies the key without revealing it."""
        digest = hashlib.sha256(self._header_bytes())
        digest.update(self._blocks.tobytes())
        return digest.hexdigest()[:16]

    @property
    def condition_numbers(self) -> np.ndarray:
        """The 2-norm condition number of every stored block."""
        if self._conditions is None:
            self._conditions = np.array([condition_number(block) for block in self._blocks])
        return self._conditions

    @property
    def worst_condition(self) -> float:
        return float(self.condition_numbers.max())

    def block_for(self, index: int) -> int:
        """The stored block that sits at diagonal position ``index``."""
        return index if self.family == "blocks" else 0

    def summary(self) -> dict:
        """Public facts about the key, safe to log and to write to a results folder."""
        return {
            "fingerprint": self.fingerprint,
            "family": self.family,
            "block_size": self.block_size,
            "entries": self.entries,
            "image_shape": list(self.image_shape),
            "padding": self.padding,
            "domain_shape": list(self.domain_shape),
            "worst_condition": self.worst_condition,
        }

    def __repr__(self) -> str:
        return (
            f"HolderKey(family={self.family!r}, block_size={self.block_size}, entries={self.entries!r}, "
            f"image_shape={self.image_shape}, padding={self.padding}, fingerprint={self.fingerprint!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HolderKey):
            return NotImplemented
        return self._header_bytes() == other._header_bytes() and np.array_equal(self._blocks, other._blocks)

    __hash__ = None  # keys are compared by content and must not be used as dictionary keys by accident

    # ------------------------------------------------------------ matrices
    def blocks(self, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64, inverse: bool = False) -> torch.Tensor:
        """The stored blocks (or their inverses, computed in float64) as a ``(count, q, q)`` tensor."""
        cache_key = (str(device), dtype, inverse)
        if cache_key not in self._torch_cache:
            blocks = torch.tensor(self._blocks)
            if inverse:
                # One block at a time: torch 2.14's batched inverse (MKL) fails ("Pivots given to lu_solve must all
                # be greater or equal to 1") for blocks of about 150 x 150 and more when torch runs more than one
                # thread, e.g. a blocks key on 224 x 224 images; a single block never did.
                blocks = torch.stack([torch.linalg.inv(block) for block in blocks])
            self._torch_cache[cache_key] = blocks.to(device=device, dtype=dtype)
        return self._torch_cache[cache_key]

    def matrix(self, *, inverse: bool = False) -> torch.Tensor:
        """The full ``N x N`` matrix ``M`` (or ``M^-1``) in float64: for checks and attacks on small keys."""
        blocks = self.blocks(inverse=inverse)
        if self.family == "dense":
            return blocks[0]
        if self.family == "repeated":
            blocks = blocks.expand(self.num_blocks, -1, -1)
        return torch.block_diag(*blocks)

    def expected_float32_error(self, samples: int = 8, seed: int = 0) -> float:
        """Relative error of a float32 morph/unmorph round trip on random images.

        AugConv fuses ``M^-1`` with the first convolution, so this is the error its float32 outputs
        carry relative to their scale.
        """
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(samples, self.num_blocks, self.block_size, generator=generator, dtype=torch.float64)
        blocks = self.blocks()
        inverse32 = self.blocks(dtype=torch.float32, inverse=True).double()
        if self.family == "dense":
            morphed = images[:, 0] @ blocks[0]
            recovered = morphed.float().double() @ inverse32[0]
            images = images[:, 0]
        else:
            morphed = torch.einsum("bkq,kqr->bkr", images, blocks.expand(self.num_blocks, -1, -1))
            recovered = torch.einsum("bkq,kqr->bkr", morphed.float().double(), inverse32.expand(self.num_blocks, -1, -1))
        return float((recovered - images).abs().max() / images.abs().max())

    # ---------------------------------------------------------------- files
    def save(self, path: str | os.PathLike, *, auth_key: bytes | None = None) -> Path:
        """Write the key to one file, owner-only (mode 0600), atomically. With ``auth_key`` (a holder's secret
        file key) the file carries an authentication tag, so that a planted or edited key file is refused."""
        path = Path(path)
        meta = json.dumps(dict(self._header(), fingerprint=self.fingerprint), sort_keys=True).encode()
        array = io.BytesIO()
        np.save(array, self._blocks, allow_pickle=False)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("meta.json", meta)
            archive.writestr("blocks.npy", array.getvalue())
            if auth_key is not None:
                archive.writestr(_TAG_ENTRY, file_tag(auth_key, meta, array.getvalue()))
        atomic_write_bytes(path, buffer.getvalue(), private=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, image_shape: Sequence[int] | None = None,
             auth_key: bytes | None = None) -> "HolderKey":
        """Read and validate a key file; with ``image_shape``, also check that it fits those images; with
        ``auth_key``, refuse a file whose authentication tag is missing or wrong (planted or edited)."""
        path = Path(path)
        if not path.is_file():
            raise MorphingKeyError(f"key file {path} does not exist; generate a key or fix the path")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.warn(f"key file {path} is accessible to other users; restrict it with 'chmod 600 {path}'", stacklevel=2)
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                if names - {_TAG_ENTRY} != _FILE_ENTRIES:
                    raise ValueError(f"entries {sorted(names)} instead of {sorted(_FILE_ENTRIES)}")
                meta_bytes, block_bytes = archive.read("meta.json"), archive.read("blocks.npy")
                tag = archive.read(_TAG_ENTRY) if _TAG_ENTRY in names else None
                meta = json.loads(meta_bytes)
                blocks = np.load(io.BytesIO(block_bytes), allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
            raise MorphingKeyError(f"key file {path} is truncated or not a key file ({_short(error)}); restore it or generate a new key") from None
        try:
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}")
            if blocks.dtype != np.float64 or blocks.ndim != 3:
                raise ValueError(f"blocks of dtype {blocks.dtype} and {blocks.ndim} dimensions")
            key = cls(meta["family"], blocks, meta["image_shape"], meta["padding"], meta["entries"])
        except (ValueError, KeyError, TypeError, MorphingKeyError) as error:
            raise MorphingKeyError(f"key file {path} is invalid ({_short(error)}); restore it or generate a new key") from None
        if key.block_size != meta.get("block_size") or key.fingerprint != meta.get("fingerprint"):
            raise MorphingKeyError(
                f"key file {path} failed its integrity check (fingerprint {key.fingerprint} does not match the "
                f"recorded {meta.get('fingerprint')}): it was modified or corrupted; restore it or generate a new key"
            )
        if auth_key is not None and (tag is None or not hmac.compare_digest(tag, file_tag(auth_key, meta_bytes, block_bytes))):
            raise MorphingKeyError(
                f"key file {path} does not carry this holder's authentication tag: it was planted, edited or made by "
                "another holder; remove it (the holder then draws its key again from its own secret)"
            )
        if image_shape is not None and tuple(image_shape) != key.image_shape:
            raise MorphingKeyError(
                f"key file {path} is for images of shape {key.image_shape}, not {tuple(image_shape)}; "
                "use the key made for this dataset or generate a new one"
            )
        return key

    # ------------------------------------------------------------- internals
    def _header(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "block_size": self.block_size,
            "entries": self.entries,
            "image_shape": list(self.image_shape),
            "padding": self.padding,
        }

    def _header_bytes(self) -> bytes:
        return json.dumps(self._header(), sort_keys=True).encode()

    def _validate(self) -> None:
        _check_choice("key family", self.family, FAMILIES)
        if self.entries not in ENTRY_DISTRIBUTIONS + ("imported",):
            raise MorphingKeyError(f"unknown entry distribution {self.entries!r}")
        domain = _domain_shape(self.image_shape, self.padding)
        size = math.prod(domain)
        count, rows, columns = self._blocks.shape if self._blocks.ndim == 3 else (0, 0, -1)
        if rows != columns or rows < 1:
            raise MorphingKeyError(f"key blocks must be square, got shape {self._blocks.shape}")
        _resolve_block_size(self.family, rows, domain)
        expected = size // rows if self.family == "blocks" else 1
        if count != expected:
            raise MorphingKeyError(f"a {self.family} key with q = {rows} over N = {size} needs {expected} stored blocks, got {count}")
        _check_finite(self._blocks, "key")


def file_tag(auth_key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over the parts of a file, each length-prefixed (so that no two splits of the bytes agree)."""
    mac = hmac.new(auth_key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)
    return mac.digest()


def check_key_geometry(image_shape: Sequence[int], family: str, block_size: int | None, padding: int) -> int:
    """The checks `HolderKey.generate` makes on the key's shape, without drawing a key; returns q."""
    _check_choice("key family", family, FAMILIES)
    return _resolve_block_size(family, block_size, _domain_shape(image_shape, padding))


def _domain_shape(image_shape: Sequence[int], padding: int) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in shape):
        raise MorphingKeyError(f"image_shape must be (channels, height, width) of positive integers, got {image_shape!r}")
    if not isinstance(padding, (int, np.integer)) or padding < 0:
        raise MorphingKeyError(f"padding must be a non-negative integer, got {padding!r}")
    channels, height, width = (int(v) for v in shape)
    return channels, height + 2 * int(padding), width + 2 * int(padding)


def _resolve_block_size(family: str, block_size: int | None, domain: tuple[int, int, int]) -> int:
    size = math.prod(domain)
    if family == "dense":
        if block_size not in (None, size):
            raise MorphingKeyError(f"a dense key has one {size} x {size} block; leave the block size out or use {size}")
        return size
    q = domain[2] if block_size is None else block_size
    if not isinstance(q, (int, np.integer)) or isinstance(q, bool) or q < 1 or size % q:
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        raise MorphingKeyError(
            f"block size q = {q!r} does not divide N = {size} (domain {domain[0]}x{domain[1]}x{domain[2]}); "
            f"choose one of {_preview(divisors)}"
        )
    return int(q)


def condition_number(block: np.ndarray) -> float:
    """The 2-norm condition number. Large blocks (dense keys) use the eigenvalues of B^T B, ~4x faster than an
    SVD and, within the condition bounds keys are drawn with (< 1e7), accurate to far better than 1e-6."""
    if len(block) < LARGE_BLOCK:
        return float(np.linalg.cond(block))
    eigenvalues = np.linalg.eigvalsh(block.T @ block)
    if eigenvalues[0] <= 0:
        return float("inf")
    return float(np.sqrt(eigenvalues[-1] / eigenvalues[0]))


def _draw_block(rng: np.random.Generator, q: int, entries: str, bound: float) -> tuple[np.ndarray, float]:
    """A random block whose condition number is within ``bound``, and that condition number."""
    for _ in range(MAX_REDRAWS):
        if entries == "uniform":
            block = rng.random((q, q))
        else:
            block = rng.integers(1, 256, size=(q, q)).astype(np.float64)
        condition = condition_number(block)
        if condition <= bound:
            return block, condition
    raise MorphingKeyError(
        f"no {q} x {q} block with condition number below {bound:.3g} in {MAX_REDRAWS} draws; raise max_condition"
    )


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise MorphingKeyError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise MorphingKeyError(f"{what} contains NaN or infinite values; a key must be finite")


def _preview(values: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (", ..." if len(values) > limit else "")


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:160] or type(error).__name__
