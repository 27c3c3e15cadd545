"""Keys for MedMNIST+ image sizes (128 and 224 pixels, so blocks of 128 x 128 and more)."""

import torch

from clients.keys import HolderKey


def test_a_blocks_key_for_224_pixel_images_inverts_with_several_threads():
    """torch 2.14's batched inverse fails for blocks of about 150 x 150 and more when torch runs two threads or more,
    so a blocks key on 224-pixel images (q = 224) could not build its AugConv."""
    key = HolderKey.generate((1, 2, 160), family="blocks", seed=0)  # two 160 x 160 blocks, quick to draw
    torch.set_num_threads(2)  # conftest's autouse fixture restores one thread afterwards
    inverse = key.blocks(inverse=True)
    identity = torch.eye(160, dtype=torch.float64).expand(2, -1, -1)
    torch.testing.assert_close(inverse @ key.blocks(), identity, atol=1e-8, rtol=0)
