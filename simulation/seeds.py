"""Seeds for the experiment's public randomness (data placement, initial weights, sampling): never for secrets."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *labels) -> int:
    """A 63-bit seed for one purpose (e.g. ("partition",)), independent of every other purpose's. Whoever knows the
    experiment seed can recompute it, so holders' keys, orders and local randomness come from clients.secrets."""
    text = "/".join(str(part) for part in (seed, *labels)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
