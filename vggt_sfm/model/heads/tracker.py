"""Iterative point tracker of VGGT's track head (CoTracker / VGGSfM style).

Given feature maps of S frames and N query points in frame 0, every iteration samples a local
correlation volume around the current position of each track at `corr_levels` pyramid levels, embeds it
together with the track's motion and features, and lets a transformer that alternates attention over
time (per track) and over space (tracks <-> 64 learned virtual tracks) predict position and feature
updates. Frame 0 positions stay at the queries. Parameter names follow the VGGT checkpoint
(`updateformer.virual_tracks` is misspelt there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Mlp
from .pos_embed import grid_sincos_embed, motion_embed


def sample_bilinear(
    maps: torch.Tensor, xy: torch.Tensor, padding_mode: str = "border"
) -> torch.Tensor:
    """Sample `maps` [N, C, H, W] at pixel positions `xy` [N, ..., 2] (x, y; pixel centres at integers).

    Returns [N, C, ...] (bilinear, `grid_sample` with align_corners=True).
    """
    h, w = maps.shape[-2:]
    scale = xy.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    grid = (xy * scale - 1).reshape(xy.shape[0], -1, 1, 2) if xy.dim() == 3 else xy * scale - 1
    out = F.grid_sample(maps, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out.reshape(*out.shape[:2], *xy.shape[1:-1])


class CorrelationPyramid:
    """Average-pooled feature pyramid and local correlation sampling around track positions."""

    def __init__(self, fmaps: torch.Tensor, num_levels: int, radius: int) -> None:
        b, s, c, h, w = fmaps.shape
        self.radius = radius
        self.levels = [fmaps]
        for _ in range(num_levels - 1):
            pooled = F.avg_pool2d(self.levels[-1].flatten(0, 1), kernel_size=2, stride=2)
            self.levels.append(pooled.view(b, s, c, *pooled.shape[-2:]))
        d = torch.linspace(-radius, radius, 2 * radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        # Offset (d_a, d_b) is added to (x, y): the first window axis moves x. The correlation MLP's
        # weights were trained with this layout.
        self.offsets = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)

    def sample(self, track_feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Correlations [B, S, N, levels * (2r+1)^2] of `track_feats` [B, S, N, C] around `coords` [B, S, N, 2]."""
        b, s, n, c = track_feats.shape
        window = 2 * self.radius + 1
        out = []
        for i, fmaps in enumerate(self.levels):
            h, w = fmaps.shape[-2:]
            corr = torch.matmul(track_feats, fmaps.view(b, s, c, h * w)) / math.sqrt(c)
            xy = coords.reshape(b * s * n, 1, 1, 2) / 2**i + self.offsets.to(coords.dtype).view(1, window, window, 2)
            sampled = sample_bilinear(corr.view(b * s * n, 1, h, w), xy, padding_mode="zeros")
            out.append(sampled.view(b, s, n, window * window))
        return torch.cat(out, dim=-1)


class AttnBlock(nn.Module):
    """Self-attention block of the update transformer. Its residuals start from the normalised input."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block (queries `x`, keys/values `context`); residuals from the normalised input."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        x = x + self.cross_attn(x, context, context, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Transformer over [B, N, T, C] track tokens alternating time and (virtual-track) space attention."""

    def __init__(
        self,
        depth: int = 6,
        input_dim: int = 388,
        hidden_size: int = 384,
        num_heads: int = 8,
        output_dim: int = 130,
        mlp_ratio: float = 4.0,
        num_virtual_tracks: int = 64,
    ) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))
        self.time_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.space_virtual_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.space_point2virtual_blocks = nn.ModuleList(
            [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.space_virtual2point_blocks = nn.ModuleList(
            [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, T, input_dim] -> [B, N, T, output_dim]."""
        init = self.input_transform(self.input_norm(x))
        b, n, t, c = init.shape
        tokens = torch.cat((init, self.virual_tracks.expand(b, -1, t, -1)), dim=1)
        m = tokens.shape[1]
        for time_block, v2p, virtual_block, p2v in zip(
            self.time_blocks,
            self.space_virtual2point_blocks,
            self.space_virtual_blocks,
            self.space_point2virtual_blocks,
        ):
            tokens = time_block(tokens.reshape(b * m, t, c)).view(b, m, t, c)
            space = tokens.transpose(1, 2).reshape(b * t, m, c)
            points, virtual = space[:, :n], space[:, n:]
            virtual = virtual_block(v2p(virtual, points))
            points = p2v(points, virtual)
            tokens = torch.cat((points, virtual), dim=1).view(b, t, m, c).transpose(1, 2)
        return self.flow_head(self.output_norm(tokens[:, :n] + init))


class TrackerPredictor(nn.Module):
    """Predicts tracks of query points through S frames of feature maps (see the module docstring)."""

    def __init__(
        self,
        latent_dim: int = 128,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        depth: int = 6,
        num_heads: int = 8,
        max_scale: float = 518.0,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.stride = stride
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.max_scale = max_scale
        self.transformer_dim = 3 * latent_dim + 4  # motion embedding + 4, correlations, track features
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = EfficientUpdateFormer(
            depth, self.transformer_dim, hidden_size, num_heads, latent_dim + 2
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))

    def forward(
        self, query_points: torch.Tensor, fmaps: torch.Tensor, iters: int = 4
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Tracks of `query_points` [B, N, 2] (input pixels, frame 0) in `fmaps` [B, S, C, H/stride, W/stride].

        Returns the tracks of every iteration (each [B, S, N, 2], input pixels), visibility and confidence
        ([B, S, N], in [0, 1]).
        """
        b, n, _ = query_points.shape
        s, c, hh, ww = fmaps.shape[1:]
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        queries = query_points / float(self.stride)
        coords = queries[:, None].expand(b, s, n, 2).clone()
        track_feats = sample_bilinear(fmaps[:, 0], queries).transpose(1, 2)  # [B, N, C]
        track_feats = track_feats[:, None].expand(b, s, n, c)
        pyramid = CorrelationPyramid(fmaps, self.corr_levels, self.corr_radius)
        # The query position never changes, so its (bilinearly sampled) position embedding is fixed.
        grid_embed = grid_sincos_embed(self.transformer_dim, hh, ww, fmaps.device).expand(b, -1, -1, -1)
        pos = sample_bilinear(grid_embed, queries).transpose(1, 2).reshape(b * n, 1, -1)
        ref = torch.cat((self.query_ref_token[:, :1], self.query_ref_token[:, 1:].expand(-1, s - 1, -1)), dim=1)

        tracks = []
        for _ in range(iters):
            coords = coords.detach()
            corr = self.corr_mlp(pyramid.sample(track_feats, coords).transpose(1, 2).reshape(b * n, s, -1))
            flows = (coords - coords[:, :1]).transpose(1, 2).reshape(b * n, s, 2)
            motion = torch.cat(
                (motion_embed(flows, self.latent_dim // 2), flows / self.max_scale, flows / self.max_scale), dim=-1
            )
            feats = track_feats.transpose(1, 2).reshape(b * n, s, c)
            x = torch.cat((motion, corr, feats), dim=-1) + pos + ref
            delta = self.updateformer(x.view(b, n, s, -1)).reshape(b * n * s, c + 2)
            feats = self.ffeat_updater(self.ffeat_norm(delta[:, 2:])) + feats.reshape(b * n * s, c)
            track_feats = feats.view(b, n, s, c).transpose(1, 2)
            coords = coords + delta[:, :2].reshape(b, n, s, 2).transpose(1, 2)
            coords[:, 0] = queries
            tracks.append(coords * self.stride)

        vis = torch.sigmoid(self.vis_predictor(track_feats).squeeze(-1))
        conf = torch.sigmoid(self.conf_predictor(track_feats).squeeze(-1))
        return tracks, vis, conf
