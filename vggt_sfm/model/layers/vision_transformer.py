"""DINOv2 ViT with register tokens, as VGGT embeds it: the patch encoder of the aggregator.

Only what VGGT uses is kept: tokens = [cls, registers, patches] with a learned position embedding
(resized by antialiased bicubic interpolation in float32 when the patch grid is not the training one),
a stack of pre-norm blocks (LayerNorm eps 1e-6), the final norm, and the normalised patch tokens as
output (`x_norm_patchtokens` in DINOv2). `mask_token` exists only so that checkpoints load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .block import Block
from .patch_embed import PatchEmbed


class DinoVisionTransformer(nn.Module):
    """DINOv2 encoder returning normalised patch tokens [N, (H/p)*(W/p), dim]."""

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        init_values: float = 1.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.pretrain_grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid**2, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, norm_eps=1e-6)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def patch_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding of a grid_h x grid_w patch grid, [1, grid_h*grid_w, dim] in float32."""
        stored = self.pos_embed[:, 1:].float()
        if (grid_h, grid_w) == (self.pretrain_grid, self.pretrain_grid):
            return stored
        m = int(math.isqrt(stored.shape[1]))
        grid = stored.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=True)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised patch tokens of ImageNet-normalised `images` [N, 3, H, W]."""
        n = images.shape[0]
        grid_h, grid_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patches = self.patch_embed(images)
        patches = patches + self.patch_pos_embed(grid_h, grid_w).to(patches.dtype)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(patches.dtype)
        x = torch.cat(
            (cls.expand(n, -1, -1), self.register_tokens.to(patches.dtype).expand(n, -1, -1), patches), dim=1
        )
        for block in self.blocks:
            x = block(x)
        # LayerNorm is per token, so normalising only the patch tokens gives DINOv2's x_norm_patchtokens.
        return self.norm(x[:, 1 + self.num_register_tokens :])
