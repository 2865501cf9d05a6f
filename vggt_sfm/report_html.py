"""`OUTPUT/report.html`: one self-contained page on a run (or on any COLMAP model), readable from `file://` offline.

Built only from what is on disk, so `vggt-sfm report OUTPUT` rebuilds it at any time: the model (`sparse/0`),
`summary.json` (stage reports: BA rounds, stage times, the match graph, accuracy against ground truth) and
`prior_cameras.json` (the predicted cameras the run started from). A plain COLMAP model folder gets the parts
that need only the model. The plots are plotly's, with its JavaScript bundle inlined (about 5 MB): plotly is the
plotting library of the Python SfM / 3D-vision tools' HTML reports, draws interactive 3D scenes in the browser,
and its offline bundle makes the page need no network.

Every plot has a stable element id (`PLOT_IDS`); a plot without data says "no data" on the page.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from .errors import UserError
from .evaluation.metrics import EvaluationResult, cameras_from_reconstruction, evaluate, rotation_errors_deg
from .prior import PriorCameras

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
PRIOR_FILE = "prior_cameras.json"
PLOTLY_INSTALL = "pip install plotly"
MAX_POINTS_SHOWN = 20000  # points drawn in the 3D view (a fixed random subset): the page stays light
AUC_CURVE_MAX_DEG = 30.0

# Element id -> title of every plot the page can hold.
PLOT_IDS: dict[str, str] = {
    "plot-scene": "Cameras and points",
    "plot-prior-change": "How far the prior was off: change from the prior to the result, per image",
    "plot-reprojection-errors": "Reprojection error of the observations (px)",
    "plot-track-lengths": "Track length of the 3D points",
    "plot-observations": "Observations per image",
    "plot-features-matches": "Keypoints and verified matches per image",
    "plot-match-matrix": "Pair graph: verified matches per image pair",
    "plot-ba-rounds": "Bundle-adjustment rounds",
    "plot-stage-times": "Time per stage (s)",
    "plot-gt-errors": "Error against ground truth, per image",
    "plot-gt-auc": "Pose accuracy against ground truth (pairs under a threshold; AUC is its mean)",
}
GROUND_TRUTH_PLOTS = ("plot-gt-errors", "plot-gt-auc")


def require_plotly() -> None:
    """Refuse, in one line naming the install, when plotly (the report's plotting library) is missing."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise UserError(
            f"the HTML report needs plotly, which is not installed: run `{PLOTLY_INSTALL}` (or pass --no-report)"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# What a run adds to its output for the report (small, JSON)


def prior_cameras_dict(prior: PriorCameras) -> dict[str, Any]:
    """The prior cameras as JSON-ready lists (cam_from_world in OpenCV axes, K in COLMAP pixels)."""
    return {
        "image_names": list(prior.image_names),
        "image_sizes": np.asarray(prior.image_sizes).tolist(),
        "cam_from_world": np.asarray(prior.cam_from_world).tolist(),
        "intrinsics": np.asarray(prior.intrinsics).tolist(),
    }


def write_prior_cameras(path: Path, prior: PriorCameras) -> None:
    """Write the cameras a run started from (`OUTPUT/prior_cameras.json`)."""
    path.write_text(json.dumps(prior_cameras_dict(prior)))


def read_prior_cameras(path: Path) -> PriorCameras | None:
    """The cameras of `write_prior_cameras`, or None (with a warning) when the file is unreadable."""
    try:
        values = json.loads(path.read_text())
        prior = PriorCameras(
            image_names=[str(n) for n in values["image_names"]],
            image_sizes=np.asarray(values["image_sizes"], dtype=int).reshape(-1, 2),
            cam_from_world=np.asarray(values["cam_from_world"], dtype=np.float64).reshape(-1, 3, 4),
            intrinsics=np.asarray(values["intrinsics"], dtype=np.float64).reshape(-1, 3, 3),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("%s is unreadable (%s); the report leaves out the prior's cameras", path, error)
        return None
    return prior


def match_statistics(names: list[str], features: list, verified: Any) -> dict[str, Any]:
    """Keypoints per image and each matched pair's raw and verified match counts (indices into `names`)."""
    pairs = np.asarray(verified.pairs, dtype=int).reshape(-1, 2)
    return {
        "image_names": list(names),
        "keypoints": [int(len(f.keypoints)) for f in features],
        "pairs": [
            [int(i), int(j), int(raw), int(len(m))]
            for (i, j), raw, m in zip(pairs, np.asarray(verified.num_raw).tolist(), verified.matches)
        ],
    }


def accuracy_details(accuracy: EvaluationResult) -> dict[str, Any]:
    """Per-image errors and the curve of pairs under each threshold, for the report's ground-truth plots."""
    errors = np.maximum(accuracy.pair_rotation_errors, accuracy.pair_translation_errors)
    thresholds = np.arange(0.0, AUC_CURVE_MAX_DEG + 0.25, 0.5)
    fraction = [float(np.mean(errors < t)) if errors.size else 0.0 for t in thresholds]
    return {
        "per_image": accuracy.per_image(),
        "curve": {"threshold_deg": thresholds.tolist(), "fraction_of_pairs": fraction},
        "auc": {str(t): float(v) for t, v in accuracy.auc.items()},
    }


# ----------------------------------------------------------------------------------------------------------------
# Reading an output folder or a model folder


@dataclass
class ReportInputs:
    """What one page is built from; `summary` and `prior` are None for a plain COLMAP model."""

    model_dir: Path
    reconstruction: pycolmap.Reconstruction
    summary: dict[str, Any] | None
    prior: PriorCameras | None
    default_output: Path


def _is_model_folder(folder: Path) -> bool:
    return any((folder / f"images.{ext}").is_file() and (folder / f"cameras.{ext}").is_file() for ext in ("bin", "txt"))


def read_report_inputs(folder: Path) -> ReportInputs:
    """A vggt-sfm output folder (`sparse/0`, `summary.json`, ...) or a COLMAP model folder; else a UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give a vggt-sfm output folder or a COLMAP model folder")
    if (folder / "sparse" / "0").is_dir():
        model_dir = folder / "sparse" / "0"
    elif _is_model_folder(folder):
        model_dir = folder
    else:
        raise UserError(
            f"{folder} holds neither a vggt-sfm output (no sparse/0) nor a COLMAP model (no cameras.bin and "
            "images.bin): give the --output folder of a run, or a model folder such as OUTPUT/sparse/0"
        )
    try:
        reconstruction = pycolmap.Reconstruction(str(model_dir))
    except Exception as error:  # pycolmap raises its own errors on a damaged model
        raise UserError(f"{model_dir}: cannot read a COLMAP model ({error})") from None
    summary = None
    prior = None
    if model_dir != folder:
        summary_path = folder / "summary.json"
        if summary_path.is_file():
            try:
                summary = json.loads(summary_path.read_text())
            except (OSError, ValueError) as error:
                logger.warning("%s is unreadable (%s); the report shows the model only", summary_path, error)
        if (folder / PRIOR_FILE).is_file():
            prior = read_prior_cameras(folder / PRIOR_FILE)
    return ReportInputs(model_dir, reconstruction, summary, prior, folder / REPORT_FILE)


# ----------------------------------------------------------------------------------------------------------------
# Numbers of the model


@dataclass
class ModelStatistics:
    """Per-image and per-observation numbers of a model, images in name order."""

    names: list[str]
    image_ids: list[int]
    registered: np.ndarray  # (S,) bool
    observations: np.ndarray  # (S,) int
    keypoints: np.ndarray  # (S,) int: points2D of each image
    mean_error: np.ndarray  # (S,) px, NaN without observations
    errors: np.ndarray  # (O,) px, every observation's reprojection error
    track_lengths: np.ndarray  # (P,) int


def model_statistics(reconstruction: pycolmap.Reconstruction) -> ModelStatistics:
    """Reprojection errors (per observation and per image), track lengths and co-visibility of a model."""
    images = sorted(reconstruction.images.values(), key=lambda image: image.name)
    num = len(images)
    observations = np.zeros(num, dtype=int)
    mean_error = np.full(num, np.nan)
    all_errors = []
    points = reconstruction.points3D
    for i, image in enumerate(images):
        if not image.has_pose:
            continue
        observed = [(p.xy, p.point3D_id) for p in image.points2D if p.has_point3D()]
        observations[i] = len(observed)
        if not observed:
            continue
        xy = np.array([o[0] for o in observed], dtype=np.float64)
        xyz = np.array([points[o[1]].xyz for o in observed], dtype=np.float64)
        pose = image.cam_from_world().matrix()
        in_camera = xyz @ pose[:, :3].T + pose[:, 3]
        projected = np.asarray(reconstruction.cameras[image.camera_id].img_from_cam(in_camera), dtype=np.float64)
        error = np.linalg.norm(projected.reshape(-1, 2) - xy, axis=1)
        error = error[np.isfinite(error)]
        all_errors.append(error)
        mean_error[i] = float(np.mean(error)) if error.size else np.nan
    return ModelStatistics(
        names=[image.name for image in images],
        image_ids=[image.image_id for image in images],
        registered=np.array([image.has_pose for image in images], dtype=bool),
        observations=observations,
        keypoints=np.array([image.num_points2D() for image in images], dtype=int),
        mean_error=mean_error,
        errors=np.concatenate(all_errors) if all_errors else np.zeros(0),
        track_lengths=np.array([point.track.length() for point in points.values()], dtype=int),
    )


def covisibility(reconstruction: pycolmap.Reconstruction, names: list[str]) -> np.ndarray:
    """(S,S) 3D points seen by both images, images in the order of `names`."""
    index = {image.image_id: names.index(image.name) for image in reconstruction.images.values() if image.name in names}
    matrix = np.zeros((len(names), len(names)), dtype=int)
    for point in reconstruction.points3D.values():
        seen = sorted({index[element.image_id] for element in point.track.elements if element.image_id in index})
        for a in range(len(seen)):
            matrix[seen[a], seen[a + 1:]] += 1
    return matrix + matrix.T


# ----------------------------------------------------------------------------------------------------------------
# Figures


def _no_data(fig: Any, reason: str) -> Any:
    fig.add_annotation(text=f"no data: {reason}", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font={"size": 16, "color": "#888"})  # fmt: skip
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _layout(fig: Any, height: int = 360, **kwargs: Any) -> Any:
    fig.update_layout(height=height, margin={"l": 60, "r": 20, "t": 30, "b": 60}, template="plotly_white", **kwargs)
    return fig


def _frustum_lines(cameras: PriorCameras, size: float, values: np.ndarray) -> tuple[list, list, list, list]:
    """Polylines of each camera's frustum (apex at the centre, image plane at depth `size`), None-separated,
    with one colour value per vertex."""
    xs, ys, zs, colours = [], [], [], []
    for pose, K, (width, height), value in zip(cameras.cam_from_world, cameras.intrinsics, cameras.image_sizes, values):
        R, t = pose[:, :3], pose[:, 3]
        center = -R.T @ t
        corners_px = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], dtype=np.float64)
        rays = corners_px @ np.linalg.inv(K).T
        rays *= size / np.max(np.abs(rays[:, 2]))
        corners = (rays - t) @ R  # R^T (x - t), row-wise
        c1, c2, c3, c4 = corners
        path = [center, c1, c2, c3, c4, c1, None, center, c2, None, center, c3, None, center, c4, None]
        for vertex in path:
            xs.append(None if vertex is None else float(vertex[0]))
            ys.append(None if vertex is None else float(vertex[1]))
            zs.append(None if vertex is None else float(vertex[2]))
            colours.append(float(value))
    return xs, ys, zs, colours


@dataclass
class PriorAlignment:
    """The prior's world mapped onto the model's, X_model = scale * rotation @ X_prior + translation, and what
    each common image changed under it."""

    rotation: np.ndarray  # (3,3)
    scale: float
    translation: np.ndarray  # (3,)
    names: list[str]  # the images both have, in the model's order
    rotation_change_deg: np.ndarray  # per name: angle between the prior's and the model's camera rotation
    center_change_pct: np.ndarray  # per name: centre distance, % of the model's scene extent


def _nearest_rotation(M: np.ndarray) -> np.ndarray:
    U, _, Vt = np.linalg.svd(M)
    return U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt


def align_prior(prior: PriorCameras, cameras: PriorCameras) -> PriorAlignment | None:
    """Map the prior onto the model (None with fewer than 2 common images).

    The rotation comes from the cameras' rotations (R_prior = R_model @ A for every image, averaged), not from
    the centres: a few cameras along a line leave a centre fit free to turn about that line. Images that moved
    far more than the others (the frames the prior got wrong) are left out of the fit, so that they stand out.
    """
    index = {name: i for i, name in enumerate(prior.image_names)}
    common = [(index[n], j) for j, n in enumerate(cameras.image_names) if n in index]
    if len(common) < 2:
        return None
    R_prior = prior.cam_from_world[[i for i, _ in common], :, :3]
    R_model = cameras.cam_from_world[[j for _, j in common], :, :3]
    per_image = np.einsum("sji,sjk->sik", R_model, R_prior)  # R_model^T R_prior
    keep = np.ones(len(common), dtype=bool)
    for _ in range(2):
        A = _nearest_rotation(per_image[keep].sum(axis=0))
        angles = rotation_errors_deg(R_prior, R_model @ A)
        keep = angles <= 3.0 * np.median(angles) + 0.5
    C_prior = prior.centers()[[i for i, _ in common]] @ A.T
    C_model = cameras.centers()[[j for _, j in common]]
    inliers = np.ones(len(common), dtype=bool)
    for _ in range(2):
        mean_p, mean_m = C_prior[inliers].mean(axis=0), C_model[inliers].mean(axis=0)
        spread = np.sum((C_prior[inliers] - mean_p) ** 2)
        scale = float(np.sum((C_prior[inliers] - mean_p) * (C_model[inliers] - mean_m)) / spread) if spread > 0 else 1.0
        translation = mean_m - scale * mean_p
        residuals = np.linalg.norm(scale * C_prior + translation - C_model, axis=1)
        inliers = residuals <= 3.0 * np.median(residuals) + 1e-12
        if inliers.sum() < 2:
            break
    extent = cameras.scene_scale() if cameras.num_images >= 2 else 1.0
    return PriorAlignment(
        rotation=A, scale=scale, translation=translation, names=[cameras.image_names[j] for _, j in common],
        rotation_change_deg=angles, center_change_pct=100.0 * residuals / extent,
    )


def _prior_in_model_frame(prior: PriorCameras, alignment: PriorAlignment) -> PriorCameras:
    """The prior cameras moved into the model's frame."""
    A, s, t = alignment.rotation, alignment.scale, alignment.translation
    R = prior.cam_from_world[:, :, :3] @ A.T
    centers = s * prior.centers() @ A.T + t
    poses = np.concatenate([R, -np.einsum("sij,sj->si", R, centers)[:, :, None]], axis=2)
    return PriorCameras(prior.image_names, prior.image_sizes, poses, prior.intrinsics)


def _subset(cameras: PriorCameras, keep: np.ndarray) -> PriorCameras:
    return PriorCameras([n for n, k in zip(cameras.image_names, keep) if k], cameras.image_sizes[keep],
                        cameras.cam_from_world[keep], cameras.intrinsics[keep])  # fmt: skip


def scene_figure(
    reconstruction: pycolmap.Reconstruction,
    stats: ModelStatistics,
    prior: PriorCameras | None,
    summary: dict[str, Any] | None = None,
) -> Any:
    """3D view: the model's frusta coloured by their mean reprojection error, points in their colours, and the
    prior's frusta (toggle in the legend)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    cameras = cameras_from_reconstruction(reconstruction)
    points = reconstruction.points3D
    if cameras.num_images == 0 and len(points) == 0:
        return _layout(_no_data(fig, "the model has no registered image and no point"), height=600)
    extent = cameras.scene_scale() if cameras.num_images >= 2 else 1.0
    if len(points):
        xyz = np.array([p.xyz for p in points.values()])
        rgb = np.array([p.color for p in points.values()], dtype=int)
        if len(xyz) > MAX_POINTS_SHOWN:
            keep = np.sort(np.random.default_rng(0).choice(len(xyz), MAX_POINTS_SHOWN, replace=False))
            xyz, rgb = xyz[keep], rgb[keep]
        fig.add_trace(go.Scatter3d(
            x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers", name=f"points ({len(xyz)} of {len(points)})",
            marker={"size": 2, "color": [f"rgb({r},{g},{b})" for r, g, b in rgb]}, hoverinfo="skip",
        ))  # fmt: skip
        if cameras.num_images < 2:
            extent = float(np.median(np.linalg.norm(xyz - np.median(xyz, axis=0), axis=1))) or 1.0
    size = 0.15 * extent
    if prior is not None:
        alignment = align_prior(prior, cameras)
        if alignment is not None:
            aligned = _prior_in_model_frame(prior, alignment)
            xs, ys, zs, _ = _frustum_lines(aligned, size, np.zeros(aligned.num_images))
            fig.add_trace(go.Scatter3d(x=xs, y=ys, z=zs, mode="lines", name="prior cameras (aligned)",
                                       line={"color": "rgba(120,120,120,0.8)", "width": 2}, hoverinfo="skip"))  # fmt: skip
    if cameras.num_images:
        by_name = dict(zip(stats.names, stats.mean_error))
        errors = np.array([by_name.get(n, np.nan) for n in cameras.image_names])
        measured = np.isfinite(errors)
        shown = np.nan_to_num(errors, nan=0.0)
        top = float(np.nanmax(errors)) if measured.any() else 1.0
        colour_axis = {"cmin": 0.0, "cmax": max(top, 1e-3), "colorscale": "Viridis"}
        if measured.any():
            xs, ys, zs, colours = _frustum_lines(_subset(cameras, measured), size, shown[measured])
            fig.add_trace(go.Scatter3d(
                x=xs, y=ys, z=zs, mode="lines", name="cameras (colour: mean reprojection error)", hoverinfo="skip",
                line={"color": colours, "width": 4, **colour_axis},
            ))  # fmt: skip
        if not measured.all():  # a frame without observations has no error: grey, not the colour of 0 px
            xs, ys, zs, _ = _frustum_lines(_subset(cameras, ~measured), size, shown[~measured])
            fig.add_trace(go.Scatter3d(x=xs, y=ys, z=zs, mode="lines", name="cameras without observations",
                                       hoverinfo="skip", line={"color": "#d62728", "width": 4}))  # fmt: skip
        centers = cameras.centers()
        fig.add_trace(go.Scatter3d(
            x=centers[:, 0], y=centers[:, 1], z=centers[:, 2], mode="markers", name="camera centres",
            text=[f"{n} ({c})<br>mean reprojection error {e:.3f} px"
                  for n, c, e in zip(cameras.image_names, _image_categories(cameras.image_names, summary), errors)],
            hoverinfo="text",
            marker={"size": 4, "color": shown, **colour_axis,
                    "colorbar": {"title": {"text": "mean reproj.<br>error (px)"}}},
        ))  # fmt: skip
    fig.update_layout(scene={"aspectmode": "data", "xaxis": {"visible": False}, "yaxis": {"visible": False},
                             "zaxis": {"visible": False}}, legend={"x": 0, "y": 1})  # fmt: skip
    return _layout(fig, height=650)


def _image_categories(names: list[str], summary: dict[str, Any] | None) -> list[str]:
    relocalized = set((summary or {}).get("relocalized") or [])
    not_refined = set((summary or {}).get("not_refined") or [])
    return ["not refined" if n in not_refined else "re-localised" if n in relocalized else "refined" for n in names]


_CATEGORY_COLOURS = {"refined": "#4c78a8", "re-localised": "#f58518", "not refined": "#9d9d9d"}


def prior_change_figure(inputs: ReportInputs) -> Any:
    """Per image, the rotation and centre change from the prior to the result (after `align_prior`)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cameras = cameras_from_reconstruction(inputs.reconstruction)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("rotation change (degrees)", "centre change (% of the scene extent)"))  # fmt: skip
    alignment = align_prior(inputs.prior, cameras) if inputs.prior is not None else None
    if alignment is None:
        reason = "no prior cameras (not a vggt-sfm output)" if inputs.prior is None else "fewer than 2 registered images"
        return _layout(_no_data(fig, reason), height=420)
    names = alignment.names
    categories = _image_categories(names, inputs.summary)
    for category, colour in _CATEGORY_COLOURS.items():
        chosen = [k for k, c in enumerate(categories) if c == category]
        if not chosen:
            continue
        for row, values in ((1, alignment.rotation_change_deg), (2, alignment.center_change_pct)):
            fig.add_trace(go.Bar(x=[names[k] for k in chosen], y=[float(values[k]) for k in chosen], name=category,
                                 marker_color=colour, legendgroup=category, showlegend=row == 1), row=row, col=1)  # fmt: skip
    fig.update_xaxes(categoryorder="array", categoryarray=names)
    return _layout(fig, height=480, barmode="overlay")


def _histogram_figure(values: np.ndarray, x_title: str, empty: str, integer: bool = False) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    if values.size == 0:
        return _layout(_no_data(fig, empty))
    if integer:
        counts = np.bincount(values.astype(int))
        lengths = np.nonzero(counts)[0]
        fig.add_trace(go.Bar(x=lengths, y=counts[lengths], marker_color="#4c78a8"))
    else:
        fig.add_trace(go.Histogram(x=values, nbinsx=60, marker_color="#4c78a8"))
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title="count")
    return _layout(fig)


def _per_image_bars(names: list[str], series: dict[str, np.ndarray], y_title: str, empty: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    if not names:
        return _layout(_no_data(fig, empty))
    for label, values in series.items():
        fig.add_trace(go.Bar(x=names, y=np.asarray(values).tolist(), name=label))
    fig.update_yaxes(title=y_title)
    return _layout(fig, barmode="group")


def _match_graph(inputs: ReportInputs, stats: ModelStatistics) -> tuple[list[str], np.ndarray, np.ndarray, str]:
    """(names, keypoints, pair matrix, what the matrix counts): the run's verified matches when its summary has
    them, else the model's keypoints and co-visible points."""
    graph = ((inputs.summary or {}).get("details") or {}).get("match_graph")
    if graph:
        names = list(graph["image_names"])
        matrix = np.zeros((len(names), len(names)), dtype=int)
        for i, j, _, verified in graph["pairs"]:
            matrix[i, j] = matrix[j, i] = verified
        return names, np.asarray(graph["keypoints"], dtype=int), matrix, "verified matches"
    matrix = covisibility(inputs.reconstruction, stats.names)
    return stats.names, stats.keypoints, matrix, "3D points seen by both (the model has no match list)"


def features_matches_figure(graph: tuple[list[str], np.ndarray, np.ndarray, str]) -> Any:
    """Keypoints and verified matches (summed over the image's pairs) per image, from `_match_graph`."""
    names, keypoints, matrix, counted = graph
    label = "verified matches" if counted == "verified matches" else "points shared with other images"
    return _per_image_bars(names, {"keypoints": keypoints, label: matrix.sum(axis=1)}, "count", "the model has no image")


def match_matrix_figure(graph: tuple[list[str], np.ndarray, np.ndarray, str]) -> Any:
    """The pair graph as a matrix of match counts, from `_match_graph`."""
    import plotly.graph_objects as go

    names, _, matrix, counted = graph
    fig = go.Figure()
    if not names or not matrix.any():
        return _layout(_no_data(fig, "no matched pair"), height=520)
    fig.add_trace(go.Heatmap(z=matrix.tolist(), x=names, y=names, colorscale="Blues",
                             colorbar={"title": {"text": counted.split(" (")[0]}},
                             hovertemplate="%{y} - %{x}: %{z}<extra></extra>"))  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title={"text": counted, "font": {"size": 12}})
    return _layout(fig, height=560)


def ba_rounds_figure(summary: dict[str, Any] | None) -> Any:
    """Per bundle-adjustment round: mean reprojection error, 3D points, observations filtered and added."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    refine = ((summary or {}).get("details") or {}).get("refine") or {}
    history = refine.get("history") or []
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=("mean reprojection error (px)", "3D points", "observations filtered / added"))  # fmt: skip
    if not history:
        reason = "no bundle adjustment in this run" if summary else "no run summary (a plain COLMAP model)"
        return _layout(_no_data(fig, reason))
    rounds = [int(r["round"]) for r in history]
    fig.add_trace(go.Scatter(x=rounds, y=[r["mean_reprojection_error"] for r in history], mode="lines+markers",
                             name="error (px)"), row=1, col=1)  # fmt: skip
    fig.add_trace(go.Scatter(x=rounds, y=[r.get("num_points", 0) for r in history], mode="lines+markers",
                             name="points"), row=1, col=2)  # fmt: skip
    fig.add_trace(go.Bar(x=rounds, y=[r["filtered"] for r in history], name="filtered"), row=1, col=3)
    fig.add_trace(go.Bar(x=rounds, y=[r["added"] for r in history], name="added"), row=1, col=3)
    fig.update_xaxes(title="round", dtick=1)
    return _layout(fig)


def stage_times_figure(summary: dict[str, Any] | None) -> Any:
    """Seconds per stage (cached stages marked)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    seconds = (summary or {}).get("stage_seconds") or {}
    if not seconds:
        return _layout(_no_data(fig, "no run summary (a plain COLMAP model)"))
    cached = set(summary.get("cached_stages") or [])
    names = [n + (" (cached)" if n in cached else "") for n in seconds]
    fig.add_trace(go.Bar(x=list(seconds.values()), y=names, orientation="h", marker_color="#4c78a8"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title=f"seconds (total {sum(seconds.values()):.1f})")
    return _layout(fig, height=max(300, 28 * len(seconds) + 80))


def ground_truth_figures(accuracy: dict[str, Any], summary: dict[str, Any] | None) -> tuple[Any, Any]:
    """Per-image rotation / centre error against ground truth, and the curve of pairs under each threshold."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = accuracy["per_image"]
    names = [row["name"] for row in rows]
    errors = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                           subplot_titles=("rotation error (degrees)", "centre error (% of the scene extent)"))  # fmt: skip
    categories = _image_categories(names, summary)
    for category, colour in _CATEGORY_COLOURS.items():
        chosen = [k for k, c in enumerate(categories) if c == category]
        if not chosen:
            continue
        for row, key in ((1, "rotation_error_deg"), (2, "center_error_pct")):
            errors.add_trace(go.Bar(x=[names[k] for k in chosen], y=[rows[k][key] for k in chosen], name=category,
                                    marker_color=colour, legendgroup=category, showlegend=row == 1), row=row, col=1)  # fmt: skip
    errors.update_xaxes(categoryorder="array", categoryarray=names)
    _layout(errors, height=480, barmode="overlay")

    curve = accuracy["curve"]
    auc = go.Figure()
    auc.add_trace(go.Scatter(x=curve["threshold_deg"], y=curve["fraction_of_pairs"], mode="lines", fill="tozeroy",
                             name="pairs under the threshold"))  # fmt: skip
    labels = ", ".join(f"AUC@{t} {100 * v:.1f}" for t, v in accuracy.get("auc", {}).items() if v is not None)
    auc.update_xaxes(title="threshold on max(rotation, translation) error of the image pairs (degrees)")
    auc.update_yaxes(title="fraction of pairs", range=[0, 1.02])
    auc.update_layout(title={"text": labels, "font": {"size": 12}})
    return errors, _layout(auc)


# ----------------------------------------------------------------------------------------------------------------
# The page


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table.facts { border-collapse: collapse; } table.facts td { padding: 2px 12px 2px 0; vertical-align: top; }
.failed { color: #b00; font-weight: bold; } .ok { color: #070; font-weight: bold; } .note { color: #666; }
"""


def _facts_table(inputs: ReportInputs, stats: ModelStatistics, label: str) -> str:
    rec, summary = inputs.reconstruction, inputs.summary
    num_points = rec.num_points3D()
    error = float(np.mean(stats.errors)) if stats.errors.size else float("nan")
    facts: list[tuple[str, str]] = [("model", html.escape(label))]
    if summary:
        status = summary.get("status", "")
        css = "ok" if status == "ok" else "failed"
        reasons = "; ".join(summary.get("failure_reasons") or [])
        facts.append(("status", f'<span class="{css}">{html.escape(status)}</span> {html.escape(reasons)}'))
        if summary.get("command"):
            facts.append(("command", f"<code>{html.escape(summary['command'])}</code>"))
    facts += [
        ("images registered", f"{int(stats.registered.sum())} of {len(stats.names)}"),
        ("3D points", f"{num_points} (mean track length {np.mean(stats.track_lengths) if num_points else 0:.2f})"),
        ("observations", f"{int(stats.observations.sum())}"),
        ("mean reprojection error", f"{error:.3f} px (over the observations)"),
    ]
    if summary:
        before = summary.get("initial_mean_reprojection_error")
        if before is not None:
            facts.append(("before bundle adjustment", f"{before:.3f} px"))
        for key, label in (("relocalized", "re-localised"), ("not_refined", "not refined")):
            if summary.get(key):
                facts.append((label, html.escape(", ".join(summary[key]))))
        accuracy = summary.get("accuracy")
        if accuracy:
            facts.append(("vs ground truth", html.escape(
                f"rotation error median {accuracy.get('rotation_error_median_deg') or float('nan'):.3f} deg, "
                f"centre error median {accuracy.get('center_error_median_pct') or float('nan'):.2f} %, "
                f"AUC@5 {100 * (accuracy.get('auc@5') or float('nan')):.1f}")))  # fmt: skip
        if summary.get("version"):
            facts.append(("vggt-sfm", html.escape(str(summary["version"]))))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def build_figures(
    inputs: ReportInputs, accuracy: dict[str, Any] | None = None
) -> tuple[dict[str, Any], ModelStatistics]:
    """Every plot of the page by element id (the ground-truth ones only with accuracy), and the model's numbers."""
    stats = model_statistics(inputs.reconstruction)
    summary = inputs.summary
    graph = _match_graph(inputs, stats)
    figures = {
        "plot-scene": scene_figure(inputs.reconstruction, stats, inputs.prior, summary),
        "plot-prior-change": prior_change_figure(inputs),
        "plot-reprojection-errors": _histogram_figure(stats.errors, "reprojection error (px)", "no observation"),
        "plot-track-lengths": _histogram_figure(stats.track_lengths, "track length (images)", "no 3D point", integer=True),
        "plot-observations": _per_image_bars(stats.names, {"observations": stats.observations}, "observations",
                                             "the model has no image"),  # fmt: skip
        "plot-features-matches": features_matches_figure(graph),
        "plot-match-matrix": match_matrix_figure(graph),
        "plot-ba-rounds": ba_rounds_figure(summary),
        "plot-stage-times": stage_times_figure(summary),
    }
    accuracy = accuracy or ((summary or {}).get("details") or {}).get("ground_truth")
    if accuracy:
        figures["plot-gt-errors"], figures["plot-gt-auc"] = ground_truth_figures(accuracy, summary)
    return figures, stats


def render_page(inputs: ReportInputs, accuracy: dict[str, Any] | None = None, label: str | None = None) -> str:
    """The whole page as one HTML string, plotly's bundle inlined; `label` names the model (default: its folder)."""
    require_plotly()
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    figures, stats = build_figures(inputs, accuracy)
    sections = []
    for plot_id, figure in figures.items():
        div = pio.to_html(figure, full_html=False, include_plotlyjs=False, div_id=plot_id,
                          config={"displaylogo": False, "responsive": True})  # fmt: skip
        sections.append(f"<h2>{html.escape(PLOT_IDS[plot_id])}</h2>\n{div}")
    if not any(plot_id in figures for plot_id in GROUND_TRUTH_PLOTS):
        sections.append('<p class="note">No ground truth: run with --gt (or `vggt-sfm report OUTPUT --gt GT`) '
                        "for the errors per image and the AUC curve.</p>")  # fmt: skip
    label = label or str(inputs.model_dir)
    title = f"vggt-sfm report: {label}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head>\n<body>"
        f"<h1>{html.escape(title)}</h1>{_facts_table(inputs, stats, label)}\n" + "\n".join(sections) + "</body></html>\n"
    )


def write_run_report(work: Path, label: str) -> bool:
    """A run's report, written into its (temporary) output folder; False, with a warning, when it fails: an
    unexpected error in the report must not cost the run its model."""
    try:
        write_report(work, label=label)
    except Exception as error:  # noqa: BLE001 -- any failure here is reported and the run's results are kept
        logger.warning("report.html was not written (%s: %s); `vggt-sfm report %s` retries", type(error).__name__,
                       error, label)  # fmt: skip
        return False
    return True


def write_report(
    output_dir: Path,
    output: Path | None = None,
    ground_truth: pycolmap.Reconstruction | str | Path | None = None,
    label: str | None = None,
) -> Path:
    """Write the report of a vggt-sfm output folder (or a COLMAP model folder) and return its path.

    `output`: the file to write (default: `report.html` in the folder); `ground_truth`: a COLMAP model of the same
    images, for the accuracy plots when the run's summary has none; `label`: how the page names the model (a run
    passes its final output folder, as it writes into a temporary one). Written to a temporary file and renamed.
    """
    require_plotly()
    inputs = read_report_inputs(Path(output_dir))
    accuracy = None
    if ground_truth is not None:
        accuracy = accuracy_details(
            evaluate(inputs.reconstruction, ground_truth, labels=(f"the model {inputs.model_dir}", "the ground truth"))
        )
    target = Path(output) if output is not None else inputs.default_output
    if not target.parent.is_dir():
        raise UserError(f"cannot write the report {target}: its folder {target.parent} does not exist")
    partial = target.with_name(f".{target.name}.partial")
    if label is None:
        label = str(inputs.model_dir if inputs.model_dir == Path(output_dir) else Path(output_dir))
    partial.write_text(render_page(inputs, accuracy, label), encoding="utf-8")
    partial.replace(target)
    return target
