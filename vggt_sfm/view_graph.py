"""The prior checked against the view graph: frames VGGT got wrong are found and repaired before mapping.

VGGT fails on whole frames (tens of degrees off, turned around, on the wrong side of a symmetric object), and a
frame placed wrongly is paired with the wrong neighbours, so its matches never confirm it. This stage, between
verification and tracks:

1. **searches again** for the frames the verification left weakly connected: they are matched against every
   other image (a frame turned around has lost its true neighbours) and verified by RANSAC alone, since their
   prior is what is in doubt;
2. compares each frame's predicted rotation with its pairs' measured relative rotations (essential matrices of
   the verified matches): a frame most of its pairs contradict is **failed**, and gets the rotation its trusted
   neighbours agree on and a centre triangulated from their epipoles (the directions in which they see it); the
   mapping re-localises it from there (`repair_rotations`: local, not a global rotation average, which a shared
   focal bias or a drift bends);
3. drops searched pairs whose relative rotation contradicts the repaired rotations (symmetric or repeated
   structure that RANSAC alone accepted).

Frames contradicted by their pairs that cannot be repaired keep their prediction, are reported
(`ViewGraphReport.unconnected`) and are re-localised first, or else not refined.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pycolmap

from . import log
from .matching import MatchingConfig, PairMatches, VerifiedMatches, match_pairs, pinhole_camera, verify_matches
from .executor import default_workers, fork_map
from .prior import PriorCameras, rotation_angles_deg

logger = logging.getLogger(__name__)


@dataclass
class ViewGraphConfig:
    """When a frame's prediction is doubted, and how it is repaired."""

    enabled: bool = True
    # A frame with fewer verified pairs than this, or fewer verified matches than `weak_fraction` of the typical
    # frame's, is matched again against every image.
    min_verified_pairs: int = 2
    weak_fraction: float = 0.2
    max_search_pairs: int = 300  # per frame searched again (the most overlapping by the prior first... all when fewer)
    # The averaged rotation of a frame farther than this from its prediction: the prediction failed (VGGT's iid
    # error is a few degrees; its failures are tens).
    failed_rotation_deg: float = 10.0
    # A searched pair whose relative rotation is this far from the one the (repaired) rotations imply is dropped:
    # symmetric or repeated structure, as the RANSAC fallback's check (matching.max_ransac_rotation_deg). Not
    # nearer: a drifting prior is 10 degrees off on sound pairs.
    max_pair_rotation_error_deg: float = 30.0
    min_pair_inliers: int = 15  # pairs with fewer inliers do not enter the rotation averaging
    num_workers: int = 0


@dataclass
class ViewGraphReport:
    failed: list[str] = field(default_factory=list)  # predictions found wrong and repaired (rotation, centre)
    searched: list[str] = field(default_factory=list)  # frames matched again against every image
    search_pairs: int = 0
    search_verified: int = 0
    dropped_pairs: int = 0  # verified pairs contradicting the averaged rotations
    unconnected: list[str] = field(default_factory=list)  # contradicted by their pairs, but not repairable
    rotation_change_deg: dict[str, float] = field(default_factory=dict)  # repaired vs predicted, per failed frame


@dataclass
class CheckedPrior:
    """The prior with its failed frames repaired, and the matches of the searched pairs added."""

    prior: PriorCameras
    raw: PairMatches
    verified: VerifiedMatches
    failed: list[int]  # frames whose prediction failed and was repaired (to be re-localised first)
    unconfirmed: list[int]  # frames contradicted by their matches that could not be repaired
    report: ViewGraphReport
    confirmed: list[int] = field(default_factory=list)  # frames whose (repaired) rotation two or more pairs confirm


def _frame_strength(verified: VerifiedMatches, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(S,) verified pairs and verified matches per frame."""
    pairs = np.zeros(num_images, dtype=int)
    matches = np.zeros(num_images, dtype=int)
    for (i, j), m in zip(verified.pairs, verified.matches):
        for k in (i, j):
            pairs[k] += 1
            matches[k] += len(m)
    return pairs, matches


def weak_frames(verified: VerifiedMatches, num_images: int, config: ViewGraphConfig) -> list[int]:
    """Frames the verification left with too few pairs or matches to confirm (or correct) their prediction."""
    pairs, matches = _frame_strength(verified, num_images)
    typical = float(np.median(matches)) if num_images else 0.0
    weak = (pairs < config.min_verified_pairs) | (matches < config.weak_fraction * typical)
    return np.flatnonzero(weak).tolist()


def relative_poses(
    features: list, verified: VerifiedMatches, prior: PriorCameras, num_workers: int = 0
) -> list[pycolmap.Rigid3d | None]:
    """cam_j_from_cam_i of every verified pair from its inlier matches (essential matrix under the prior's
    intrinsics, COLMAP's two-view estimation); None where it is degenerate."""
    cameras = [pinhole_camera(prior, i) for i in range(prior.num_images)]

    def estimate(index: int) -> tuple[np.ndarray, np.ndarray] | None:
        i, j = (int(v) for v in verified.pairs[index])
        matches = np.ascontiguousarray(verified.matches[index], dtype=np.uint32)
        if len(matches) < 8:
            return None
        options = pycolmap.TwoViewGeometryOptions()
        options.compute_relative_pose = True
        options.ransac.random_seed = 0
        options.min_num_inliers = 8
        with log.quiet_pycolmap():
            geometry = pycolmap.estimate_calibrated_two_view_geometry(
                cameras[i], np.asarray(features[i].keypoints, dtype=np.float64),
                cameras[j], np.asarray(features[j].keypoints, dtype=np.float64), matches, options,
            )  # fmt: skip
        pose = geometry.cam2_from_cam1
        if pose is None or int(geometry.config) != int(pycolmap.TwoViewGeometryConfiguration.CALIBRATED):
            return None
        return pose.rotation.quat, np.asarray(pose.translation, dtype=np.float64)

    results = fork_map(estimate, range(verified.num_pairs), default_workers(num_workers), chunksize=8)
    return [
        None if r is None else pycolmap.Rigid3d(pycolmap.Rotation3d(np.asarray(r[0])), r[1]) for r in results
    ]


def _chordal_mean(rotations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The rotation nearest (Frobenius) to the weighted sum of (N,3,3) rotations."""
    U, _, Vt = np.linalg.svd(np.einsum("n,nij->ij", weights, rotations))
    return U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt


def repair_rotations(
    R: np.ndarray, pairs: np.ndarray, poses: list[pycolmap.Rigid3d | None], inliers: np.ndarray,
    config: ViewGraphConfig,
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Find the frames whose rotation contradicts their pairs and re-derive it from trusted neighbours.

    A frame's evidence is the median, over its pairs, of the angle between the pair's measured relative rotation
    and the one the predicted rotations imply. Local on purpose: a focal-length bias or a drift bends long chains
    of relative rotations (so a global average would move sound frames), but hardly one pair. Frames whose
    evidence is within `failed_rotation_deg` are trusted; trust then spreads to the frame with the most trusted
    neighbours that agree (each gives R_i = R_ji^T R_j; at least two must agree): its rotation is kept when it
    agrees with them, or replaced by theirs (repaired). Returns the rotations, the repaired frames in order, the
    frames never trusted (bool (S,)): contradicted by their pairs, with too few agreeing neighbours, and the
    trusted frames (repaired ones included) with at least two pairs (bool (S,)): confirmed.
    """
    R = R.copy()
    num = len(R)
    measured = [None if p is None else p.rotation.matrix() for p in poses]
    incident: list[list[int]] = [[] for _ in range(num)]
    for k, (i, j) in enumerate(pairs):
        if measured[k] is not None and inliers[k] >= config.min_pair_inliers:
            incident[int(i)].append(k)
            incident[int(j)].append(k)

    def evidence(frame: int) -> float:
        values = [
            rotation_angles_deg(measured[k][None], (R[pairs[k, 1]] @ R[pairs[k, 0]].T)[None])[0]
            for k in incident[frame]
        ]
        return float(np.median(values)) if values else 0.0

    def from_neighbours(frame: int) -> tuple[np.ndarray | None, float]:
        """The rotation the trusted neighbours agree on, and their support (inliers)."""
        implied, weights = [], []
        for k in incident[frame]:
            a, b = (int(v) for v in pairs[k])
            other = b if a == frame else a
            if trusted[other]:
                # R_b = R_ba R_a: from a neighbour b, R_i = R_ba^T R_b; from a neighbour a, R_i = R_ab R_a.
                implied.append(measured[k].T @ R[other] if a == frame else measured[k] @ R[other])
                weights.append(float(inliers[k]))
        if len(implied) < 2:
            return None, 0.0
        implied, weights = np.array(implied), np.array(weights)
        estimate = _chordal_mean(implied, weights)
        for _ in range(2):  # the neighbours that agree decide (a wrong pair among them does not)
            agree = rotation_angles_deg(implied, np.repeat(estimate[None], len(implied), 0)) <= config.failed_rotation_deg
            if agree.sum() < 2:
                return None, 0.0
            estimate = _chordal_mean(implied[agree], weights[agree])
        return estimate, float(weights[agree].sum())

    trusted = np.array([evidence(i) <= config.failed_rotation_deg for i in range(num)])
    logger.debug("view graph evidence: %s", [round(evidence(i), 1) for i in range(num)])
    if not trusted.any():
        return R, [], np.zeros(num, dtype=bool), np.zeros(num, dtype=bool)  # nothing to anchor on
    repaired: list[int] = []
    while True:
        best, best_support, best_rotation = -1, 0.0, None
        for i in np.flatnonzero(~trusted):
            estimate, support = from_neighbours(int(i))
            if estimate is not None and support > best_support:
                best, best_support, best_rotation = int(i), support, estimate
        if best < 0:
            break
        if rotation_angles_deg(best_rotation[None], R[best][None])[0] > config.failed_rotation_deg:
            R[best] = best_rotation
            repaired.append(best)
        trusted[best] = True
    return R, repaired, ~trusted, trusted & (np.array([len(k) for k in incident]) >= 2)


def _pair_rotation_errors(R: np.ndarray, pairs: np.ndarray, poses: list[pycolmap.Rigid3d | None]) -> np.ndarray:
    """(P,) degrees between each pair's relative rotation and the one the rotations R imply (inf: no pose)."""
    errors = np.full(len(pairs), np.inf)
    for k, ((i, j), pose) in enumerate(zip(pairs, poses)):
        if pose is not None:
            implied = R[j] @ R[i].T
            errors[k] = rotation_angles_deg(pose.rotation.matrix()[None], implied[None])[0]
    return errors


def centre_from_neighbours(
    frame: int, rotations: np.ndarray, centers: np.ndarray, pairs: np.ndarray, poses: list, trusted: np.ndarray
) -> np.ndarray | None:
    """The centre of `frame` closest to the lines from its trusted neighbours' centres along the directions in
    which they see it (each pair's relative translation, turned into the world by the neighbour's rotation in
    `rotations` (S,3,3)); None with fewer than two non-parallel lines."""
    origins, directions = [], []
    for (i, j), pose in zip(pairs, poses):
        if pose is None or frame not in (i, j):
            continue
        other = j if i == frame else i
        if not trusted[other]:
            continue
        t = np.asarray(pose.translation, dtype=np.float64)  # cam_j_from_cam_i: C_i seen from j is t, C_j from i is -R^T t
        R_other = rotations[other]
        if i == frame:  # the frame is i: its centre lies along R_j^T t from C_j
            direction = R_other.T @ t
        else:  # the frame is j: C_j - C_i = -R_i^T R^T t in the world
            direction = -R_other.T @ (pose.rotation.matrix().T @ t)
        norm = np.linalg.norm(direction)
        if norm > 0:
            origins.append(centers[other])
            directions.append(direction / norm)
    if len(origins) < 2:
        return None
    origins, directions = np.array(origins), np.array(directions)
    projector = np.eye(3)[None] - directions[:, :, None] * directions[:, None, :]
    A = projector.sum(axis=0)
    if np.linalg.eigvalsh(A)[0] < 1e-3 * len(origins):
        return None  # (nearly) parallel lines: no intersection
    centre = np.linalg.solve(A, np.einsum("sij,sj->i", projector, origins))
    # The frame must lie ahead along each line, not behind (the lines are rays).
    ahead = np.einsum("si,si->s", centre[None] - origins, directions)
    return centre if np.median(ahead) > 0 else None


def check_prior(
    features: list,
    prior: PriorCameras,
    raw: PairMatches,
    verified: VerifiedMatches,
    matching: MatchingConfig,
    config: ViewGraphConfig,
    progress: bool = True,
) -> CheckedPrior:
    """Search again for the weakly verified frames, then find and repair the predictions their pairs contradict."""
    num = prior.num_images
    report = ViewGraphReport()
    if not config.enabled or num < 3:
        return CheckedPrior(prior, raw, verified, [], [], report)

    searched = weak_frames(verified, num, config)
    checked_before = verified.num_pairs  # pairs verified under the prior; the searched ones follow
    if searched:
        raw, verified, extra, extra_verified = _search_again(features, prior, raw, verified, searched, matching, config,
                                                             progress)  # fmt: skip
        report.searched = [prior.image_names[i] for i in searched]
        report.search_pairs, report.search_verified = extra, extra_verified
        logger.info("searched %d weakly verified frame(s) against every image: %d pairs, %d verified",
                    len(searched), extra, extra_verified)  # fmt: skip

    inliers = np.array([len(m) for m in verified.matches], dtype=int)
    poses = relative_poses(features, verified, prior, config.num_workers)
    predicted = prior.cam_from_world[:, :, :3]
    rotations, failed, unrepaired, confirmed = repair_rotations(predicted, verified.pairs, poses, inliers, config)
    report.unconnected = [prior.image_names[i] for i in np.flatnonzero(unrepaired)]

    # Searched pairs that contradict the rotations go (symmetric or repeated structure that RANSAC alone
    # accepted); the pairs the prior verified stay (an essential matrix of a near-planar pair can be the wrong one).
    errors = _pair_rotation_errors(rotations, verified.pairs, poses)
    searched_pair = np.arange(verified.num_pairs) >= checked_before
    keep = ~(searched_pair & np.isfinite(errors) & (errors > config.max_pair_rotation_error_deg))
    report.dropped_pairs = int((~keep).sum())
    if report.dropped_pairs:
        verified = _select_pairs(verified, keep)
        poses = [p for p, k in zip(poses, keep) if k]

    repaired = prior
    if failed:
        change = rotation_angles_deg(rotations, predicted)
        cam_from_world = prior.cam_from_world.copy()
        trusted = np.ones(num, dtype=bool)
        trusted[failed] = False
        trusted[unrepaired] = False
        centers = prior.centers()
        for i in failed:
            centre = centre_from_neighbours(i, rotations, centers, verified.pairs, poses, trusted)
            if centre is None:
                centre = centers[i]
            cam_from_world[i, :, :3] = rotations[i]
            cam_from_world[i, :, 3] = -rotations[i] @ centre
        repaired = replace(prior, cam_from_world=cam_from_world)
        report.failed = [prior.image_names[i] for i in failed]
        report.rotation_change_deg = {prior.image_names[i]: float(change[i]) for i in failed}
        for i in failed:
            logger.warning("%s: the predicted rotation was %.0f degrees off its matches; repaired from its neighbours",
                           prior.image_names[i], change[i])  # fmt: skip
    return CheckedPrior(repaired, raw, verified, sorted(failed), np.flatnonzero(unrepaired).tolist(), report,
                        np.flatnonzero(confirmed).tolist())


def _select_pairs(verified: VerifiedMatches, keep: np.ndarray) -> VerifiedMatches:
    ids = np.flatnonzero(keep)
    return VerifiedMatches(
        pairs=verified.pairs[ids],
        matches=[verified.matches[k] for k in ids],
        method=[verified.method[k] for k in ids],
        num_raw=verified.num_raw[ids],
        tolerance_px=verified.tolerance_px[ids] if len(verified.tolerance_px) else verified.tolerance_px,
    )


def _search_again(
    features: list,
    prior: PriorCameras,
    raw: PairMatches,
    verified: VerifiedMatches,
    frames: list[int],
    matching: MatchingConfig,
    config: ViewGraphConfig,
    progress: bool,
) -> tuple[PairMatches, VerifiedMatches, int, int]:
    """Match `frames` against every image they were not paired with; verify those pairs by RANSAC alone."""
    num = prior.num_images
    verified_pairs = {(int(i), int(j)) for i, j in verified.pairs}
    raw_index = {(int(i), int(j)): k for k, (i, j) in enumerate(raw.pairs)}
    extra = set()
    for i in frames:
        others = [j for j in range(num) if j != i and (min(i, j), max(i, j)) not in verified_pairs]
        for j in others[: config.max_search_pairs]:
            extra.add((min(i, j), max(i, j)))
    if not extra:
        return raw, verified, 0, 0
    pairs = np.array(sorted(extra), dtype=np.int64)
    # The prior of these frames is in doubt: plain descriptor matching, COLMAP's RANSAC with no rotation check.
    search = replace(matching, matcher="auto" if matching.matcher == "guided" else matching.matcher,
                     verification="ransac")  # fmt: skip
    # Pairs matched before (whose verification failed under the doubted prior) keep their matches.
    new = np.array([tuple(p) not in raw_index for p in pairs.tolist()], dtype=bool)
    new_raw = match_pairs(features, pairs[new], search, progress=progress, prior=None)
    old = [raw_index[tuple(p)] for p in pairs[~new].tolist()]
    extra_raw = PairMatches(
        pairs=np.concatenate([raw.pairs[old].reshape(-1, 2), new_raw.pairs.reshape(-1, 2)]),
        matches=[raw.matches[k] for k in old] + list(new_raw.matches),
        scores=[raw.scores[k] for k in old] + list(new_raw.scores) if len(raw.scores) else [],
    )
    extra_verified = verify_matches(features, extra_raw, prior, search, progress=progress)
    merged_raw = raw.extended(new_raw)  # the stored pairs stay in their store, unread
    merged = VerifiedMatches(
        pairs=np.concatenate([verified.pairs.reshape(-1, 2), extra_verified.pairs.reshape(-1, 2)]),
        matches=list(verified.matches) + list(extra_verified.matches),
        method=list(verified.method) + list(extra_verified.method),
        num_raw=np.concatenate([verified.num_raw, extra_verified.num_raw]),
        tolerance_px=np.concatenate([verified.tolerance_px, extra_verified.tolerance_px]),
    )
    return merged_raw, merged, len(pairs), extra_verified.num_pairs
