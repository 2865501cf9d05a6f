"""The main job: images + VGGT predictions -> features -> matches -> tracks -> bundle-adjusted COLMAP model.

Each stage is a function of its own module; this module only wires them, caches the expensive results in the
output folder so that a rerun resumes, and writes the outputs atomically: everything goes to a hidden
`.NAME.partial` folder beside the output, renamed to the output at the very end, so a crash or Ctrl-C never
leaves a half-written `sparse/0`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pycolmap

from . import features as features_stage
from . import mapping as mapping_stage
from . import matching as matching_stage
from . import pairs as pairs_stage
from . import prior_free
from . import refine as refine_stage
from . import tracks as tracks_stage
from .cache import StageCache, file_fingerprint, stage_key
from .config import PipelineConfig, load_preset
from .errors import UserError
from .images import ImageInfo, list_images, scan_images
from .log import quiet_pycolmap
from .outputs import check_output_requirements, write_outputs
from .predictions import Predictions, load_predictions, match_images
from .prior import PriorCameras, prior_from_predictions

logger = logging.getLogger(__name__)

RESULT_FILES = ("sparse", "summary.json", "points3D.ply")


@dataclass
class ReconstructionSummary:
    """What a run produced, written to `summary.json` and printed at the end."""

    num_images: int
    num_registered: int
    num_points: int
    mean_track_length: float
    mean_reprojection_error: float
    mean_observations_per_image: float
    not_refined: list[str] = field(default_factory=list)  # kept their predicted pose: too few verified matches
    relocalized: list[str] = field(default_factory=list)  # prior pose disagreed with the matches; re-estimated
    skipped_images: list[str] = field(default_factory=list)  # unreadable
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cached_stages: list[str] = field(default_factory=list)
    bundle_adjusted: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    prior: str = "vggt"  # "none": COLMAP's mapper initialised the model (prior_free.py)
    unregistered: list[str] = field(default_factory=list)  # no prior: images COLMAP's mapper could not register

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A short human summary of the run."""
        lines = [
            f"registered {self.num_registered}/{self.num_images} images, {self.num_points} points, "
            f"mean track length {self.mean_track_length:.2f}, "
            f"mean reprojection error {self.mean_reprojection_error:.3f} px"
            + ("" if self.bundle_adjusted else " (no bundle adjustment)"),
        ]
        if self.prior == "none":
            lines.append("prior: none (COLMAP's mapper on our matches, no VGGT predictions)")
        if self.unregistered:
            lines.append(f"NOT registered (COLMAP's mapper could not place them): {', '.join(self.unregistered)}")
        if self.not_refined:
            lines.append(
                f"NOT refined (too few verified matches, predicted pose kept): {', '.join(self.not_refined)}"
            )
        if self.relocalized:
            lines.append(f"re-localised (prior pose disagreed with matches): {', '.join(self.relocalized)}")
        if self.skipped_images:
            lines.append(f"skipped unreadable images: {', '.join(self.skipped_images)}")
        times = ", ".join(
            f"{name} {seconds:.1f}s" + (" (cached)" if name in self.cached_stages else "")
            for name, seconds in self.stage_seconds.items()
        )
        lines.append(f"time: {times}; total {sum(self.stage_seconds.values()):.1f}s")
        return "\n".join(lines)


@dataclass
class StageResults:
    """The intermediate results the outputs need (database, dense points)."""

    features: list
    raw_matches: Any
    verified_matches: Any
    tracks: Any


@dataclass
class ReconstructionResult:
    """The refined model, its summary, and the output folder (None when nothing was written)."""

    reconstruction: pycolmap.Reconstruction
    summary: ReconstructionSummary
    output: Path | None = None


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        logger.info("%s ...", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _prepare_output(output: Path, overwrite: bool) -> Path:
    """The hidden work folder for this run; refuses to touch existing results without `overwrite`."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"output folder {output} already holds results; pass --overwrite or choose another --output")
    work = output.parent / f".{output.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    # An interrupted run leaves its cache (to resume from) and possibly half-written files (to discard).
    for leftover in work.iterdir():
        if leftover.name != "cache":
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    old_cache = output / "cache"
    if overwrite and old_cache.is_dir() and not (work / "cache").exists():
        shutil.copytree(old_cache, work / "cache")
    return work


def _commit_output(work: Path, output: Path) -> None:
    """Swap the finished work folder into place; the old results (if any) go only after the new ones are there."""
    trash = None
    if output.exists():
        trash = output.parent / f".{output.name}.old-{int(time.time())}"
        output.rename(trash)
    work.rename(output)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _load_inputs(
    images_dir: Path, predictions: Predictions | str | Path | None, config: PipelineConfig
) -> tuple[list[ImageInfo], list[str], Predictions | Path | None]:
    names = list_images(images_dir)
    infos = scan_images(images_dir, names, min_images=2)
    readable = {info.name for info in infos}
    skipped = [n for n in names if n not in readable]
    if predictions is None or isinstance(predictions, Predictions):
        return infos, skipped, predictions
    path = Path(predictions)
    sizes = {info.name: (info.width, info.height) for info in infos} if not skipped else None
    loaded = load_predictions(path, image_sizes=sizes, preprocess=config.predict.preprocess)
    return infos, skipped, _check_names(loaded, names, path)


def _check_names(predictions: Predictions, names: list[str], source: Path | str) -> Predictions:
    extra = sorted(set(predictions.image_names) - set(names))
    if extra:
        raise UserError(
            f"predictions {source} name {len(extra)} image(s) not in the images folder, e.g. {extra[0]} "
            "(check --images or predict again)"
        )
    return predictions


def _predict(images_dir: Path, config: PipelineConfig, weights: str | Path | None, download: bool, progress: bool) -> Predictions:
    from .predict import predict

    return predict(
        images_dir,
        weights=weights,
        download=download,
        device=config.predict.device,
        dtype=config.predict.dtype,
        preprocess=config.predict.preprocess,
        progress=progress,
        window=config.predict.window,
        window_overlap=config.predict.window_overlap,
    )


def reconstruction_summary_numbers(reconstruction: pycolmap.Reconstruction) -> dict[str, float]:
    """Registered images, points, mean track length, mean reprojection error and observations per image."""
    reconstruction.update_point_3d_errors()
    num_points = reconstruction.num_points3D()
    registered = reconstruction.num_reg_images()
    return {
        "num_registered": registered,
        "num_points": num_points,
        "mean_track_length": float(reconstruction.compute_mean_track_length()) if num_points else 0.0,
        "mean_reprojection_error": float(reconstruction.compute_mean_reprojection_error()) if num_points else 0.0,
        "mean_observations_per_image": float(reconstruction.compute_mean_observations_per_reg_image())
        if registered
        else 0.0,
    }


def run(
    images_dir: str | Path,
    predictions: Predictions | str | Path | None = None,
    output: str | Path | None = None,
    config: PipelineConfig | None = None,
    overwrite: bool = False,
    weights: str | Path | None = None,
    download: bool = False,
    progress: bool = True,
    prior: str | None = None,
) -> ReconstructionResult:
    """Reconstruct a folder of images, initialised by VGGT predictions (a file, a Predictions, or run VGGT).

    Without `config`, the `default` preset (`pipelines/default.toml`) is used, as on the command line.

    With `output`, writes `sparse/0/` (binary model), `points3D.ply`, `summary.json` (and the extras the config
    asks for) atomically, caching every stage's result under `output/cache/` so that a rerun resumes.

    `prior="none"` (or `config.prior`) reconstructs without VGGT: COLMAP's mapper on our matches (prior_free.py).
    """
    config = config or load_preset("default")  # the same run as the command line's default
    config = replace(config, prior=prior) if prior is not None else config
    prior_free.check_request(config, predictions, weights, download)
    images_dir = Path(images_dir)
    timer = _Timer()
    output_path = Path(output) if output is not None else None
    work = _prepare_output(output_path, overwrite) if output_path is not None else None
    cache = StageCache(work / "cache" if work is not None else None)

    with timer.stage("images"):
        infos, skipped, loaded = _load_inputs(images_dir, predictions, config)
    names = [info.name for info in infos]
    fingerprint = file_fingerprint([images_dir / n for n in names])

    if config.prior == "none":
        prior, predictions_used = None, None
        reconstruction, summary, stages = prior_free.reconstruct_without_prior(
            images_dir, names, fingerprint, config, cache, timer, progress
        )
    else:
        with timer.stage("predictions"):
            if loaded is None:
                key = stage_key("predictions", fingerprint, config.predict)
                loaded, was_cached = cache.get_or_compute(
                    key, lambda: _predict(images_dir, config, weights, download, progress)
                )
                if was_cached:
                    timer.cached.append("predictions")
                loaded = _check_names(loaded, names + skipped, "VGGT")
            predictions_used = match_images(loaded, names, "predictions")
        if work is not None:
            check_output_requirements(config, predictions_used)
        image_sizes = np.array([[info.width, info.height] for info in infos])
        prior = prior_from_predictions(predictions_used, image_sizes)

        reconstruction, summary, stages = _reconstruct_from_prior(
            images_dir, names, fingerprint, prior, predictions_used, config, cache, timer, progress
        )
    summary.skipped_images = skipped

    if work is not None:
        with timer.stage("write"):
            summary.details["outputs"] = write_outputs(
                work, reconstruction, config, images_dir, prior, predictions_used, stages
            )
        summary.stage_seconds = dict(timer.seconds)
        (work / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
        _commit_output(work, output_path)
    summary.stage_seconds = dict(timer.seconds)
    return ReconstructionResult(reconstruction=reconstruction, summary=summary, output=output_path)


def _reconstruct_from_prior(
    images_dir: Path,
    names: list[str],
    fingerprint: list,
    prior: PriorCameras,
    predictions: Predictions,
    config: PipelineConfig,
    cache: StageCache,
    timer: _Timer,
    progress: bool,
) -> tuple[pycolmap.Reconstruction, ReconstructionSummary, StageResults]:
    def cached(stage: str, key: str, compute):
        with timer.stage(stage):
            result, was_cached = cache.get_or_compute(key, compute)
        if was_cached:
            timer.cached.append(stage)
        return result

    features_key = stage_key("features", fingerprint, config.features)
    features = cached(
        "features",
        features_key,
        lambda: features_stage.extract_features(images_dir, names, config.features, progress=progress),
    )
    with timer.stage("pairs"):
        pairs = pairs_stage.select_pairs(prior, config.pairs)
    # Guided matching searches along the prior's epipolar lines (and its LightGlue fallback picks pairs by the
    # prior's overlap), so only then is the prior part of the key.
    matcher = matching_stage.resolve_matcher(config.features.extractor, config.matching.matcher, has_prior=True)
    prior_used = [prior.cam_from_world.tolist(), prior.intrinsics.tolist()] if matcher == "guided" else None
    matches_key = stage_key("matches", features_key, pairs.tolist(), config.matching, prior_used)
    raw = cached(
        "matching",
        matches_key,
        lambda: matching_stage.match_pairs(features, pairs, config.matching, progress=progress, prior=prior),
    )
    verify_key = stage_key(
        "verification", matches_key, config.matching, prior.cam_from_world.tolist(), prior.intrinsics.tolist()
    )
    verified = cached(
        "verification", verify_key, lambda: matching_stage.verify_matches(features, raw, prior, config.matching)
    )
    with timer.stage("tracks"):
        tracks = tracks_stage.build_tracks(verified, [len(f.keypoints) for f in features], config.tracks)
    with timer.stage("initialization"), quiet_pycolmap():
        reconstruction, mapping_report = mapping_stage.initialize_reconstruction(
            prior, features, tracks, predictions, config.mapping
        )
    refine_report = None
    if config.refine.enabled:
        with timer.stage("bundle adjustment"), quiet_pycolmap():
            refine_report = refine_stage.refine_reconstruction(
                reconstruction,
                config.refine,
                tracks=tracks,
                features=features,
                verified=verified,
                constant_images=_image_ids(names, mapping_report.not_refined),
            )
            if config.mapping.extract_colors:
                mapping_stage.color_points(reconstruction, features)  # points made by re-triangulation
    numbers = reconstruction_summary_numbers(reconstruction)
    summary = ReconstructionSummary(
        num_images=len(names),
        not_refined=list(mapping_report.not_refined),
        relocalized=list(mapping_report.relocalized),
        cached_stages=timer.cached,
        bundle_adjusted=config.refine.enabled,
        details={
            "pairs": int(len(pairs)),
            "verified_pairs": int(sum(len(m) > 0 for m in verified.matches)),
            "tracks": int(tracks.num_tracks),
            "mapping": _report_dict(mapping_report),
            "refine": _report_dict(refine_report),
        },
        **numbers,
    )
    return reconstruction, summary, StageResults(features, raw, verified, tracks)


def _image_ids(names: list[str], subset: list[str]) -> list[int]:
    index = {name: i + 1 for i, name in enumerate(names)}
    return [index[n] for n in subset if n in index]


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    try:
        values = asdict(report)
    except TypeError:
        return {"report": repr(report)}
    return json.loads(json.dumps(values, default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v)))


def reconstruct(
    images_dir: str | Path,
    predictions: Predictions | str | Path | None = None,
    output: str | Path | None = None,
    config: PipelineConfig | None = None,
    **kwargs: Any,
) -> pycolmap.Reconstruction:
    """Reconstruct a folder of images and return the refined `pycolmap.Reconstruction` (see `run`)."""
    return run(images_dir, predictions=predictions, output=output, config=config, **kwargs).reconstruction
