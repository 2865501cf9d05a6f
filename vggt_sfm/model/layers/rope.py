"""2D rotary position embedding (RoPE) of VGGT's alternating-attention blocks.

Each attention head's vector of dimension D is split in two halves: the first half is rotated by the
token's row (y), the second by its column (x). Within a half of size D/2 the rotation pairs channel i
with channel i + D/4 ("rotate half", not interleaved pairs), with angle `pos / base**(2k / (D/2))`.

Positions are the same for every frame (frames are told apart only by their camera/register tokens),
so the cos/sin tables are built once per forward pass for the P tokens of one frame and broadcast over
frames, batch and heads.
"""

from __future__ import annotations

import torch


def token_positions(grid_h: int, grid_w: int, num_special: int, device: torch.device | None = None) -> torch.Tensor:
    """(y, x) positions of one frame's tokens, shape [num_special + grid_h*grid_w, 2].

    Special tokens (camera, registers) sit at (0, 0); patch (i, j) of the row-major grid sits at
    (i + 1, j + 1) so that no patch shares the special tokens' position.
    """
    ys, xs = torch.meshgrid(
        torch.arange(1, grid_h + 1, device=device), torch.arange(1, grid_w + 1, device=device), indexing="ij"
    )
    patches = torch.stack((ys.reshape(-1), xs.reshape(-1)), dim=-1)
    special = patches.new_zeros(num_special, 2)
    return torch.cat((special, patches), dim=0)


def rope_tables(
    positions: torch.Tensor, head_dim: int, base: float = 100.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [P, head_dim] (float32), for (y, x) `positions` of shape [P, 2]."""
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, half, 2, device=positions.device).float() / half)
    angles = positions.float()[..., None] * inv_freq  # [P, 2, half/2]
    angles = torch.cat((angles, angles), dim=-1).flatten(-2)  # [P, head_dim]: y half, then x half
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [..., N, D] where N is a multiple of the table length P (N = frames * P)."""
    n, d = x.shape[-2:]
    p = cos.shape[0]
    x = x.unflatten(-2, (n // p, p))
    quarters = x.unflatten(-1, (2, 2, d // 4))  # [..., (y|x), (first|second quarter), D/4]
    rotated = torch.stack((-quarters[..., 1, :], quarters[..., 0, :]), dim=-2).flatten(-3)
    out = x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return out.flatten(-3, -2)
