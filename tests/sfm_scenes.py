"""Small real scenes for the geometry tests: SIFT correspondences on real photos, checked by the true cameras.

A scene is a few images of a shipped data set (downscaled into a temporary folder where needed), their
ground-truth cameras scaled alike, COLMAP SIFT features (pycolmap), mutual-nearest-neighbour + ratio matches
(`matching.mutual_nn_ratio`), and of those the matches whose Sampson error under the TRUE epipolar geometry is
small: an honest stand-in for verified matches (real keypoint noise, real coverage, no outliers beyond the
threshold). Scenes are built once per test session.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from PIL import Image

from vggt_sfm.evaluation.metrics import read_ground_truth
from vggt_sfm.evaluation.simulate import simulate_prior
from vggt_sfm.features import Features, keypoint_colors
from vggt_sfm.matching import VerifiedMatches, fundamental_from_cameras, mutual_nn_ratio, sampson_distances
from vggt_sfm.prior import PriorCameras, prior_from_predictions
from vggt_sfm.tracks import Tracks, build_tracks

DATA = Path(__file__).resolve().parents[1] / "data"
FIXTURES = Path(__file__).parent / "fixtures"
# Per data set: its ground-truth model and its images. The fountain's six scene images are shipped at 1024 px in
# tests/fixtures (made from the 3072 px originals of shared/datasets/strecha_fountain_p11 as `load_scene` made
# them, see fixtures/README.md), so that the scene is the same with or without the shared folder.
SOURCES = {"fountain": (DATA / "fountain" / "gt", FIXTURES / "fountain_1024")}
# Six fountain images at 1024 px: ~2k SIFT keypoints each, ~2k tracks; the scene the geometry tests share.
FOUNTAIN = ("fountain", tuple(f"{i:04d}.jpg" for i in range(6)), 1024)


@dataclass
class Scene:
    images_dir: Path
    gt: PriorCameras  # true cameras at the scene's resolution, sorted by name
    features: list[Features]
    verified: VerifiedMatches


def _scaled_ground_truth(dataset: str, names: list[str], max_size: int) -> tuple[PriorCameras, float]:
    gt = read_ground_truth(SOURCES[dataset][0])
    index = {n: i for i, n in enumerate(gt.image_names)}
    order = [index[n] for n in names]
    sizes = gt.image_sizes[order]
    scale = min(1.0, max_size / float(sizes.max()))
    new_sizes = np.round(sizes * scale).astype(int)
    K = gt.intrinsics[order].copy()
    # COLMAP convention: pixel corner at 0, so scaling the coordinates scales K's first two rows exactly.
    K[:, 0, :] *= (new_sizes[:, 0] / sizes[:, 0])[:, None]
    K[:, 1, :] *= (new_sizes[:, 1] / sizes[:, 1])[:, None]
    return PriorCameras(names, new_sizes, gt.cam_from_world[order], K), scale


def _sift(image: np.ndarray, max_features: int) -> tuple[np.ndarray, np.ndarray]:
    options = pycolmap.FeatureExtractionOptions()
    options.num_threads = 1
    options.sift.max_num_features = max_features
    options.sift.first_octave = 0  # no upsampling: 4x faster, enough keypoints at this size
    with warnings.catch_warnings():  # pycolmap.Sift is deprecated, but it is the one returning numpy arrays
        warnings.simplefilter("ignore", DeprecationWarning)
        sift = pycolmap.Sift(options, pycolmap.Device.cpu)
    keypoints, descriptors = sift.extract(np.ascontiguousarray(image))
    descriptors = descriptors.astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True) + 1e-12
    return keypoints[:, :2].astype(np.float64), descriptors


@functools.lru_cache(maxsize=None)
def load_scene(
    dataset: str, names: tuple[str, ...], max_size: int = 768, max_features: int = 3072, max_epipolar_px: float = 2.0
) -> Scene:
    """A scene of the named images (sorted), matched exhaustively and filtered by the true epipolar geometry."""
    names = sorted(names)
    gt, _ = _scaled_ground_truth(dataset, names, max_size)
    images_dir = Path(tempfile.mkdtemp(prefix=f"vggt_sfm_{dataset}_"))
    atexit.register(shutil.rmtree, images_dir, ignore_errors=True)
    features = []
    for name, (width, height) in zip(names, gt.image_sizes):
        source = SOURCES[dataset][1] / name
        image = Image.open(source)
        image.draft("RGB", (int(width), int(height)))  # JPEG: decode at reduced scale, much faster
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((int(width), int(height)), Image.LANCZOS)
            image.save(images_dir / name, quality=95)
        else:
            shutil.copyfile(source, images_dir / name)
        keypoints, descriptors = _sift(np.asarray(image.convert("L")), max_features)
        features.append(
            Features(
                keypoints,
                descriptors,
                np.ones(len(keypoints), np.float32),
                (int(width), int(height)),
                "sift",
                colors=keypoint_colors(np.asarray(image), keypoints),
            )
        )

    pairs, matches, num_raw = [], [], []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            raw, _ = mutual_nn_ratio(features[i].descriptors, features[j].descriptors, ratio=0.85)
            errors = sampson_distances(
                features[i].keypoints[raw[:, 0]], features[j].keypoints[raw[:, 1]], fundamental_from_cameras(gt, i, j)
            )
            inliers = raw[errors < max_epipolar_px]
            if len(inliers) >= 15:
                pairs.append((i, j))
                matches.append(inliers)
                num_raw.append(len(raw))
    verified = VerifiedMatches(
        np.array(pairs, dtype=int).reshape(-1, 2), matches, ["prior"] * len(pairs), np.array(num_raw)
    )
    return Scene(images_dir, gt, features, verified)


def without_image(verified: VerifiedMatches, image: int) -> VerifiedMatches:
    """The verified matches minus every pair that involves `image`."""
    keep = ~(verified.pairs == image).any(axis=1)
    return VerifiedMatches(
        verified.pairs[keep],
        [m for m, k in zip(verified.matches, keep) if k],
        [m for m, k in zip(verified.method, keep) if k],
        verified.num_raw[keep],
    )


def simulated_prior(scene: Scene, seed: int = 1, outliers: Sequence[int] = ()) -> PriorCameras:
    """A VGGT-level prior of the scene (`evaluation.simulate`): 2 deg, 3 % centre, 5 % focal noise."""
    return prior_from_predictions(simulate_prior(scene.gt, "vggt", seed=seed, outliers=outliers), scene.gt.image_sizes)


@pytest.fixture(scope="module")
def scene() -> Scene:
    """The shared fountain scene (import this fixture into a test module to use it)."""
    return load_scene(*FOUNTAIN)


@pytest.fixture(scope="module")
def tracks(scene: Scene) -> Tracks:
    return build_tracks(scene.verified, [len(f.keypoints) for f in scene.features])
