"""DPT head (Ranftl et al., "Vision Transformers for Dense Prediction") as VGGT uses it.

Four aggregator layers are read; each layer's patch tokens are LayerNorm-ed (one shared norm), projected
by a 1x1 convolution and resized to 4x, 2x, 1x and 1/2x of the patch grid. RefineNet-style fusion blocks
merge them coarse-to-fine, a last fusion doubles the resolution, a 3x3 convolution follows and the result
is upsampled (bilinear, align_corners) to the image size divided by `down_ratio`. With `pos_embed`, a
sinusoidal embedding of an aspect-aware uv grid (scaled by 0.1) is added after each projection and after
the final upsampling. Depth/point heads end with two convolutions and an activation; the track head's
feature extractor (`feature_only`) stops before them.

Frames are processed `frames_chunk_size` at a time: each frame is independent here, and the
full-resolution intermediate maps dominate the memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .head_act import activate_dense
from .pos_embed import uv_pos_embed


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus the skip.

    The skip adds relu(x), not x: the reference implementation applies its first ReLU in place, and the
    checkpoint was trained that way. We do the same (the caller's tensor is overwritten; every caller
    passes a map it no longer needs), which also saves a full-resolution copy.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x, inplace=True)
        return self.conv2(F.relu(self.conv1(x), inplace=True)) + x


class FeatureFusionBlock(nn.Module):
    """Adds the refined skip features (if any), refines, upsamples to `size` (default 2x), 1x1 conv."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: Sequence[int] | None = None
    ) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Dense prediction from four aggregator layers (see the module docstring).

    `forward` returns (values [B, S, H, W, output_dim-1], confidence [B, S, H, W]), or with
    `feature_only` the feature maps [B, S, features, H/down_ratio, W/down_ratio].
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        pos_embed: bool = True,
        feature_only: bool = False,
        down_ratio: int = 1,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.activation = activation
        self.intermediate_layer_idx = tuple(intermediate_layer_idx)
        self.pos_embed = pos_embed
        self.feature_only = feature_only
        self.down_ratio = down_ratio

        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, kernel_size=1) for oc in out_channels])
        c0, c1, _, c3 = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4),
                nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, oc in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(oc, features, kernel_size=3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(32, output_dim, kernel_size=1),
            )

    def forward(
        self,
        tokens_list: list[torch.Tensor | None],
        image_hw: tuple[int, int],
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predictions for the frames of `tokens_list` (aggregator output) for images of size `image_hw`."""
        layers = [tokens_list[i] for i in self.intermediate_layer_idx]
        if any(t is None for t in layers):
            raise ValueError(f"the DPT head needs aggregator layers {self.intermediate_layer_idx}")
        s = layers[0].shape[1]
        step = s if not frames_chunk_size or frames_chunk_size >= s else frames_chunk_size
        chunks = [
            self._forward_frames([t[:, i : i + step] for t in layers], image_hw, patch_start_idx)
            for i in range(0, s, step)
        ]
        if self.feature_only:
            return torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]
        if len(chunks) == 1:
            return chunks[0]
        return torch.cat([c[0] for c in chunks], dim=1), torch.cat([c[1] for c in chunks], dim=1)

    @staticmethod
    def _add_pos_embed(x: torch.Tensor, aspect: float, ratio: float = 0.1) -> torch.Tensor:
        """x + ratio * uv embedding, added in place (x is always a fresh convolution / interpolation output)
        and half by half, so that the full [C, h, w] embedding is never materialised."""
        c, h, w = x.shape[1:]
        emb_u, emb_v = uv_pos_embed(c, h, w, aspect, device=x.device)
        x[:, : c // 2] += (ratio * emb_u).to(x.dtype)
        x[:, c // 2 :] += (ratio * emb_v).to(x.dtype)
        return x

    def _forward_frames(
        self,
        layers: list[torch.Tensor],
        image_hw: tuple[int, int],
        patch_start_idx: int,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, s = layers[0].shape[:2]
        h, w = image_hw
        grid_h, grid_w = h // self.patch_size, w // self.patch_size
        aspect = w / h
        maps = []
        for tokens, project, resize in zip(layers, self.projects, self.resize_layers):
            x = self.norm(tokens[:, :, patch_start_idx:])  # [B, s, h*w, C], contiguous
            # A channels-last view of the token grid: no copy; convolutions accept this layout.
            x = x.view(b * s, grid_h, grid_w, -1).permute(0, 3, 1, 2)
            x = project(x)
            if self.pos_embed:
                x = self._add_pos_embed(x, aspect)
            maps.append(resize(x))
        del x

        scratch = self.scratch
        l1, l2, l3, l4 = (getattr(scratch, f"layer{i}_rn")(m) for i, m in enumerate(maps, start=1))
        del maps
        out = scratch.refinenet4(l4, size=l3.shape[-2:])
        out = scratch.refinenet3(out, l3, size=l2.shape[-2:])
        out = scratch.refinenet2(out, l2, size=l1.shape[-2:])
        out = scratch.output_conv1(scratch.refinenet1(out, l1))
        del l1, l2, l3, l4
        size = (grid_h * self.patch_size // self.down_ratio, grid_w * self.patch_size // self.down_ratio)
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        if self.pos_embed:
            out = self._add_pos_embed(out, aspect)
        if self.feature_only:
            return out.view(b, s, *out.shape[1:])
        values, conf = activate_dense(scratch.output_conv2(out), self.activation)
        return values.reshape(b, s, *values.shape[1:]), conf.reshape(b, s, *conf.shape[1:])
