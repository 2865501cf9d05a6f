"""Our features and matches as a COLMAP 4 database, so COLMAP's own tools can start from them.

The database holds the cameras, rigs and frames, images (ids equal to the reconstruction's: frame index + 1),
our keypoints, our raw matches, the verified matches as CALIBRATED two-view geometries (with the relative pose,
E and F taken from the reconstruction where both images are registered; PANORAMIC with H for a pair without
baseline), and the predicted camera centres as pose priors. `pycolmap.incremental_mapping`, `global_mapping` and `triangulate_points` read it as it is.

COLMAP 3.x reads it too (`colmap mapper`, `point_triangulator`; tested with Debian's COLMAP 3.8): its `images`
table has seven pose-prior columns (prior_qw..prior_qz, prior_tx..prior_tz) that COLMAP 4 dropped, and COLMAP 3.x
refuses a database without them ("SQL logic error" while preparing its statements). They are added here, with
the pose priors' positions in prior_tx..prior_tz (COLMAP 3.x keeps a position prior there) and no rotation prior
(NULL). COLMAP 4 ignores those columns; COLMAP 3.x ignores what COLMAP 4 added (the rigs, frames and pose_priors
tables, the camera1/camera2 columns of two_view_geometries).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pycolmap

from ..prior import PriorCameras
from .files import atomic_output

if TYPE_CHECKING:
    from ..features import Features

logger = logging.getLogger(__name__)

# COLMAP 3.x's images table: rotation prior (quaternion w, x, y, z) and position prior.
COLMAP3_PRIOR_COLUMNS = ("prior_qw", "prior_qx", "prior_qy", "prior_qz", "prior_tx", "prior_ty", "prior_tz")
_MIN_BASELINE = 1e-6  # relative to the spread of the camera centres: below it a pair has no usable translation


class Matches(Protocol):
    """Matches of image pairs: `pairs` (P,2) frame indices and, per pair, (M,2) keypoint indices."""

    pairs: np.ndarray
    matches: list[np.ndarray]


@dataclass
class DatabaseReport:
    """What was written."""

    num_images: int
    num_keypoints: int
    num_matched_pairs: int
    num_verified_pairs: int
    num_pose_priors: int
    pose_priors_aligned: bool  # the prior centres were moved into the reconstruction's frame


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def relative_geometry(
    camera1: pycolmap.Camera, cam1_from_world: pycolmap.Rigid3d, camera2: pycolmap.Camera, cam2_from_world: pycolmap.Rigid3d
) -> tuple[pycolmap.Rigid3d, np.ndarray, np.ndarray]:
    """cam2_from_cam1 (unit translation, as COLMAP's two-view estimates have), E and F of two posed cameras.

    F ignores lens distortion, as COLMAP's does.
    """
    cam2_from_cam1 = cam2_from_world * cam1_from_world.inverse()
    R = cam2_from_cam1.rotation.matrix()
    t = np.asarray(cam2_from_cam1.translation, dtype=np.float64)
    t = t / np.linalg.norm(t)
    E = _skew(t) @ R
    K1, K2 = camera1.calibration_matrix(), camera2.calibration_matrix()
    F = np.linalg.inv(K2).T @ E @ np.linalg.inv(K1)
    return pycolmap.Rigid3d(pycolmap.Rotation3d(R), t), E, F / np.abs(F).max()


def _set_relative_pose(
    geometry: pycolmap.TwoViewGeometry, reconstruction: pycolmap.Reconstruction, id1: int, id2: int, extent: float
) -> None:
    """Fill the pose, E and F of a verified pair from the model; a pair without baseline is PANORAMIC, with H."""
    images = reconstruction.images
    if id1 not in images or id2 not in images or not (images[id1].has_pose and images[id2].has_pose):
        return
    image1, image2 = images[id1], images[id2]
    camera1, camera2 = reconstruction.cameras[image1.camera_id], reconstruction.cameras[image2.camera_id]
    baseline = np.linalg.norm(image1.projection_center() - image2.projection_center())
    if baseline <= _MIN_BASELINE * extent:
        # E and F are undefined without translation; COLMAP calls such a pair panoramic and describes it by H.
        cam2_from_cam1 = image2.cam_from_world() * image1.cam_from_world().inverse()
        R = cam2_from_cam1.rotation.matrix()
        geometry.config = int(pycolmap.TwoViewGeometryConfiguration.PANORAMIC)
        geometry.cam2_from_cam1 = pycolmap.Rigid3d(pycolmap.Rotation3d(R), np.zeros(3))
        geometry.H = camera2.calibration_matrix() @ R @ np.linalg.inv(camera1.calibration_matrix())
        return
    cam2_from_cam1, E, F = relative_geometry(camera1, image1.cam_from_world(), camera2, image2.cam_from_world())
    geometry.cam2_from_cam1 = cam2_from_cam1
    geometry.E = E
    geometry.F = F


def _camera_spread(reconstruction: pycolmap.Reconstruction) -> float:
    """Median distance of the registered camera centres to their median (as PriorCameras.scene_scale)."""
    centers = np.array([reconstruction.images[i].projection_center() for i in reconstruction.reg_image_ids()])
    spread = float(np.median(np.linalg.norm(centers - np.median(centers, axis=0), axis=1))) if len(centers) else 0.0
    return spread if spread > 0 else 1.0


def _aligned_prior_centers(
    prior: PriorCameras, reconstruction: pycolmap.Reconstruction, image_ids: list[int]
) -> tuple[np.ndarray, bool]:
    """Predicted centres, moved by a similarity into the reconstruction's frame when enough images are registered."""
    centers = prior.centers()
    registered = [i for i, image_id in enumerate(image_ids)
                  if image_id in reconstruction.images and reconstruction.images[image_id].has_pose]
    if len(registered) < 3:
        return centers, False
    targets = np.array([reconstruction.images[image_ids[i]].projection_center() for i in registered])
    rec_from_prior = pycolmap.estimate_sim3d(centers[registered], targets)
    if rec_from_prior is None:
        logger.warning("could not align the predicted camera centres to the model; pose priors stay in the prior's frame")
        return centers, False
    return np.asarray(rec_from_prior * centers), True


def _camera_from_prior(camera_id: int, K: np.ndarray, size: np.ndarray) -> pycolmap.Camera:
    return pycolmap.Camera(
        camera_id=camera_id, model="PINHOLE", width=int(size[0]), height=int(size[1]),
        params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]],
    )


def write_database(
    path: Path | str,
    reconstruction: pycolmap.Reconstruction,
    features: list[Features],
    raw_matches: Matches | None,
    verified: Matches | None,
    prior: PriorCameras | None = None,
    two_view_poses: bool = True,
    align_pose_priors: bool = True,
    pose_prior_std: float | None = None,
    overwrite: bool = False,
) -> DatabaseReport:
    """Write a COLMAP 4 database for the images of `features` (frame i is image id i + 1).

    Cameras, rigs and frames come from `reconstruction`; a frame missing from it gets a PINHOLE camera from
    the prior. `verified` pairs become CALIBRATED two-view geometries; with `two_view_poses` their relative pose,
    E and F come from the reconstruction when both images are registered. The prior's camera centres become
    pose priors (CARTESIAN), moved into the reconstruction's frame by a similarity when `align_pose_priors`,
    with covariance `pose_prior_std`^2 I when given (else COLMAP's fallback applies).
    """
    num_frames = len(features)
    if prior is not None and prior.num_images != num_frames:
        raise ValueError(f"{num_frames} feature sets but {prior.num_images} prior cameras")
    image_ids = list(range(1, num_frames + 1))
    missing = [image_id for image_id in image_ids if image_id not in reconstruction.images]
    if missing and prior is None:
        raise ValueError(f"images {missing[:5]} are not in the reconstruction; pass the prior to describe them")
    for image_id in image_ids:
        if image_id in reconstruction.images and prior is not None:
            name = reconstruction.images[image_id].name
            if name != prior.image_names[image_id - 1]:
                raise ValueError(f"image id {image_id} is {name} in the model but {prior.image_names[image_id - 1]} in the prior")

    with atomic_output(path, overwrite=overwrite, directory=False) as tmp:
        with pycolmap.Database.open(str(tmp)) as db:
            # Cameras, with their focal lengths marked as known so COLMAP's mappers trust them.
            for camera in reconstruction.cameras.values():
                camera = copy.copy(camera)
                camera.has_prior_focal_length = True
                db.write_camera(camera, use_camera_id=True)
            for rig in reconstruction.rigs.values():
                db.write_rig(rig, use_rig_id=True)
            next_camera_id = max(reconstruction.cameras, default=0) + 1
            next_rig_id = max(reconstruction.rigs, default=0) + 1
            next_frame_id = max(reconstruction.frames, default=0) + 1

            images: dict[int, pycolmap.Image] = {}
            extra_frames = []
            for image_id in image_ids:
                if image_id in reconstruction.images:
                    source = reconstruction.images[image_id]
                    image = pycolmap.Image(name=source.name, camera_id=source.camera_id, image_id=image_id)
                else:
                    i = image_id - 1
                    camera = _camera_from_prior(next_camera_id, prior.intrinsics[i], prior.image_sizes[i])
                    camera.has_prior_focal_length = True
                    db.write_camera(camera, use_camera_id=True)
                    rig = pycolmap.Rig(rig_id=next_rig_id)
                    rig.add_ref_sensor(camera.sensor_id)
                    db.write_rig(rig, use_rig_id=True)
                    image = pycolmap.Image(name=prior.image_names[i], camera_id=camera.camera_id, image_id=image_id)
                    frame = pycolmap.Frame(frame_id=next_frame_id, rig_id=next_rig_id)
                    frame.add_data_id(image.data_id)
                    extra_frames.append(frame)
                    next_camera_id, next_rig_id, next_frame_id = next_camera_id + 1, next_rig_id + 1, next_frame_id + 1
                db.write_image(image, use_image_id=True)
                images[image_id] = image
            for frame in reconstruction.frames.values():
                db.write_frame(frame, use_frame_id=True)
            for frame in extra_frames:
                db.write_frame(frame, use_frame_id=True)

            num_keypoints = 0
            for image_id, feats in zip(image_ids, features):
                keypoints = np.ascontiguousarray(feats.keypoints[:, :2], dtype=np.float32)
                db.write_keypoints(image_id, keypoints)
                num_keypoints += len(keypoints)
                _check_points2D(reconstruction, image_id, keypoints)

            num_matched = 0
            if raw_matches is not None:
                for (i, j), matches in zip(np.asarray(raw_matches.pairs), raw_matches.matches):
                    db.write_matches(int(i) + 1, int(j) + 1, np.ascontiguousarray(matches, dtype=np.uint32).reshape(-1, 2))
                    num_matched += 1

            num_verified = 0
            extent = _camera_spread(reconstruction)
            if verified is not None:
                for (i, j), matches in zip(np.asarray(verified.pairs), verified.matches):
                    id1, id2 = int(i) + 1, int(j) + 1
                    geometry = pycolmap.TwoViewGeometry()
                    geometry.config = int(pycolmap.TwoViewGeometryConfiguration.CALIBRATED)
                    geometry.inlier_matches = np.ascontiguousarray(matches, dtype=np.uint32).reshape(-1, 2)
                    if two_view_poses:
                        _set_relative_pose(geometry, reconstruction, id1, id2, extent)
                    db.write_two_view_geometry(id1, id2, geometry)
                    num_verified += 1

            num_priors, aligned = 0, False
            positions: dict[int, np.ndarray] = {}
            if prior is not None:
                centers, aligned = (
                    _aligned_prior_centers(prior, reconstruction, image_ids)
                    if align_pose_priors else (prior.centers(), False)
                )
                for image_id, center in zip(image_ids, centers):
                    pose_prior = pycolmap.PosePrior()
                    pose_prior.position = center
                    pose_prior.coordinate_system = pycolmap.PosePriorCoordinateSystem.CARTESIAN
                    pose_prior.corr_data_id = images[image_id].data_id
                    if pose_prior_std is not None:
                        pose_prior.position_covariance = np.eye(3) * float(pose_prior_std) ** 2
                    db.write_pose_prior(pose_prior)
                    positions[image_id] = np.asarray(center, dtype=np.float64)
                    num_priors += 1
        add_colmap3_columns(tmp, positions)
    return DatabaseReport(
        num_images=num_frames,
        num_keypoints=num_keypoints,
        num_matched_pairs=num_matched,
        num_verified_pairs=num_verified,
        num_pose_priors=num_priors,
        pose_priors_aligned=aligned,
    )


def add_colmap3_columns(path: Path | str, positions: dict[int, np.ndarray]) -> None:
    """Give a COLMAP 4 database the images columns COLMAP 3.x needs; `positions` (image id -> xyz) fill prior_t*.

    Plain SQL, since pycolmap knows only COLMAP 4's schema. Columns already there are kept.
    """
    with contextlib.closing(sqlite3.connect(str(path))) as connection, connection:
        existing = {row[1] for row in connection.execute("PRAGMA table_info(images)")}
        for column in COLMAP3_PRIOR_COLUMNS:
            if column not in existing:
                connection.execute(f"ALTER TABLE images ADD COLUMN {column} REAL")
        connection.executemany(
            "UPDATE images SET prior_tx = ?, prior_ty = ?, prior_tz = ? WHERE image_id = ?",
            [(*map(float, xyz), int(image_id)) for image_id, xyz in positions.items()],
        )


def _check_points2D(reconstruction: pycolmap.Reconstruction, image_id: int, keypoints: np.ndarray) -> None:
    """Warn when the model's 2D points are not our keypoints: triangulate_points then needs clear_points=True."""
    if image_id not in reconstruction.images:
        return
    points2D = reconstruction.images[image_id].points2D
    if len(points2D) == 0:
        return
    if len(points2D) != len(keypoints) or not np.allclose(
        np.array([p.xy for p in points2D]), keypoints, atol=1e-2
    ):
        logger.warning(
            "image %d: the model's 2D points differ from the database keypoints "
            "(use clear_points=True when triangulating from this database)", image_id
        )
