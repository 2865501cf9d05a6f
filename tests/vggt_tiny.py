"""A tiny VGGT (same code and key names as VGGT-1B, a few hundred thousand parameters) for fast tests."""

from __future__ import annotations

import torch

from vggt_sfm.model import VGGT, VGGTConfig

TINY = VGGTConfig(
    embed_dim=32,
    depth=4,
    num_heads=2,
    patch_embed="conv",
    intermediate_layer_idx=(0, 1, 2, 3),
    camera_trunk_depth=1,
    camera_num_heads=2,
    dpt_features=8,
    dpt_out_channels=(4, 8, 16, 16),
    track_features=8,
    track_hidden_size=16,
    track_iters=1,
)


def tiny_vggt(seed: int = 0, **overrides) -> VGGT:
    """A seeded random tiny VGGT in eval mode."""
    torch.manual_seed(seed)
    return VGGT(TINY, **overrides).eval()
