"""Prior cameras: the predicted poses and intrinsics in original-image pixels, as every geometric stage uses them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .predictions import Predictions


@dataclass
class PriorCameras:
    """Predicted cameras of S images, in the prediction's (arbitrary) world frame and scale."""

    image_names: list[str]
    image_sizes: np.ndarray  # (S,2) int: (width, height) of the original images
    cam_from_world: np.ndarray  # (S,3,4) float64, OpenCV axes
    intrinsics: np.ndarray  # (S,3,3) float64, original pixels, COLMAP convention (pixel centres at +0.5)

    @property
    def num_images(self) -> int:
        return len(self.image_names)

    def centers(self) -> np.ndarray:
        """(S,3) camera centres in world coordinates: C = -R^T t."""
        R = self.cam_from_world[:, :, :3]
        t = self.cam_from_world[:, :, 3]
        return -np.einsum("sji,sj->si", R, t)

    def viewing_directions(self) -> np.ndarray:
        """(S,3) unit optical axes in world coordinates (the third row of R)."""
        return self.cam_from_world[:, 2, :3] / np.linalg.norm(self.cam_from_world[:, 2, :3], axis=1, keepdims=True)

    def scene_scale(self) -> float:
        """A robust extent of the camera set: median distance of the centres to their median."""
        centers = self.centers()
        spread = np.linalg.norm(centers - np.median(centers, axis=0), axis=1)
        scale = float(np.median(spread))
        return scale if scale > 0 else 1.0

    def projection_matrices(self) -> np.ndarray:
        """(S,3,4) P = K [R|t] in original pixels (COLMAP convention)."""
        return self.intrinsics @ self.cam_from_world


def rotation_angles_deg(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    """(N,) angles in degrees between rotation matrices (N,3,3) R_a and R_b (from the trace of R_a R_b^T)."""
    cosine = (np.einsum("sij,sij->s", R_a, R_b) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


def prior_from_predictions(predictions: Predictions, image_sizes: np.ndarray) -> PriorCameras:
    """Prior cameras from predictions; `image_sizes` (S,2) are the original (width, height) in frame order."""
    return PriorCameras(
        image_names=list(predictions.image_names),
        image_sizes=np.asarray(image_sizes, dtype=int),
        cam_from_world=np.asarray(predictions.cam_from_world, dtype=np.float64),
        intrinsics=predictions.image_intrinsics(),
    )
