"""Predictions for more frames than one VGGT pass can hold: overlapping windows, chained by similarities.

VGGT predicts every window in a frame of its own (the window's first camera at the origin, its own scale).
Consecutive windows share `overlap` frames. Each shared frame's confident pixels, unprojected with their depth
and camera in both windows, give the same surface points in both frames; a robust similarity between those
point sets (`similarity.align_points`) carries the new window into the frame of the first window, where its
cameras, depth maps and point maps are expressed (each window is placed on the one before it). A shared frame
keeps the earlier window's prediction.

Windows follow the sorted image order, so they suit captures whose neighbours in name order see the same
scene (video frames, walk-throughs, orbits taken in order). Chaining leaves some drift over many windows;
the matches and bundle adjustment of the reconstruction correct it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pycolmap

from .errors import UserError
from .model.geometry import unproject_depth_map_to_point_map
from .predictions import OPTIONAL_MAPS, Predictions
from .similarity import align_points

logger = logging.getLogger(__name__)

MAX_POINTS_PER_FRAME = 4096  # confident pixels of a shared frame used to fit the similarity
INLIER_DEPTH_FRACTION = 0.05  # a correspondence is an inlier within this fraction of the shared frames' median depth


def default_overlap(window: int) -> int:
    """Frames shared by consecutive windows when none is given: a quarter of the window, at least one."""
    return min(max(window // 4, 1), window - 1)


def window_ranges(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) frame ranges of `window` frames, consecutive ones sharing at least `overlap` frames.

    The last window ends at the last frame (it may share more than `overlap`). One window when all frames fit.
    """
    if window < 2:
        raise UserError(f"a window needs at least 2 frames, got {window}")
    if not 1 <= overlap < window:
        raise UserError(f"the window overlap must be between 1 and the window size - 1 ({window - 1}), got {overlap}")
    if num_frames <= window:
        return [(0, num_frames)]
    step = window - overlap
    starts = list(range(0, num_frames - window, step)) + [num_frames - window]
    return [(start, start + window) for start in starts]


def _pixel_points(predictions: Predictions, frame: int, pixels: np.ndarray) -> np.ndarray:
    """World points (N,3) float64 of a frame's depth at the flat pixel indices `pixels`."""
    points = unproject_depth_map_to_point_map(
        predictions.depth[frame][None].astype(np.float64),
        predictions.cam_from_world[frame][None],
        predictions.intrinsics[frame][None],
    )[0]
    return points.reshape(-1, 3)[pixels]


def _usable(predictions: Predictions, frame: int) -> np.ndarray:
    """Pixels with a positive finite depth, at or above the frame's median confidence."""
    depth = predictions.depth[frame]
    usable = np.isfinite(depth) & (depth > 0)
    if predictions.depth_conf is not None and usable.any():
        conf = predictions.depth_conf[frame]
        usable &= conf >= np.median(conf[usable])
    return usable.reshape(-1)


def shared_points(
    reference: Predictions, current: Predictions, names: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corresponding surface points (N,3) of the frames `names` that both predictions hold, from the pixels both
    predict with confidence: (in current's frame, in reference's frame, their depth (N,) in reference)."""
    ref_index, cur_index = reference.index(), current.index()
    src, tgt, depth = [], [], []
    for name in names:
        i, j = ref_index[name], cur_index[name]
        if reference.depth[i].shape != current.depth[j].shape:
            raise ValueError(f"{name}: the two windows' depth maps differ in size")
        pixels = np.flatnonzero(_usable(reference, i) & _usable(current, j))
        if len(pixels) > MAX_POINTS_PER_FRAME:
            pixels = pixels[np.linspace(0, len(pixels) - 1, MAX_POINTS_PER_FRAME).astype(int)]
        src.append(_pixel_points(current, j, pixels))
        tgt.append(_pixel_points(reference, i, pixels))
        depth.append(reference.depth[i].reshape(-1)[pixels])
    return np.concatenate(src), np.concatenate(tgt), np.concatenate(depth)


def window_similarity(reference: Predictions, current: Predictions) -> pycolmap.Sim3d:
    """reference_from_current similarity, fitted on the frames both hold (see the module docstring)."""
    if reference.depth is None or current.depth is None:
        raise ValueError("aligning windows needs their depth maps")
    ref_names = set(reference.image_names)
    names = [name for name in current.image_names if name in ref_names]
    if not names:
        raise ValueError("the windows share no frame")
    src, tgt, depth = shared_points(reference, current, names)
    if len(src) < 3:
        raise UserError(
            f"windows sharing {', '.join(names)} have fewer than 3 pixels with a confident depth in both; "
            "use a larger window overlap"
        )
    sim, num_inliers = align_points(src, tgt, INLIER_DEPTH_FRACTION * float(np.median(depth)))
    if sim is None:
        raise UserError(f"windows sharing {', '.join(names)} cannot be aligned (degenerate depth); use a larger overlap")
    logger.debug("window aligned on %d frames, %d of %d points inliers, scale %.4g", len(names), num_inliers, len(src), sim.scale)
    return sim


def transform_predictions(predictions: Predictions, sim: pycolmap.Sim3d) -> Predictions:
    """The same predictions in the frame `sim` maps into: cameras, depth (scaled) and point maps."""
    cam_from_world = np.stack(
        [
            sim.transform_camera_world(pycolmap.Rigid3d(pose)).matrix()
            for pose in predictions.cam_from_world
        ]
    )
    world_points = predictions.world_points
    if world_points is not None:
        world_points = (sim * world_points.reshape(-1, 3).astype(np.float64)).reshape(world_points.shape)
        world_points = world_points.astype(predictions.world_points.dtype)
    depth = predictions.depth
    if depth is not None:
        depth = (depth * sim.scale).astype(depth.dtype)
    return Predictions(
        image_names=list(predictions.image_names),
        cam_from_world=cam_from_world,
        intrinsics=predictions.intrinsics,
        grid_from_image=predictions.grid_from_image,
        depth=depth,
        depth_conf=predictions.depth_conf,
        world_points=world_points,
        world_points_conf=predictions.world_points_conf,
    )


def chain_windows(windows: Iterable[Predictions]) -> Predictions:
    """One Predictions of all frames, in the first window's frame: each window is placed by its similarity to the
    window before it (already placed), and contributes the frames not seen before. `windows` may be a generator
    (`predict` runs VGGT lazily); each frame's maps are copied once, at the end."""
    parts: list[Predictions] = []
    known: set[str] = set()
    previous = None
    for window in windows:
        placed = window if previous is None else transform_predictions(window, window_similarity(previous, window))
        new = [name for name in placed.image_names if name not in known]
        parts.append(placed if len(new) == placed.num_frames else placed.subset(new))
        known.update(new)
        previous = placed
    if not parts:
        raise ValueError("no window to chain")
    if len(parts) == 1:
        return parts[0]

    def join(key: str) -> np.ndarray | None:
        values = [getattr(part, key) for part in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    return Predictions(
        image_names=[name for part in parts for name in part.image_names],
        cam_from_world=join("cam_from_world"),
        intrinsics=join("intrinsics"),
        grid_from_image=join("grid_from_image"),
        **{key: join(key) for key in OPTIONAL_MAPS},
    )
