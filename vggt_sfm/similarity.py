"""Robust similarity (Sim3d) between two sets of corresponding 3D points."""

from __future__ import annotations

import numpy as np
import pycolmap


def align_points(src: np.ndarray, tgt: np.ndarray, inlier_distance: float) -> tuple[pycolmap.Sim3d | None, int]:
    """tgt_from_src similarity of (N,3) corresponding points, N >= 3: LO-RANSAC (`pycolmap.estimate_sim3d_robust`,
    fixed seed), then least squares (`pycolmap.estimate_sim3d`) on its inliers, so that a few wrong
    correspondences do not drag the fit.

    Returns the similarity (None if degenerate) and the number of inliers it was fitted on.
    """
    options = pycolmap.RANSACOptions(max_error=inlier_distance, random_seed=0)
    robust = pycolmap.estimate_sim3d_robust(src, tgt, options)
    inliers = np.ones(len(src), dtype=bool)
    if robust is not None and robust["num_inliers"] >= 3:
        inliers = np.asarray(robust["inlier_mask"], dtype=bool)
    return pycolmap.estimate_sim3d(src[inliers], tgt[inliers]), int(np.count_nonzero(inliers))
