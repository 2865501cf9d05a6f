"""Depth maps to 3D points with VGGT's pixel convention (pixel centres at integer coordinates)."""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def unproject_depth_map_to_point_map(
    depth_map: ArrayLike, extrinsics: ArrayLike, intrinsics: ArrayLike
) -> ArrayLike:
    """World points [S, H, W, 3] of z-depth maps [S, H, W] or [S, H, W, 1].

    `extrinsics` [S, 3, 4] are cam_from_world (OpenCV axes), `intrinsics` [S, 3, 3] pinholes for the
    depth grid with pixel (u, v) centred at integer (u, v), as VGGT predicts them. A pixel becomes
    X_cam = ((u - cx) d / fx, (v - cy) d / fy, d) and X_world = R^T (X_cam - t).
    Points of non-positive depth are returned as computed (callers mask by depth or confidence).
    Returns the same array type as `depth_map` (numpy in, numpy out), in float32 or float64 as given.
    """
    as_numpy = isinstance(depth_map, np.ndarray)
    depth = torch.as_tensor(depth_map)
    if depth.dim() == 4:
        depth = depth.squeeze(-1)
    dtype = depth.dtype if depth.is_floating_point() else torch.float32
    depth = depth.to(dtype)
    extr = torch.as_tensor(extrinsics).to(device=depth.device, dtype=dtype)
    intr = torch.as_tensor(intrinsics).to(device=depth.device, dtype=dtype)
    _, h, w = depth.shape
    u = torch.arange(w, device=depth.device, dtype=dtype)
    v = torch.arange(h, device=depth.device, dtype=dtype)
    fx, fy = intr[:, 0, 0, None, None], intr[:, 1, 1, None, None]
    cx, cy = intr[:, 0, 2, None, None], intr[:, 1, 2, None, None]
    cam = torch.stack(
        (
            (u[None, None, :] - cx) * depth / fx,
            (v[None, :, None] - cy) * depth / fy,
            depth,
        ),
        dim=-1,
    )  # [S, H, W, 3]
    rot, trans = extr[:, None, :, :3], extr[:, None, None, :, 3]
    # R^T (X - t) for row vectors: (X - t) @ R
    world = torch.matmul(cam - trans, rot)
    return world.numpy() if as_numpy else world
