"""Where a holder's secrets start: its own entropy (or a holder-side seed), kept in its own folder.

A holder's key, its channel order and its local random state (batch order, augmentation, dropout) are all derived
from a `HolderSecrets`, never from anything the server sends or holds: a key drawn from the experiment seed that
travels in the server's messages is a key the server can recompute.

* `holder`: 32 bytes that only this holder has. By default drawn from the operating system's entropy the first time
  the holder needs it; with a holder seed (`simulation.run --holder-seed N`, node config `holder-seed`) derived from
  that seed and the holder's id, so that experiments can be repeated without telling the server anything.
* `federation`: 32 bytes shared by the federation's holders and by nobody else, for one federation-wide channel
  order (`--shuffle federation`). The launcher on the holders' side provisions it into every holder's folder, or it
  comes from the holder seed, or from node config `federation-secret`.

The secrets file is JSON, owner-only, like the key file; it is never sent and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets as entropy
from dataclasses import dataclass
from pathlib import Path

import torch

from clients.keys import HolderKey
from simulation.errors import UsageError
from simulation.files import atomic_write_bytes, private_dir

SECRETS_FILE = "secrets.json"
PROVISION_FILE = "provision.json"
SECRET_BYTES = 32
FORMAT_VERSION = 1
SHUFFLE_MODES = ("federation", "holder", "none")


@dataclass(frozen=True, repr=False)
class HolderSecrets:
    holder: bytes
    federation: bytes | None
    source: str  # "entropy" or "holder-seed": how `holder` was drawn (public)

    # ------------------------------------------------------------ creation
    @classmethod
    def from_holder_seed(cls, holder_seed: int, holder_id: int) -> "HolderSecrets":
        """Secrets derived from a holder-side seed: the same seed gives every holder its own secret and all of them
        the same federation secret."""
        seed = _seed_value(holder_seed)
        return cls(
            holder=hashlib.sha256(f"mple/holder-seed/{seed}/holder/{holder_id}".encode()).digest(),
            federation=hashlib.sha256(f"mple/holder-seed/{seed}/federation".encode()).digest(),
            source="holder-seed",
        )

    @classmethod
    def fresh(cls, federation: bytes | None = None) -> "HolderSecrets":
        """Secrets from the operating system's entropy."""
        return cls(holder=entropy.token_bytes(SECRET_BYTES), federation=federation, source="entropy")

    # ------------------------------------------------------------ derived seeds
    def seed(self, *labels) -> int:
        """A 63-bit seed for one holder-side purpose (e.g. ("key",) or ("batches", round)), independent of the
        others and unpredictable without `holder`."""
        return _derive(self.holder, labels)

    @property
    def file_key(self) -> bytes:
        """The key of the authentication tags on the holder's own files (key file, AugConv)."""
        return hmac.new(self.holder, b"mple/file-authentication", hashlib.sha256).digest()

    def federation_seed(self, *labels) -> int:
        if self.federation is None:
            raise UsageError(
                "--shuffle federation needs a secret shared by the holders, and this holder has none: run through "
                "python -m simulation.run or simulation.deploy, give every SuperNode the same node config "
                "holder-seed or federation-secret, or use --shuffle holder"
            )
        return _derive(self.federation, labels)

    # ------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        record = {"version": FORMAT_VERSION, "source": self.source, "holder": self.holder.hex(),
                  "federation": None if self.federation is None else self.federation.hex()}
        return atomic_write_bytes(path, (json.dumps(record) + "\n").encode(), private=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HolderSecrets":
        path = Path(path)
        try:
            record = json.loads(path.read_text())
            if record.get("version") != FORMAT_VERSION:
                raise ValueError(f"version {record.get('version')!r}")
            holder = bytes.fromhex(record["holder"])
            federation = None if record["federation"] is None else bytes.fromhex(record["federation"])
            source = str(record["source"])
            if len(holder) != SECRET_BYTES or (federation is not None and len(federation) != SECRET_BYTES):
                raise ValueError("wrong secret length")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UsageError(f"holder secrets file {path} is unreadable or damaged ({error}); restore it from a "
                             "backup, or start the holder in a new folder (it then gets a new key)") from None
        return cls(holder=holder, federation=federation, source=source)

    def __repr__(self) -> str:
        return f"HolderSecrets(source={self.source!r}, federation={'yes' if self.federation else 'no'})"


def holder_secrets(home: str | os.PathLike, holder_id: int, *, holder_seed: int | None = None,
                   federation_secret: str | None = None) -> HolderSecrets:
    """The holder's secrets from its folder; the first time, drawn (from `holder_seed` when given, else from the
    operating system's entropy) and saved there owner-only."""
    path = Path(home) / SECRETS_FILE
    if path.exists():
        return HolderSecrets.load(path)
    if holder_seed is not None:
        secrets = HolderSecrets.from_holder_seed(holder_seed, holder_id)
    else:
        secrets = HolderSecrets.fresh(_federation_from_hex(federation_secret))
    private_dir(path.parent)
    secrets.save(path)
    return secrets


@dataclass(frozen=True, repr=False)
class HolderProvision:
    """What a launcher on the holders' side hands every holder of a simulation, kept owner-only in the holders'
    root folder so that a resumed run hands out the same: the holder seed, or else one federation secret drawn
    from fresh entropy (each holder then draws its own secret the first time it is needed)."""

    holder_seed: int | None
    federation_secret: str | None  # hex

    def secrets_for(self, home: Path, holder_id: int) -> HolderSecrets:
        return holder_secrets(home, holder_id, holder_seed=self.holder_seed, federation_secret=self.federation_secret)


def provision_holders(root: str | os.PathLike, holder_seed: int | None = None) -> HolderProvision:
    """Load the holders' provision from `root` (a resumed run), or create it; a different holder seed for a root
    that already has one is refused, since its holders already drew their keys."""
    path = Path(root) / PROVISION_FILE
    if path.exists():
        try:
            record = json.loads(path.read_text())
            provision = HolderProvision(record["holder_seed"], record["federation_secret"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UsageError(f"holder provision file {path} is unreadable or damaged ({error}); start a new run "
                             "folder") from None
        if holder_seed is not None and provision.holder_seed != _seed_value(holder_seed):
            raise UsageError(f"the holders under {root} were provisioned with another holder seed; resume without "
                             "--holder-seed, or start a new run folder")
        return provision
    if holder_seed is not None:
        provision = HolderProvision(_seed_value(holder_seed), None)
    else:
        provision = HolderProvision(None, entropy.token_hex(SECRET_BYTES))
    private_dir(path.parent)
    atomic_write_bytes(path, (json.dumps({"holder_seed": provision.holder_seed,
                                          "federation_secret": provision.federation_secret}) + "\n").encode(),
                       private=True)
    return provision


# ------------------------------------------------------------ what the secrets determine
def channel_order(secrets: HolderSecrets, shuffle: str, out_channels: int) -> torch.Tensor:
    """The permutation the holder applies to the first layer's output channels (secret, never sent): one for the
    whole federation, one per holder, or none."""
    if shuffle not in SHUFFLE_MODES:
        raise UsageError(f"unknown channel order mode {shuffle!r}; choose one of {', '.join(SHUFFLE_MODES)}")
    if shuffle == "none":
        return torch.arange(out_channels)
    seed = secrets.federation_seed("order") if shuffle == "federation" else secrets.seed("order")
    return torch.randperm(out_channels, generator=torch.Generator().manual_seed(seed))


def draw_key(secrets: HolderSecrets, image_shape, *, family: str, block_size: int | None, entries: str,
             padding: int) -> HolderKey:
    """The holder's morphing key, drawn from its own secret."""
    return HolderKey.generate(image_shape, family=family, block_size=block_size, entries=entries, padding=padding,
                              seed=secrets.seed("key"))


def _derive(secret: bytes, labels) -> int:
    message = "/".join(str(label) for label in labels).encode()
    return int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest()[:8], "little") >> 1


def _seed_value(holder_seed) -> int:
    """A holder seed as an integer >= 0 (node config may give it as text)."""
    try:
        value = -1 if isinstance(holder_seed, bool) else int(str(holder_seed))
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"holder-seed must be a non-negative integer, got {holder_seed!r}")
    return value


def _federation_from_hex(text: str | None) -> bytes | None:
    if not text:
        return None
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != SECRET_BYTES:
        raise UsageError(f"node config federation-secret must be {2 * SECRET_BYTES} hex digits (for example from "
                         "python -c 'import secrets; print(secrets.token_hex(32))'), the same on every holder")
    return value
