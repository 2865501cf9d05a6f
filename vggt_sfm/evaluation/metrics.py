"""Camera accuracy against a ground-truth COLMAP model of the same images (matched by image name).

Pairwise metrics follow the VGGT / CO3D protocol (VGGT `evaluation/test_co3d.py`):
- every pair i<j of ground-truth images (sorted by name); relative pose rel = E_i inv(E_j) with E = cam_from_world;
- rotation error from the quaternions of the relative rotations: arccos(1 - 2 max(1 - (q.q_gt)^2, eps));
- translation error: the angle between the relative translation directions, acos(sqrt(1 - max(1 - (t.t_gt)^2, eps))),
  folded with min(err, 180 - err); undefined values count as 1e6;
- AUC@T: mean of the cumulative 1-degree histogram (bins 0..T) of max(rotation, translation) error over all pairs.
An image missing from the estimate (not registered) fails all its pairs: rotation error 180, translation error 1e6.
A ground-truth pair with coincident centres (templeSR0001 and templeSR0011 are taken from the same pose) has no
translation direction; its translation error is 0, so only its rotation counts.

Per-image metrics need a common frame: the estimated camera centres are mapped onto the ground truth by a
similarity, then the centre and rotation errors are measured. The similarity is robust, so that a few lost
cameras do not drag the others: LO-RANSAC (`pycolmap.estimate_sim3d_robust`, inliers within 20 % of the scene
extent, fixed seed), then least squares (`pycolmap.estimate_sim3d`) on its inliers. Centre
errors are also given as % of the ground truth's scene extent (`PriorCameras.scene_scale`: the median distance
of the camera centres to their median), which makes them comparable across data sets in other units.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycolmap
from scipy.spatial.transform import Rotation

from ..errors import UserError
from ..predictions import Predictions, load_predictions
from ..prior import PriorCameras, prior_from_predictions
from ..similarity import align_points

AUC_THRESHOLDS = (1, 3, 5, 10, 30)
FAILED_ROTATION_ERROR = 180.0
FAILED_TRANSLATION_ERROR = 1e6  # what the protocol assigns to an undefined translation angle
_EPS = 1e-15
_ZERO_BASELINE = 1e-6  # of the scene extent
ALIGNMENT_INLIER_FRACTION = 0.2  # of the scene extent

CameraSource = pycolmap.Reconstruction | Predictions | PriorCameras | str | Path

logger = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    """Errors of an estimate against ground truth; arrays are per ground-truth image or per pair."""

    image_names: list[str]  # the ground-truth images, sorted
    registered: np.ndarray  # (S,) bool: the estimate has a pose for this image
    pairs: np.ndarray  # (P,2) int, i<j
    pair_rotation_errors: np.ndarray  # (P,) degrees, relative rotation
    pair_translation_errors: np.ndarray  # (P,) degrees, relative translation direction
    auc: dict[int, float]  # threshold (degrees) -> AUC in [0,1]
    scene_extent: float  # ground-truth units
    center_errors: np.ndarray  # (S,) ground-truth units after the similarity alignment; NaN if unregistered
    rotation_errors: np.ndarray  # (S,) degrees, absolute rotation after the alignment; NaN if unregistered
    focal_errors: np.ndarray  # (S,) relative |f - f_gt| / f_gt of the mean focal length; NaN if unknown
    aligned: bool = True  # False when fewer than 3 images were registered (no similarity, per-image errors NaN)
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.image_names)

    @property
    def num_registered(self) -> int:
        return int(np.count_nonzero(self.registered))

    def as_dict(self) -> dict[str, float | int]:
        """Scalar metrics, JSON-ready; per-image medians over registered images."""
        out: dict[str, float | int] = {
            "num_images": self.num_images,
            "num_registered": self.num_registered,
            "num_pairs": len(self.pairs),
        }
        for threshold, value in self.auc.items():
            out[f"auc@{threshold}"] = float(value)
        out["rotation_error_median_deg"] = _stat(np.median, self.pair_rotation_errors)
        out["rotation_error_mean_deg"] = _stat(np.mean, self.pair_rotation_errors)
        out["translation_error_median_deg"] = _stat(np.median, self.pair_translation_errors)
        out["scene_extent"] = self.scene_extent
        out["center_error_median"] = _stat(np.nanmedian, self.center_errors)
        out["center_error_median_pct"] = 100.0 * out["center_error_median"] / self.scene_extent
        out["center_error_max_pct"] = 100.0 * _stat(np.nanmax, self.center_errors) / self.scene_extent
        out["absolute_rotation_error_median_deg"] = _stat(np.nanmedian, self.rotation_errors)
        out["absolute_rotation_error_max_deg"] = _stat(np.nanmax, self.rotation_errors)
        out["focal_error_median"] = _stat(np.nanmedian, self.focal_errors)
        out.update(self.extras)
        return out

    def per_image(self) -> list[dict[str, object]]:
        """One row per ground-truth image: name, registered, centre / rotation / focal error."""
        return [
            {
                "name": name,
                "registered": bool(self.registered[i]),
                "center_error": float(self.center_errors[i]),
                "center_error_pct": float(100.0 * self.center_errors[i] / self.scene_extent),
                "rotation_error_deg": float(self.rotation_errors[i]),
                "focal_error": float(self.focal_errors[i]),
            }
            for i, name in enumerate(self.image_names)
        ]

    def summary(self) -> str:
        """One line: registration, AUCs, median rotation / centre / focal errors."""
        d = self.as_dict()
        aucs = " ".join(f"AUC@{t}={100 * v:.1f}" for t, v in self.auc.items())
        centre = (
            f"centre med {d['center_error_median_pct']:.2f}% ({d['center_error_median']:.4g})"
            if self.aligned
            else "centre n/a (no similarity aligns the cameras)"
        )
        return (
            f"registered {self.num_registered}/{self.num_images}  {aucs}  "
            f"rot med {d['rotation_error_median_deg']:.3f} deg  {centre}  "
            f"focal med {100 * d['focal_error_median']:.2f}%"
        )


def _stat(fn, values: np.ndarray) -> float:
    finite = values[~np.isnan(values)] if values.size else values
    return float(fn(finite)) if finite.size else float("nan")


def rotation_errors_deg(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    """(N,) angle between rotations (N,3,3), from quaternions as the VGGT protocol computes it."""
    q_a = Rotation.from_matrix(R_a).as_quat()
    q_b = Rotation.from_matrix(R_b).as_quat()
    loss = np.maximum(1.0 - np.sum(q_a * q_b, axis=-1) ** 2, _EPS)
    return np.degrees(np.arccos(np.clip(1.0 - 2.0 * loss, -1.0, 1.0)))


def translation_direction_errors_deg(t_gt: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(N,) angle between translation directions (N,3), folded to [0,90] (sign ambiguity); 1e6 if undefined."""
    t = t / (np.linalg.norm(t, axis=-1, keepdims=True) + _EPS)
    t_gt = t_gt / (np.linalg.norm(t_gt, axis=-1, keepdims=True) + _EPS)
    loss = np.maximum(1.0 - np.sum(t * t_gt, axis=-1) ** 2, _EPS)
    with np.errstate(invalid="ignore"):
        err = np.degrees(np.arccos(np.sqrt(1.0 - loss)))
    err = np.minimum(err, np.abs(180.0 - err))
    err[~np.isfinite(err)] = FAILED_TRANSLATION_ERROR
    return err


def relative_poses(cam_from_world: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(P,3,4) rel = E_i inv(E_j) for each pair (i, j)."""
    R = cam_from_world[:, :, :3]
    t = cam_from_world[:, :, 3]
    R_i, R_j = R[pairs[:, 0]], R[pairs[:, 1]]
    R_rel = R_i @ np.transpose(R_j, (0, 2, 1))
    t_rel = t[pairs[:, 0]] - np.einsum("pab,pb->pa", R_rel, t[pairs[:, 1]])
    return np.concatenate([R_rel, t_rel[:, :, None]], axis=2)


def pose_auc(rotation_errors: np.ndarray, translation_errors: np.ndarray, threshold: float) -> float:
    """AUC@threshold of the protocol: mean of the cumulative 1-degree histogram of max(rot, trans) error."""
    errors = np.maximum(rotation_errors, translation_errors)
    if errors.size == 0:
        return float("nan")
    histogram, _ = np.histogram(errors, bins=np.arange(int(threshold) + 1))
    return float(np.mean(np.cumsum(histogram / errors.size)))


def cameras_from_reconstruction(reconstruction: pycolmap.Reconstruction) -> PriorCameras:
    """The registered images of a reconstruction as cameras (sorted by name), K in COLMAP pixels."""
    images = sorted(
        (image for image in reconstruction.images.values() if image.has_pose), key=lambda image: image.name
    )
    cameras = [reconstruction.cameras[image.camera_id] for image in images]
    return PriorCameras(
        image_names=[image.name for image in images],
        image_sizes=np.array([(c.width, c.height) for c in cameras], dtype=int).reshape(-1, 2),
        cam_from_world=np.array([image.cam_from_world().matrix() for image in images]).reshape(-1, 3, 4),
        intrinsics=np.array([c.calibration_matrix() for c in cameras]).reshape(-1, 3, 3),
    )


def read_ground_truth(ground_truth: pycolmap.Reconstruction | str | Path) -> PriorCameras:
    """Ground-truth cameras from a COLMAP model (object or folder)."""
    if not isinstance(ground_truth, pycolmap.Reconstruction):
        path = Path(ground_truth)
        if not path.is_dir():
            raise UserError(f"ground-truth model folder not found: {path} (give a COLMAP model folder)")
        ground_truth = pycolmap.Reconstruction(str(path))
    gt = cameras_from_reconstruction(ground_truth)
    if gt.num_images < 2:
        raise UserError("the ground-truth model has fewer than 2 posed images; nothing to evaluate")
    return gt


def check_common_images(
    estimate_names: Sequence[str],
    gt_names: Sequence[str],
    estimate_label: str = "the estimate",
    gt_label: str = "the ground truth",
    warn: bool = True,
) -> int:
    """How many ground-truth images the estimate has. None is a UserError naming both sides (the ground truth
    is of other images); a partial overlap is said in a warning, as the missing images count as failures."""
    gt_set, common = set(gt_names), set(estimate_names) & set(gt_names)
    if not common:
        example = f" (e.g. {sorted(estimate_names)[0]} vs {sorted(gt_set)[0]})" if estimate_names and gt_set else ""
        raise UserError(
            f"{estimate_label} and {gt_label} have no image in common{example}: give the ground truth of the "
            "same images"
        )
    if warn and len(common) < len(gt_set):
        logger.warning(
            "%d of the %d images of %s are not in %s; they count as not registered",
            len(gt_set) - len(common), len(gt_set), gt_label, estimate_label,
        )
    return len(common)


def as_cameras(estimate: CameraSource, ground_truth: PriorCameras) -> PriorCameras:
    """Any supported estimate as cameras; predictions use the ground truth's image sizes."""
    if isinstance(estimate, (str, Path)):
        path = Path(estimate)
        if path.is_dir():
            estimate = pycolmap.Reconstruction(str(path))
        else:
            sizes = {n: tuple(s) for n, s in zip(ground_truth.image_names, ground_truth.image_sizes)}
            estimate = load_predictions(path, image_sizes=sizes)
    if isinstance(estimate, PriorCameras):
        return estimate
    if isinstance(estimate, pycolmap.Reconstruction):
        return cameras_from_reconstruction(estimate)
    if isinstance(estimate, Predictions):
        gt_sizes = dict(zip(ground_truth.image_names, ground_truth.image_sizes))
        known = [n for n in estimate.image_names if n in gt_sizes]
        predictions = estimate.subset(known)
        return prior_from_predictions(predictions, np.array([gt_sizes[n] for n in known]).reshape(-1, 2))
    raise TypeError(f"cannot evaluate an object of type {type(estimate).__name__}")


def _mean_focal(K: np.ndarray) -> np.ndarray:
    return 0.5 * (K[..., 0, 0] + K[..., 1, 1])


def evaluate(
    estimate: CameraSource,
    ground_truth: pycolmap.Reconstruction | PriorCameras | str | Path,
    thresholds: tuple[int, ...] = AUC_THRESHOLDS,
    labels: tuple[str, str] = ("the estimate", "the ground truth"),
) -> EvaluationResult:
    """Compare estimated cameras with ground truth, matching images by name.

    `estimate` is a reconstruction, predictions, prior cameras, a model folder or a predictions file;
    `ground_truth` a reconstruction, cameras or a model folder. Ground-truth images the estimate lacks count as
    failures (said in a warning); estimated images the ground truth lacks are ignored. No image in common is a
    UserError naming both, by `labels` (estimate, ground truth).
    """
    gt = ground_truth if isinstance(ground_truth, PriorCameras) else read_ground_truth(ground_truth)
    if isinstance(estimate, Predictions):  # as_cameras keeps only the images the ground truth has
        check_common_images(estimate.image_names, gt.image_names, *labels)
    est = as_cameras(estimate, gt)
    if not isinstance(estimate, Predictions):
        check_common_images(est.image_names, gt.image_names, *labels)
    order = np.argsort(gt.image_names)
    names = [gt.image_names[i] for i in order]
    gt_pose = gt.cam_from_world[order]
    gt_K = gt.intrinsics[order]
    num = len(names)

    est_index = {name: i for i, name in enumerate(est.image_names)}
    registered = np.array([name in est_index for name in names], dtype=bool)
    est_pose = np.full((num, 3, 4), np.nan)
    est_K = np.full((num, 3, 3), np.nan)
    taken = [est_index[n] for n in names if n in est_index]
    est_pose[registered] = est.cam_from_world[taken]
    est_K[registered] = est.intrinsics[taken]

    pairs = np.array([(i, j) for i in range(num) for j in range(i + 1, num)], dtype=int).reshape(-1, 2)
    rot_err = np.full(len(pairs), FAILED_ROTATION_ERROR)
    trans_err = np.full(len(pairs), FAILED_TRANSLATION_ERROR)
    valid = registered[pairs[:, 0]] & registered[pairs[:, 1]]
    if np.any(valid):
        rel_gt = relative_poses(gt_pose, pairs[valid])
        rel_est = relative_poses(est_pose, pairs[valid])
        rot_err[valid] = rotation_errors_deg(rel_est[:, :, :3], rel_gt[:, :, :3])
        trans_err[valid] = translation_direction_errors_deg(rel_gt[:, :, 3], rel_est[:, :, 3])
    gt_cams = PriorCameras(names, gt.image_sizes[order], gt_pose, gt_K)
    extent = gt_cams.scene_scale()
    gt_centers = gt_cams.centers()
    baseline = np.linalg.norm(gt_centers[pairs[:, 0]] - gt_centers[pairs[:, 1]], axis=1)
    no_direction = valid & (baseline < _ZERO_BASELINE * extent)
    trans_err[no_direction] = 0.0
    auc = {int(t): pose_auc(rot_err, trans_err, t) for t in thresholds}

    center_err = np.full(num, np.nan)
    abs_rot_err = np.full(num, np.nan)
    num_inliers = 0
    sim = None
    if np.count_nonzero(registered) >= 3:
        est_centers = PriorCameras(names, gt.image_sizes[order], est_pose, est_K).centers()[registered]
        sim, num_inliers = align_points(est_centers, gt_centers[registered], ALIGNMENT_INLIER_FRACTION * extent)
    if sim is not None:
        gt_from_est = sim.matrix()
        centers = est_centers @ gt_from_est[:, :3].T + gt_from_est[:, 3]
        center_err[registered] = np.linalg.norm(centers - gt_centers[registered], axis=1)
        R_aligned = est_pose[registered, :, :3] @ (gt_from_est[:, :3] / sim.scale).T
        abs_rot_err[registered] = rotation_errors_deg(R_aligned, gt_pose[registered, :, :3])
    focal_err = np.abs(_mean_focal(est_K) - _mean_focal(gt_K)) / _mean_focal(gt_K)

    return EvaluationResult(
        image_names=names,
        registered=registered,
        pairs=pairs,
        pair_rotation_errors=rot_err,
        pair_translation_errors=trans_err,
        auc=auc,
        scene_extent=extent,
        center_errors=center_err,
        rotation_errors=abs_rot_err,
        focal_errors=focal_err,
        aligned=sim is not None,
        extras={
            "num_pairs_without_baseline": int(np.count_nonzero(baseline < _ZERO_BASELINE * extent)),
            "num_alignment_inliers": num_inliers,
        },
    )
