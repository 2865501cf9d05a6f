"""The main job: images + VGGT predictions -> features -> matches -> tracks -> bundle-adjusted COLMAP model.

Each stage is a function of its own module; this module only wires them, caches the expensive results in the
output folder so that a rerun resumes, and writes the outputs atomically: everything goes to a hidden
`.NAME.partial` folder beside the output, renamed to the output at the very end, so a crash or Ctrl-C never
leaves a half-written `sparse/0`.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import pycolmap

from . import features as features_stage
from . import mapping as mapping_stage
from . import matching as matching_stage
from . import pairs as pairs_stage
from . import prior_free
from . import refine as refine_stage
from . import tracks as tracks_stage
from . import view_graph as view_graph_stage
from .cache import StageCache, file_fingerprint, stage_key
from .config import PipelineConfig, load_preset
from .errors import UserError, param
from .executor import Executor, open_executor
from .images import ImageInfo, list_images, scan_images
from .log import clear_stage, quiet_pycolmap, show_stage
from .output_folder import commit_output, reserved_output
from .outputs import check_output_requirements, write_outputs
from .predictions import Predictions, check_image_geometry, load_predictions, match_images, shown_names
from .prior import PriorCameras, prior_from_predictions
from . import __version__
from .evaluation.metrics import check_common_images, evaluate, read_ground_truth
from .report import json_ready, label_reprojection_errors, output_entries
from .report_html import REPORT_FILE, accuracy_details, match_statistics, write_run_report
from .sanity import STATUS_OK, check_run, prior_disagreement_deg, status_of
from .storage import FeatureStore, MatchStore, num_keypoints

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
    not_refined: list[str] = field(default_factory=list)  # kept their predicted pose: too few observations
    relocalized: list[str] = field(default_factory=list)  # prior pose disagreed with the matches; re-estimated
    skipped_images: list[str] = field(default_factory=list)  # unreadable
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cached_stages: list[str] = field(default_factory=list)
    bundle_adjusted: bool = True
    # The initial model's (triangulated from the prior, before bundle adjustment); the one above is the final's.
    initial_mean_reprojection_error: float | None = None
    status: str = STATUS_OK  # "ok", or "FAILED" when the result fails the checks of `sanity.check_run`
    failure_reasons: list[str] = field(default_factory=list)
    paths_written: list[str] = field(default_factory=list)  # relative to the output folder
    accuracy: dict[str, Any] | None = None  # against `ground_truth`, when given
    version: str = __version__  # of vggt-sfm
    command: str | None = None  # the command line, when run from it
    config: dict[str, Any] = field(default_factory=dict)  # the resolved configuration (preset + overrides)
    details: dict[str, Any] = field(default_factory=dict)
    prior: str = "vggt"  # "none": COLMAP's mapper initialised the model (prior_free.py)
    unregistered: list[str] = field(default_factory=list)  # no prior: images COLMAP's mapper could not register

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """The summary as strict JSON (NaN and infinities written as null), as `summary.json` holds it."""
        return json.dumps(json_ready(self.as_dict()), indent=2)

    def format(self) -> str:
        """A short human summary of the run."""
        lines = [
            f"registered {self.num_registered}/{self.num_images} images, {self.num_points} points, "
            f"mean track length {self.mean_track_length:.2f}, "
            f"mean reprojection error {self.mean_reprojection_error:.3f} px"
            + (
                f" ({self.initial_mean_reprojection_error:.2f} px before bundle adjustment)"
                if self.bundle_adjusted and self.initial_mean_reprojection_error is not None
                else ""
            )
            + ("" if self.bundle_adjusted else " (no bundle adjustment)"),
        ]
        if self.prior == "none":
            lines.append("prior: none (COLMAP's mapper on our matches, no VGGT predictions)")
        if self.unregistered:
            lines.append(f"NOT registered (COLMAP's mapper could not place them): {', '.join(self.unregistered)}")
        if self.not_refined:
            lines.append(
                "NOT refined (predicted pose kept: too few triangulated observations, or contradicted by its "
                f"matches and not re-localised): {', '.join(self.not_refined)}"
            )
        if self.relocalized:
            lines.append(f"re-localised (prior pose disagreed with matches): {', '.join(self.relocalized)}")
        repaired = (self.details.get("view_graph") or {}).get("failed") or []
        if repaired:
            lines.append(f"repaired (predicted rotation contradicted by its pairs): {', '.join(repaired)}")
        if self.skipped_images:
            lines.append(f"skipped unreadable images: {', '.join(self.skipped_images)}")
        times = ", ".join(
            f"{name} {seconds:.1f}s" + (" (cached)" if name in self.cached_stages else "")
            for name, seconds in self.stage_seconds.items()
        )
        lines.append(f"time: {times}; total {sum(self.stage_seconds.values()):.1f}s")
        if self.failure_reasons:
            lines.append(f"{self.status}: " + "; ".join(self.failure_reasons))
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
    accuracy: Any = None  # evaluation.metrics.EvaluationResult against `ground_truth`, when given


class _Timer:
    def __init__(self, show: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []
        self.show = show  # a one-line stage indicator on a terminal

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        logger.info("%s ...", name)
        if self.show:
            show_stage(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            clear_stage()

    def run_cached(self, stage: str, cache: StageCache, key: str, compute: Callable[[], Any]) -> Any:
        """A stage's result from the cache, or computed and stored, timed under `stage`."""
        with self.stage(stage):
            result, was_cached = cache.get_or_compute(key, compute)
        if was_cached and stage not in self.cached:
            self.cached.append(stage)
        return result


def cached_features(
    images_dir: Path, names: list[str], fingerprint: list, config: PipelineConfig, cache: StageCache, timer: _Timer,
    progress: bool, executor: Executor | None = None,
) -> tuple[list, str]:
    """The features of every image and their cache key: written image by image into the stage's HDF5 store (an
    interrupted extraction resumes), read back one image at a time (`storage.FeatureReader`)."""
    key = stage_key("features", fingerprint, config.features)

    def extract():
        with FeatureStore(cache.store_path(key), key) as store:
            return features_stage.extract_features(
                images_dir, names, config.features, progress=progress, store=store, executor=executor
            )

    return timer.run_cached("features", cache, key, extract), key


def cached_matches(
    key: str, names: list[str], cache: StageCache, timer: _Timer, match: Callable[[MatchStore], Any]
) -> Any:
    """`match(store)`'s raw matches, written pair by pair into the stage's HDF5 store (an interrupted matching
    resumes) and read back one pair at a time, under the stage cache's `key`."""

    def compute():
        with MatchStore(cache.store_path(key), key, names) as store:
            return match(store)

    return timer.run_cached("matching", cache, key, compute)


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
    sizes = {info.name: (info.width, info.height) for info in infos}
    sizes.update({name: None for name in skipped})  # an official file's frames follow every image's name
    loaded = load_predictions(path, image_sizes=sizes, preprocess=config.predict.preprocess)
    check_image_geometry(loaded, sizes, path)  # before any warning about the names: another set is one error
    return infos, skipped, _check_names(loaded, names, path)


def _check_names(predictions: Predictions, names: list[str], source: Path | str) -> Predictions:
    """Predictions of images no longer in the folder (a blurry photo deleted) are ignored, with a warning.

    When images lack a frame as well, `match_images` refuses with one line naming both instead.
    """
    frames = set(predictions.image_names)
    extra = sorted(frames - set(names))
    if extra and frames.issuperset(names):
        logger.warning(
            "predictions %s: ignoring %d of their %d frames, for images not in the images folder: %s",
            source, len(extra), predictions.num_frames, shown_names(extra),
        )
    return predictions


def _source(predictions: Predictions | str | Path | None) -> str:
    """How messages name the predictions: the file, or where they came from."""
    if predictions is None:
        return "of VGGT"
    return str(predictions) if isinstance(predictions, (str, Path)) else "given"


def _predict(
    images_dir: Path, config: PipelineConfig, weights: str | Path | None, download: bool, progress: bool,
    executor: Executor | None = None,
) -> Predictions:  # fmt: skip
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
        chunks=config.predict.chunks,
        chunk_overlap=config.predict.chunk_overlap,
        executor=executor,
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
    ground_truth: pycolmap.Reconstruction | str | Path | None = None,
    command: str | None = None,
    prior: str | None = None,
) -> ReconstructionResult:
    """Reconstruct a folder of images, initialised by VGGT predictions (a file, a Predictions, or run VGGT).

    - `images_dir`: the folder of photos (the command line's `--images`).
    - `predictions`: a predictions `.npz` or a `Predictions`; None runs VGGT (`weights`, `download` as for
      `vggt_sfm.predict`).
    - `config`: a `PipelineConfig`; None is the `default` preset (`pipelines/default.toml`), as on the command
      line. Pick another and change values with `config.load_preset` and `config.apply_overrides`:

          config = apply_overrides(load_preset("accurate"), [(["features", "max_keypoints"], 4096)])

    - `output`: the folder to write; None writes nothing. It gets `sparse/0/` (binary model), `points3D.ply`,
      `summary.json` and the extras the config asks for, atomically, with every stage's result cached under
      `output/cache/` so that a rerun resumes; existing results are replaced only with `overwrite`.
      A second run writing the same output refuses; a failed one leaves only its finished stages' cache.
    - `progress`: progress bars and a stage line on a terminal (stderr); nothing when stderr is not a terminal.
    - `ground_truth`: a COLMAP model (folder or `pycolmap.Reconstruction`) of the same images: the result's
      `accuracy` and the summary's `accuracy` hold the errors against it.
    - `command`: the command line to record in the summary.
    - `prior`: "none" (or `config.prior`) reconstructs without VGGT: COLMAP's mapper on our matches
      (`prior_free.py`).

    The summary's `status` is "FAILED" (with `failure_reasons`) when the result fails the sanity checks of
    `vggt_sfm.sanity` (no points, a large reprojection error, most frames not refined); the output is written
    all the same, for inspection. User mistakes raise `UserError`.
    """
    gt = read_ground_truth(ground_truth) if ground_truth is not None else None
    if gt is not None:  # before any work: a ground truth of other images is a mistake
        check_common_images(list_images(Path(images_dir)), gt.image_names, f"images folder {images_dir}",
                            "the ground truth", warn=False)  # fmt: skip
    config = config or load_preset("default")  # the same run as the command line's default
    config = replace(config, prior=prior) if prior is not None else config
    prior_free.check_request(config, predictions, weights, download)
    output_path = Path(output) if output is not None else None
    # Connected before the output is reserved: a cluster that does not answer leaves nothing behind.
    with open_executor(config.backend) as executor, reserved_output(output_path, overwrite) as work, \
            StageCache(work / "cache" if work is not None else None) as cache:
        return _run_stages(images_dir, predictions, output_path, work, config, weights, download, progress, gt,
                           command, cache, executor)  # fmt: skip


def _run_stages(
    images_dir: str | Path,
    predictions: Predictions | str | Path | None,
    output_path: Path | None,
    work: Path | None,
    config: PipelineConfig,
    weights: str | Path | None,
    download: bool,
    progress: bool,
    gt: PriorCameras | None,
    command: str | None,
    cache: StageCache,
    executor: Executor | None = None,
) -> ReconstructionResult:
    images_dir = Path(images_dir)
    timer = _Timer(show=progress)

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
            split = [key for key in ("chunks", "window") if getattr(config.predict, key)]
            if loaded is not None and split:  # a preset's split, with predictions given: nothing to split
                logger.warning("predict.%s is not used: the predictions %s are used as they are", split[0],
                               _source(predictions))
            if loaded is None:
                key = stage_key("predictions", fingerprint, config.predict)
                loaded, was_cached = cache.get_or_compute(
                    key, lambda: _predict(images_dir, config, weights, download, progress, executor)
                )
                if was_cached:
                    timer.cached.append("predictions")
                loaded = _check_names(loaded, names + skipped, "VGGT")
            predictions_used = match_images(loaded, names, _source(predictions))
            sizes = {info.name: (info.width, info.height) for info in infos}
            check_image_geometry(predictions_used, sizes, _source(predictions))
        if work is not None:
            check_output_requirements(config, predictions_used)
        image_sizes = np.array([[info.width, info.height] for info in infos])
        prior = prior_from_predictions(predictions_used, image_sizes)

        reconstruction, summary, stages = _reconstruct_from_prior(
            images_dir, names, fingerprint, prior, predictions_used, config, cache, timer, progress, executor
        )
    summary.skipped_images = skipped
    summary.config, summary.command = config.as_dict(), command
    accuracy = evaluate(reconstruction, gt, labels=("the model", "the ground truth")) if gt is not None else None
    summary.accuracy = accuracy.as_dict() if accuracy is not None else None
    if accuracy is not None:
        summary.details["ground_truth"] = accuracy_details(accuracy)
    repaired = (summary.details.get("view_graph") or {}).get("failed") or []
    known_failed = _known_failed(summary.not_refined, summary.relocalized, repaired)
    disagreement = prior_disagreement_deg(reconstruction, prior, known_failed) if prior is not None else float("nan")
    summary.details["prior_disagreement_deg"] = disagreement
    summary.failure_reasons = check_run(
        summary.num_images, summary.num_points, summary.mean_reprojection_error, summary.not_refined, prior,
        bundle_adjusted=summary.bundle_adjusted, limits=config.sanity, prior_disagreement=disagreement,
    )
    summary.status = status_of(summary.failure_reasons)

    if work is not None:
        with timer.stage("write"):
            summary.details["outputs"] = write_outputs(
                work, reconstruction, config, images_dir, prior, predictions_used, stages
            )
        summary.stage_seconds = dict(timer.seconds)
        summary.paths_written = output_entries(work) + ["summary.json"] + [REPORT_FILE] * config.output.report
        (work / "summary.json").write_text(summary.to_json())
        if config.output.report and not write_run_report(work, label=str(output_path)):  # from the files above
            summary.paths_written.remove(REPORT_FILE)
            (work / "summary.json").write_text(summary.to_json())
        commit_output(work, output_path)
    summary.stage_seconds = dict(timer.seconds)
    return ReconstructionResult(reconstruction=reconstruction, summary=summary, output=output_path, accuracy=accuracy)


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
    executor: Executor | None = None,
) -> tuple[pycolmap.Reconstruction, ReconstructionSummary, StageResults]:
    def cached(stage: str, key: str, compute):
        return timer.run_cached(stage, cache, key, compute)

    features, features_key = cached_features(
        images_dir, names, fingerprint, config, cache, timer, progress, executor
    )
    with timer.stage("pairs"):
        pairs = pairs_stage.select_pairs(prior, config.pairs)
    # Guided matching searches along the prior's epipolar lines (and its LightGlue fallback picks pairs by the
    # prior's overlap), so only then is the prior part of the key.
    matcher = matching_stage.resolve_matcher(config.features.extractor, config.matching.matcher, has_prior=True)
    prior_used = [prior.cam_from_world.tolist(), prior.intrinsics.tolist()] if matcher == "guided" else None
    matches_key = stage_key("matches", features_key, pairs.tolist(), config.matching, prior_used)
    raw = cached_matches(
        matches_key, names, cache, timer,
        lambda store: matching_stage.match_pairs(
            features, pairs, config.matching, progress=progress, prior=prior, executor=executor, store=store
        ),
    )  # fmt: skip
    predicted, focal_repass = prior, None
    for attempt in range(2):
        verify_key = stage_key(
            "verification", matches_key, config.matching, prior.cam_from_world.tolist(), prior.intrinsics.tolist()
        )
        verified = cached(
            "verification",
            verify_key,
            lambda: matching_stage.verify_matches(features, raw, prior, config.matching, executor=executor),
        )
        checked = cached(
            "view graph",
            stage_key("view_graph", verify_key, config.view_graph),
            lambda: view_graph_stage.check_prior(
                features, prior, raw, verified, config.matching, config.view_graph, progress
            ),
        )
        with timer.stage("tracks"):
            tracks = tracks_stage.build_tracks(checked.verified, num_keypoints(features), config.tracks)
        with timer.stage("initialization"), quiet_pycolmap():
            reconstruction, mapping_report = mapping_stage.initialize_reconstruction(
                checked.prior, features, tracks, predictions, config.mapping, doubted=checked.failed,
                unconfirmed=checked.unconfirmed, confirmed=checked.confirmed,
            )
        refine_report = None
        if config.refine.enabled:
            with timer.stage("bundle adjustment"), quiet_pycolmap():
                refine_report = refine_stage.refine_reconstruction(
                    reconstruction,
                    config.refine,
                    tracks=tracks,
                    features=features,
                    verified=checked.verified,
                    constant_images=_image_ids(names, mapping_report.not_refined),
                    late_images=_image_ids(names, mapping_report.not_refined),
                    progress=progress,
                )
                # Registered late: refined after all, no longer held at the prediction.
                mapping_report.not_refined = [
                    name for name in mapping_report.not_refined if name not in refine_report.registered_late
                ]
                if config.mapping.extract_colors:
                    mapping_stage.color_points(reconstruction, features)  # points made by re-triangulation
        if attempt > 0:
            # The refined focal can itself be wrong where the views cannot tell focal length from distance (a ring
            # of narrow views of one object): templeSR under every failure mode, seed 1, the repass turned the
            # images 7.6 deg from the prediction's relative rotations and ended 5.9 deg off the truth, the first
            # pass 2.7 and 1.9 deg. On the eight other runs measured with a repass (fountain, Herz-Jesu, fern,
            # lego, templeSR) the two passes differ by under 0.1 deg. So the repass is kept unless it turns the
            # images clearly farther from the prediction than the first pass did.
            passes = (first, _Pass(reconstruction, mapping_report, refine_report, checked, tracks, prior))
            failed = _known_failed(
                [name for one in passes for name in one.mapping_report.not_refined],
                [name for one in passes for name in one.mapping_report.relocalized],
                [name for one in passes for name in one.checked.report.failed],
            )
            disagreements = [prior_disagreement_deg(one.reconstruction, predicted, failed) for one in passes]
            keep_first = disagreements[1] > disagreements[0] + config.refine.focal_repass_max_disagreement_deg
            if keep_first:
                logger.warning(
                    "the repass with the refined focal turned the images %.1f degrees from the prediction (the "
                    "first pass %.1f): keeping the first pass", disagreements[1], disagreements[0],
                )  # fmt: skip
                reconstruction, mapping_report, refine_report, checked, tracks, prior = first
            focal_repass = {"focal_factor": factor, "kept": "first" if keep_first else "repass",
                            "prior_disagreement_deg": {"first": disagreements[0], "repass": disagreements[1]}}
            break
        factor = _focal_factor(reconstruction, prior, mapping_report.not_refined)
        if refine_report is None or abs(np.log(factor)) <= config.refine.focal_repass:
            break
        first = _Pass(reconstruction, mapping_report, refine_report, checked, tracks, prior)
        # A focal length the whole prediction got wrong (VGGT's field of view) skews the verification, the tracks
        # and the initial model; bundle adjustment finds the focal but not every match lost to it.
        logger.warning(
            "the predicted focal lengths were %.0f %% off; verifying and refining again with the refined focal",
            100 * abs(factor - 1),
        )  # fmt: skip
        intrinsics = predicted.intrinsics.copy()
        intrinsics[:, :2, :2] *= factor
        prior = replace(predicted, intrinsics=intrinsics)
    raw, verified = checked.raw, checked.verified
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
            "view_graph": _report_dict(checked.report),
            "focal_factor_applied": float(np.mean(prior.intrinsics[:, 0, 0] / predicted.intrinsics[:, 0, 0])),
            "focal_repass": focal_repass,  # None: no repass (the refined focal stayed near the prediction's)
            "mapping": _report_dict(mapping_report),
            "refine": _report_dict(refine_report),
            "match_graph": match_statistics(names, features, verified),
        },
        **numbers,
    )
    summary.initial_mean_reprojection_error = label_reprojection_errors(summary.details)
    return reconstruction, summary, StageResults(features, raw, verified, tracks)


def _focal_factor(reconstruction: pycolmap.Reconstruction, prior: PriorCameras, not_refined: list[str]) -> float:
    """Median ratio of the refined focal lengths to the prior's, over the refined images (1 without any)."""
    index = {name: i for i, name in enumerate(prior.image_names)}
    skip = set(not_refined)
    ratios = []
    for image in reconstruction.images.values():
        if image.has_pose and image.name in index and image.name not in skip:
            K = prior.intrinsics[index[image.name]]
            ratios.append(reconstruction.cameras[image.camera_id].mean_focal_length() / (0.5 * (K[0, 0] + K[1, 1])))
    return float(np.median(ratios)) if ratios else 1.0


class _Pass(NamedTuple):
    """What one verify-map-refine pass of `_reconstruct_from_prior` produced."""

    reconstruction: pycolmap.Reconstruction
    mapping_report: Any
    refine_report: Any
    checked: Any
    tracks: Any
    prior: PriorCameras


def _known_failed(not_refined: list[str], relocalized: list[str], repaired: list[str]) -> list[str]:
    """The frames whose prediction the run found wrong (repaired by the view graph, re-localised) or could not
    refine: left out where the model is compared with the prediction."""
    return sorted(set(not_refined) | set(relocalized) | set(repaired))


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
    """Reconstruct a folder of images and return the refined `pycolmap.Reconstruction`.

    `kwargs` are those of `run`: `overwrite`, `weights`, `download`, `progress`, `ground_truth`. Check
    `run(...).summary.status` instead when the result's sanity matters (a FAILED run still returns its model).
    """
    return run(images_dir, predictions=predictions, output=output, config=config, **kwargs).reconstruction
