"""Simulated priors: ground-truth cameras plus noise, written as a VGGT-like predictions file.

Lets the geometric stages be tested and benchmarked against known truth without running VGGT. For each
camera: its rotation is perturbed about a random axis by an angle ~ N(0, sigma), its centre moved by
N(0, sigma) per axis (a fraction of the scene extent, `PriorCameras.scene_scale`), its focal length scaled by
a log-normal factor. The result is put into a random similarity frame (rotation, translation, scale), as the
prior's frame is arbitrary. Intrinsics are expressed on VGGT's prediction grid (`vggt_grid_from_image`) with the
principal point at the grid centre, as VGGT predicts it, so the true principal point is NOT kept.

Depth (optional, `depth_from`): the ground-truth models have no dense geometry, so depth is rendered from a
reconstruction WITH 3D points of the same images (e.g. one our pipeline made), brought onto the ground truth by a
similarity of the camera centres. Each image's depth map on the prediction grid is the z-buffered depth of the
points that image observes, seen through its true camera, with holes filled from the nearest rendered pixel; the
confidence is high at rendered pixels and falls off with the distance to them. In the prior's frame depth scales
with the similarity's scale. This is a SIMULATED depth: exact at the points, piecewise constant between them.

Usage: python -m vggt_sfm.evaluation.simulate --gt GT_MODEL --images IMAGES --level vggt --seed 0 --output prior.npz
       [--depth-from MODEL_WITH_POINTS] [--failure-modes focal-bias,drift,bad-frames,flipped,depth|all]

VGGT's structured errors (a shared focal bias, drift, many bad frames, flipped frames, inconsistent depth) are
added by `failure_modes.py` on top of the iid noise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..errors import UserError
from ..images import scan_images
from ..observations import observation_table
from ..predictions import Predictions, save_predictions, vggt_grid_from_image
from ..prior import PriorCameras
from ..similarity import align_points
from .failure_modes import FailureModes, FailureReport, apply_camera_failures, apply_depth_failures
from .metrics import ALIGNMENT_INLIER_FRACTION, cameras_from_reconstruction, read_ground_truth

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseLevel:
    """Standard deviations of the simulated prior's errors."""

    rotation_deg: float  # angle about a random axis, per camera
    center_fraction: float  # per axis, as a fraction of the scene extent
    focal_fraction: float  # of log(focal)


NOISE_LEVELS = {
    "easy": NoiseLevel(rotation_deg=0.5, center_fraction=0.01, focal_fraction=0.02),
    "vggt": NoiseLevel(rotation_deg=2.0, center_fraction=0.03, focal_fraction=0.05),
    "hard": NoiseLevel(rotation_deg=5.0, center_fraction=0.08, focal_fraction=0.10),
}
OUTLIER_ROTATION_DEG = 20.0
# Simulated depth confidence, VGGT-like (> 1, higher is better): 1 + (MAX - 1) exp(-d / RADIUS) at a distance of
# d grid pixels from the nearest rendered point, so only pixels near real geometry pass the dense export's cut.
DEPTH_CONFIDENCE_MAX = 10.0
DEPTH_CONFIDENCE_RADIUS_PX = 4.0


def _noise_level(level: str | NoiseLevel) -> NoiseLevel:
    if isinstance(level, NoiseLevel):
        return level
    if level not in NOISE_LEVELS:
        raise UserError(f"unknown noise level {level!r}; use one of {', '.join(NOISE_LEVELS)}")
    return NOISE_LEVELS[level]


def _outlier_indices(outliers: int | Sequence[int | str], names: list[str]) -> list[int]:
    """Frame indices from names / indices, or, for a count N, N frames spread evenly (N=1: the middle one)."""
    if isinstance(outliers, (int, np.integer)):
        count = int(outliers)
        if not 0 <= count <= len(names):
            raise UserError(f"cannot make {count} outlier frames out of {len(names)} images")
        return sorted({(2 * k + 1) * len(names) // (2 * count) for k in range(count)})
    index = {name: i for i, name in enumerate(names)}
    chosen = []
    for item in outliers:
        if isinstance(item, str) and item in index:
            chosen.append(index[item])
        elif isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            i = int(item)
            if not -len(names) <= i < len(names):
                raise UserError(f"outlier frame {i} is out of range: there are {len(names)} images")
            chosen.append(i % len(names))
        else:
            raise UserError(f"outlier frame {item!r} is not an image of the ground truth (give a name or an index)")
    return sorted(set(chosen))


def _rotations_about_random_axes(rng: np.random.Generator, angles_deg: np.ndarray) -> np.ndarray:
    axes = rng.normal(size=(len(angles_deg), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    return Rotation.from_rotvec(axes * np.radians(angles_deg)[:, None]).as_matrix()


def render_depth(
    points_cam: np.ndarray, intrinsics: np.ndarray, grid_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Depth and confidence (H,W) of camera-frame points (N,3) on a grid of `grid_size` = (width, height).

    `intrinsics` is K in grid pixels with integer pixel centres. Each point lands on its nearest pixel, the
    nearest point wins (z-buffer); every other pixel takes the depth of the nearest rendered pixel, with a
    confidence that falls off with that distance (`DEPTH_CONFIDENCE_*`). No point in view: depth and confidence 0.
    """
    width, height = grid_size
    points_cam = np.asarray(points_cam, dtype=np.float64).reshape(-1, 3)
    points_cam = points_cam[points_cam[:, 2] > 0]
    projected = points_cam @ np.asarray(intrinsics, dtype=np.float64).T
    u, v = projected[:, 0] / projected[:, 2], projected[:, 1] / projected[:, 2]
    inside = (u >= -0.5) & (u < width - 0.5) & (v >= -0.5) & (v < height - 0.5)
    if not inside.any():
        return np.zeros((height, width), np.float32), np.zeros((height, width), np.float32)
    depth = np.full((height, width), np.inf)
    rows = np.round(v[inside]).astype(int).clip(0, height - 1)
    cols = np.round(u[inside]).astype(int).clip(0, width - 1)
    np.minimum.at(depth, (rows, cols), points_cam[inside, 2])
    distance, (near_rows, near_cols) = ndimage.distance_transform_edt(np.isinf(depth), return_indices=True)
    confidence = 1.0 + (DEPTH_CONFIDENCE_MAX - 1.0) * np.exp(-distance / DEPTH_CONFIDENCE_RADIUS_PX)
    return depth[near_rows, near_cols].astype(np.float32), confidence.astype(np.float32)


def _read_model(model: pycolmap.Reconstruction | str | Path) -> pycolmap.Reconstruction:
    if isinstance(model, pycolmap.Reconstruction):
        return model
    path = Path(model)
    if not path.is_dir():
        raise UserError(f"depth model folder not found: {path} (give a COLMAP model with 3D points, e.g. OUTPUT/sparse/0)")
    return pycolmap.Reconstruction(str(path))


MIN_TRACK_LENGTH = 3  # images that must see a point for it to be rendered into simulated depth


def observed_points(model: pycolmap.Reconstruction | str | Path, truth: PriorCameras) -> list[np.ndarray]:
    """For each image of `truth`, the (N,3) points `model` sees in that image, in the ground truth's world.

    Images are matched by name; the model's frame is mapped onto the ground truth by a robust similarity of the
    camera centres. An image the model lacks gets no points.
    """
    model = _read_model(model)
    if model.num_points3D() == 0:
        raise UserError("the depth model has no 3D points to render depth from (give a reconstructed model, not a ground truth)")
    cameras = cameras_from_reconstruction(model)
    index = {name: i for i, name in enumerate(cameras.image_names)}
    common = [(index[name], i) for i, name in enumerate(truth.image_names) if name in index]
    if len(common) < 3:
        raise UserError(
            f"the depth model shares only {len(common)} image name(s) with the ground truth; at least 3 are needed to align it"
        )
    model_ids, truth_ids = (np.array(ids) for ids in zip(*common))
    gt_from_model, _ = align_points(
        cameras.centers()[model_ids], truth.centers()[truth_ids], ALIGNMENT_INLIER_FRACTION * truth.scene_scale()
    )
    if gt_from_model is None:
        raise UserError("the depth model's cameras cannot be aligned to the ground truth (degenerate camera centres)")
    similarity = gt_from_model.matrix()
    image_ids = {image.name: image.image_id for image in model.images.values() if image.has_pose}
    table = observation_table(model)
    point_ids, row = table.points()
    xyz_of_row = np.array([model.points3D[i].xyz for i in point_ids.tolist()], dtype=np.float64).reshape(-1, 3)
    # Points that only two images see include the model's few wrong ones, and each would paint a patch of
    # confident wrong depth around it; three views confirm a point (all points when too few have three).
    confirmed = np.bincount(row, minlength=len(point_ids)) >= MIN_TRACK_LENGTH
    if confirmed.sum() < 0.2 * model.num_points3D():
        confirmed[:] = True
    points = []
    for name in truth.image_names:
        xyz = np.zeros((0, 3))
        if name in image_ids:
            rows = row[table.image_id == image_ids[name]]
            xyz = xyz_of_row[rows[confirmed[rows]]]
        points.append(xyz @ similarity[:, :3].T + similarity[:, 3])
    missing = [name for name, xyz in zip(truth.image_names, points) if len(xyz) == 0]
    if missing:
        logger.warning("simulated depth: no points for %d image(s), e.g. %s (depth 0 there)", len(missing), missing[0])
    return points


def simulate_prior(
    ground_truth: pycolmap.Reconstruction | PriorCameras | str | Path,
    level: str | NoiseLevel = "vggt",
    seed: int = 0,
    outliers: int | Sequence[int | str] = (),
    outlier_rotation_deg: float = OUTLIER_ROTATION_DEG,
    preprocess: str = "crop",
    depth_from: pycolmap.Reconstruction | str | Path | None = None,
    failure_modes: FailureModes | str | None = None,
    report: FailureReport | None = None,
) -> Predictions:
    """A noisy copy of the ground-truth cameras as `Predictions`, in a random similarity frame.

    `outliers` (image names or frame indices in sorted-name order, or a count of frames spread evenly) get a
    rotation error of exactly `outlier_rotation_deg` about a random axis instead of the level's rotation noise.
    The same seed gives the same prior (with or without depth). `depth_from`, a model with 3D points of the same
    images, adds simulated depth maps and confidences on the prediction grid (see the module docstring).
    `failure_modes` (a `FailureModes` or mode names, see `failure_modes.py`) add VGGT's structured errors on top
    of the iid noise, which stays the same draw; `report`, when given, is filled with what they did.
    """
    gt = ground_truth if isinstance(ground_truth, PriorCameras) else read_ground_truth(ground_truth)
    order = np.argsort(gt.image_names)
    names = [gt.image_names[i] for i in order]
    sizes = gt.image_sizes[order]
    R_gt = gt.cam_from_world[order, :, :3]
    K_gt = gt.intrinsics[order]
    centers_gt = gt.centers()[order]
    noise = _noise_level(level)
    num = len(names)
    rng = np.random.default_rng(seed)

    # Noise is drawn in a fixed order so that a seed reproduces the prior exactly.
    angles = rng.normal(0.0, noise.rotation_deg, size=num)
    delta_R = _rotations_about_random_axes(rng, angles)
    center_noise = rng.normal(0.0, noise.center_fraction * gt.scene_scale(), size=(num, 3))
    focal_factor = np.exp(rng.normal(0.0, noise.focal_fraction, size=num))
    world_R = Rotation.random(random_state=rng).as_matrix()
    world_scale = float(np.exp(rng.uniform(np.log(0.1), np.log(10.0))))
    world_t = rng.normal(0.0, 1.0, size=3) * world_scale
    outlier_ids = _outlier_indices(outliers, names)
    if outlier_ids:
        delta_R[outlier_ids] = _rotations_about_random_axes(rng, np.full(len(outlier_ids), outlier_rotation_deg))

    modes = FailureModes.named(failure_modes) if isinstance(failure_modes, str) else failure_modes
    modes = modes if modes is not None and not modes.is_empty() else None
    # The failure modes draw from a generator of their own: the iid noise above is the same draw without them.
    failure_rng = np.random.default_rng([seed, 7])
    R_true, centers_true, focal_bias = R_gt, centers_gt, 1.0
    failures = FailureReport()
    if modes is not None:
        R_true, centers_true, focal_bias, failures = apply_camera_failures(
            modes, failure_rng, names, R_gt, centers_gt, gt.scene_scale()
        )
    if report is not None:
        report.__dict__.update(failures.__dict__)

    # Perturb in the camera frame, then re-express in the new world: X' = s Rw X + tw, so R' = R Rw^T.
    R = delta_R @ R_true @ world_R.T
    centers = world_scale * (centers_true + center_noise) @ world_R.T + world_t
    t = -np.einsum("sij,sj->si", R, centers)
    cam_from_world = np.concatenate([R, t[:, :, None]], axis=2)

    # K in original pixels with integer pixel centres, then onto the prediction grid.
    K_true = K_gt.copy()
    K_true[:, 0, 2] -= 0.5
    K_true[:, 1, 2] -= 0.5
    grid_from_image, (grid_w, grid_h) = vggt_grid_from_image([tuple(map(int, s)) for s in sizes], preprocess)
    K_grid = grid_from_image @ K_true
    K_grid[:, :2, :2] *= (focal_bias * focal_factor)[:, None, None]
    K_grid[:, 0, 2] = grid_w / 2.0
    K_grid[:, 1, 2] = grid_h / 2.0

    depth = depth_conf = None
    if depth_from is not None:
        truth = PriorCameras(names, sizes, gt.cam_from_world[order], K_gt)
        # Depth is a property of the image: rendered through the true camera, then in the prior's scale.
        maps = [
            render_depth(xyz @ pose[:, :3].T + pose[:, 3], K, (grid_w, grid_h))
            for xyz, pose, K in zip(observed_points(depth_from, truth), truth.cam_from_world, grid_from_image @ K_true)
        ]
        depth = world_scale * np.stack([d for d, _ in maps])
        depth_conf = np.stack([c for _, c in maps])
        if failures.frame_scales is not None:
            depth *= failures.frame_scales[:, None, None].astype(depth.dtype)
        if modes is not None:
            depth, depth_conf = apply_depth_failures(modes, failure_rng, depth, depth_conf)

    return Predictions(
        image_names=names,
        cam_from_world=cam_from_world,
        intrinsics=K_grid,
        grid_from_image=grid_from_image,
        depth=depth,
        depth_conf=depth_conf,
    )


def write_simulated_prior(
    gt: Path | str,
    images: Path | str,
    output: Path | str,
    level: str = "vggt",
    seed: int = 0,
    outlier_frames: int | Sequence[int | str] = (),
    depth_from: pycolmap.Reconstruction | Path | str | None = None,
    failure_modes: FailureModes | str | None = None,
) -> Predictions:
    """Simulate a prior for the ground-truth model `gt` of the photos in `images`, and save it to `output`.

    The photos' real sizes must match the ground-truth cameras, so the prior's grid mapping fits them.
    `outlier_frames`, `depth_from` and `failure_modes`: as `outliers`, `depth_from` and `failure_modes` of
    `simulate_prior`.
    """
    cameras = read_ground_truth(gt)
    infos = {info.name: info for info in scan_images(Path(images))}
    missing = [n for n in cameras.image_names if n not in infos]
    if missing:
        raise UserError(
            f"{len(missing)} ground-truth image(s) are not in {images}, e.g. {missing[0]} (give the matching folder)"
        )
    for name, (width, height) in zip(cameras.image_names, cameras.image_sizes):
        info = infos[name]
        if (info.width, info.height) != (width, height):
            raise UserError(
                f"image {name} is {info.width}x{info.height} but its ground-truth camera is {width}x{height} "
                "(the model belongs to other images)"
            )
    predictions = simulate_prior(
        cameras, level=level, seed=seed, outliers=outlier_frames, depth_from=depth_from, failure_modes=failure_modes
    )
    save_predictions(predictions, output)
    return predictions


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a simulated prior file."""
    parser = argparse.ArgumentParser(
        prog="python -m vggt_sfm.evaluation.simulate",
        description="Write a SIMULATED prior (ground truth + noise) as a predictions .npz file.",
    )
    parser.add_argument("--gt", required=True, type=Path, help="ground-truth COLMAP model folder")
    parser.add_argument("--images", required=True, type=Path, help="the images folder the model belongs to")
    parser.add_argument("--level", default="vggt", choices=sorted(NOISE_LEVELS), help="noise level")
    parser.add_argument("--seed", default=0, type=int, help="random seed of the noise")
    parser.add_argument(
        "--outliers", default="", help="comma-separated image names or indices given a 20-degree rotation error"
    )
    parser.add_argument("--outlier-frames", type=int, default=0, help="or: this many frames, spread evenly")
    parser.add_argument("--output", required=True, type=Path, help="the .npz file to write")
    parser.add_argument(
        "--depth-from", type=Path, help="a COLMAP model with 3D points of the same images: render simulated depth from it"
    )
    parser.add_argument("--failure-modes", default="", help="structured errors to add: focal-bias, drift, bad-frames, "
                        "flipped, depth (comma-separated) or all")
    args = parser.parse_args(argv)
    outliers: int | list[str] = [item for item in args.outliers.split(",") if item] or args.outlier_frames
    try:
        predictions = write_simulated_prior(
            gt=args.gt, images=args.images, output=args.output, level=args.level, seed=args.seed,
            outlier_frames=outliers, depth_from=args.depth_from, failure_modes=args.failure_modes or None,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {predictions.num_frames} frames, level {args.level}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
