"""Track head: DPT feature maps at half resolution + the iterative point tracker."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .dpt_head import DPTHead
from .tracker import TrackerPredictor


class TrackHead(nn.Module):
    """Tracks query points of the first frame through all frames of a sequence."""

    def __init__(
        self,
        dim_in: int = 2048,
        patch_size: int = 14,
        features: int = 128,
        iters: int = 4,
        stride: int = 2,
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
    ) -> None:
        super().__init__()
        self.iters = iters
        self.feature_extractor = DPTHead(
            dim_in,
            patch_size,
            features=features,
            out_channels=out_channels,
            intermediate_layer_idx=intermediate_layer_idx,
            feature_only=True,
            down_ratio=stride,
            pos_embed=False,
        )
        self.tracker = TrackerPredictor(features, stride, corr_levels, corr_radius, hidden_size)

    def forward(
        self,
        tokens_list: list[torch.Tensor | None],
        image_hw: tuple[int, int],
        patch_start_idx: int,
        query_points: torch.Tensor,
        frames_chunk_size: int | None = 8,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Tracks of `query_points` [B, N, 2] (pixels of frame 0, centres at integers).

        Returns the tracks of each iteration ([B, S, N, 2] pixels), visibility and confidence [B, S, N].
        """
        fmaps = self.feature_extractor(tokens_list, image_hw, patch_start_idx, frames_chunk_size)
        return self.tracker(query_points, fmaps, self.iters)
