"""Feature extraction on real photos: the pixel convention, the resolution mapping, the extractors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from vggt_sfm.errors import UserError
from vggt_sfm.features import FeatureConfig, extract_features, extract_image, presets
from vggt_sfm.images import read_image

TEMPLE = Path(__file__).resolve().parents[1] / "data" / "templeSR" / "images"


@pytest.fixture(scope="module")
def temple_image() -> np.ndarray:
    return read_image(TEMPLE / "templeSR0001.png")


def _inside(features) -> bool:
    width, height = features.image_size
    x, y = features.keypoints[:, 0], features.keypoints[:, 1]
    return bool(np.all((x >= 0) & (x <= width) & (y >= 0) & (y <= height)))


@pytest.mark.parametrize("extractor,backend", [("aliked", "pycolmap"), ("sift", "pycolmap"), ("sift", "opencv")])
def test_upscaled_image_gives_the_same_keypoints_scaled(temple_image, extractor, backend):
    # A 2x pixel-replicated image, downscaled back by the extractor, is the original image again: its keypoints
    # must be exactly twice the original's in COLMAP's corner-origin convention (integer-centre keypoints
    # scaled without the +0.5 would be off by half a pixel).
    height, width = temple_image.shape[:2]
    config = FeatureConfig(extractor=extractor, resize_max=None, max_keypoints=1024, sift_backend=backend)
    small = extract_image(temple_image, config)
    big_image = np.repeat(np.repeat(temple_image, 2, axis=0), 2, axis=1)
    big_config = FeatureConfig(extractor=extractor, resize_max=max(width, height), max_keypoints=1024, sift_backend=backend)
    big = extract_image(big_image, big_config)
    assert big.image_size == (2 * width, 2 * height)
    assert small.num_keypoints > 300 and big.num_keypoints == small.num_keypoints
    distance, _ = cKDTree(2.0 * small.keypoints).query(big.keypoints)
    assert np.median(distance) < 1e-3
    assert np.mean(distance < 0.05) > 0.95
    assert _inside(small) and _inside(big)


@pytest.mark.parametrize("backend", ["pycolmap", "opencv"])
def test_sift_keypoints_of_a_mirrored_image_mirror_about_the_image_edge(temple_image, backend):
    # In COLMAP's convention a mirror maps x to W - x (with integer pixel centres it would be W - 1 - x).
    width = temple_image.shape[1]
    config = FeatureConfig(extractor="sift", resize_max=None, max_keypoints=2048, sift_backend=backend)
    original = extract_image(temple_image, config)
    mirrored = extract_image(np.ascontiguousarray(temple_image[:, ::-1]), config)
    mapped = mirrored.keypoints.copy()
    mapped[:, 0] = width - mapped[:, 0]
    distance, _ = cKDTree(original.keypoints).query(mapped)
    assert np.mean(distance < 0.05) > 0.8
    assert np.allclose(np.linalg.norm(original.descriptors, axis=1), 1.0, atol=1e-5)
    assert original.extractor == "sift" and original.num_keypoints <= 2048


def test_opencv_sift_finds_colmaps_keypoints_at_the_same_pixels(temple_image):
    # Two implementations of one detector with one convention: most keypoints coincide to a fraction of a pixel
    # (a quarter-pixel shift of the upsampled octave, or a missing +0.5, would move them all).
    colmap = extract_image(temple_image, FeatureConfig(extractor="sift", resize_max=None, max_keypoints=2048))
    opencv = extract_image(
        temple_image, FeatureConfig(extractor="sift", resize_max=None, max_keypoints=2048, sift_backend="opencv")
    )
    distance, _ = cKDTree(colmap.keypoints).query(opencv.keypoints)
    assert opencv.num_keypoints > 0.5 * colmap.num_keypoints
    assert np.mean(distance < 0.25) > 0.9  # measured 0.97
    assert np.median(distance[distance < 1.0]) < 0.01  # measured 1e-4 (0.71 with the +0.5 missing)
    # RootSIFT descriptors, unit norm and non-negative, as COLMAP's.
    assert np.allclose(np.linalg.norm(opencv.descriptors, axis=1), 1.0, atol=1e-5)
    assert opencv.descriptors.min() >= 0


def test_keypoint_colours_are_the_pixels_under_the_keypoints(temple_image):
    features = extract_image(temple_image, FeatureConfig(extractor="sift", resize_max=320, max_keypoints=512))
    col = np.floor(features.keypoints[:, 0]).astype(int)
    row = np.floor(features.keypoints[:, 1]).astype(int)
    assert features.colors.shape == (features.num_keypoints, 3) and features.colors.dtype == np.uint8
    assert np.array_equal(features.colors, temple_image[row, col])


def test_downscaled_extraction_maps_back_to_original_pixels(temple_image):
    # Detection at half resolution must find the same structures as at full resolution, in original pixels.
    full = extract_image(temple_image, FeatureConfig(resize_max=None, max_keypoints=1024))
    half = extract_image(temple_image, FeatureConfig(resize_max=320, max_keypoints=512))
    assert half.image_size == full.image_size == (640, 480)
    assert half.resize_scale == pytest.approx(2.0)
    assert _inside(half)
    distance, _ = cKDTree(full.keypoints).query(half.keypoints)
    # Localisation at half resolution is about a detector pixel (2 original pixels); a shifted mapping would not
    # put most keypoints within 1.5 px of a full-resolution one.
    assert np.median(distance) < 1.5


def test_extract_features_reads_the_folder_in_order(tmp_path, temple_image):
    names = ["b.png", "a.jpg"]
    shutil.copy(TEMPLE / "templeSR0002.png", tmp_path / "b.png")
    # An EXIF-rotated JPEG: features must refer to the upright pixels (read_image applies the orientation).
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(temple_image, k=1)))  # stored 480x640
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": back to 640x480
    rotated.save(tmp_path / "a.jpg", exif=exif, quality=95)
    config = FeatureConfig(extractor="aliked", max_keypoints=300, resize_max=400)
    features = extract_features(tmp_path, names, config, progress=False)
    assert [f.image_size for f in features] == [(640, 480), (640, 480)]
    for f in features:
        assert 50 < f.num_keypoints <= 300
        assert f.keypoints.dtype == np.float64 and f.descriptors.dtype == np.float32
        assert f.descriptors.shape == (f.num_keypoints, 128) and f.scores.shape == (f.num_keypoints,)
        assert np.all(np.diff(f.scores) <= 0)  # strongest first
        assert _inside(f)


def test_bad_configuration_is_a_user_error():
    with pytest.raises(UserError, match="unknown feature extractor"):
        extract_features(TEMPLE, ["templeSR0001.png"], FeatureConfig(extractor="superpoint"), progress=False)
    with pytest.raises(UserError, match="max_keypoints must be positive"):
        extract_image(np.zeros((64, 64, 3), np.uint8), FeatureConfig(**{**presets["sift"], "max_keypoints": 0}))
    with pytest.raises(UserError, match="unknown SIFT backend"):
        extract_image(np.zeros((64, 64, 3), np.uint8), FeatureConfig(extractor="sift", sift_backend="vlfeat"))
