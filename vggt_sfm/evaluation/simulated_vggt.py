"""A stand-in for VGGT made from ground truth, for tests and benchmarks of what happens around the model.

`SimulatedVGGT` is a torch module with VGGT's interface (`model(images, heads=...)` -> `pose_enc`, `depth`,
`depth_conf`), so that `predict` runs unchanged on it: one pass, windows, chunks, the executor, the merge. It knows
the images by their pixels: each input frame is matched to its image through a hash of the preprocessed frame.
Each forward pass then predicts its frames as a real VGGT pass would look to the geometry: the ground-truth
cameras through `simulate_prior` (VGGT-like noise, depth rendered from a model with points of the same images),
with a noise draw of its own (seeded by the set of frames it sees, so the same pass gives the same prediction),
in a frame of its own (its first camera at the origin, its first frame's median depth 1, as VGGT normalises).
Each frame gets the same amount of noise whatever the pass (the centre noise is a fraction of the whole scene's
extent, not of the part the pass sees).

These are SIMULATED predictions: they say nothing about how VGGT itself predicts, only how the rest of the
pipeline copes with independent passes that each carry their own error.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap
import torch

from ..images import read_image
from ..merge import transform_predictions
from ..model import VGGTConfig
from ..model.pose_encoding import extrinsics_intrinsics_to_pose_encoding
from ..model.preprocess import _paste_centred, resize_image
from ..prior import PriorCameras
from .metrics import read_ground_truth
from .simulate import NOISE_LEVELS, NoiseLevel, simulate_prior


def _fingerprint(frame: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(frame, dtype=np.float32).tobytes()).hexdigest()


class SimulatedVGGT(torch.nn.Module):
    """VGGT's interface over simulated predictions of the images of `ground_truth` found in `images_dir`.

    `depth_from`: a COLMAP model with 3D points of the same images (`simulate_prior`'s); `level` and `seed` the
    noise (each pass draws its own from `seed` and its frames). `calls` lists the frames of every pass run.
    """

    def __init__(
        self,
        ground_truth: PriorCameras | pycolmap.Reconstruction | str | Path,
        images_dir: str | Path,
        depth_from: pycolmap.Reconstruction | str | Path,
        level: str | NoiseLevel = "vggt",
        seed: int = 0,
        preprocess: str = "crop",
    ) -> None:
        super().__init__()
        self.truth = ground_truth if isinstance(ground_truth, PriorCameras) else read_ground_truth(ground_truth)
        self.images_dir, self.depth_from, self.level, self.seed = Path(images_dir), depth_from, level, seed
        self.preprocess = preprocess
        self.config = VGGTConfig()  # the memory estimate of `predict` is VGGT-1B's
        self.enabled_heads = ("camera", "depth")
        self.calls: list[list[str]] = []
        self._frames: dict[str, np.ndarray] = {}  # name -> preprocessed frame before padding
        self._names: dict[tuple[int, int], dict[str, str]] = {}  # grid (H, W) -> fingerprint -> name

    def _name_index(self, height: int, width: int) -> dict[str, str]:
        if not self._frames:
            for name in self.truth.image_names:
                if (self.images_dir / name).exists():
                    self._frames[name] = resize_image(read_image(self.images_dir / name), self.preprocess)
        if (height, width) not in self._names:
            self._names[(height, width)] = {
                _fingerprint(_paste_centred(frame, height, width)): name for name, frame in self._frames.items()
            }
        return self._names[(height, width)]

    def _pass(self, names: list[str], grid_hw: tuple[int, int]):
        """Predictions of one pass over `names`, in the pass's own frame (see the module docstring)."""
        index = {name: i for i, name in enumerate(self.truth.image_names)}
        rows = [index[name] for name in names]
        subset = PriorCameras(
            names, self.truth.image_sizes[rows], self.truth.cam_from_world[rows], self.truth.intrinsics[rows]
        )
        digest = hashlib.sha1("\n".join(sorted(names)).encode()).digest()
        seed = self.seed * 2**32 + int.from_bytes(digest[:4], "little")  # the same pass, the same draw
        # The centre noise is a fraction of the extent of the cameras given; a pass sees a part of the scene, but
        # its frames get as much noise as in a pass over all of them.
        level = self.level if isinstance(self.level, NoiseLevel) else NOISE_LEVELS[self.level]
        level = dataclasses.replace(
            level, center_fraction=level.center_fraction * self.truth.scene_scale() / subset.scene_scale()
        )
        predicted = simulate_prior(
            subset, level=level, seed=seed, preprocess=self.preprocess, depth_from=self.depth_from
        ).subset(names)
        # VGGT's frame: the first camera at the origin, the first frame's median depth 1.
        first = pycolmap.Rigid3d(predicted.cam_from_world[0])
        depth = predicted.depth[0][predicted.depth[0] > 0]
        scale = 1.0 / float(np.median(depth)) if len(depth) else 1.0
        predicted = transform_predictions(predicted, pycolmap.Sim3d(scale, first.rotation, scale * first.translation))
        if tuple(predicted.depth.shape[1:]) != grid_hw:
            raise ValueError(f"simulated depth is {predicted.depth.shape[1:]}, the input grid {grid_hw}")
        return predicted

    def forward(self, images: torch.Tensor, query_points: Any = None, heads: Any = None) -> dict[str, torch.Tensor]:
        frames = images[0] if images.dim() == 5 else images
        height, width = frames.shape[-2:]
        index = self._name_index(height, width)
        try:
            names = [index[_fingerprint(frame.detach().cpu().float().numpy())] for frame in frames]
        except KeyError:
            raise ValueError("a frame is none of the simulated model's images (another folder, or preprocessing)") from None
        self.calls.append(names)
        predicted = self._pass(names, (height, width))
        extrinsic = torch.from_numpy(predicted.cam_from_world)
        intrinsic = torch.from_numpy(predicted.intrinsics)
        pose_enc = extrinsics_intrinsics_to_pose_encoding(extrinsic, intrinsic, (height, width))
        return {
            "pose_enc": pose_enc[None].to(images.device),
            "depth": torch.from_numpy(predicted.depth.astype(np.float32))[None, ..., None].to(images.device),
            "depth_conf": torch.from_numpy(predicted.depth_conf.astype(np.float32))[None].to(images.device),
        }
