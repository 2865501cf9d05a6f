"""Learned per-channel scaling of a residual branch (CaiT's LayerScale)."""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiplies its input by a learned vector `gamma` of size `dim`."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
