"""A holder's own security floor: the weakest key it accepts, whatever the server asks for.

The server's settings name a key family and a block size `q`; a holder does not take them on trust. With `q = 1`
a `repeated` key multiplies the image by one constant, and a key whose blocks are (scaled) permutations only moves
pixels about: the image stays an image. The floor is the holder's: node config `key-families` and
`min-block-size` on a SuperNode, `--holder-key-families` and `--holder-min-block-size` on the holders' side of a
simulation (see clients.client_app.HolderSide).
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.keys import FAMILIES, HolderKey, check_key_geometry
from simulation.errors import UsageError

DEFAULT_MIN_BLOCK_SIZE = 4


@dataclass(frozen=True)
class SecurityFloor:
    families: tuple[str, ...] = FAMILIES
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE

    def __post_init__(self):
        unknown = [family for family in self.families if family not in FAMILIES]
        if unknown or not self.families:
            raise UsageError(f"a holder's key families must be among {', '.join(FAMILIES)}, got "
                             f"{', '.join(self.families) or 'none'}")
        if isinstance(self.min_block_size, bool) or not isinstance(self.min_block_size, int) or self.min_block_size < 2:
            raise UsageError(f"a holder's smallest block size must be an integer of at least 2 (q = 1 morphs an image "
                             f"into a multiple of itself), got {self.min_block_size!r}")

    @classmethod
    def from_node_config(cls, node_config) -> "SecurityFloor":
        """The floor a SuperNode's node config sets (`key-families="blocks,dense" min-block-size=16`)."""
        families = str(node_config.get("key-families", "")).strip()
        minimum = node_config.get("min-block-size", DEFAULT_MIN_BLOCK_SIZE)
        try:
            minimum = int(minimum)
        except (TypeError, ValueError):
            raise UsageError(f"node config min-block-size must be an integer, got {minimum!r}") from None
        chosen = tuple(part.strip() for part in families.split(",") if part.strip()) if families else FAMILIES
        return cls(chosen, minimum)

    def check_request(self, family: str, block_size: int | None, image_shape, padding: int) -> None:
        """Refuse, before drawing anything, settings weaker than the floor."""
        if family not in self.families:
            raise UsageError(f"the holder's floor refuses a {family} key: it accepts {', '.join(self.families)} "
                             "(holder-side setting key-families, --holder-key-families)")
        q = check_key_geometry(image_shape, family, block_size, padding)
        if q < self.min_block_size:
            raise UsageError(f"the holder's floor refuses a {family} key with q = {q}: it is q >= {self.min_block_size} "
                             "(holder-side setting min-block-size, --holder-min-block-size); ask for a larger --block-size")

    def check_key(self, key: HolderKey) -> None:
        """Refuse a key weaker than the floor, including one whose blocks only permute and scale pixels."""
        self.check_request(key.family, key.block_size, key.image_shape, key.padding)
        blocks = key.blocks()
        nonzero_per_row = (blocks.abs() > 0).sum(dim=-1)
        if bool((nonzero_per_row <= 1).all()):
            raise UsageError("the holder's floor refuses a key whose blocks are scaled permutations: it only moves and "
                             "scales pixels, so the morphed image is still an image; draw a new key")
