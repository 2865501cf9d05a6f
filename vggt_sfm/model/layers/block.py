"""Pre-norm transformer block with LayerScale, used by DINOv2, the aggregator and the camera head."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .layer_scale import LayerScale
from .mlp import Mlp

# When no gradient flows through the tokens, the feed-forward half runs on at most this many tokens at a
# time: its hidden layer is 4x wider than the tokens and would dominate the memory of global attention
# over many frames.
MLP_CHUNK_TOKENS = 16384


class Block(nn.Module):
    """`x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`.

    `norm_eps` is 1e-6 in DINOv2 and PyTorch's default 1e-5 elsewhere in VGGT.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float = 0.01,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        tokens = x.view(-1, x.shape[-1])
        if x.requires_grad or tokens.shape[0] <= MLP_CHUNK_TOKENS:
            return x + self.ls2(self.mlp(self.norm2(x)))
        # Tokens are independent in the feed-forward half; x is our own tensor, so update it in place.
        for chunk in tokens.split(MLP_CHUNK_TOKENS):
            chunk += self.ls2(self.mlp(self.norm2(chunk)))
        return x
