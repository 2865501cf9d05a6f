"""Two-layer perceptron of the transformer blocks (`fc1` -> GELU -> `fc2`)."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Position-wise feed-forward network; parameter names follow the VGGT / DINOv2 checkpoints."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
