"""Sinusoidal position embeddings of the heads (fixed, not learned)."""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor, base: float) -> torch.Tensor:
    """[M] positions -> [M, dim] = [sin(p * w_k), cos(p * w_k)], w_k = base**(-k / (dim/2)), in float64 math."""
    omega = 1.0 / base ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.double()[:, None] * omega
    return torch.cat((angles.sin(), angles.cos()), dim=1).float()


def uv_pos_embed(
    channels: int, h: int, w: int, aspect: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPT head: embedding of a uv grid spanning the image diagonal (unit length), in two separable halves.

    The first channels/2 channels encode u (the column) and are returned as [channels/2, 1, w]; the
    last channels/2 encode v (the row), returned as [channels/2, h, 1]. Broadcast, they are the
    [channels, h, w] embedding. `aspect` = W / H of the image, the same at every feature resolution.
    """
    diag = (aspect**2 + 1.0) ** 0.5
    span_u, span_v = aspect / diag, 1.0 / diag
    u = torch.linspace(-span_u * (w - 1) / w, span_u * (w - 1) / w, w, dtype=torch.float32, device=device)
    v = torch.linspace(-span_v * (h - 1) / h, span_v * (h - 1) / h, h, dtype=torch.float32, device=device)
    return sincos_1d(channels // 2, u, 100.0).T[:, None, :], sincos_1d(channels // 2, v, 100.0).T[:, :, None]


def grid_sincos_embed(dim: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """Tracker: embedding [1, dim, h, w] of integer pixel positions, first half x, second half y (base 10000)."""
    ex = sincos_1d(dim // 2, torch.arange(w, device=device), 10000.0).T[:, None, :].expand(-1, h, -1)
    ey = sincos_1d(dim // 2, torch.arange(h, device=device), 10000.0).T[:, :, None].expand(-1, -1, w)
    return torch.cat((ex, ey), dim=0)[None]


def motion_embed(flows: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [..., 2*dim] of 2D displacements [..., 2]: x then y, sin/cos interleaved.

    Frequencies are k * 1000 / dim for even k < dim (linear, as in the reference tracker).
    """
    freqs = torch.arange(0, dim, 2, device=flows.device, dtype=torch.float32) * (1000.0 / dim)
    angles = flows[..., None].float() * freqs  # [..., 2, dim/2]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-3)
