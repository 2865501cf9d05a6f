"""The predictions file: the contract between the VGGT model and the geometry.

A `.npz` with, for S frames (the model writes it, `reconstruct` reads it; users may bring their own):

| key | shape | meaning |
|---|---|---|
| `image_names` | (S,) str | file names relative to the images folder, in frame order |
| `extrinsic` | (S,3,4) | cam_from_world [R|t], OpenCV axes, as VGGT outputs |
| `intrinsic` | (S,3,3) | pinhole K in pixels of the prediction grid, pixel centres at integers (VGGT) |
| `grid_from_image` | (S,3,3), optional | maps an original-image pixel (x, y, 1) to the prediction grid; both with pixel centres at integers. Absent: the grid is the original image |
| `depth` | (S,H,W) or (S,H,W,1), optional | z-depth on the prediction grid |
| `depth_conf` | (S,H,W), optional | VGGT confidence, > 1, higher is better |
| `world_points` | (S,H,W,3), optional | point map in the prediction's world frame |
| `world_points_conf` | (S,H,W), optional | |

Files saved by the official VGGT demos have the same keys without `image_names` and `grid_from_image`; for
those the images are taken in sorted order and the mapping is derived from the documented preprocessing
(`crop` or `pad`, see `vggt_grid_from_image`).

The prior's world frame and scale are arbitrary (VGGT: first camera, normalised scale).
Inside vggt-sfm every pixel coordinate is in COLMAP's convention (pixel centres at +0.5);
`Predictions.image_intrinsics()` does that conversion once.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError, param

VGGT_IMAGE_SIZE = 518
VGGT_PATCH_SIZE = 14
PREPROCESS_MODES = ("crop", "pad")

REQUIRED_KEYS = ("extrinsic", "intrinsic")
OPTIONAL_MAPS = ("depth", "depth_conf", "world_points", "world_points_conf")


@dataclass
class Predictions:
    """Per-frame camera (and optionally depth / point map) predictions for a set of images."""

    image_names: list[str]
    cam_from_world: np.ndarray  # (S,3,4) float64, OpenCV axes
    intrinsics: np.ndarray  # (S,3,3) float64, prediction-grid pixels, pixel centres at integers
    grid_from_image: np.ndarray | None = None  # (S,3,3) float64
    depth: np.ndarray | None = None  # (S,H,W) float32
    depth_conf: np.ndarray | None = None  # (S,H,W) float32
    world_points: np.ndarray | None = None  # (S,H,W,3) float32
    world_points_conf: np.ndarray | None = None  # (S,H,W) float32
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.image_names)

    def index(self) -> dict[str, int]:
        """Frame index of each image name."""
        return {name: i for i, name in enumerate(self.image_names)}

    def image_from_grid(self) -> np.ndarray:
        """(S,3,3) maps a prediction-grid pixel back to the original image (pixel centres at integers)."""
        if self.grid_from_image is None:
            return np.broadcast_to(np.eye(3), (self.num_frames, 3, 3)).copy()
        return np.linalg.inv(self.grid_from_image)

    def image_intrinsics(self) -> np.ndarray:
        """(S,3,3) K in original-image pixels, in COLMAP's convention (pixel centres at +0.5)."""
        K = self.image_from_grid() @ self.intrinsics
        K[:, 0, 2] += 0.5 * K[:, 2, 2]
        K[:, 1, 2] += 0.5 * K[:, 2, 2]
        return K / K[:, 2:3, 2:3]

    def grid_points(self, frame: int, xy_image: np.ndarray) -> np.ndarray:
        """Map (N,2) original-image pixels (COLMAP convention) to prediction-grid pixels (integer centres)."""
        xy = np.asarray(xy_image, dtype=np.float64) - 0.5
        if self.grid_from_image is None:
            return xy
        G = self.grid_from_image[frame]
        h = xy @ G[:2, :2].T + G[:2, 2]
        return h

    def sample_depth(self, frame: int, xy_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bilinearly sample depth and confidence at (N,2) original-image pixels (COLMAP convention).

        Points outside the prediction grid get depth 0 and confidence 0.
        """
        if self.depth is None:
            raise ValueError("these predictions have no depth")
        grid = self.grid_points(frame, xy_image)
        depth = _bilinear(self.depth[frame], grid)
        conf = (
            _bilinear(self.depth_conf[frame], grid)
            if self.depth_conf is not None
            else np.where(depth > 0, np.inf, 0.0)
        )
        return depth, conf

    def subset(self, names: list[str]) -> Predictions:
        """The predictions of the given images, in that order."""
        index = self.index()
        order = [index[n] for n in names]

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[order]

        return Predictions(
            image_names=list(names),
            cam_from_world=self.cam_from_world[order],
            intrinsics=self.intrinsics[order],
            grid_from_image=take(self.grid_from_image),
            depth=take(self.depth),
            depth_conf=take(self.depth_conf),
            world_points=take(self.world_points),
            world_points_conf=take(self.world_points_conf),
        )


def _bilinear(values: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Sample an (H,W) map at (N,2) pixel positions with integer centres; 0 outside."""
    H, W = values.shape
    x, y = xy[:, 0], xy[:, 1]
    inside = (x >= 0) & (y >= 0) & (x <= W - 1) & (y <= H - 1)
    x0 = np.clip(np.floor(x).astype(int), 0, W - 1)
    y0 = np.clip(np.floor(y).astype(int), 0, H - 1)
    x1 = np.clip(x0 + 1, 0, W - 1)
    y1 = np.clip(y0 + 1, 0, H - 1)
    wx = np.clip(x - x0, 0, 1)
    wy = np.clip(y - y0, 0, 1)
    out = (
        values[y0, x0] * (1 - wx) * (1 - wy)
        + values[y0, x1] * wx * (1 - wy)
        + values[y1, x0] * (1 - wx) * wy
        + values[y1, x1] * wx * wy
    )
    return np.where(inside, out, 0.0)


def vggt_resized_size(width: int, height: int, mode: str) -> tuple[int, int]:
    """(width, height) an image is resized to by VGGT's loader, before cropping or padding."""
    if mode not in PREPROCESS_MODES:
        raise UserError(f"unknown preprocessing mode {mode!r}; use one of {', '.join(PREPROCESS_MODES)}")
    target = VGGT_IMAGE_SIZE
    if mode == "crop" or width >= height:
        new_width = target
        new_height = round(height * (new_width / width) / VGGT_PATCH_SIZE) * VGGT_PATCH_SIZE
    else:
        new_height = target
        new_width = round(width * (new_height / height) / VGGT_PATCH_SIZE) * VGGT_PATCH_SIZE
    return new_width, new_height


def vggt_grid_from_image(
    sizes: list[tuple[int, int]], mode: str = "crop"
) -> tuple[np.ndarray, tuple[int, int]]:
    """The official loader's geometry: per-image (3,3) grid_from_image and the common grid (width, height).

    `sizes` are the original (width, height). Resize to width 518 (`crop`, then centre-crop rows above 518) or
    longest side 518 (`pad`, then centre-pad to 518x518); sides are multiples of 14; images of different
    resulting sizes are centre-padded to the largest. Pixel centres at integers on both sides.
    """
    per_image = []
    shapes = []
    for width, height in sizes:
        new_w, new_h = vggt_resized_size(width, height, mode)
        sx, sy = new_w / width, new_h / height
        off_x = off_y = 0.0
        out_w, out_h = new_w, new_h
        if mode == "crop" and new_h > VGGT_IMAGE_SIZE:
            off_y = -float((new_h - VGGT_IMAGE_SIZE) // 2)
            out_h = VGGT_IMAGE_SIZE
        if mode == "pad":
            off_x = float((VGGT_IMAGE_SIZE - new_w) // 2)
            off_y = float((VGGT_IMAGE_SIZE - new_h) // 2)
            out_w = out_h = VGGT_IMAGE_SIZE
        # Scaling maps pixel edges: x_grid + 0.5 = s (x + 0.5), then the crop / pad offset.
        G = np.array(
            [[sx, 0.0, 0.5 * sx - 0.5 + off_x], [0.0, sy, 0.5 * sy - 0.5 + off_y], [0.0, 0.0, 1.0]]
        )
        per_image.append(G)
        shapes.append((out_w, out_h))
    grid_w = max(s[0] for s in shapes)
    grid_h = max(s[1] for s in shapes)
    for G, (w, h) in zip(per_image, shapes):
        G[0, 2] += (grid_w - w) // 2
        G[1, 2] += (grid_h - h) // 2
    return np.stack(per_image), (grid_w, grid_h)


def _check_finite(name: str, array: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise UserError(f"predictions file {path}: '{name}' has {bad} NaN or infinite values (re-run the prediction)")


def load_predictions(
    path: Path | str,
    image_sizes: dict[str, tuple[int, int]] | None = None,
    preprocess: str = "crop",
) -> Predictions:
    """Read and validate a predictions file.

    `image_sizes` (name -> (width, height) of the original images, in sorted name order) is needed for files
    from the official demos, which have no `image_names`: the frames are then the images in sorted order and
    `grid_from_image` follows from `preprocess`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"predictions file not found: {path} (run `vggt-sfm predict` or pass the right {param('predictions')})")
    if not zipfile.is_zipfile(path):
        raise UserError(f"predictions file {path} is not an .npz archive (save it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:  # a damaged archive or an object array
        raise UserError(f"cannot read predictions file {path}: {error}") from None

    for key in REQUIRED_KEYS:
        if key not in arrays:
            raise UserError(
                f"predictions file {path} lacks the required key '{key}' (it has: {', '.join(sorted(arrays))})"
            )
    extrinsic = np.asarray(arrays.pop("extrinsic"), dtype=np.float64)
    intrinsic = np.asarray(arrays.pop("intrinsic"), dtype=np.float64)
    if extrinsic.ndim == 4 and extrinsic.shape[0] == 1:  # a saved [B=1,S,...] batch
        extrinsic, intrinsic = extrinsic[0], intrinsic[0]
    if extrinsic.ndim != 3 or extrinsic.shape[1:] != (3, 4):
        raise UserError(f"predictions file {path}: 'extrinsic' must have shape (S,3,4), got {extrinsic.shape}")
    num = extrinsic.shape[0]
    if intrinsic.shape != (num, 3, 3):
        raise UserError(f"predictions file {path}: 'intrinsic' must have shape ({num},3,3), got {intrinsic.shape}")
    _check_finite("extrinsic", extrinsic, path)
    _check_finite("intrinsic", intrinsic, path)

    official_file = "image_names" not in arrays
    if not official_file:
        names = [str(n) for n in arrays.pop("image_names").tolist()]
        if len(names) != num:
            raise UserError(
                f"predictions file {path}: {len(names)} image_names but {num} cameras (the file is inconsistent)"
            )
    else:
        if image_sizes is None:
            raise UserError(f"predictions file {path} has no 'image_names'; give the images folder so frames can be matched")
        names = sorted(image_sizes)
        if len(names) != num:
            raise UserError(
                f"predictions file {path} has {num} frames but the images folder has {len(names)} images "
                "(an official VGGT file must come from exactly these images, in sorted order)"
            )

    grid_from_image = arrays.pop("grid_from_image", None)
    if grid_from_image is not None:
        grid_from_image = np.asarray(grid_from_image, dtype=np.float64)
        if grid_from_image.shape != (num, 3, 3):
            raise UserError(f"predictions file {path}: 'grid_from_image' must have shape ({num},3,3)")
        _check_finite("grid_from_image", grid_from_image, path)
    elif official_file:
        grid_from_image, _ = vggt_grid_from_image([image_sizes[n] for n in names], preprocess)

    maps: dict[str, np.ndarray | None] = {}
    for key in OPTIONAL_MAPS:
        value = arrays.pop(key, None)
        if value is None:
            maps[key] = None
            continue
        value = np.asarray(value, dtype=np.float32)
        if value.shape[0] == 1 and value.ndim >= 4 and value.shape[1] == num and num != 1:
            value = value[0]
        if key == "depth" and value.ndim == 4 and value.shape[-1] == 1:
            value = value[..., 0]
        expected_ndim = 4 if key == "world_points" else 3
        if value.ndim != expected_ndim or value.shape[0] != num:
            raise UserError(f"predictions file {path}: '{key}' has shape {value.shape}, expected {num} frames")
        _check_finite(key, value, path)
        maps[key] = value
    if maps["depth_conf"] is not None and maps["depth"] is None:
        maps["depth_conf"] = None
    return Predictions(
        image_names=names,
        cam_from_world=extrinsic,
        intrinsics=intrinsic,
        grid_from_image=grid_from_image,
        extras={k: v for k, v in arrays.items() if isinstance(v, np.ndarray)},
        **maps,
    )


def save_predictions(predictions: Predictions, path: Path | str) -> None:
    """Write the predictions file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "image_names": np.asarray(predictions.image_names, dtype=str),
        "extrinsic": predictions.cam_from_world.astype(np.float32),
        "intrinsic": predictions.intrinsics.astype(np.float32),
    }
    if predictions.grid_from_image is not None:
        arrays["grid_from_image"] = predictions.grid_from_image.astype(np.float64)
    for key in OPTIONAL_MAPS:
        value = getattr(predictions, key)
        if value is not None:
            arrays[key] = value.astype(np.float32)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def match_images(predictions: Predictions, image_names: list[str], path: Path | str) -> Predictions:
    """Restrict predictions to the readable images, checking that every image has a prediction."""
    index = predictions.index()
    missing = [n for n in image_names if n not in index]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise UserError(
            f"predictions file {path} has no frame for {len(missing)} image(s): {shown} "
            "(predict again for this images folder)"
        )
    return predictions.subset(image_names)
