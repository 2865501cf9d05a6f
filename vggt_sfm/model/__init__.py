"""VGGT, reimplemented with the official checkpoint's parameter names (see `vggt.py`)."""

from .geometry import unproject_depth_map_to_point_map
from .pose_encoding import extrinsics_intrinsics_to_pose_encoding, pose_encoding_to_extrinsics_intrinsics
from .vggt import VGGT, VGGTConfig

__all__ = [
    "VGGT",
    "VGGTConfig",
    "extrinsics_intrinsics_to_pose_encoding",
    "pose_encoding_to_extrinsics_intrinsics",
    "unproject_depth_map_to_point_map",
]
