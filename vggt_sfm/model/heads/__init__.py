"""VGGT's prediction heads."""

from .camera_head import CameraHead
from .dpt_head import DPTHead
from .track_head import TrackHead

__all__ = ["CameraHead", "DPTHead", "TrackHead"]
