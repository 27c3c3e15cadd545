"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
from pathlib import Path

import torch

from simulation.errors import UsageError

PRIVATE_DIR_MODE = stat.S_IRWXU


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, private: bool = False) -> Path:
    """Write `data` to `path` through a temporary file in the same folder; `private` makes it owner-only (0600)
    from the moment it exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(descriptor, stat.S_IRUSR | stat.S_IWUSR if private else 0o644)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, value) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False, default=_jsonable) + "\n")


def atomic_torch_save(value, path: str | os.PathLike, *, private: bool = False) -> Path:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return atomic_write_bytes(path, buffer.getvalue(), private=private)


def fresh_folder(path: str | os.PathLike, *, results=None, allow_existing: bool = False,
                 hint: str = "choose a new --out", create: bool = True, what: str = "folder") -> Path:
    """An output folder that earlier results are safe from: refused when it is a file, or when it already holds
    results (any of the names `results`, or anything at all when `results` is None), unless `allow_existing`.
    Created unless `create` is false (a command that may still refuse its input creates it when it writes)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; give a folder path")
    if path.exists() and not allow_existing:
        held = [name for name in results if (path / name).exists()] if results is not None else list(path.iterdir())
        if held:
            what = "already exists and is not empty" if results is None else f"already holds {held[0]} from an earlier run"
            raise UsageError(f"--out {path} {what}; {hint}")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create {what} {path}: {error.strerror}; choose another --out") from None
    return path


def private_dir(path: str | os.PathLike) -> Path:
    """Create (if needed) a folder only its owner can enter."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR_MODE)
    return path


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
