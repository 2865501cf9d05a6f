"""Everything a run writes into its (temporary) output folder, in one place.

`OUTPUT/sparse/0/` (binary model; `--text` adds the text files), `OUTPUT/points3D.ply`, and on request
`OUTPUT/database.db` (COLMAP 4 schema), `OUTPUT/gs/` (3DGS / gsplat layout) and `OUTPUT/transforms.json`
(nerfstudio). The caller renames the folder into place afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from .config import PipelineConfig
from .errors import UserError
from .predictions import Predictions
from .prior import PriorCameras

logger = logging.getLogger(__name__)


def model_points(reconstruction: pycolmap.Reconstruction) -> tuple[np.ndarray, np.ndarray]:
    """(N,3) float64 positions and (N,3) uint8 colours of the model's 3D points."""
    points = list(reconstruction.points3D.values())
    if not points:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.uint8)
    xyz = np.array([p.xyz for p in points], dtype=np.float64)
    rgb = np.array([p.color for p in points], dtype=np.uint8)
    return xyz, rgb


def write_outputs(
    work: Path,
    reconstruction: pycolmap.Reconstruction,
    config: PipelineConfig,
    images_dir: Path,
    prior: PriorCameras,
    predictions: Predictions,
    stages: Any,
    overwrite: bool = False,
) -> None:
    """Write the model and every export the config asks for into `work`."""
    from .export.colmap import write_model
    from .export.ply import write_ply

    output = config.output
    if output.dense_points > 0 and predictions.depth is None:
        raise UserError(
            "--dense-points needs depth predictions, but the predictions have no 'depth' "
            "(run `vggt-sfm predict`, which saves depth, or drop --dense-points)"
        )
    write_model(reconstruction, work / "sparse" / "0", text=output.text, overwrite=True)
    xyz, rgb = model_points(reconstruction)
    write_ply(work / "points3D.ply", xyz, rgb)

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
        from .export.dense import dense_points

        export_points = dense_points(predictions, reconstruction, images_dir, max_points=output.dense_points)
        write_ply(work / "dense_points.ply", *export_points)

    if "gsplat" in output.export:
        from .export.gsplat import export_gsplat

        export_gsplat(
            reconstruction,
            images_dir,
            work / "gs",
            downscales=tuple(output.downscales),
            points=export_points,
            overwrite=overwrite,
        )
    if "nerfstudio" in output.export:
        from .export.nerfstudio import export_nerfstudio

        export_nerfstudio(reconstruction, images_dir, work, points=export_points)
