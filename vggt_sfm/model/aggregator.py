"""VGGT's aggregator: DINOv2 patch tokens + camera/register tokens, then alternating attention.

Every frame gets 1 camera token and `num_register_tokens` register tokens in front of its patch tokens
(P = 1 + registers + patches tokens per frame). The first frame uses the tokens' variant 0, all other
frames variant 1; that is the only thing marking the reference frame. Then `depth` rounds of
frame attention (each frame's P tokens attend among themselves) and global attention (all S*P tokens of
a sequence attend jointly), both with 2D RoPE on q/k.

Output of layer i is `cat(frame_block_i(...), global_block_i(...))` on channels: [B, S, P, 2*dim].
To save memory only the layers the heads read are kept (`keep_layers`); the returned list has one entry
per layer and None for the others, so heads index it by layer number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .layers import Block, DinoVisionTransformer, PatchEmbed, rope_tables, token_positions

# ImageNet statistics; DINOv2 was trained on images normalised with them.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class Aggregator(nn.Module):
    """Alternating frame/global attention over the tokens of S frames (see the module docstring)."""

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        qk_norm: bool = True,
        rope_freq: float = 100.0,
        init_values: float = 0.01,
        aa_order: Sequence[str] = ("frame", "global"),
        aa_block_size: int = 1,
        patch_embed: str = "dino",
        dino_depth: int = 24,
        dino_num_heads: int = 16,
        dino_mlp_ratio: float = 4.0,
        dino_init_values: float = 1.0,
        keep_layers: Iterable[int] = (4, 11, 17, 23),
    ) -> None:
        super().__init__()
        if depth % aa_block_size:
            raise ValueError(f"depth {depth} is not divisible by aa_block_size {aa_block_size}")
        if sorted(aa_order) != ["frame", "global"]:
            raise ValueError(f"aa_order must order 'frame' and 'global', got {aa_order}")
        if patch_embed == "dino":
            self.patch_embed = DinoVisionTransformer(
                img_size, patch_size, embed_dim, dino_depth, dino_num_heads, dino_mlp_ratio,
                num_register_tokens, dino_init_values,
            )
        elif patch_embed == "conv":
            self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        else:
            raise ValueError(f"unknown patch_embed {patch_embed!r}; expected 'dino' or 'conv'")

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(
                [
                    Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, qk_norm=qk_norm)
                    for _ in range(depth)
                ]
            )

        self.frame_blocks = blocks()
        self.global_blocks = blocks()
        # Variant 0 is for the first frame of each sequence, variant 1 for all others.
        self.camera_token = nn.Parameter(torch.empty(1, 2, 1, embed_dim))
        self.register_token = nn.Parameter(torch.empty(1, 2, num_register_tokens, embed_dim))
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)

        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.head_dim = embed_dim // num_heads
        self.depth = depth
        self.rope_freq = rope_freq
        self.aa_order = tuple(aa_order)
        self.aa_block_size = aa_block_size
        self.patch_start_idx = 1 + num_register_tokens
        self.keep_layers = frozenset(keep_layers) | {depth - 1}

    def forward(
        self, images: torch.Tensor, keep_layers: Iterable[int] | None = None
    ) -> tuple[list[torch.Tensor | None], int]:
        """Tokens of the kept layers for `images` [B, S, 3, H, W] in [0, 1].

        Returns a list of length `depth` whose entry i is [B, S, P, 2*dim] for kept layers and None
        otherwise, and the index of the first patch token in P (`patch_start_idx`).
        `keep_layers` defaults to the layers the heads use (`self.keep_layers`).
        """
        b, s, c_in, h, w = images.shape
        if c_in != 3:
            raise ValueError(f"expected RGB images [B, S, 3, H, W], got {tuple(images.shape)}")
        keep = self.keep_layers if keep_layers is None else frozenset(keep_layers)

        mean = images.new_tensor(IMAGE_MEAN).view(3, 1, 1)
        std = images.new_tensor(IMAGE_STD).view(3, 1, 1)
        patch_tokens = self.patch_embed(((images - mean) / std).reshape(b * s, 3, h, w))
        tokens = torch.cat(
            (self._per_frame(self.camera_token, b, s), self._per_frame(self.register_token, b, s), patch_tokens),
            dim=1,
        )
        del patch_tokens
        p, c = tokens.shape[1:]

        rope = None
        if self.rope_freq > 0:
            positions = token_positions(h // self.patch_size, w // self.patch_size, self.patch_start_idx, images.device)
            rope = rope_tables(positions, self.head_dim, self.rope_freq)

        outputs: list[torch.Tensor | None] = [None] * self.depth
        for start in range(0, self.depth, self.aa_block_size):
            for kind in self.aa_order:
                # Frame attention sees [B*S, P, C], global attention [B, S*P, C]: two views of one tensor.
                shape, blocks, offset = (
                    ((b * s, p, c), self.frame_blocks, 0) if kind == "frame" else ((b, s * p, c), self.global_blocks, c)
                )
                tokens = tokens.reshape(shape)
                for layer in range(start, start + self.aa_block_size):
                    tokens = blocks[layer](tokens, rope)
                    if layer in keep:
                        if outputs[layer] is None:
                            outputs[layer] = tokens.new_empty(b, s, p, 2 * c)
                        outputs[layer][..., offset : offset + c] = tokens.view(b, s, p, c)
        return outputs, self.patch_start_idx

    @staticmethod
    def _per_frame(token: torch.Tensor, b: int, s: int) -> torch.Tensor:
        """[1, 2, X, C] first-frame/other-frame variants -> [B*S, X, C]."""
        first = token[:, :1].expand(b, 1, -1, -1)
        others = token[:, 1:].expand(b, s - 1, -1, -1)
        return torch.cat((first, others), dim=1).reshape(b * s, *token.shape[2:])
