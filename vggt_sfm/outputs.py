"""Everything a run writes into its (temporary) output folder, in one place.

`OUTPUT/sparse/0/` (binary model; `--text` adds the text files), `OUTPUT/points3D.ply`, and on request
`OUTPUT/database.db` (COLMAP 4 schema), `OUTPUT/gs/` (3DGS / gsplat layout), `OUTPUT/nerfstudio/`
(`transforms.json`, `sparse_pc.ply`, images) and `OUTPUT/dense_points.ply`. The caller renames the folder into
place afterwards, so each writer here may assume its target is new.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pycolmap

from .config import PipelineConfig
from .errors import UserError, param
from .export.colmap import write_model
from .export.ply import reconstruction_points, write_ply
from .predictions import Predictions
from .prior import PriorCameras
from .report_html import PRIOR_FILE, require_plotly, write_prior_cameras

logger = logging.getLogger(__name__)


def check_output_requirements(config: PipelineConfig, predictions: Predictions) -> None:
    """Refuse, before any work, an export whose inputs are missing."""
    if config.output.dense_points > 0 and predictions.depth is None:
        raise UserError(
            "dense points need depth predictions, but the predictions have no 'depth' "
            f"(run `vggt-sfm predict`, which saves depth, or set {param('output.dense_points', 0)})"
        )
    if config.output.report:
        require_plotly()


def write_outputs(
    work: Path,
    reconstruction: pycolmap.Reconstruction,
    config: PipelineConfig,
    images_dir: Path,
    prior: PriorCameras,
    predictions: Predictions,
    stages: Any,
) -> dict[str, Any]:
    """Write the model and every export the config asks for into `work`; returns facts for the summary."""
    output = config.output
    check_output_requirements(config, predictions)
    facts: dict[str, Any] = {}
    write_model(reconstruction, work / "sparse" / "0", text=output.text)
    write_ply(work / "points3D.ply", *reconstruction_points(reconstruction))
    if prior is not None:  # (a run without a prior has none to compare with)
        write_prior_cameras(work / PRIOR_FILE, prior)  # the predicted cameras, for the report's comparison

    if output.database:
        from .export.database import write_database

        write_database(
            work / "database.db",
            reconstruction,
            stages.features,
            stages.raw_matches,
            stages.verified_matches,
            prior,
        )

    export_points = None
    if output.dense_points > 0:
        from .export.dense import DenseConfig, dense_points

        dense = dense_points(predictions, reconstruction, images_dir, DenseConfig(max_points=output.dense_points))
        export_points = (dense.xyz, dense.rgb)
        write_ply(work / "dense_points.ply", dense.xyz, dense.rgb)
        facts["dense_points"] = int(len(dense.xyz))
        if dense.skipped:
            facts["dense_points_skipped"] = dict(dense.skipped)

    if "gsplat" in output.export:
        from .export.gsplat import export_gsplat

        export_gsplat(reconstruction, images_dir, work / "gs", downscales=tuple(output.downscales), points=export_points)
    if "nerfstudio" in output.export:
        from .export.nerfstudio import export_nerfstudio

        export_nerfstudio(
            reconstruction, images_dir, work / "nerfstudio", points=export_points, downscales=tuple(output.downscales)
        )
    return facts
