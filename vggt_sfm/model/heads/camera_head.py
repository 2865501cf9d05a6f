"""Camera head: iterative refinement of a 9-d pose encoding from the camera tokens.

The camera token of every frame (last aggregator layer, 2*dim channels) is LayerNorm-ed, then modulated
(adaLN: shift/scale/gate from an embedding of the current estimate), passed through a small transformer
trunk that attends across the S frames, and decoded into an update of the raw encoding. Each iteration's
activated encoding (absT_quaR_FoV, see `pose_encoding.py`) is returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Block, Mlp
from .head_act import activate_pose

POSE_ENCODING_DIM = 9  # translation (3), quaternion XYZW (4), field of view h, w (2)


class CameraHead(nn.Module):
    """Predicts `num_iterations` successive pose encodings [B, S, 9] from the aggregator's last layer."""

    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        num_iterations: int = 4,
    ) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.trunk = nn.Sequential(
            *[Block(dim_in, num_heads, mlp_ratio, init_values=init_values) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_ENCODING_DIM))
        self.embed_pose = nn.Linear(POSE_ENCODING_DIM, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.pose_branch = Mlp(dim_in, dim_in // 2, POSE_ENCODING_DIM)

    def forward(self, tokens_list: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Pose encodings of each iteration, each [B, S, 9]; the last one is the prediction."""
        last = tokens_list[-1]
        if last is None:
            raise ValueError("the camera head needs the aggregator's last layer")
        tokens = self.token_norm(last[:, :, 0])
        normalized = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
        raw = None
        encodings = []
        for _ in range(self.num_iterations):
            # Refinement works on the raw (pre-activation) encoding; the first step starts from a learned token.
            source = self.empty_pose_tokens.expand(*tokens.shape[:2], -1) if raw is None else raw.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(source)).chunk(3, dim=-1)
            x = gate * (normalized * (1 + scale) + shift) + tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            raw = delta if raw is None else raw + delta
            encodings.append(activate_pose(raw))
        return encodings
