"""Reconstruction without VGGT predictions (`--prior none`): for photos without the 5 GB checkpoint or a GPU.

The same features as the prior-based run; pairs from every pair of images up to `pairs.exhaustive_max_images`,
beyond that from retrieval (`retrieval.py`: VLAD on a vocabulary trained on the collection); matching as
without a prior (SIFT: mutual nearest neighbours and the ratio test; ALIKED / DISK: LightGlue); verification by
COLMAP's RANSAC (`matching.verify_matches` with `verification="ransac"`, cameras guessed from the image size);
then COLMAP's mapper on a database of our keypoints and verified matches (`export/database.py`), incremental or
global (GLOMAP), through pycolmap. Its largest model goes through our refinement (`refine.py`: rounds of BA with
the principal point freed, re-triangulation from the verified matches) and the usual outputs. Frames the mapper
cannot register are reported by name; exports that need predicted depth are refused before any work.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pycolmap

from . import mapping as mapping_stage
from . import matching as matching_stage
from . import refine as refine_stage
from .cache import StageCache, stage_key
from .errors import UserError
from .export.database import write_database
from .log import quiet_pycolmap
from .pairs import exhaustive_pairs
from .retrieval import RetrievalConfig, global_descriptors, retrieval_pairs

if TYPE_CHECKING:
    from .config import PipelineConfig
    from .features import Features
    from .matching import PairMatches, VerifiedMatches

logger = logging.getLogger(__name__)

PRIORS = ("vggt", "none")
MAPPERS = ("incremental", "global")
# COLMAP's focal length for an image without EXIF: 1.2 x the longer side (a 45-degree-ish field of view).
DEFAULT_FOCAL_FACTOR = 1.2


@dataclass
class WithoutPriorConfig:
    """The stages that replace the prior when there is none (`prior = "none"`)."""

    mapper: str = "incremental"  # COLMAP's "incremental" mapper or "global" (GLOMAP)
    retrieval_neighbors: int = 20  # pairs per image from retrieval, beyond pairs.exhaustive_max_images images
    retrieval: RetrievalConfig = dataclasses.field(default_factory=RetrievalConfig)
    min_model_images: int = 2  # a smaller model is no reconstruction
    seed: int = 0  # the mapper's RANSAC and initial pair: the same run gives the same model


def check_request(config: PipelineConfig, predictions: Any = None, weights: Any = None, download: bool = False) -> None:
    """Refuse, before any work, a run without a prior that is asked for something only the prior gives."""
    if config.prior not in PRIORS:
        raise UserError(f"unknown prior {config.prior!r} (choose 'vggt' or 'none')")
    if config.prior != "none":
        return
    if config.without_prior.mapper not in MAPPERS:
        raise UserError(
            f"unknown mapper {config.without_prior.mapper!r} in without_prior.mapper (choose {' or '.join(MAPPERS)})"
        )
    if predictions is not None:
        raise UserError("--prior none reconstructs without predictions; drop --predictions (or --prior none)")
    if weights is not None or download:
        raise UserError("--prior none does not run VGGT; drop --weights / --download (or --prior none)")
    if config.output.dense_points > 0:
        raise UserError(
            "dense points (--dense-points / output.dense_points) come from VGGT's depth maps, which --prior none "
            "does not have; set --dense-points 0 or reconstruct with predictions"
        )
    if config.mapping.camera_model not in mapping_stage.CAMERA_MODELS:
        raise UserError(
            f"camera model {config.mapping.camera_model!r} is not supported; "
            f"use one of {', '.join(mapping_stage.CAMERA_MODELS)}"
        )


def select_pairs_without_prior(features: list[Features], config: PipelineConfig) -> tuple[np.ndarray, str]:
    """(P,2) pairs i<j and how they were chosen: all pairs up to `pairs.exhaustive_max_images`, else retrieval."""
    num = len(features)
    method = config.pairs.method
    if method not in ("auto", "prior", "exhaustive"):
        raise UserError(f"unknown pairing method {method!r} (choose auto or exhaustive)")
    if method == "exhaustive" or num <= max(config.pairs.exhaustive_max_images, 2):
        return exhaustive_pairs(num), "exhaustive"
    # "prior" (the default preset's) has no prior to pick by here: the nearest images by appearance instead.
    neighbors = config.without_prior.retrieval_neighbors
    vectors = global_descriptors([f.descriptors for f in features], config.without_prior.retrieval)
    return retrieval_pairs(vectors, neighbors), "retrieval"


def initial_cameras(features: list[Features], model: str, shared: bool) -> list[pycolmap.Camera]:
    """A camera per image (one object for all when `shared` and the sizes agree), from the image size alone:
    COLMAP's default focal length, the principal point at the centre, no distortion."""
    sizes = [tuple(int(v) for v in f.image_size) for f in features]
    if shared and len(set(sizes)) > 1:
        logger.warning("images have different sizes; using one camera per image instead of a shared camera")
        shared = False

    def camera(camera_id: int, size: tuple[int, int]) -> pycolmap.Camera:
        focal = DEFAULT_FOCAL_FACTOR * max(size)
        return pycolmap.Camera.create_from_model_name(camera_id, model, focal, size[0], size[1])

    if shared:
        return [camera(1, sizes[0])] * len(features)
    return [camera(i + 1, size) for i, size in enumerate(sizes)]


def _unposed_model(names: list[str], features: list[Features], cameras: list[pycolmap.Camera]) -> pycolmap.Reconstruction:
    """Cameras, rigs, frames and images (id = frame index + 1, our keypoints) without poses: the database's content."""
    rec = pycolmap.Reconstruction()
    for camera in {c.camera_id: c for c in cameras}.values():
        rec.add_camera_with_trivial_rig(camera)
    for index, (name, feats, camera) in enumerate(zip(names, features, cameras)):
        _add_unposed_image(rec, index, name, feats, camera.camera_id)
    return rec


def _add_unposed_image(rec: pycolmap.Reconstruction, index: int, name: str, features: Features, camera_id: int) -> None:
    """Image `index` (id index + 1) with our keypoints, in a trivial frame of its own that has no pose."""
    image = pycolmap.Image(
        name=name, keypoints=np.asarray(features.keypoints, dtype=np.float64), camera_id=camera_id, image_id=index + 1
    )
    rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d())
    rec.deregister_frame(rec.images[index + 1].frame_id)  # the model holds a copy: its frame id, not ours


def _guessed_focal(database: Path, cameras: list[pycolmap.Camera]) -> None:
    """Mark the focal lengths as guesses in the database: `write_database` marks them known (they come from a
    prior there), and COLMAP's mappers would then trust a focal length that is only 1.2 x the image size.
    (Measured: no difference on fountain, 0.061 vs 0.055 deg, nor on templeSR; kept as COLMAP marks a guess.)"""
    with pycolmap.Database.open(str(database)) as db:
        for camera in {c.camera_id: c for c in cameras}.values():
            stored = db.read_camera(camera.camera_id)
            stored.has_prior_focal_length = False
            db.update_camera(stored)


def _two_view_models(database: Path, features: list[Features], verified: VerifiedMatches, cameras: list[pycolmap.Camera],
                     config: PipelineConfig) -> None:
    """Give each verified pair its E / F / H and relative pose: the global mapper averages rotations from them,
    while `write_database` (which takes poses from a model) has none to give before mapping. RANSAC on the
    verified matches alone: they are inliers already, so it converges at once."""
    options = pycolmap.TwoViewGeometryOptions()
    options.compute_relative_pose = True
    options.ransac.max_error = config.matching.ransac_threshold_px
    options.ransac.random_seed = config.without_prior.seed
    options.min_num_inliers = config.matching.min_inliers
    with pycolmap.Database.open(str(database)) as db, quiet_pycolmap():
        for (i, j), matches in zip(verified.pairs, verified.matches):
            i, j = int(i), int(j)
            geometry = pycolmap.estimate_two_view_geometry(
                cameras[i], np.asarray(features[i].keypoints, dtype=np.float64),
                cameras[j], np.asarray(features[j].keypoints, dtype=np.float64),
                np.ascontiguousarray(matches, dtype=np.uint32), options,
            )  # fmt: skip
            db.update_two_view_geometry(i + 1, j + 1, geometry)


def map_with_colmap(
    images_dir: Path,
    names: list[str],
    features: list[Features],
    raw: PairMatches,
    verified: VerifiedMatches,
    config: PipelineConfig,
) -> pycolmap.Reconstruction:
    """COLMAP's mapper (incremental or global) on our keypoints and verified matches; the largest model.

    Raises UserError when no model of at least `without_prior.min_model_images` images comes out.
    """
    options = config.without_prior
    cameras = initial_cameras(features, config.mapping.camera_model, config.mapping.shared_camera)
    with tempfile.TemporaryDirectory(prefix="vggt_sfm_mapper_") as tmp:
        database = Path(tmp) / "database.db"
        write_database(database, _unposed_model(names, features, cameras), features, raw, verified, prior=None)
        _guessed_focal(database, cameras)
        if options.mapper == "global":
            _two_view_models(database, features, verified, cameras, config)
        output = Path(tmp) / "sparse"
        output.mkdir()
        with quiet_pycolmap():
            # A failing mapper logs ERROR lines; the UserError below says it in one line instead.
            pycolmap.logging.minloglevel = 3
            if options.mapper == "global":
                pipeline_options = pycolmap.GlobalPipelineOptions()
                pipeline_options.random_seed = options.seed
                pipeline_options.min_model_size = options.min_model_images
                models = pycolmap.global_mapping(database, images_dir, output, pipeline_options)
            else:
                pipeline_options = pycolmap.IncrementalPipelineOptions()
                pipeline_options.random_seed = options.seed
                pipeline_options.min_model_size = options.min_model_images
                pipeline_options.extract_colors = False  # coloured from the features afterwards
                models = pycolmap.incremental_mapping(database, images_dir, output, pipeline_options)
    models = [m for m in (models or {}).values() if m.num_reg_images() >= options.min_model_images]
    if not models:
        raise UserError(
            f"COLMAP's {options.mapper} mapper could not reconstruct {images_dir} from its "
            f"{verified.num_pairs} verified image pairs: the photos need more overlap (or use VGGT predictions)"
        )
    return max(models, key=lambda m: (m.num_reg_images(), m.num_points3D()))


def unregistered_names(reconstruction: pycolmap.Reconstruction, names: list[str]) -> list[str]:
    """The images (frame index + 1 = image id) that have no pose in `reconstruction`."""
    registered = set(reconstruction.reg_image_ids())
    return [name for index, name in enumerate(names) if index + 1 not in registered]


def _with_every_image(reconstruction: pycolmap.Reconstruction, names: list[str], features: list[Features]) -> pycolmap.Reconstruction:
    """The model with every image of the collection (unregistered ones without pose, each with a camera of its
    own), as the database export expects (`write_database` describes missing images only from a prior)."""
    missing = [i for i in range(len(names)) if not reconstruction.exists_image(i + 1)]
    if not missing:
        return reconstruction
    cameras = initial_cameras(features, "SIMPLE_PINHOLE", shared=False)
    next_camera_id = max(reconstruction.cameras, default=0) + 1
    for index in missing:
        camera = cameras[index]
        camera.camera_id = next_camera_id
        next_camera_id += 1
        reconstruction.add_camera_with_trivial_rig(camera)
        _add_unposed_image(reconstruction, index, names[index], features[index], camera.camera_id)
    return reconstruction


def reconstruct_without_prior(
    images_dir: Path,
    names: list[str],
    fingerprint: list,
    config: PipelineConfig,
    cache: StageCache,
    timer: Any,
    progress: bool,
) -> tuple[pycolmap.Reconstruction, Any, Any]:
    """Features -> pairs -> matches -> RANSAC -> COLMAP's mapper -> our refinement, as `pipeline.run` wires it.

    Returns the refined model, its ReconstructionSummary (with `prior: none` and the unregistered images) and
    the StageResults the outputs need.
    """
    from .pipeline import (
        ReconstructionSummary, StageResults, _report_dict, cached_features, cached_matches,
        reconstruction_summary_numbers,
    )  # fmt: skip

    def cached(stage: str, key: str, compute):
        return timer.run_cached(stage, cache, key, compute)

    # The same features (and cache key) as with a prior.
    features, features_key = cached_features(images_dir, names, fingerprint, config, cache, timer, progress)
    with timer.stage("pairs"):
        pairs, pairs_method = select_pairs_without_prior(features, config)
    # Without a prior the epipolar guidance has nothing to follow: "auto" picks the unguided matcher.
    matching_config = dataclasses.replace(
        config.matching,
        matcher="auto" if config.matching.matcher == "guided" else config.matching.matcher,
        verification="ransac" if config.matching.verification == "prior" else config.matching.verification,
    )
    matches_key = stage_key("matches", features_key, pairs.tolist(), matching_config, None)
    raw = cached_matches(
        matches_key, names, cache, timer,
        lambda store: matching_stage.match_pairs(features, pairs, matching_config, progress=progress, store=store),
    )  # fmt: skip
    verify_key = stage_key("verification", matches_key, matching_config, "no prior")
    verified = cached(
        "verification",
        verify_key,
        lambda: matching_stage.verify_matches(features, raw, None, matching_config, progress=progress),
    )
    if verified.num_pairs == 0:
        raise UserError(
            f"no two images of {images_dir} could be matched ({len(pairs)} pairs tried, none with "
            f"{matching_config.min_inliers} verified matches): the photos must show the same scene with overlap"
        )
    with timer.stage("mapping"):
        reconstruction = map_with_colmap(images_dir, names, features, raw, verified, config)
    unregistered = unregistered_names(reconstruction, names)
    if unregistered:
        logger.warning("COLMAP's mapper could not register %d image(s): %s", len(unregistered), ", ".join(unregistered))
    refine_report = None
    if config.refine.enabled:
        with timer.stage("bundle adjustment"), quiet_pycolmap():
            refine_report = refine_stage.refine_reconstruction(
                reconstruction, config.refine, verified=verified, features=features
            )
    if config.output.database:
        # After refinement: a camera without registered views would keep refine from freeing the principal point.
        reconstruction = _with_every_image(reconstruction, names, features)
    if config.mapping.extract_colors:
        mapping_stage.color_points(reconstruction, features)
    numbers = reconstruction_summary_numbers(reconstruction)
    summary = ReconstructionSummary(
        num_images=len(names),
        cached_stages=timer.cached,
        bundle_adjusted=config.refine.enabled,
        prior="none",
        unregistered=unregistered,
        details={
            "pairs": int(len(pairs)),
            "pairs_method": pairs_method,
            "verified_pairs": int(verified.num_pairs),
            "mapper": config.without_prior.mapper,
            "refine": _report_dict(refine_report),
        },
        **numbers,
    )
    return reconstruction, summary, StageResults(features, raw, verified, None)

