"""A real scene for the export tests, built once per test session.

Middlebury templeSR (16 real photos, gantry-calibrated cameras) through the pipeline's own stages: COLMAP SIFT
keypoints (features), pairs chosen from the cameras (pairs), nearest-neighbour ratio matches (matching); as
verified matches, the raw matches that agree with the TRUE epipolar geometry (Sampson distance under 2 px).
The prior is the true cameras in another frame and scale with centre noise, as a prediction would be.
`temple_model()` is the true cameras with points triangulated by COLMAP from our database: a real
reconstruction to export.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
from scipy.spatial.transform import Rotation

from vggt_sfm.evaluation.metrics import read_ground_truth
from vggt_sfm.export.database import write_database
from vggt_sfm.features import FeatureConfig, Features, extract_features
from vggt_sfm.log import quiet_pycolmap
from vggt_sfm.matching import MatchingConfig, PairMatches, fundamental_from_cameras, match_pairs, sampson_distances
from vggt_sfm.pairs import PairsConfig, select_pairs
from vggt_sfm.prior import PriorCameras

TEMPLE = Path(__file__).resolve().parents[1] / "data" / "templeSR"
MAX_SAMPSON_PX = 2.0

# The prior's world: world_prior = PRIOR_SCALE * PRIOR_ROTATION @ world + PRIOR_TRANSLATION.
PRIOR_SCALE = 3.7
PRIOR_ROTATION = Rotation.from_rotvec([0.3, -1.1, 0.4]).as_matrix()
PRIOR_TRANSLATION = np.array([0.5, -2.0, 1.0])
PRIOR_CENTER_NOISE = 0.005  # in ground-truth units, before the scale


@dataclass
class TempleScene:
    images_dir: Path
    ground_truth: pycolmap.Reconstruction  # image id = frame index + 1, names sorted
    names: list[str]
    features: list[Features]
    raw: PairMatches
    verified: PairMatches  # the raw matches consistent with the true cameras
    prior: PriorCameras


def temporary_folder() -> Path:
    """A folder removed when the test session ends."""
    path = Path(tempfile.mkdtemp(prefix="vggt-sfm-export-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def prior_from_truth(gt: pycolmap.Reconstruction, seed: int = 0) -> PriorCameras:
    """The true cameras in the prior's frame and scale, with noisy centres."""
    rng = np.random.default_rng(seed)
    ids = sorted(gt.images)
    poses, K, sizes = [], [], []
    for image_id in ids:
        image = gt.images[image_id]
        camera = gt.cameras[image.camera_id]
        pose = image.cam_from_world().matrix()
        R = pose[:, :3] @ PRIOR_ROTATION.T
        center = image.projection_center() + rng.normal(scale=PRIOR_CENTER_NOISE, size=3)
        center_prior = PRIOR_SCALE * PRIOR_ROTATION @ center + PRIOR_TRANSLATION
        poses.append(np.c_[R, -R @ center_prior])
        K.append(camera.calibration_matrix())
        sizes.append((camera.width, camera.height))
    return PriorCameras(
        image_names=[gt.images[i].name for i in ids],
        image_sizes=np.array(sizes),
        cam_from_world=np.array(poses),
        intrinsics=np.array(K),
    )


@functools.lru_cache(maxsize=1)
def temple_scene() -> TempleScene:
    gt = pycolmap.Reconstruction(str(TEMPLE / "gt"))
    ids = sorted(gt.images)
    names = [gt.images[i].name for i in ids]
    assert ids == list(range(1, len(ids) + 1)) and names == sorted(names)
    true_cameras = read_ground_truth(gt)
    features = extract_features(
        TEMPLE / "images", names, FeatureConfig(extractor="sift", max_keypoints=2048), progress=False
    )
    pairs = select_pairs(true_cameras, PairsConfig(method="prior", num_neighbors=5))
    raw = match_pairs(features, pairs, MatchingConfig(matcher="nn-ratio", ratio=0.95, max_distance=1.0), progress=False)
    verified = PairMatches(pairs=np.zeros((0, 2), dtype=np.int64), matches=[])
    kept = []
    for (i, j), matches in zip(raw.pairs, raw.matches):
        F = fundamental_from_cameras(true_cameras, i, j)
        distances = sampson_distances(features[i].keypoints[matches[:, 0]], features[j].keypoints[matches[:, 1]], F)
        inliers = matches[distances < MAX_SAMPSON_PX]
        if len(inliers) >= 15:
            kept.append((i, j))
            verified.matches.append(inliers)
    verified.pairs = np.array(kept, dtype=np.int64).reshape(-1, 2)
    return TempleScene(TEMPLE / "images", gt, names, features, raw, verified, prior_from_truth(gt))


@functools.lru_cache(maxsize=1)
def temple_database() -> Path:
    """Our database of the scene (written once; tests copy it before COLMAP writes to it)."""
    scene = temple_scene()
    path = temporary_folder() / "database.db"
    write_database(path, scene.ground_truth, scene.features, scene.raw, scene.verified, scene.prior)
    return path


@functools.lru_cache(maxsize=1)
def _temple_model_dir() -> Path:
    scene = temple_scene()
    output = temporary_folder() / "triangulated"
    output.mkdir()
    database = output.parent / "database.db"
    shutil.copyfile(temple_database(), database)
    with quiet_pycolmap():
        pycolmap.triangulate_points(scene.ground_truth, str(database), str(scene.images_dir), str(output))
    return output


def temple_model() -> pycolmap.Reconstruction:
    """True cameras with COLMAP-triangulated points from our matches (a fresh copy for each caller)."""
    return pycolmap.Reconstruction(str(_temple_model_dir()))
