"""Dense initial points for splatting, from the predicted depth maps and the refined cameras.

The predicted depth lives in the prediction's scale (VGGT: normalised, per-scene), not the refined model's. Each
image's depth is therefore brought into the model by a robust fit against the sparse points it observes
(refined depth = scale * predicted depth [+ shift]); confident pixels are then unprojected through the refined
camera (distortion included), voxel-downsampled, coloured from the image and capped at `max_points`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycolmap

from ..errors import UserError, param
from ..images import read_image
from ..predictions import Predictions

logger = logging.getLogger(__name__)

_MAD_TO_SIGMA = 1.4826


@dataclass
class DenseConfig:
    """How dense points are chosen."""

    max_points: int = 100_000
    min_confidence: float = 1.5  # VGGT's depth confidence is 1 + exp(c) > 1; higher is better
    drop_least_confident: float = 0.3  # also drop this fraction of each image's least confident pixels
    fit_shift: bool = False  # fit refined = scale * predicted + shift instead of a scale alone
    max_fit_error: float = 0.1  # skip an image whose median relative depth error after the fit is larger
    min_fit_points: int = 8  # sparse observations an image needs for the fit
    voxel_size: float | None = None  # None: chosen so that about `max_points` voxels remain
    max_candidates: int = 4_000_000  # pixels are subsampled on a regular grid above this many
    # Multi-view consistency: a point is kept only where one of the (up to) `check_views` nearest other views
    # has confident depth agreeing with it within `max_view_disagreement` (relative). VGGT is confident in places
    # where it is wrong (sky, reflections); another view's depth there rarely agrees, or is not confident. A
    # point no other view sees cannot be confirmed and goes too (splatting densifies from the confirmed ones).
    check_views: int = 4
    max_view_disagreement: float = 0.05
    seed: int = 0


@dataclass
class DepthFit:
    """refined depth = scale * predicted depth + shift, for one image."""

    scale: float
    shift: float
    median_error: float  # median relative depth error at the sparse observations
    num_points: int


@dataclass
class DensePoints:
    """Coloured points in the reconstruction's world frame."""

    xyz: np.ndarray  # (N,3) float64
    rgb: np.ndarray  # (N,3) uint8
    fits: dict[str, DepthFit] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # image name -> why it gave no points
    voxel_size: float = 0.0
    inconsistent: int = 0  # candidate points dropped: confirmed by no other view


def fit_depth(predicted: np.ndarray, refined: np.ndarray, fit_shift: bool = False) -> DepthFit | None:
    """Robustly fit refined ≈ scale * predicted (+ shift) on positive depth pairs; None when it cannot."""
    valid = (predicted > 0) & (refined > 0) & np.isfinite(predicted) & np.isfinite(refined)
    predicted, refined = predicted[valid], refined[valid]
    if len(predicted) < (3 if fit_shift else 1):
        return None
    scale, shift = float(np.median(refined / predicted)), 0.0
    for _ in range(3):
        relative = np.abs(scale * predicted + shift - refined) / refined
        inliers = relative <= max(3.0 * _MAD_TO_SIGMA * np.median(relative), 1e-3)
        p, r = predicted[inliers], refined[inliers]
        if fit_shift and len(p) >= 3 and np.ptp(p) > 0:
            scale, shift = (float(v) for v in np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), r, rcond=None)[0])
        else:
            scale, shift = float(p @ r / (p @ p)), 0.0
    if not scale > 0:
        return None
    error = float(np.median(np.abs(scale * predicted + shift - refined) / refined))
    return DepthFit(scale=scale, shift=shift, median_error=error, num_points=len(predicted))


def _voxel_keys(xyz: np.ndarray, voxel_size: float) -> np.ndarray:
    """One integer per voxel (a single int64 when the grid allows, else rows of three)."""
    cells = np.floor((xyz - xyz.min(axis=0)) / voxel_size).astype(np.int64)
    dims = cells.max(axis=0) + 1
    if float(dims[0]) * float(dims[1]) * float(dims[2]) < 2.0**62:
        return (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
    return cells


def voxel_downsample(xyz: np.ndarray, rgb: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """One point per occupied voxel: the mean position and mean colour of the points inside it."""
    if len(xyz) == 0:
        return xyz, rgb
    keys = _voxel_keys(xyz, voxel_size)
    _, inverse, counts = np.unique(keys, axis=0 if keys.ndim == 2 else None, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    mean_xyz = np.stack([np.bincount(inverse, weights=xyz[:, i]) for i in range(3)], 1) / counts[:, None]
    mean_rgb = np.stack([np.bincount(inverse, weights=rgb[:, i].astype(np.float64)) for i in range(3)], 1)
    mean_rgb /= counts[:, None]
    return mean_xyz, np.clip(np.round(mean_rgb), 0, 255).astype(np.uint8)


def _count_voxels(xyz: np.ndarray, voxel_size: float) -> int:
    keys = _voxel_keys(xyz, voxel_size)
    return len(np.unique(keys, axis=0 if keys.ndim == 2 else None))


def auto_voxel_size(xyz: np.ndarray, max_points: int) -> float:
    """A voxel size leaving a little under `max_points` voxels; the points sample surfaces, so count ~ size^-2."""
    low, high = np.percentile(xyz, [2, 98], axis=0)
    size = max(float(np.linalg.norm(high - low)) / np.sqrt(max_points), 1e-12)
    for _ in range(8):
        count = _count_voxels(xyz, size)
        if 0.8 * max_points <= count <= max_points:
            break
        size *= np.sqrt(count / (0.9 * max_points))
    return size


def _observations(reconstruction: pycolmap.Reconstruction, image: pycolmap.Image) -> tuple[np.ndarray, np.ndarray]:
    """(n,2) pixels and (n,3) world points of the image's observations of 3D points."""
    xy, xyz = [], []
    for point2D in image.points2D:
        if point2D.has_point3D():
            xy.append(point2D.xy)
            xyz.append(reconstruction.points3D[point2D.point3D_id].xyz)
    return np.array(xy, dtype=np.float64).reshape(-1, 2), np.array(xyz, dtype=np.float64).reshape(-1, 3)


def _fit_image(
    predictions: Predictions, frame: int, reconstruction: pycolmap.Reconstruction, image: pycolmap.Image,
    config: DenseConfig,
) -> DepthFit | str:
    """The image's depth fit against the sparse points it observes, or why there is none."""
    xy, xyz = _observations(reconstruction, image)
    if len(xy) < config.min_fit_points:
        return f"only {len(xy)} sparse observations to fit the depth scale"
    predicted, confidence = predictions.sample_depth(frame, xy)
    usable = (confidence >= config.min_confidence) & (predicted > 0)
    if np.count_nonzero(usable) < config.min_fit_points:
        return "too few sparse points with confident predicted depth"
    refined = (image.cam_from_world() * xyz[usable])[:, 2]
    fit = fit_depth(predicted[usable], refined, config.fit_shift)
    if fit is None or fit.num_points < config.min_fit_points:
        return "too few sparse points in front of the camera with confident predicted depth"
    if fit.median_error > config.max_fit_error:
        return f"predicted depth disagrees with the model (median error {fit.median_error:.1%} over {fit.num_points} points)"
    return fit


def _unproject_image(
    predictions: Predictions, frame: int, grid: np.ndarray, image: pycolmap.Image, camera: pycolmap.Camera,
    fit: DepthFit, config: DenseConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """World points and their (N,2) pixels (COLMAP convention) of the confident grid pixels inside the image."""
    u, v = grid[:, 0].astype(int), grid[:, 1].astype(int)
    depth = predictions.depth[frame][v, u].astype(np.float64)
    confidence = (
        predictions.depth_conf[frame][v, u].astype(np.float64)
        if predictions.depth_conf is not None else np.full(len(depth), np.inf)
    )
    # Grid pixel (integer centres) -> original image pixel, COLMAP convention (+0.5); padding falls outside.
    homogeneous = grid @ predictions.image_from_grid()[frame].T
    xy = homogeneous[:, :2] / homogeneous[:, 2:3] + 0.5
    z = fit.scale * depth + fit.shift
    keep = (
        (depth > 0) & (z > 0) & (confidence >= config.min_confidence)
        & (xy[:, 0] >= 0) & (xy[:, 0] <= camera.width) & (xy[:, 1] >= 0) & (xy[:, 1] <= camera.height)
    )
    if config.drop_least_confident > 0 and keep.any() and np.isfinite(confidence[keep]).all():
        keep &= confidence >= np.quantile(confidence[keep], config.drop_least_confident)
    xy, z = xy[keep], z[keep]
    rays = camera.cam_from_img(np.ascontiguousarray(xy)).reshape(-1, 2)
    finite = np.isfinite(rays).all(axis=1)  # undistortion can fail far outside the calibrated field
    rays, xy, z = rays[finite], xy[finite], z[finite]
    points_cam = np.concatenate([rays * z[:, None], z[:, None]], axis=1)
    return image.cam_from_world().inverse() * points_cam, xy


def _confirmed_by_other_views(
    predictions: Predictions, frame_of: dict[str, int], reconstruction: pycolmap.Reconstruction,
    image: pycolmap.Image, sources: list[pycolmap.Image], fits: dict[str, DepthFit], xyz: np.ndarray,
    config: DenseConfig,
) -> np.ndarray:
    """(N,) bool: the points of `image` that another view's confident depth confirms."""
    center = image.projection_center()
    others = sorted((o for o in sources if o.image_id != image.image_id),
                    key=lambda o: np.linalg.norm(o.projection_center() - center))[: config.check_views]  # fmt: skip
    checked = np.zeros(len(xyz), dtype=bool)
    agreed = np.zeros(len(xyz), dtype=bool)
    for other in others:
        camera = reconstruction.cameras[other.camera_id]
        points_cam = other.cam_from_world() * xyz
        z = points_cam[:, 2]
        ahead = z > 0
        xy = np.full((len(xyz), 2), -1.0)
        if ahead.any():
            xy[ahead] = camera.img_from_cam(points_cam[ahead])
        inside = ahead & (xy[:, 0] >= 0) & (xy[:, 0] <= camera.width) & (xy[:, 1] >= 0) & (xy[:, 1] <= camera.height)
        if not inside.any():
            continue
        fit = fits[other.name]
        depth, confidence = predictions.sample_depth(frame_of[other.name], xy[inside])
        seen = (depth > 0) & (confidence >= config.min_confidence)
        checked[inside] = True
        rows = np.flatnonzero(inside)[seen]
        expected = fit.scale * depth[seen] + fit.shift
        agreed[rows] |= np.abs(expected - z[rows]) <= config.max_view_disagreement * z[rows]
    return agreed


def dense_points(
    predictions: Predictions,
    reconstruction: pycolmap.Reconstruction,
    images_dir: Path | str,
    config: DenseConfig | None = None,
) -> DensePoints:
    """Confident predicted depth, unprojected with the refined cameras, voxel-downsampled and coloured.

    Images are matched to prediction frames by name. Raises UserError when the predictions have no depth.
    """
    config = config or DenseConfig()
    if predictions.depth is None:
        raise UserError(
            "dense points need depth predictions, and these predictions have no 'depth' "
            f"(predict again with the VGGT model, or set {param('output.dense_points', 0)})"
        )
    if config.max_points < 1:
        raise UserError(f"{param('output.dense_points')} must be at least 1, got {config.max_points}")
    images_dir = Path(images_dir)
    frame_of = predictions.index()
    _, grid_h, grid_w = predictions.depth.shape
    result = DensePoints(xyz=np.zeros((0, 3)), rgb=np.zeros((0, 3), dtype=np.uint8))
    images = [reconstruction.images[i] for i in sorted(reconstruction.reg_image_ids())]
    for image in images:
        if image.name not in frame_of:
            result.skipped[image.name] = "no prediction for this image"
    images = [image for image in images if image.name in frame_of]

    # A regular subsample of the grid keeps the candidates (and memory) bounded on large image sets.
    stride = max(1, int(np.ceil(np.sqrt(len(images) * grid_h * grid_w / config.max_candidates))))
    grid_v, grid_u = np.mgrid[0:grid_h:stride, 0:grid_w:stride]
    grid = np.stack([grid_u.reshape(-1), grid_v.reshape(-1), np.ones(grid_u.size)], axis=1).astype(np.float64)

    all_xyz, all_rgb, sources = [], [], []
    for image in images:
        frame = frame_of[image.name]
        fit = _fit_image(predictions, frame, reconstruction, image, config)
        if isinstance(fit, str):
            result.skipped[image.name] = fit
            continue
        result.fits[image.name] = fit
        camera = reconstruction.cameras[image.camera_id]
        xyz, xy = _unproject_image(predictions, frame, grid, image, camera, fit, config)
        if len(xyz) == 0:
            result.skipped[image.name] = "no confident depth inside the image"
            continue
        pixels = read_image(images_dir / image.name)
        cols = np.clip(np.floor(xy[:, 0]).astype(int), 0, pixels.shape[1] - 1)
        rows = np.clip(np.floor(xy[:, 1]).astype(int), 0, pixels.shape[0] - 1)
        all_xyz.append(xyz)
        all_rgb.append(pixels[rows, cols])
        sources.append(image)

    for name, why in result.skipped.items():
        logger.warning("dense points: skipping %s: %s", name, why)
    if not all_xyz:
        return result
    if config.check_views > 0 and len(sources) > 1:
        before = sum(len(x) for x in all_xyz)
        for k, image in enumerate(sources):
            keep = _confirmed_by_other_views(predictions, frame_of, reconstruction, image, sources, result.fits,
                                             all_xyz[k], config)  # fmt: skip
            all_xyz[k], all_rgb[k] = all_xyz[k][keep], all_rgb[k][keep]
        result.inconsistent = before - sum(len(x) for x in all_xyz)
        logger.info("dense points: %d of %d contradicted by the other views' depth", result.inconsistent, before)
    xyz = np.concatenate(all_xyz)
    rgb = np.concatenate(all_rgb)
    voxel = 0.0
    if config.voxel_size or len(xyz) > config.max_points:
        voxel = config.voxel_size or auto_voxel_size(xyz, config.max_points)
        xyz, rgb = voxel_downsample(xyz, rgb, voxel)
    if len(xyz) > config.max_points:
        chosen = np.sort(np.random.default_rng(config.seed).choice(len(xyz), config.max_points, replace=False))
        xyz, rgb = xyz[chosen], rgb[chosen]
    result.xyz, result.rgb, result.voxel_size = xyz, rgb, float(voxel)
    logger.info("dense points: %d from %d images (voxel %.3g)", len(xyz), len(result.fits), voxel)
    return result
