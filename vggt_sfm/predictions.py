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


def _frame(names: list[str], index: int) -> str:
    return f"frame {index} ({names[index]})"


def _check_cameras(
    extrinsic: np.ndarray, intrinsic: np.ndarray, grid_from_image: np.ndarray | None, names: list[str], path: Path
) -> None:
    """Rotations that are rotations, positive focal lengths, a grid mapping that keeps the image upright."""
    R = extrinsic[:, :, :3]
    orthogonality = np.abs(R @ np.transpose(R, (0, 2, 1)) - np.eye(3)).max(axis=(1, 2))
    bad = np.flatnonzero((orthogonality > 1e-3) | (np.linalg.det(R) <= 0))
    if len(bad):
        raise UserError(
            f"predictions file {path}: 'extrinsic' of {_frame(names, bad[0])} is not a rotation "
            f"(|R R^T - I| = {orthogonality[bad[0]]:.3g}, det {np.linalg.det(R[bad[0]]):.3g}; {len(bad)} frame(s) "
            "like it); extrinsic must be cam_from_world [R|t] with R a rotation"
        )
    focal = intrinsic[:, [0, 1], [0, 1]] / intrinsic[:, 2:3, 2]
    bad = np.flatnonzero((focal <= 0).any(axis=1))
    if len(bad):
        fx, fy = focal[bad[0]]
        raise UserError(
            f"predictions file {path}: 'intrinsic' of {_frame(names, bad[0])} has focal lengths ({fx:.4g}, "
            f"{fy:.4g}) in pixels; they must be positive ({len(bad)} frame(s) like it)"
        )
    if grid_from_image is not None:
        bad = np.flatnonzero((grid_from_image[:, 0, 0] <= 0) | (grid_from_image[:, 1, 1] <= 0))
        if len(bad):
            raise UserError(
                f"predictions file {path}: 'grid_from_image' of {_frame(names, bad[0])} does not scale the "
                "image by positive factors (it must map an image pixel (x, y, 1) to the prediction grid)"
            )


def _check_map_shapes(maps: dict[str, np.ndarray | None], path: Path) -> None:
    """Depth, confidence and point maps must share one prediction grid."""
    shapes = {key: value.shape[1:3] for key, value in maps.items() if value is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"'{key}' {shape[1]}x{shape[0]}" for key, shape in shapes.items())
        raise UserError(
            f"predictions file {path}: the maps are on different grids ({listed}, width x height); they must "
            "all have the prediction grid's size"
        )


def check_image_geometry(
    predictions: Predictions, image_sizes: dict[str, tuple[int, int] | None], source: Path | str
) -> None:
    """Refuse predictions made for other images: each frame's image must map onto its prediction grid.

    The grid is the depth maps' when there are any, else the one centred on the predicted principal point (as
    VGGT predicts it). On one axis at least the image must span that grid (to 25 %: VGGT fits the width, or the
    longest side), and the principal point must lie inside the image. Photos of another size named like the
    predicted ones (0000.jpg, ...) fail here instead of ending as a model with a large reprojection error.
    """
    K_image = predictions.image_intrinsics()
    image_from_grid = predictions.image_from_grid()
    for i, name in enumerate(predictions.image_names):
        if image_sizes.get(name) is None:  # not in the folder, or unreadable
            continue
        width, height = image_sizes[name]
        if predictions.depth is not None:
            grid_size = np.array(predictions.depth.shape[2:0:-1], dtype=np.float64)
        else:
            K = predictions.intrinsics[i] / predictions.intrinsics[i, 2, 2]
            grid_size = 2.0 * K[:2, 2]  # VGGT's principal point is (W/2, H/2) of its grid
        # The size of image that would span that grid, through this frame's mapping.
        implied = grid_size * np.diag(image_from_grid[i])[:2]
        ratio = np.array([width, height]) / implied
        cx, cy = K_image[i, 0, 2], K_image[i, 1, 2]
        inside = 0 <= cx <= width and 0 <= cy <= height
        if not inside or not np.any(np.abs(np.log(ratio)) < np.log(1.25)):
            raise UserError(
                f"predictions {source} were made for images of about {implied[0]:.0f}x{implied[1]:.0f}, but "
                f"{name} is {width}x{height} (its principal point would be at ({cx:.0f}, {cy:.0f})); these are "
                "predictions of other images: predict again for this images folder"
            )


def load_predictions(
    path: Path | str,
    image_sizes: dict[str, tuple[int, int] | None] | None = None,
    preprocess: str = "crop",
) -> Predictions:
    """Read and validate a predictions file.

    `image_sizes` (name -> (width, height) of the original images; None for an unreadable one) is needed for
    files from the official demos, which have no `image_names`: the frames are then the images in sorted name
    order and `grid_from_image` follows from `preprocess`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"predictions file not found: {path} (run `vggt-sfm predict` or pass the right {param('predictions')})")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if zip_start:  # a zip whose end (the central directory) is missing: cut short by a copy or a crash
            raise UserError(
                f"predictions file {path} is truncated (the .npz archive has no end); copy it again or re-run the "
                "prediction"
            )
        raise UserError(f"predictions file {path} is not an .npz archive (save it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise UserError(f"predictions file {path} is damaged ({error}); copy it again or re-run the prediction") from None
        # An object array: reading it would run code from the file.
        raise UserError(f"predictions file {path} holds Python objects, not arrays (save plain numeric arrays)") from None
    except Exception as error:  # a damaged archive: bad CRC, cut-off member
        raise UserError(
            f"predictions file {path} is damaged ({error}); copy it again or re-run the prediction"
        ) from None

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
        names = sorted(image_sizes)  # every image of the folder, readable or not: frames follow that order
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
        # Unreadable images (size None) keep an identity mapping: their frames are dropped before any use.
        known = [i for i, n in enumerate(names) if image_sizes[n] is not None]
        grid_from_image = np.tile(np.eye(3), (num, 1, 1))
        if known:
            grid_from_image[known] = vggt_grid_from_image([image_sizes[names[i]] for i in known], preprocess)[0]
    _check_cameras(extrinsic, intrinsic, grid_from_image, names, path)

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
    _check_map_shapes(maps, path)
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
    for key, value in predictions.extras.items():  # e.g. the merge report of chunked predictions (a JSON string)
        if key not in arrays and isinstance(value, np.ndarray) and not value.dtype.hasobject:
            arrays[key] = value
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def shown_names(names: list[str], count: int = 3) -> str:
    """A few names of a list, for a message."""
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")


def match_images(predictions: Predictions, image_names: list[str], path: Path | str) -> Predictions:
    """Restrict predictions to the readable images, checking that every image has a prediction."""
    index = predictions.index()
    missing = [n for n in image_names if n not in index]
    if missing:
        wanted = set(image_names)
        others = [n for n in predictions.image_names if n not in wanted]
        also = f"; their other frames are of {shown_names(others)}" if others else ""
        raise UserError(
            f"predictions {path} have no frame for {len(missing)} of the {len(image_names)} image(s) in the "
            f"images folder: {shown_names(missing)}{also} (predict again for this images folder, or move those images "
            "out of it)"
        )
    return predictions.subset(image_names)
