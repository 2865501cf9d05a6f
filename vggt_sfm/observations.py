"""The observations of a `pycolmap.Reconstruction` as flat arrays.

Walking `point.track.elements` builds a Python object per observation (about 17 us each); asking each image for
its observed keypoints is about 1 us per observation. Stages that need every observation (colours, connected
image groups) read them once into arrays and work on those.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pycolmap


@dataclass
class ObservationTable:
    """One row per observation: image `image_id` sees 3D point `point3D_id` at its keypoint `point2D_idx`."""

    image_id: np.ndarray  # (O,) int64
    point2D_idx: np.ndarray  # (O,) int64
    point3D_id: np.ndarray  # (O,) int64

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(P,) the distinct point3D ids (sorted) and (O,) each observation's row in them."""
        return np.unique(self.point3D_id, return_inverse=True)


def observation_table(rec: pycolmap.Reconstruction, image_ids: Collection[int] | None = None) -> ObservationTable:
    """Every observation of the registered images (or of `image_ids` among them), image by image."""
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    images, indices, points = [], [], []
    for image_id in sorted(rec.reg_image_ids()):
        if wanted is not None and image_id not in wanted:
            continue
        image = rec.images[image_id]
        # Both lists run over the keypoints with a 3D point, in keypoint order.
        observed = np.asarray(image.get_observation_point2D_idxs(), dtype=np.int64)
        observed_points = image.get_observation_points2D()
        ids = np.fromiter((p.point3D_id for p in observed_points), dtype=np.int64, count=len(observed_points))
        images.append(np.full(len(observed), image_id, dtype=np.int64))
        indices.append(observed)
        points.append(ids)
    if not images:
        empty = np.zeros(0, dtype=np.int64)
        return ObservationTable(empty, empty.copy(), empty.copy())
    return ObservationTable(np.concatenate(images), np.concatenate(indices), np.concatenate(points))
