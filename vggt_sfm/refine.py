"""Bundle adjustment in rounds: BA -> filter observations -> re-triangulate / complete / merge tracks -> BA ...

The first rounds use a robust loss with the intrinsics fixed (the initial model carries the prior's errors,
tens of pixels), later ones the plain squared error. The principal point, which COLMAP keeps fixed by
default, is refined in the final rounds when enough images share the camera and the view is wide enough: a
principal point off the image centre otherwise biases every rotation by about atan(offset / focal). Images
whose pose cannot be refined (too few observations) are held constant and, when there are any, the result is
mapped back onto the frame it started in so that they stay in place.

Every adjustment is checked: intrinsics it makes implausible are put back and held; an adjustment that turns
the cameras far from where refinement started (many wrong matches in a weakly constrained scene) is undone
and refinement stops, with a warning and `RefineReport.diverged`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pycolmap
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from .log import progress as log_progress
from .mapping import estimate_pose
from .prior import rotation_angles_deg
from .log import quiet_pycolmap
from .observations import ObservationTable, observation_table

if TYPE_CHECKING:
    from .features import Features
    from .matching import VerifiedMatches
    from .tracks import Tracks

logger = logging.getLogger(__name__)

LOSSES = {
    "trivial": pycolmap.LossFunctionType.TRIVIAL,
    "soft_l1": pycolmap.LossFunctionType.SOFT_L1,
    "cauchy": pycolmap.LossFunctionType.CAUCHY,
    "huber": pycolmap.LossFunctionType.HUBER,
}


@dataclass
class RefineConfig:
    enabled: bool = True
    rounds: int = 6  # BA rounds at most (each: BA, filter, re-triangulate); a final BA follows a changed model
    robust_rounds: int = 1  # the first rounds use `loss` and keep the intrinsics fixed; the rest squared error
    loss: str = "cauchy"  # "cauchy" | "soft_l1" | "huber" | "trivial"
    loss_scale_px: float = 1.0  # at least this; the robust rounds use the median initial error when larger
    refine_focal_length: bool = True
    refine_principal_point: bool = True  # in the final rounds, when a camera is seen by enough images
    min_views_principal_point: int = 5
    min_fov_principal_point_deg: float = 40.0  # narrower views cannot tell the principal point from rotation
    refine_extra_params: bool = True
    min_fov_extra_params_deg: float = 30.0  # (diagonal field of view) nor distortion from focal length
    # Intrinsics a round may not produce (it is then redone with those parameters held at their last values):
    max_principal_point_offset: float = 0.05  # from the image centre, fraction of the image diagonal
    max_focal_aspect: float = 0.05  # |fx / fy - 1|
    max_focal_change: float = 0.5  # |f / f_initial - 1|
    max_distortion: float = 0.05  # largest displacement within the image, fraction of the diagonal
    # A round that changes the relative rotations between the images by more than this (median over pairs)
    # has diverged (e.g. many wrong matches in a weakly constrained scene): it is undone and refinement stops.
    max_rotation_change_deg: float = 10.0
    # Observations beyond this error (original pixels) are filtered after each round. COLMAP uses 4; 2 keeps
    # the few wrong matches that link weakly connected parts of a scene from bending them (lego: median
    # rotation error over five prior draws 1.69 -> 0.89 deg, worst 3.26 -> 1.18; fern and templeSR better on
    # every draw; benchmarks/README.md).
    max_reproj_error_px: float = 2.0
    # > 0: the filter is instead this many times the keypoint noise measured after the first round (sigma from
    # the median point error, as for a 2D Gaussian; the image's own noise decides, not a number of pixels).
    filter_sigmas: float = 0.0
    min_tri_angle_deg: float = 1.5
    retriangulate: bool = True  # create, complete and merge tracks from the verified matches
    max_change: float = 0.002  # stop when a round filters or adds fewer observations than this fraction
    min_image_observations: int = 10  # fewer: the image's pose is held constant in that round
    min_shared_points: int = 15  # images sharing fewer 3D points are not connected (placed by the prior per group)
    max_iterations: int = 100  # per BA (Ceres)
    min_residuals_for_threads: int = 1000  # Ceres uses all threads from this many residuals (COLMAP: 50000)
    # Ceres stops when an iteration lowers the cost by less than this fraction. COLMAP sets 0 (run to the
    # iteration limit); the rounds after the first start near the optimum, where the last iterations gain nothing:
    # 1e-6 halves BA time with the same pose accuracy on the five benchmark sets (benchmarks/README.md).
    function_tolerance: float = 1e-6
    # The camera centres refinement starts from (the prediction's) are kept as soft position priors, with this
    # standard deviation (fraction of the scene extent): they fix the gauge without holding any camera exactly,
    # and they hold parts of a weakly connected scene where the matches alone leave them free. 0: no priors,
    # the gauge is fixed on two cameras instead. 0.15 rather than 0.05: a prior that drifts along the sequence
    # (chained windows, VGGT's own drift) is only locally right, and 0.05 held templeSR at the drifted poses
    # (median rotation error 2.91 vs 1.06 deg at 0.15) with no loss on the iid prior (templeSR 1.24 vs 1.21, lego
    # 0.95 vs 0.96 deg; benchmarks/README.md, failure modes).
    position_prior_std: float = 0.15
    # When BA moves the focal length this far (log ratio) from the prediction, the run verifies, maps and refines
    # once more with the prediction's focal lengths scaled to the refined one (a shared focal bias: fountain
    # 0.107 -> 0.053 deg, iid 0.037; benchmarks/README.md, failure modes).
    focal_repass: float = 0.05
    # ... unless the repass turns the images this much farther (median over pairs, degrees) from the prediction's
    # relative rotations than the first pass: then the refined focal was wrong and the first pass is kept.
    focal_repass_max_disagreement_deg: float = 1.0
    # Frames held out of the initial model (mapping's `not_refined`: too few observations survive a prior pose ~2
    # degrees off when a frame's partners are few or its views narrow; or a frame repaired by the view graph that
    # PnP on the first, unrefined points could not confirm) are registered by PnP on the refined model, then refined
    # with the rest (lego100 seed 0: 4 of 100 frames, AUC@1 90.1 -> 97.8; lego all failure modes, seeds 0-2: median
    # rotation 1.69 -> 1.25 deg). The PnP pose must keep `late_min_inliers` of the frame's matches to the model's
    # points within `late_max_error_px` and stay within `late_max_rotation_deg` of its current rotation (the
    # prediction, or the view graph's repair): two independent pieces of evidence must agree, else it stays held.
    register_late: bool = True
    late_min_inliers: int = 30
    late_max_error_px: float = 4.0
    late_max_rotation_deg: float = 10.0


@dataclass
class RoundReport:
    round: int
    loss: str
    refine_principal_point: bool
    num_residuals: int
    mean_reprojection_error: float  # after the round (BA, filtering, re-triangulation)
    num_observations: int  # after filtering and re-triangulation
    filtered: int  # observations removed
    added: int  # observations created, completed or merged
    termination: str
    time_s: float
    num_points: int = 0  # 3D points after the round


@dataclass
class RefineReport:
    rounds: int = 0
    mean_reprojection_error: float = float("nan")
    num_points: int = 0
    num_observations: int = 0
    constant_images: list[str] = field(default_factory=list)
    refined_intrinsics: list[str] = field(default_factory=list)  # "focal", "principal_point", "extra"
    diverged: bool = False  # a round was undone and refinement stopped early (see RefineConfig)
    history: list[RoundReport] = field(default_factory=list)
    registered_late: list[str] = field(default_factory=list)  # held frames registered by PnP on the refined model
    max_reproj_error_px: float = float("nan")  # the filter used (RefineConfig: fixed or from the measured noise)
    time_s: float = 0.0


def refine_reconstruction(
    reconstruction: pycolmap.Reconstruction,
    config: RefineConfig | None = None,
    *,
    verified: VerifiedMatches | None = None,
    tracks: Tracks | None = None,
    features: list[Features] | None = None,
    constant_images: Collection[int] = (),
    late_images: Collection[int] = (),
    progress: bool = False,
) -> RefineReport:
    """Bundle-adjust `reconstruction` in place, in rounds, and report each round (a bar of rounds on a terminal
    with `progress`).

    Correspondences for re-triangulation come from `verified` (image index i = image_id - 1), or else from the
    `tracks` (every two observations of a track); without either, rounds only adjust and filter.
    `features`, when given, are checked against the images' keypoints. `constant_images` are image ids whose
    poses stay as they are (e.g. the mapping report's `not_refined`); those also in `late_images` (e.g. all of
    them) join the refinement when PnP on the refined model places them near
    their pose (`RefineConfig.register_late`), and are then refined with the rest.
    """
    start = time.perf_counter()
    config = config or RefineConfig()
    if config.loss not in LOSSES:
        raise ValueError(f"RefineConfig.loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if features is not None:
        _check_features(reconstruction, features)
    report = RefineReport()
    rec = reconstruction
    constant = {int(i) for i in constant_images if rec.exists_image(int(i))}
    initial_poses = {i: rec.images[i].cam_from_world().matrix() for i in rec.reg_image_ids()}
    if rec.num_points3D() == 0 or set(rec.reg_image_ids()) <= constant:
        logger.warning(
            "nothing to adjust: %d points, %d of %d images held",
            rec.num_points3D(), len(constant), rec.num_reg_images(),
        )  # fmt: skip
        return _finish(report, rec, constant, start)

    graph = _correspondence_graph(rec, verified, tracks, constant) if config.retriangulate else None
    with quiet_pycolmap():
        observations = pycolmap.ObservationManager(rec) if graph is None else pycolmap.ObservationManager(rec, graph)
        triangulator = pycolmap.IncrementalTriangulator(graph, rec, observations) if graph is not None else None
        observations.filter_observations_with_negative_depth()
        rec.update_point_3d_errors()
        initial_errors = np.array([p.error for p in rec.points3D.values()])
        robust_scale = max(config.loss_scale_px, float(np.median(initial_errors)) if len(initial_errors) else 0.0)

        position_priors = _position_priors(rec, config.position_prior_std)
        guard = _Guard(
            initial_focal={camera_id: camera.mean_focal_length() for camera_id, camera in rec.cameras.items()},
            initial_poses=initial_poses,
        )
        fov = min(_diagonal_fov_deg(camera) for camera in rec.cameras.values())
        refine = {
            "focal": config.refine_focal_length,
            "principal_point": False,  # switched on in the final rounds
            "extra": config.refine_extra_params and fov >= config.min_fov_extra_params_deg,
        }
        principal_point_possible = (
            config.refine_principal_point
            and fov >= config.min_fov_principal_point_deg
            and _enough_views(rec, config, constant)
        )
        stable = False
        last_changed = True
        for index in log_progress(range(config.rounds), "bundle adjustment rounds", config.rounds, progress):
            round_start = time.perf_counter()
            robust = index < config.robust_rounds and config.loss != "trivial"
            if principal_point_possible and not robust and not refine["principal_point"]:
                refine["principal_point"] = stable or index == config.rounds - 1
            summary, held = _guarded_bundle_adjust(
                rec, config, robust, robust_scale, refine, constant, guard, position_priors
            )
            if summary.diverged:
                report.diverged = True
                last_changed = False
                break
            if "principal_point" in summary.frozen:
                principal_point_possible = False
            if index == 0 and config.filter_sigmas > 0:
                config = replace(config, max_reproj_error_px=config.filter_sigmas * _keypoint_noise_px(rec))
                logger.info("observations filtered beyond %.2f px (measured noise)", config.max_reproj_error_px)
            report.max_reproj_error_px = config.max_reproj_error_px
            filtered = observations.filter_all_points3D(config.max_reproj_error_px, config.min_tri_angle_deg)
            added = (
                _retriangulate(triangulator, rec, _triangulator_options(rec, config), constant | held)
                if triangulator is not None
                else 0
            )
            rec.update_point_3d_errors()
            error = rec.compute_mean_reprojection_error()
            num_observations = rec.compute_num_observations()
            change = (filtered + added) / max(num_observations, 1)
            report.history.append(
                RoundReport(
                    round=index,
                    loss=config.loss if robust else "trivial",
                    refine_principal_point=refine["principal_point"],
                    num_residuals=summary.num_residuals,
                    mean_reprojection_error=float(error),
                    num_observations=int(num_observations),
                    filtered=int(filtered),
                    added=int(added),
                    termination=summary.termination,
                    time_s=time.perf_counter() - round_start,
                    num_points=int(rec.num_points3D()),
                )
            )
            logger.info(
                "BA round %d (%s%s): %.3f px, %d observations, -%d +%d (%.1f s)",
                index, report.history[-1].loss, ", principal point" if refine["principal_point"] else "", error,
                num_observations, filtered, added, report.history[-1].time_s,
            )  # fmt: skip
            last_changed = filtered + added > 0
            stable = change < config.max_change
            if stable and not robust and (refine["principal_point"] or not principal_point_possible):
                break
        if last_changed and report.history:
            # The model changed after its last adjustment: adjust once more so the result is a BA optimum.
            summary, _ = _guarded_bundle_adjust(rec, config, False, robust_scale, refine, constant, guard, position_priors)
            report.diverged = summary.diverged
            observations.filter_all_points3D(config.max_reproj_error_px, config.min_tri_angle_deg)
        report.refined_intrinsics = [name for name, on in refine.items() if on]
        rec.update_point_3d_errors()

    if constant:
        _align_to_reference(rec, initial_poses, constant)
    candidates = sorted(constant & {int(i) for i in late_images}) if config.register_late else []
    joined = _register_late(rec, _pair_matches(verified, tracks), candidates, config) if candidates else []
    if joined:
        logger.info("registered late, by PnP on the refined model: %s", ", ".join(rec.images[i].name for i in joined))
        # Once more with them free: their matches re-triangulate and the whole model adjusts to them.
        again = refine_reconstruction(
            rec, config, verified=verified, tracks=tracks, constant_images=constant - set(joined), progress=progress
        )
        again.history = report.history + again.history
        again.rounds = len(again.history)
        again.registered_late = [rec.images[i].name for i in joined]
        again.time_s = time.perf_counter() - start
        return again
    return _finish(report, rec, constant, start)


def _keypoint_noise_px(rec: pycolmap.Reconstruction) -> float:
    """Per-axis keypoint noise (pixels) from the model's point errors: for a 2D Gaussian of sigma per axis, the
    error norm averages 1.2533 sigma (Rayleigh), and the median of the points' mean errors is close to it."""
    rec.update_point_3d_errors()
    errors = np.array([point.error for point in rec.points3D.values()])
    return float(np.median(errors)) / 1.2533 if len(errors) else 1.0


def _pair_matches(
    verified: VerifiedMatches | None, tracks: Tracks | None
) -> list[tuple[int, int, np.ndarray]]:
    """(i, j, (K,2) keypoint index matches) per image pair, image index i = image_id - 1: the verified matches,
    or else every two observations of a track; empty without either."""
    if verified is not None:
        return [
            (int(i), int(j), np.asarray(m, dtype=np.int64).reshape(-1, 2))
            for (i, j), m in zip(verified.pairs, verified.matches)
        ]
    if tracks is not None and tracks.num_observations:
        return [(i, j, matches.astype(np.int64)) for (i, j), matches in tracks.image_pair_matches().items()]
    return []


def _register_late(
    rec: pycolmap.Reconstruction,
    pairs: list[tuple[int, int, np.ndarray]],
    candidates: list[int],
    config: RefineConfig,
) -> list[int]:
    """Image ids of `candidates` (held images) that PnP on the model's points places near their current pose;
    their poses are set to the PnP pose."""
    joined = []
    for image_id in candidates:
        image = rec.images[image_id]
        xy, xyz = [], []
        for i, j, matches in pairs:
            if image_id not in (i + 1, j + 1) or len(matches) == 0:
                continue
            own, other_id = (matches[:, 0], j + 1) if i + 1 == image_id else (matches[:, 1], i + 1)
            other = matches[:, 1] if i + 1 == image_id else matches[:, 0]
            if other_id in candidates or not rec.exists_image(other_id):
                continue
            partner = rec.images[other_id]
            for k_own, k_other in zip(own, other):
                point2D = partner.points2D[int(k_other)]
                if point2D.has_point3D():
                    xy.append(image.points2D[int(k_own)].xy)
                    xyz.append(rec.points3D[point2D.point3D_id].xyz)
        if len(xy) < config.late_min_inliers:
            continue
        # Several partners may see the same keypoint's point: one 2D-3D match per keypoint and point suffices.
        xy_xyz = np.unique(np.hstack([np.array(xy), np.array(xyz)]), axis=0)
        pose = estimate_pose(
            xy_xyz[:, :2], xy_xyz[:, 2:], rec.cameras[image.camera_id], config.late_max_error_px,
            config.late_min_inliers,
        )  # fmt: skip
        if pose is None:
            continue
        current = image.cam_from_world().matrix()
        if rotation_angles_deg(pose[None, :, :3], current[None, :, :3])[0] > config.late_max_rotation_deg:
            continue
        rec.frames[image.frame_id].set_cam_from_world(image.camera_id, pycolmap.Rigid3d(pose))
        joined.append(image_id)
    return joined


def _finish(report: RefineReport, rec: pycolmap.Reconstruction, constant: set[int], start: float) -> RefineReport:
    report.rounds = len(report.history)
    report.num_points = rec.num_points3D()
    report.num_observations = rec.compute_num_observations()
    report.mean_reprojection_error = float(rec.compute_mean_reprojection_error()) if report.num_points else float("nan")
    report.constant_images = sorted(rec.images[i].name for i in constant)
    report.time_s = time.perf_counter() - start
    return report


def _check_features(rec: pycolmap.Reconstruction, features: list[Features]) -> None:
    for image_id, image in rec.images.items():
        index = image_id - 1
        if index >= len(features) or len(features[index].keypoints) != image.num_points2D():
            raise ValueError(f"image {image.name}: the features do not belong to this reconstruction")


def _enough_views(rec: pycolmap.Reconstruction, config: RefineConfig, constant: set[int]) -> bool:
    """Whether every camera is seen by enough adjusted images to refine its principal point."""
    views = {camera_id: 0 for camera_id in rec.cameras}
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        if image_id not in constant and image.num_points3D >= config.min_image_observations:
            views[image.camera_id] += 1
    return bool(views) and min(views.values()) >= config.min_views_principal_point


def _correspondence_graph(
    rec: pycolmap.Reconstruction,
    verified: VerifiedMatches | None,
    tracks: Tracks | None,
    constant: set[int],
) -> pycolmap.CorrespondenceGraph | None:
    """Matches between images as COLMAP's correspondence graph; constant images get none (their poses may be
    wrong, so new observations in them would only add error)."""
    pairs = _pair_matches(verified, tracks)
    if not pairs:
        return None
    graph = pycolmap.CorrespondenceGraph()
    for image_id, image in rec.images.items():
        graph.add_image(image_id, image.num_points2D())
    for i, j, matches in pairs:
        id1, id2 = i + 1, j + 1
        if len(matches) == 0 or id1 == id2 or id1 in constant or id2 in constant:
            continue
        if not (rec.exists_image(id1) and rec.exists_image(id2)):
            continue
        geometry = pycolmap.TwoViewGeometry()
        geometry.config = int(pycolmap.TwoViewGeometryConfiguration.CALIBRATED)
        geometry.inlier_matches = matches.astype(np.uint32)
        graph.add_two_view_geometry(id1, id2, geometry)
    graph.finalize()
    return graph


@dataclass
class _Adjustment:
    num_residuals: int = 0
    termination: str = "skipped"
    frozen: list[str] = field(default_factory=list)  # intrinsics held after an implausible result
    diverged: bool = False  # the adjustment was undone


@dataclass
class _Guard:
    """What a bundle adjustment is checked against: the state refinement started from."""

    initial_focal: dict[int, float]  # camera id -> mean focal length
    initial_poses: dict[int, np.ndarray]  # image id -> (3,4) cam_from_world


def _guarded_bundle_adjust(
    rec: pycolmap.Reconstruction,
    config: RefineConfig,
    robust: bool,
    robust_scale: float,
    refine: dict[str, bool],
    constant: set[int],
    guard: _Guard,
    position_priors: list[pycolmap.PosePrior] = (),
) -> tuple[_Adjustment, set[int]]:
    """BA, checked. When it produces implausible intrinsics, restore the model, hold the offending intrinsics
    (in `refine`, for the rounds to come too) and adjust again; when it turns the cameras far from where
    refinement started, restore the model and report divergence. Robust rounds, which start from the prior's
    errors, keep all intrinsics fixed: structure and poses settle first."""
    result = _Adjustment()
    while True:
        active = {key: on and not robust for key, on in refine.items()}
        before = pycolmap.Reconstruction(rec)
        summary, held = _bundle_adjust(rec, config, robust, robust_scale, active, constant, position_priors)
        if summary is not None:
            result.num_residuals = int(summary.num_residuals)
            result.termination = str(summary.termination_type).split(".")[-1]
            _align_components(rec, guard.initial_poses, constant | held, config.min_shared_points)
        change = _rotation_change_deg(rec, guard.initial_poses)
        if change > config.max_rotation_change_deg:
            _restore(rec, before)
            result.diverged = True
            logger.warning(
                "bundle adjustment diverged (relative rotations changed by %.1f deg, median); keeping the model "
                "from before it. Too many wrong matches for a weakly constrained scene?",
                change,
            )
            return result, held
        implausible = [k for k in _implausible_intrinsics(rec, config, guard.initial_focal) if active.get(k)]
        if not implausible:
            return result, held
        _restore(rec, before)
        for key in implausible:
            refine[key] = False
        result.frozen += implausible
        logger.warning("bundle adjustment made implausible intrinsics (%s); holding them", ", ".join(implausible))


def _position_priors(rec: pycolmap.Reconstruction, std: float) -> list[pycolmap.PosePrior]:
    """The registered images' current camera centres as COLMAP position priors (std: fraction of the extent)."""
    ids = list(rec.reg_image_ids())
    if std <= 0 or len(ids) < 3:
        return []
    centers = np.array([rec.images[i].projection_center() for i in ids])
    extent = float(np.median(np.linalg.norm(centers - np.median(centers, axis=0), axis=1)))
    if not extent > 0:
        return []
    priors = []
    for image_id, center in zip(ids, centers):
        prior = pycolmap.PosePrior()
        prior.position = center
        prior.position_covariance = np.eye(3) * (std * extent) ** 2
        prior.coordinate_system = pycolmap.PosePriorCoordinateSystem.CARTESIAN
        prior.corr_data_id = rec.images[image_id].data_id
        priors.append(prior)
    return priors


def _rotation_change_deg(rec: pycolmap.Reconstruction, initial_poses: dict[int, np.ndarray]) -> float:
    """Median over image pairs of the change of their relative rotation (independent of the world frame)."""
    ids = [i for i in initial_poses if rec.exists_image(i) and rec.images[i].has_pose]
    if len(ids) < 2:
        return 0.0
    before = np.array([initial_poses[i][:, :3] for i in ids])
    after = np.array([rec.images[i].cam_from_world().rotation.matrix() for i in ids])
    # With A_i = R0_i^T R1_i, the change of the pair (i, j) is the angle of A_i A_j^T.
    A = np.einsum("nba,nbc->nac", before, after)
    cosine = (np.einsum("iab,jab->ij", A, A) - 1.0) / 2.0
    upper = np.triu_indices(len(ids), 1)
    return float(np.degrees(np.median(np.arccos(np.clip(cosine[upper], -1.0, 1.0)))))


def _restore(rec: pycolmap.Reconstruction, saved: pycolmap.Reconstruction) -> None:
    """Put back the intrinsics, poses and points of `saved` (same ids; BA neither adds nor removes any)."""
    for camera_id, camera in saved.cameras.items():
        rec.cameras[camera_id].params = camera.params
    for frame_id, frame in saved.frames.items():
        if frame.has_pose:
            rec.frames[frame_id].rig_from_world = frame.rig_from_world
    for point_id, point in saved.points3D.items():
        rec.points3D[point_id].xyz = point.xyz


def _implausible_intrinsics(
    rec: pycolmap.Reconstruction, config: RefineConfig, initial_focal: dict[int, float]
) -> list[str]:
    """Which intrinsics ("focal", "principal_point", "extra") of any camera are out of the plausible range."""
    bad = set()
    for camera_id, camera in rec.cameras.items():
        diagonal = float(np.hypot(camera.width, camera.height))
        offset = np.hypot(camera.principal_point_x - camera.width / 2, camera.principal_point_y - camera.height / 2)
        if offset > config.max_principal_point_offset * diagonal:
            bad.add("principal_point")
        focal_x, focal_y = camera.focal_length_x, camera.focal_length_y
        if abs(focal_x / focal_y - 1) > config.max_focal_aspect:
            bad.add("focal")
        if abs(camera.mean_focal_length() / initial_focal[camera_id] - 1) > config.max_focal_change:
            bad.add("focal")
        if len(camera.extra_params_idxs()) and _max_distortion_px(camera) > config.max_distortion * diagonal:
            bad.add("extra")
    return sorted(bad)


def _max_distortion_px(camera: pycolmap.Camera) -> float:
    """Largest displacement between distorted and ideal pinhole pixels, over a grid spanning the image."""
    x, y = np.meshgrid(np.linspace(0, camera.width, 9), np.linspace(0, camera.height, 9))
    pixels = np.stack([x.ravel(), y.ravel()], axis=1)
    normalized = camera.cam_from_img(pixels)
    if not np.all(np.isfinite(normalized)):
        return float("inf")
    ideal = normalized * [camera.focal_length_x, camera.focal_length_y] + [
        camera.principal_point_x,
        camera.principal_point_y,
    ]
    return float(np.max(np.linalg.norm(ideal - pixels, axis=1)))


def _diagonal_fov_deg(camera: pycolmap.Camera) -> float:
    return float(np.degrees(2 * np.arctan2(0.5 * np.hypot(camera.width, camera.height), camera.mean_focal_length())))


def _bundle_adjust(
    rec: pycolmap.Reconstruction,
    config: RefineConfig,
    robust: bool,
    robust_scale: float,
    refine: dict[str, bool],
    constant: set[int],
    position_priors: list[pycolmap.PosePrior] = (),
) -> tuple[pycolmap.BundleAdjustmentSummary | None, set[int]]:
    """One BA over all registered images; returns the summary and the images held for lack of observations."""
    options = pycolmap.BundleAdjustmentOptions()
    options.refine_focal_length = refine["focal"]
    options.refine_principal_point = refine["principal_point"]
    options.refine_extra_params = refine["extra"]
    options.print_summary = False
    options.ceres.loss_function_type = LOSSES[config.loss] if robust else pycolmap.LossFunctionType.TRIVIAL
    options.ceres.loss_function_scale = robust_scale
    options.ceres.solver_options.max_num_iterations = config.max_iterations
    options.ceres.solver_options.function_tolerance = config.function_tolerance
    # COLMAP runs Ceres on one thread below 50000 residuals; on the few cores of a laptop the second thread
    # already pays at a few thousand (lego, 2 cores: 0.7-0.8x the solve time).
    options.ceres.min_num_residuals_for_cpu_multi_threading = config.min_residuals_for_threads

    ba_config = pycolmap.BundleAdjustmentConfig()
    held = set()
    for image_id in rec.reg_image_ids():
        image = rec.images[image_id]
        ba_config.add_image(image_id)
        if image_id in constant or image.num_points3D < config.min_image_observations:
            ba_config.set_constant_rig_from_world_pose(image.frame_id)
            if image_id not in constant:
                held.add(image_id)
    if held:
        logger.warning(
            "holding %d image(s) with fewer than %d observations: %s",
            len(held), config.min_image_observations, ", ".join(rec.images[i].name for i in sorted(held)),
        )  # fmt: skip
    if rec.num_points3D() == 0:
        return None, held
    if position_priors:
        prior_options = pycolmap.PosePriorBundleAdjustmentOptions()
        adjuster = pycolmap.create_pose_prior_bundle_adjuster(options, prior_options, ba_config, position_priors, rec)
    else:
        ba_config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
        adjuster = pycolmap.create_default_bundle_adjuster(options, ba_config, rec)
    summary = adjuster.solve()
    if not summary.is_solution_usable():
        logger.warning("bundle adjustment did not produce a usable solution (%s)", summary.termination_type)
    return summary, held


def _triangulator_options(
    rec: pycolmap.Reconstruction, config: RefineConfig
) -> pycolmap.IncrementalTriangulatorOptions:
    """COLMAP's options, with thresholds no looser than the filter's, so new observations are not filtered
    again in the next round (which would keep the rounds from settling)."""
    options = pycolmap.IncrementalTriangulatorOptions()
    focal = max(camera.mean_focal_length() for camera in rec.cameras.values())
    angle = float(np.degrees(np.arctan2(config.max_reproj_error_px, focal)))
    options.create_max_angle_error = min(options.create_max_angle_error, angle)
    options.continue_max_angle_error = min(options.continue_max_angle_error, angle)
    options.complete_max_reproj_error = min(options.complete_max_reproj_error, config.max_reproj_error_px)
    options.merge_max_reproj_error = min(options.merge_max_reproj_error, config.max_reproj_error_px)
    options.min_angle = max(options.min_angle, config.min_tri_angle_deg)
    return options


def _retriangulate(
    triangulator: pycolmap.IncrementalTriangulator,
    rec: pycolmap.Reconstruction,
    options: pycolmap.IncrementalTriangulatorOptions,
    skip: set[int],
) -> int:
    """New tracks, continued tracks, completed and merged tracks; returns the observations added."""
    added = 0
    for image_id in sorted(rec.reg_image_ids()):
        if image_id not in skip:
            added += triangulator.triangulate_image(options, image_id)
    added += triangulator.complete_all_tracks(options)
    added += triangulator.merge_all_tracks(options)
    return added


def _similarity_to_reference(
    refined: np.ndarray, reference: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray] | None:
    """(scale, Q, translation) of the world similarity X -> scale * Q X + translation that best maps cameras
    with poses `refined` (N,3,4) onto `reference` (N,3,4); None when the centres cannot fix the scale.

    The rotation comes from the cameras' orientations (centres alone leave it loose when the cameras stand
    on a line), scale and translation from the centres.
    """
    # R_refined = R_reference @ Q for the world rotation Q (refined -> reference); chordal mean over images.
    u, _, vt = np.linalg.svd(np.einsum("nji,njk->ik", reference[:, :, :3], refined[:, :, :3]))
    Q = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt

    def centers(poses: np.ndarray) -> np.ndarray:
        return -np.einsum("nji,nj->ni", poses[:, :, :3], poses[:, :, 3])

    source = centers(refined) @ Q.T
    target = centers(reference)
    source_centered = source - source.mean(axis=0)
    target_centered = target - target.mean(axis=0)
    denominator = float(np.sum(source_centered**2))
    if denominator <= 0:
        return None
    scale = float(np.sum(source_centered * target_centered)) / denominator
    if scale <= 0:
        return None
    return scale, Q, target.mean(axis=0) - scale * source.mean(axis=0)


def _align_to_reference(
    rec: pycolmap.Reconstruction, reference_poses: dict[int, np.ndarray], constant: set[int]
) -> None:
    """Map the refined model onto the frame it started in, keeping the constant images' poses unchanged."""
    variable = [i for i in reference_poses if i not in constant and rec.exists_image(i)]
    if len(variable) < 2:
        return
    # Held images get back exactly the poses they started with (the pose-prior adjuster moves the whole model
    # into its own frame and back, which is not exact for them).
    held_poses = {i: pycolmap.Rigid3d(reference_poses[i]) for i in constant if i in reference_poses}
    refined = np.array([rec.images[i].cam_from_world().matrix() for i in variable])
    similarity = _similarity_to_reference(refined, np.array([reference_poses[i] for i in variable]))
    if similarity is None:
        return
    scale, Q, translation = similarity
    rec.transform(pycolmap.Sim3d(scale, pycolmap.Rotation3d(Q), translation))
    for image_id, pose in held_poses.items():
        image = rec.images[image_id]
        rec.frames[image.frame_id].set_cam_from_world(image.camera_id, pose)


def _components(table: ObservationTable, images: set[int], min_shared_points: int) -> list[list[int]]:
    """Groups of `images` connected by at least `min_shared_points` common 3D points, largest first (`table`:
    the observations of those images)."""
    ids = sorted(images)
    if not ids:
        return []
    _, point_row = table.points()
    image_column = np.searchsorted(ids, table.image_id)
    seen = csr_matrix(
        (np.ones(len(point_row)), (point_row, image_column)), shape=(int(point_row.max(initial=-1)) + 1, len(ids))
    )
    seen.sum_duplicates()
    seen.data[:] = 1.0  # a point counts once per image
    shared = (seen.T @ seen).toarray()
    np.fill_diagonal(shared, 0)
    _, labels = connected_components(shared >= min_shared_points, directed=False)
    groups = [[ids[k] for k in np.flatnonzero(labels == label)] for label in np.unique(labels)]
    return sorted(groups, key=len, reverse=True)


def _align_components(
    rec: pycolmap.Reconstruction, reference_poses: dict[int, np.ndarray], constant: set[int], min_shared_points: int
) -> int:
    """Place each group of images that the matches connect (see `_components`) where the reference put it.

    Matches fix the cameras of a connected group relative to each other, never relative to another group: that
    placement is free in bundle adjustment (soft position priors hold it only loosely, and not at all against a
    rotation about a short row of cameras). The reference (the prediction) decides it instead, by a similarity
    per group; with one group, that only fixes the gauge the same way. Returns the number of groups.
    """
    images = {i for i in rec.reg_image_ids() if i not in constant and i in reference_poses}
    table = observation_table(rec, images)
    groups = _components(table, images, min_shared_points)
    if not groups:
        return 0
    group_of = {image_id: g for g, group in enumerate(groups) for image_id in group}
    transforms = []
    for group in groups:
        refined = np.array([rec.images[i].cam_from_world().matrix() for i in group])
        similarity = _similarity_to_reference(refined, np.array([reference_poses[i] for i in group]))
        if similarity is None:  # one camera, or all at one place: its reference pose places the group
            i = group[0]
            R_ref, R = reference_poses[i][:, :3], refined[0][:, :3]
            Q = R_ref.T @ R
            center = -R.T @ refined[0][:, 3]
            similarity = (1.0, Q, -R_ref.T @ reference_poses[i][:, 3] - Q @ center)
        transforms.append(similarity)
    # Each point moves with the group that observes it most (the images have not changed their observations).
    point_ids, point_row = table.points()
    group_lookup = np.zeros(max(group_of) + 1, dtype=np.int64)
    group_lookup[list(group_of)] = list(group_of.values())
    votes = np.zeros((len(point_ids), len(groups)), dtype=np.int64)
    np.add.at(votes, (point_row, group_lookup[table.image_id]), 1)
    owner = votes.argmax(axis=1)
    # The largest group's similarity moves the whole model at once, in pycolmap; only what it must not move (the
    # other groups, the images left out, the points none of the groups sees) is then set one by one.
    others = [i for i in rec.reg_image_ids() if group_of.get(i, 0) != 0 or i not in images]
    poses = {i: rec.images[i].cam_from_world().matrix() for i in others}
    unseen = set(rec.point3D_ids()) - set(point_ids.tolist())
    owners = {int(p): int(g) for p, g in zip(point_ids[owner != 0], owner[owner != 0])}
    positions = {p: np.array(rec.points3D[p].xyz) for p in list(owners) + list(unseen)}
    scale, Q, translation = transforms[0]
    rec.transform(pycolmap.Sim3d(scale, pycolmap.Rotation3d(Q), translation))
    for image_id, pose in poses.items():
        if image_id in images:
            scale, Q, translation = transforms[group_of[image_id]]
            rotation = pose[:, :3] @ Q.T
            pose = np.concatenate([rotation, (scale * pose[:, 3] - rotation @ translation)[:, None]], axis=1)
        image = rec.images[image_id]
        rec.frames[image.frame_id].set_cam_from_world(image.camera_id, pycolmap.Rigid3d(pose))
    for point_id, xyz in positions.items():
        if point_id in owners:
            scale, Q, translation = transforms[owners[point_id]]
            xyz = scale * (Q @ xyz) + translation
        rec.points3D[point_id].xyz = xyz
    return len(groups)
