"""VGGT (Wang et al., "VGGT: Visual Geometry Grounded Transformer", CVPR 2025), checkpoint-compatible.

`VGGT()` builds VGGT-1B with the parameter names of the released `model.pt`, so the official checkpoint
loads with a strict `load_state_dict` (build it under `torch.device("meta")` and load with `assign=True`
to avoid a random 5 GB initialisation).

Input: `images` [S, 3, H, W] or [B, S, 3, H, W], RGB in [0, 1], H and W multiples of 14 (518 on the
long side is what the model was trained for); the first frame is the reference frame. Optional
`query_points` [N, 2] or [B, N, 2]: pixels (x, y) of frame 0, pixel centres at integers.

Output dict (B batch, S frames, N query points; each head's keys only when that head runs):

| key | shape | meaning |
|---|---|---|
| `pose_enc` | [B, S, 9] | camera encoding of the last refinement step (absT_quaR_FoV, see `pose_encoding.py`) |
| `pose_enc_list` | list of 4 x [B, S, 9] | the encoding after each refinement step |
| `depth` | [B, S, H, W, 1] | z-depth in the first camera's normalised scale |
| `depth_conf` | [B, S, H, W] | depth confidence 1 + exp(c) > 1, higher is better |
| `world_points` | [B, S, H, W, 3] | point map in the first camera's frame |
| `world_points_conf` | [B, S, H, W] | point-map confidence > 1 |
| `track` | [B, S, N, 2] | tracks of the query points, pixels (last iteration) |
| `vis` | [B, S, N] | visibility probability of each track point |
| `conf` | [B, S, N] | confidence probability of each track point |
| `images` | [B, S, 3, H, W] | the input (as the official model returns it in eval mode) |

The aggregator may run under `torch.autocast` (bf16/fp16); the heads always run in float32 with
autocast disabled, like the official implementation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from .aggregator import Aggregator
from .heads import CameraHead, DPTHead, TrackHead

HEADS = ("camera", "depth", "point", "track")


@dataclass(frozen=True)
class VGGTConfig:
    """Hyper-parameters of VGGT; the defaults are VGGT-1B (facebook/VGGT-1B)."""

    img_size: int = 518  # training size; sets the stored DINO position-embedding grid (37 x 37)
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24  # frame/global attention block pairs
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    aa_order: tuple[str, ...] = ("frame", "global")
    aa_block_size: int = 1
    patch_embed: str = "dino"  # "dino" (DINOv2 ViT with registers) or "conv" (one 14x14 convolution)
    dino_depth: int = 24
    dino_num_heads: int = 16
    dino_mlp_ratio: float = 4.0
    dino_init_values: float = 1.0
    intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23)  # layers read by the DPT heads
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_mlp_ratio: float = 4.0
    camera_init_values: float = 0.01
    camera_iterations: int = 4
    dpt_features: int = 256
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    track_features: int = 128
    track_hidden_size: int = 384
    track_iters: int = 4
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    enable_track: bool = True
    # Inference only, not architecture: frames per DPT-head pass (bounds the head's working memory).
    dpt_frames_chunk_size: int = 4

    @classmethod
    def from_meta(cls, meta: str | dict[str, Any]) -> VGGTConfig:
        """Config from a parity fixture's `meta_json` (a JSON string or dict with a "config" entry).

        Every key must be a field of VGGTConfig (an unknown one would be a silently ignored difference);
        lists become tuples.
        """
        if isinstance(meta, str):
            meta = json.loads(meta)
        values = meta.get("config", meta)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown VGGT config keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class VGGT(nn.Module):
    """VGGT model; see the module docstring for inputs and outputs."""

    def __init__(self, config: VGGTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = replace(config or VGGTConfig(), **overrides)
        self.config = config
        dim = 2 * config.embed_dim  # heads read cat(frame tokens, global tokens)
        self.aggregator = Aggregator(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            num_register_tokens=config.num_register_tokens,
            qk_norm=config.qk_norm,
            rope_freq=config.rope_freq,
            init_values=config.init_values,
            aa_order=config.aa_order,
            aa_block_size=config.aa_block_size,
            patch_embed=config.patch_embed,
            dino_depth=config.dino_depth,
            dino_num_heads=config.dino_num_heads,
            dino_mlp_ratio=config.dino_mlp_ratio,
            dino_init_values=config.dino_init_values,
            keep_layers=config.intermediate_layer_idx,
        )
        dpt = dict(
            patch_size=config.patch_size,
            features=config.dpt_features,
            out_channels=config.dpt_out_channels,
            intermediate_layer_idx=config.intermediate_layer_idx,
        )
        self.camera_head = (
            CameraHead(
                dim, config.camera_trunk_depth, config.camera_num_heads, config.camera_mlp_ratio,
                config.camera_init_values, config.camera_iterations,
            )
            if config.enable_camera
            else None
        )
        self.point_head = DPTHead(dim, output_dim=4, activation="inv_log", **dpt) if config.enable_point else None
        self.depth_head = DPTHead(dim, output_dim=2, activation="exp", **dpt) if config.enable_depth else None
        self.track_head = (
            TrackHead(
                dim,
                config.patch_size,
                features=config.track_features,
                iters=config.track_iters,
                hidden_size=config.track_hidden_size,
                out_channels=config.dpt_out_channels,
                intermediate_layer_idx=config.intermediate_layer_idx,
            )
            if config.enable_track
            else None
        )

    @property
    def enabled_heads(self) -> tuple[str, ...]:
        """Names of the heads this model has, in the order they run."""
        return tuple(name for name in HEADS if getattr(self, f"{name}_head") is not None)

    def forward(
        self,
        images: torch.Tensor,
        query_points: torch.Tensor | None = None,
        heads: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Predictions for `images`; `heads` restricts the heads that run (default: all enabled heads,
        the track head only when `query_points` are given). See the module docstring for the outputs.
        """
        if images.dim() == 4:
            images = images[None]
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"expected images [S, 3, H, W] or [B, S, 3, H, W], got {tuple(images.shape)}")
        if query_points is not None and query_points.dim() == 2:
            query_points = query_points[None]
        run = self._heads_to_run(heads, query_points is not None)

        keep = set()
        if "camera" in run:
            keep.add(self.config.depth - 1)
        if run & {"depth", "point", "track"}:
            keep.update(self.config.intermediate_layer_idx)
        tokens, patch_start_idx = self.aggregator(images, keep_layers=keep)

        image_hw = tuple(images.shape[-2:])
        chunk = self.config.dpt_frames_chunk_size
        predictions: dict[str, Any] = {}
        with torch.autocast(device_type=images.device.type, enabled=False):
            tokens = [None if t is None else t.float() for t in tokens]
            if "camera" in run:
                predictions["pose_enc_list"] = self.camera_head(tokens)
                predictions["pose_enc"] = predictions["pose_enc_list"][-1]
            if "depth" in run:
                predictions["depth"], predictions["depth_conf"] = self.depth_head(
                    tokens, image_hw, patch_start_idx, chunk
                )
            if "point" in run:
                predictions["world_points"], predictions["world_points_conf"] = self.point_head(
                    tokens, image_hw, patch_start_idx, chunk
                )
            if "track" in run:
                tracks, predictions["vis"], predictions["conf"] = self.track_head(
                    tokens, image_hw, patch_start_idx, query_points.float(), chunk
                )
                predictions["track"] = tracks[-1]
        predictions["images"] = images
        return predictions

    def _heads_to_run(self, heads: Iterable[str] | None, have_queries: bool) -> set[str]:
        enabled = set(self.enabled_heads)
        if heads is None:
            return enabled if have_queries else enabled - {"track"}
        run = set(heads)
        unknown = run - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; choose from {HEADS}")
        missing = run - enabled
        if missing:
            raise ValueError(f"heads {sorted(missing)} are disabled in this model")
        if "track" in run and not have_queries:
            raise ValueError("the track head needs query_points")
        return run
