"""vggt-sfm: accurate COLMAP reconstructions from photos, initialised by VGGT's feed-forward predictions."""

__version__ = "0.1.0"
