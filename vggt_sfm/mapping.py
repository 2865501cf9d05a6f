"""The initial model: prior cameras, triangulated tracks, and frames re-localised where the prior is wrong.

Every pose starts at its prediction. Tracks are triangulated with a batched multi-view DLT (or placed from the
predicted depth), observations far from their point are dropped, and a frame whose observations disagree with
the points triangulated from the *other* frames (a failed prediction) is re-localised by RANSAC PnP before it
can bend the structure. The result is a `pycolmap.Reconstruction` that bundle adjustment (`refine.py`) polishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pycolmap

from .errors import UserError
from .observations import observation_table
from .prior import PriorCameras, rotation_angles_deg
from .tracks import Tracks

if TYPE_CHECKING:
    from .features import Features
    from .predictions import Predictions

logger = logging.getLogger(__name__)

CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV")


@dataclass
class MappingConfig:
    camera_model: str = "SIMPLE_RADIAL"
    shared_camera: bool = True  # one camera (median of the prior intrinsics) when all images have one size
    use_depth: bool = False  # place points from the predicted depth where it is confident
    min_depth_confidence: float = 1.5
    max_reproj_error_px: float = 4.0  # floor of the per-image outlier threshold
    outlier_factor: float = 4.0  # an observation is an outlier beyond factor x its image's median error
    min_tri_angle_deg: float = 1.0
    relocalize: bool = True
    # A frame is suspect when the median epipolar error of its correspondences under the prior, or the median
    # error of its observations against the other frames' points, exceeds both of these; it is re-localised
    # when RANSAC PnP on the other frames' points explains its observations much better.
    relocalize_error_factor: float = 2.5  # (times the typical frame's)
    relocalize_min_error: float = 0.01  # (fraction of the image diagonal)
    # A re-localised rotation this far from the prediction means the prediction failed (reported in
    # MappingReport.relocalized); nearer ones (a noisy but sound prediction) just start from the better pose.
    # (Centres are no evidence: PnP trades a camera's centre against its rotation along the viewing direction.)
    failed_prior_angle_deg: float = 5.0
    # PnP may not turn a frame whose rotation its pairs confirm (the view graph) farther than this.
    confirmed_max_rotation_deg: float = 10.0
    pnp_max_error: float = 0.01  # RANSAC PnP threshold, as a fraction of the image diagonal
    # VGGT fails on a few frames, not on many: when more than this fraction of the frames look failed, the
    # matches are too weak to judge them (e.g. weak texture, short tracks) and every prior pose is kept.
    max_failed_fraction: float = 0.25
    min_observations: int = 30  # fewer triangulated observations: keep the predicted pose, flag not_refined
    extract_colors: bool = True


@dataclass
class MappingReport:
    relocalized: list[str] = field(default_factory=list)  # predictions that had failed, re-localised by PnP
    improved: list[str] = field(default_factory=list)  # noisy predictions replaced by a nearby PnP pose
    not_refined: list[str] = field(default_factory=list)  # poses kept from the prior (too few observations)
    # Of those, the frames held only for too few observations (not for contradicting their matches): refinement
    # may register them late, by PnP on the refined model.
    few_observations: list[str] = field(default_factory=list)
    num_points: int = 0
    num_observations: int = 0
    mean_reprojection_error: float = float("nan")
    # Per image, under the prior: median epipolar error of its correspondences, and median error of its
    # observations against points triangulated from the other frames.
    prior_epipolar_error_px: dict[str, float] = field(default_factory=dict)
    prior_reprojection_error_px: dict[str, float] = field(default_factory=dict)
    time_s: float = 0.0


def initialize_reconstruction(
    prior: PriorCameras,
    features: list[Features],
    tracks: Tracks,
    predictions: Predictions | None = None,
    config: MappingConfig | None = None,
    doubted: Collection[int] = (),
    unconfirmed: Collection[int] = (),
    confirmed: Collection[int] = (),
) -> tuple[pycolmap.Reconstruction, MappingReport]:
    """Build the initial reconstruction from the prior cameras and the tracks.

    Image ids are frame index + 1; camera ids are 1 (shared) or frame index + 1. Point colours come from the
    keypoint colours of `features` (grey without them). Frames whose prior pose disagrees with their matches are
    re-localised; frames left with too few observations keep the prior pose and are listed in
    `report.not_refined`. `doubted` frames (e.g. repaired by the view graph) are re-localised first, on the
    points of the other frames, whatever their errors say; `unconfirmed` ones too (their pose contradicts their
    matches and could not be repaired), and those that PnP cannot place are not refined. The rotations of
    `confirmed` frames (by their pairs' relative rotations) are not re-localised far from the prior.
    """
    start = time.perf_counter()
    config = config or MappingConfig()
    num_images = prior.num_images
    if len(features) != num_images:
        raise ValueError(f"{len(features)} feature sets for {num_images} images")
    if config.use_depth and (predictions is None or predictions.depth is None):
        raise UserError("use_depth needs predictions with a 'depth' map (predict again with depth, or disable it)")

    cameras = make_cameras(prior, config.camera_model, config.shared_camera)
    keypoints = [np.asarray(f.keypoints, dtype=np.float64).reshape(-1, 2) for f in features]
    obs = _Observations.gather(tracks, keypoints, cameras)
    poses = prior.cam_from_world.astype(np.float64).copy()
    diagonal = np.hypot(prior.image_sizes[:, 0], prior.image_sizes[:, 1]).astype(np.float64)
    report = MappingReport()
    not_refined: set[int] = set()

    if config.relocalize:
        relocalized_obs, relocalized_poses, relocalized, failed = _relocalize(
            obs, poses.copy(), cameras, prior, diagonal, config, report, set(doubted) | set(unconfirmed),
            set(unconfirmed), set(confirmed),
        )
        far = _far_from_prior(prior, relocalized_poses, relocalized, config)
        # The view graph's unconfirmed frames are judged by their own evidence, not by this count.
        if len((far | failed) - set(unconfirmed)) > max(1, config.max_failed_fraction * num_images):
            logger.warning(
                "the matches disagree with the predicted poses of %d of %d images, too many to be failed "
                "predictions: the matches are too weak to judge them (weak texture?); keeping every predicted pose",
                len(far | failed), num_images,
            )  # fmt: skip
            relocalized, failed, far = [], set(unconfirmed), set()
            if failed:  # still contradicted by their matches: out of the structure, not refined
                obs = obs.select(~np.isin(obs.image, sorted(failed)))
        else:
            obs, poses = relocalized_obs, relocalized_poses
        report.relocalized = [prior.image_names[i] for i in relocalized if i in far]
        report.improved = [prior.image_names[i] for i in relocalized if i not in far]
        for name in report.relocalized:
            logger.warning("%s: the predicted pose was wrong; re-localised from its matches", name)
        not_refined |= failed

    points, obs = _triangulate(obs, poses, cameras, prior, predictions, config)

    per_image = np.bincount(obs.image, minlength=num_images)
    weak = set(np.flatnonzero(per_image < config.min_observations).tolist())
    for i in sorted(weak - not_refined):
        logger.info(
            "%s: only %d triangulated observations; held at its predicted pose until the rest is refined",
            prior.image_names[i], per_image[i],
        )
    report.few_observations = [prior.image_names[i] for i in sorted(weak - not_refined)]
    not_refined |= weak
    report.not_refined = [prior.image_names[i] for i in sorted(not_refined)]

    rec = _build_reconstruction(prior, cameras, keypoints, poses, points, obs)
    if config.extract_colors:
        color_points(rec, features)
    rec.update_point_3d_errors()
    report.num_points = rec.num_points3D()
    report.num_observations = obs.num
    report.mean_reprojection_error = rec.compute_mean_reprojection_error() if report.num_points else float("nan")
    report.time_s = time.perf_counter() - start
    logger.info(
        "initial model: %d points, %d observations, %.2f px; re-localised %s; improved %s; not refined %s (%.1f s)",
        report.num_points, report.num_observations, report.mean_reprojection_error,
        report.relocalized or "none", report.improved or "none", report.not_refined or "none", report.time_s,
    )  # fmt: skip
    return rec, report


def make_cameras(prior: PriorCameras, model: str, shared: bool) -> list[pycolmap.Camera]:
    """One pycolmap camera per image (the same object for all when shared), from the prior intrinsics."""
    if model not in CAMERA_MODELS:
        raise UserError(f"camera model {model!r} is not supported; use one of {', '.join(CAMERA_MODELS)}")
    sizes = prior.image_sizes
    if shared and len({tuple(s) for s in sizes.tolist()}) > 1:
        logger.warning("images have different sizes; using one camera per image instead of a shared camera")
        shared = False
    K = prior.intrinsics
    if shared:
        median = np.median(K, axis=0)
        camera = _camera(1, model, int(sizes[0, 0]), int(sizes[0, 1]), median)
        return [camera] * prior.num_images
    return [_camera(i + 1, model, int(w), int(h), K[i]) for i, (w, h) in enumerate(sizes)]


def _camera(camera_id: int, model: str, width: int, height: int, K: np.ndarray) -> pycolmap.Camera:
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    camera = pycolmap.Camera.create_from_model_name(camera_id, model, 0.5 * (fx + fy), width, height)
    params = np.zeros(len(camera.params))
    focal = camera.focal_length_idxs()
    if len(focal) == 1:
        params[focal[0]] = 0.5 * (fx + fy)
    else:
        params[focal[0]], params[focal[1]] = fx, fy
    pp = camera.principal_point_idxs()
    params[pp[0]], params[pp[1]] = cx, cy
    camera.params = params
    return camera


@dataclass
class _Observations:
    """Track observations with their pixels and normalised image coordinates (distortion removed)."""

    tracks: Tracks
    xy: np.ndarray  # (O,2) pixels
    normalized: np.ndarray  # (O,2)

    @property
    def image(self) -> np.ndarray:
        return self.tracks.image_index

    @property
    def track(self) -> np.ndarray:
        return self.tracks.track_id

    @property
    def num(self) -> int:
        return self.tracks.num_observations

    @classmethod
    def gather(cls, tracks: Tracks, keypoints: list[np.ndarray], cameras: list[pycolmap.Camera]) -> _Observations:
        xy = np.zeros((tracks.num_observations, 2))
        normalized = np.zeros_like(xy)
        for i in np.unique(tracks.image_index):
            mask = tracks.image_index == i
            xy[mask] = keypoints[i][tracks.keypoint_index[mask]]
            normalized[mask] = cameras[i].cam_from_img(xy[mask])
        return cls(tracks, xy, normalized)

    def select(self, keep: np.ndarray) -> _Observations:
        """Keep the masked observations; tracks left with one observation go (arrays stay track-sorted)."""
        tracks = self.tracks
        ids = np.arange(tracks.num_observations)
        # Tracks.select sorts by (track, image) like the original order, so the kept rows keep their order.
        kept = Tracks(tracks.track_id, tracks.image_index, ids, tracks.num_tracks).select(keep)
        rows = kept.keypoint_index
        new = Tracks(kept.track_id, kept.image_index, tracks.keypoint_index[rows], kept.num_tracks)
        return _Observations(new, self.xy[rows], self.normalized[rows])


def _world_normalization(poses: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and scale of the camera set, to condition the DLT."""
    R, t = poses[:, :, :3], poses[:, :, 3]
    centers = -np.einsum("sji,sj->si", R, t)
    center = np.median(centers, axis=0)
    scale = float(np.median(np.linalg.norm(centers - center, axis=1)))
    return center, scale if scale > 0 else 1.0


def _dlt_systems(obs: _Observations, poses: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
    """(O,4,4) per-observation normal matrices A^T A of the DLT, in normalised world coordinates."""
    # X_world = center + scale * X, so P [X_world; 1] = P T [X; 1].
    T = np.eye(4)
    T[:3, :3] *= scale
    T[:3, 3] = center
    P = poses[obs.image] @ T
    x, y = obs.normalized[:, 0:1], obs.normalized[:, 1:2]
    r1 = x * P[:, 2] - P[:, 0]
    r2 = y * P[:, 2] - P[:, 1]
    r1 /= np.linalg.norm(r1, axis=1, keepdims=True)
    r2 /= np.linalg.norm(r2, axis=1, keepdims=True)
    return r1[:, :, None] * r1[:, None, :] + r2[:, :, None] * r2[:, None, :]


def _solve_dlt(systems: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
    """(N,3) points from (N,4,4) normal matrices A^T A; NaN where the solution is at infinity.

    The eigenvector of the smallest eigenvalue (unit-norm homogeneous point). Fixing the homogeneous
    coordinate to 1 instead (a 3x3 solve, faster) moves points from inconsistent (prior) poses a lot and made
    the re-localisation evidence miss failed frames on fountain.
    """
    _, vectors = np.linalg.eigh(systems)
    h = vectors[:, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        X = h[:, :3] / h[:, 3:4]
    X[np.abs(h[:, 3]) < 1e-12] = np.nan
    return center + scale * X


@dataclass
class _DLT:
    """The per-observation DLT systems of a set of tracks and poses, to solve under several weightings."""

    obs: _Observations
    systems: np.ndarray  # (O,4,4) A^T A per observation, normalised world
    center: np.ndarray
    scale: float

    @classmethod
    def build(cls, obs: _Observations, poses: np.ndarray) -> _DLT:
        center, scale = _world_normalization(poses)
        return cls(obs, _dlt_systems(obs, poses, center, scale), center, scale)

    def solve(self, leave_one_out: bool = False, weights: np.ndarray | None = None) -> np.ndarray:
        weights = np.ones(self.obs.num) if weights is None else np.asarray(weights, dtype=np.float64)
        systems = self.systems * weights[:, None, None]
        used = (weights > 0).astype(int)
        starts = self.obs.tracks.offsets()[:-1]
        per_track = np.add.reduceat(systems, starts, axis=0)
        count = np.add.reduceat(used, starts)
        if not leave_one_out:
            X = _solve_dlt(per_track, self.center, self.scale)
            X[count < 2] = np.nan
            return X
        X = _solve_dlt(per_track[self.obs.track] - systems, self.center, self.scale)
        X[count[self.obs.track] - used < 2] = np.nan
        return X


def triangulate_dlt(
    obs: _Observations, poses: np.ndarray, leave_one_out: bool = False, weights: np.ndarray | None = None
) -> np.ndarray:
    """Multi-view DLT of every track: (num_tracks,3); with leave_one_out, (O,3) points without each observation.

    `weights` (O,) >= 0 weigh the observations (0: not used). A point needs two used observations (NaN
    otherwise).
    """
    return _DLT.build(obs, poses).solve(leave_one_out, weights)


def reprojection_errors(
    obs: _Observations, points: np.ndarray, poses: np.ndarray, cameras: list[pycolmap.Camera]
) -> np.ndarray:
    """(O,) pixel error of each observation against its point (one point per observation); inf behind the camera."""
    R, t = poses[obs.image, :, :3], poses[obs.image, :, 3]
    X_cam = np.einsum("oij,oj->oi", R, points) + t
    errors = np.full(obs.num, np.inf)
    valid = np.isfinite(X_cam).all(axis=1) & (X_cam[:, 2] > 1e-9 * np.abs(X_cam).max(axis=1, initial=1.0))
    for i in np.unique(obs.image[valid]):
        mask = valid & (obs.image == i)
        projected = cameras[i].img_from_cam(X_cam[mask])
        errors[mask] = np.linalg.norm(projected - obs.xy[mask], axis=1)
    return errors


def _median_per_image(values: np.ndarray, image: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Median per image ignoring NaN (inf counts as a large value; inf where no value) and the counts."""
    medians = np.full(num_images, np.inf)
    counts = np.zeros(num_images, dtype=int)
    known = ~np.isnan(values)
    for i in range(num_images):
        v = values[known & (image == i)]
        counts[i] = len(v)
        if len(v):
            medians[i] = np.median(v)
    return medians, counts


def _relocalize(
    obs: _Observations,
    poses: np.ndarray,
    cameras: list[pycolmap.Camera],
    prior: PriorCameras,
    diagonal: np.ndarray,
    config: MappingConfig,
    report: MappingReport,
    doubted: set[int] | None = None,
    unconfirmed: set[int] | None = None,
    confirmed: set[int] | None = None,
) -> tuple[_Observations, np.ndarray, list[int], set[int]]:
    """Find frames whose prior pose contradicts their matches and re-localise them by RANSAC PnP, worst first.

    Two kinds of evidence, each relative to the typical frame: the epipolar error of a frame's
    correspondences (pairwise, so a bad frame does not implicate its partners, but blind to errors along the
    epipolar lines, e.g. a pan when the camera moves sideways), and the error of its observations against
    points triangulated from the other frames (sees every error, but a bad frame spoils the others' points;
    frames are therefore down-weighted by their own error, iteratively). A suspect is re-localised on points
    from the frames not under suspicion, and only when that pose explains its observations much better than
    the prior; a frame far off whose PnP fails loses its observations (so it cannot distort the points) and is
    returned in the failed set.
    """
    num_images = prior.num_images
    relocalized: list[int] = []
    failed: set[int] = set()
    checked: set[int] = set()
    changed = True
    weights = None
    for attempt in range(num_images):
        if changed:  # the evidence only changes with a pose (or the observations)
            epipolar, counts = _epipolar_errors(obs, poses, cameras, num_images)
            # One frame moved since the last evidence: the other frames' weights hold, one pass updates them.
            reprojection, weights = _leave_one_out_errors(
                obs, poses, cameras, num_images, weights, iterations=4 if weights is None else 1
            )
            changed = False
        if attempt == 0:
            report.prior_epipolar_error_px = {
                prior.image_names[i]: float(epipolar[i]) for i in range(num_images) if counts[i]
            }
            report.prior_reprojection_error_px = {
                prior.image_names[i]: float(reprojection[i]) for i in range(num_images) if np.isfinite(reprojection[i])
            }
        usable = counts >= config.min_observations
        if usable.sum() < 3:
            break
        ratio = np.zeros(num_images)
        for errors in (epipolar, reprojection):
            known = usable & ~np.isnan(errors)
            if known.sum() >= 3:
                typical = float(np.median(errors[known]))
                far = known & (errors > config.relocalize_min_error * diagonal)
                ratio[far] = np.maximum(ratio[far], errors[far] / max(typical, 1e-9))
        # Doubted frames come first and stay out of the others' points until they are checked.
        pending = sorted((doubted or set()) - checked)
        ratio[pending] = np.maximum(ratio[pending], 1e3 * config.relocalize_error_factor)
        suspect = ratio > config.relocalize_error_factor
        suspect[list(checked)] = False
        if not suspect.any():
            break
        i = int(np.argmax(np.where(suspect, ratio, -np.inf)))
        checked.add(i)
        trusted = weights[obs.image] * ~(suspect[obs.image] | (obs.image == i))
        points = triangulate_dlt(obs, poses, weights=trusted)
        mask = (obs.image == i) & np.isfinite(points[obs.track]).all(axis=1)
        pose = _pnp(obs.xy[mask], points[obs.track[mask]], cameras[i], diagonal[i], config)
        if pose is not None and i in (confirmed or ()):
            # Its rotation is confirmed by its pairs (the view graph; for a repaired frame, derived from them): a
            # PnP pose turned far from it fits wrong points (weak texture, failed neighbours). A repaired frame
            # that PnP cannot confirm is then not refined (named), rather than trusted on its neighbours alone.
            if rotation_angles_deg(pose[None, :, :3], poses[i : i + 1, :, :3])[0] > config.confirmed_max_rotation_deg:
                pose = None
        prior_median = new_median = np.inf
        if mask.any():
            prior_median = float(np.median(reprojection_errors(obs, points[obs.track], poses, cameras)[mask]))
        if pose is not None:
            candidate = poses.copy()
            candidate[i] = pose
            new_median = float(np.median(reprojection_errors(obs, points[obs.track], candidate, cameras)[mask]))
        # The PnP pose must explain the observations (median within its RANSAC threshold), not just less badly.
        if new_median < 0.5 * prior_median and new_median <= config.pnp_max_error * diagonal[i]:
            logger.info(
                "%s: prior pose disagrees with the matches (%.1f times the typical error); PnP pose instead "
                "(%.1f px -> %.1f px against the other frames' points)",
                prior.image_names[i], ratio[i], prior_median, new_median,
            )  # fmt: skip
            poses[i] = pose
            relocalized.append(i)
            changed = True
        elif i in (unconfirmed or ()):
            logger.warning(
                "%s: the predicted pose contradicts its matches and re-localisation failed; it is kept, not refined",
                prior.image_names[i],
            )
            failed.add(i)
            obs = obs.select(obs.image != i)
            changed = True
        elif pose is None and ratio[i] > 2 * config.relocalize_error_factor:
            logger.warning(
                "%s: the predicted pose disagrees with the matches (%.1f times the typical error) and "
                "re-localisation failed; it is kept, not refined",
                prior.image_names[i], ratio[i],
            )  # fmt: skip
            failed.add(i)
            obs = obs.select(obs.image != i)
            changed = True
    return obs, poses, relocalized, failed


def _leave_one_out_errors(
    obs: _Observations,
    poses: np.ndarray,
    cameras: list[pycolmap.Camera],
    num_images: int,
    weights: np.ndarray | None = None,
    iterations: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the median error (pixels) of its observations against points triangulated without it (NaN
    without any), and the frame weights used: frames with large errors count less in the others' points.
    `weights` (S,) start the reweighting (all 1 when None)."""
    weights = np.ones(num_images) if weights is None else weights
    dlt = _DLT.build(obs, poses)
    for _ in range(iterations):
        points = dlt.solve(leave_one_out=True, weights=weights[obs.image])
        errors = reprojection_errors(obs, points, poses, cameras)
        # Without a point the error is unknown (NaN); behind the camera it is large (inf).
        errors[np.isnan(points).any(axis=1)] = np.nan
        medians, counts = _median_per_image(errors, obs.image, num_images)
        medians[counts == 0] = np.nan
        known = np.isfinite(medians)
        if known.sum() < 3:
            break
        relative = np.where(np.isnan(medians), 1.0, medians / max(float(np.median(medians[known])), 1e-9))
        weights = 1.0 / (1.0 + relative**2)
    return medians, weights


def _far_from_prior(prior: PriorCameras, poses: np.ndarray, frames: list[int], config: MappingConfig) -> set[int]:
    """The frames whose rotation is far from the prediction's."""
    frames = list(frames)
    angles = rotation_angles_deg(poses[frames, :, :3], prior.cam_from_world[frames, :, :3])
    return {i for i, angle in zip(frames, angles) if angle > config.failed_prior_angle_deg}


def _epipolar_errors(
    obs: _Observations, poses: np.ndarray, cameras: list[pycolmap.Camera], num_images: int, max_offset: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the median Sampson error (pixels) of its correspondences under the given poses, and the
    number of correspondences (inf / 0 without any). Long tracks contribute pairs of nearby observations
    only (`Tracks.observation_pairs`), which keeps the count linear in the observations."""
    first, second = obs.tracks.observation_pairs(max_offset)
    i, j = obs.image[first], obs.image[second]
    pair_key = i * num_images + j
    keys, inverse = np.unique(pair_key, return_inverse=True)
    # One essential matrix per image pair: E = [t]x R of cam_j from cam_i.
    a, b = keys // num_images, keys % num_images
    R = np.einsum("nab,ncb->nac", poses[b, :, :3], poses[a, :, :3])
    t = poses[b, :, 3] - np.einsum("nab,nb->na", R, poses[a, :, 3])
    t_cross = np.zeros((len(keys), 3, 3))
    t_cross[:, 0, 1], t_cross[:, 0, 2], t_cross[:, 1, 2] = -t[:, 2], t[:, 1], -t[:, 0]
    t_cross -= t_cross.transpose(0, 2, 1)
    E = t_cross @ R
    x1 = np.concatenate([obs.normalized[first], np.ones((len(first), 1))], axis=1)
    x2 = np.concatenate([obs.normalized[second], np.ones((len(second), 1))], axis=1)
    Ex1 = np.empty_like(x1)
    Etx2 = np.empty_like(x2)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(keys) + 1))
    for k in range(len(keys)):  # per image pair: memory stays linear in the correspondences
        rows = order[bounds[k] : bounds[k + 1]]
        Ex1[rows] = x1[rows] @ E[k].T
        Etx2[rows] = x2[rows] @ E[k]
    numerator = np.einsum("na,na->n", x2, Ex1) ** 2
    denominator = Ex1[:, 0] ** 2 + Ex1[:, 1] ** 2 + Etx2[:, 0] ** 2 + Etx2[:, 1] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized_error = np.sqrt(numerator / denominator)
    focal = np.array([camera.mean_focal_length() for camera in cameras])
    pixels = normalized_error * 0.5 * (focal[i] + focal[j])
    both = np.concatenate([pixels, pixels])
    return _median_per_image(np.where(np.isfinite(both), both, np.nan), np.concatenate([i, j]), num_images)


def _pnp(
    xy: np.ndarray, points: np.ndarray, camera: pycolmap.Camera, diagonal: float, config: MappingConfig
) -> np.ndarray | None:
    """cam_from_world (3,4) of one frame from 2D-3D matches by RANSAC PnP and refinement, or None."""
    return estimate_pose(xy, points, camera, config.pnp_max_error * diagonal, config.min_observations)


def estimate_pose(
    xy: np.ndarray, points: np.ndarray, camera: pycolmap.Camera, max_error_px: float, min_inliers: int
) -> np.ndarray | None:
    """cam_from_world (3,4) from 2D-3D matches (N,2)/(N,3) by RANSAC PnP (threshold in pixels) and refinement;
    None with fewer than `min_inliers` inliers."""
    if len(xy) < max(min_inliers, 6):
        return None
    options = pycolmap.AbsolutePoseEstimationOptions()
    options.ransac.max_error = max_error_px
    options.ransac.random_seed = 0
    result = pycolmap.estimate_and_refine_absolute_pose(
        np.asarray(xy, dtype=np.float64), np.asarray(points, dtype=np.float64), camera, options
    )
    if result is None or result["num_inliers"] < min_inliers:
        return None
    return result["cam_from_world"].matrix()


def _depth_points(
    obs: _Observations, poses: np.ndarray, predictions: Predictions, min_confidence: float
) -> np.ndarray:
    """(num_tracks,3) median of the back-projected predicted depths of each track; NaN without confident depth."""
    samples = np.full((obs.num, 3), np.nan)
    for i in np.unique(obs.image):
        mask = obs.image == i
        depth, confidence = predictions.sample_depth(int(i), obs.xy[mask])
        good = (depth > 0) & (confidence >= min_confidence)
        rays = np.concatenate([obs.normalized[mask], np.ones((mask.sum(), 1))], axis=1) * depth[:, None]
        R, t = poses[i, :, :3], poses[i, :, 3]
        world = (rays - t) @ R
        world[~good] = np.nan
        samples[mask] = world
    return _nanmedian_per_track(samples, obs.tracks)


def _nanmedian_per_track(values: np.ndarray, tracks: Tracks) -> np.ndarray:
    """(num_tracks, D) median over each track's rows, ignoring NaN rows."""
    out = np.full((tracks.num_tracks, values.shape[1]), np.nan)
    lengths = tracks.lengths()
    padded = np.full((tracks.num_tracks, int(lengths.max(initial=0)), values.shape[1]), np.nan)
    position = np.arange(tracks.num_observations) - tracks.offsets()[tracks.track_id]
    padded[tracks.track_id, position] = values
    has_value = ~np.isnan(padded[:, :, 0]).all(axis=1)
    out[has_value] = np.nanmedian(padded[has_value], axis=1)
    return out


def _triangulation_angles(obs: _Observations, points: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """(num_tracks,) approximate largest angle (deg) between the viewing rays of each track.

    Two sweeps (the ray farthest from the mean ray, then the ray farthest from that one) find the widest pair
    in practice without forming all pairs.
    """
    R, t = poses[:, :, :3], poses[:, :, 3]
    centers = -np.einsum("sji,sj->si", R, t)
    rays = points[obs.track] - centers[obs.image]
    lengths = np.linalg.norm(rays, axis=1, keepdims=True)
    # A point on a camera centre (cameras that coincide triangulate to it) has no ray: angle 0, i.e. too narrow.
    rays = np.divide(rays, lengths, out=np.zeros_like(rays), where=lengths > 0)
    starts = obs.tracks.offsets()[:-1]

    def farthest_from(reference: np.ndarray) -> np.ndarray:
        cosine = np.einsum("oi,oi->o", rays, reference[obs.track])
        order = np.lexsort((cosine, obs.track))
        return rays[order[starts]]

    mean = np.add.reduceat(rays, starts, axis=0)
    mean_length = np.linalg.norm(mean, axis=1, keepdims=True)
    first = farthest_from(np.divide(mean, mean_length, out=np.zeros_like(mean), where=mean_length > 0))
    second = farthest_from(first)
    angles = np.degrees(np.arccos(np.clip(np.einsum("ti,ti->t", first, second), -1.0, 1.0)))
    has_rays = (np.abs(first).sum(axis=1) > 0) & (np.abs(second).sum(axis=1) > 0)
    return np.where(has_rays, angles, 0.0)


def _track_points(
    obs: _Observations, poses: np.ndarray, predictions: Predictions | None, config: MappingConfig
) -> np.ndarray:
    """(num_tracks,3) points: from the predicted depth where it is confident (with use_depth), else DLT."""
    points = triangulate_dlt(obs, poses)
    if config.use_depth:
        from_depth = _depth_points(obs, poses, predictions, config.min_depth_confidence)
        has_depth = np.isfinite(from_depth).all(axis=1)
        points[has_depth] = from_depth[has_depth]
    return points


def _triangulate(
    obs: _Observations,
    poses: np.ndarray,
    cameras: list[pycolmap.Camera],
    prior: PriorCameras,
    predictions: Predictions | None,
    config: MappingConfig,
    iterations: int = 3,
) -> tuple[np.ndarray, _Observations]:
    """Points of all tracks with outlier observations removed; returns (num_tracks,3) points and the kept obs."""
    threshold = None
    for iteration in range(iterations + 1):
        if obs.tracks.num_tracks == 0:
            return np.zeros((0, 3)), obs
        points = _track_points(obs, poses, predictions, config)
        if iteration == iterations:
            break
        errors = reprojection_errors(obs, points[obs.track], poses, cameras)
        if threshold is None:
            # Fixed after the first pass: re-estimating on the cleaned set would erode the inliers each pass.
            medians, _ = _median_per_image(errors, obs.image, prior.num_images)
            medians[~np.isfinite(medians)] = 0.0
            threshold = np.maximum(config.max_reproj_error_px, config.outlier_factor * medians)
        keep = errors <= threshold[obs.image]
        narrow = _triangulation_angles(obs, points, poses) < config.min_tri_angle_deg
        keep &= ~narrow[obs.track] & np.isfinite(points[obs.track]).all(axis=1)
        if keep.all():
            break
        obs = obs.select(keep)
    good = np.isfinite(points).all(axis=1)
    if not good.all():
        obs = obs.select(good[obs.track])
        points = points[good]
    return points, obs


def color_points(reconstruction: pycolmap.Reconstruction, features: list[Features]) -> None:
    """Colour every 3D point with the mean RGB of its observed keypoints (image id = frame index + 1); grey
    where the features carry no colours."""
    table = observation_table(reconstruction)
    point_ids, row = table.points()
    sums = np.zeros((len(point_ids), 3))
    counts = np.zeros(len(point_ids))
    for image_id in np.unique(table.image_id):
        colors = features[image_id - 1].colors
        if colors is None:
            continue
        mask = table.image_id == image_id
        np.add.at(sums, row[mask], colors[table.point2D_idx[mask]])
        np.add.at(counts, row[mask], 1.0)
    mean = np.full((len(point_ids), 3), 128.0)
    seen = counts > 0
    mean[seen] = np.round(sums[seen] / counts[seen, None])
    mean = mean.astype(np.uint8)
    index = dict(zip(point_ids.tolist(), range(len(point_ids))))
    for point_id, point in reconstruction.points3D.items():
        point.color = mean[index[point_id]]


def _build_reconstruction(
    prior: PriorCameras,
    cameras: list[pycolmap.Camera],
    keypoints: list[np.ndarray],
    poses: np.ndarray,
    points: np.ndarray,
    obs: _Observations,
) -> pycolmap.Reconstruction:
    rec = pycolmap.Reconstruction()
    for camera in {c.camera_id: c for c in cameras}.values():
        rec.add_camera_with_trivial_rig(camera)
    for i, name in enumerate(prior.image_names):
        image = pycolmap.Image(name=name, keypoints=keypoints[i], camera_id=cameras[i].camera_id, image_id=i + 1)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(poses[i]))
    offsets = obs.tracks.offsets()
    image_ids = (obs.image + 1).tolist()
    point2D_ids = obs.tracks.keypoint_index.tolist()
    grey = np.array([128, 128, 128], dtype=np.uint8)
    for t in range(obs.tracks.num_tracks):
        elements = [pycolmap.TrackElement(image_ids[o], point2D_ids[o]) for o in range(offsets[t], offsets[t + 1])]
        rec.add_point3D(points[t], pycolmap.Track(elements), grey)
    return rec
