"""The folder layout that the original 3DGS code and gsplat train from.

```
output_dir/
  images/            undistorted images (pycolmap.undistort_images), same names as the inputs
  images_2/ ...      optional downscaled copies, sized like 3DGS's convert.py (ImageMagick percentage resize)
  sparse/0/          cameras.bin (PINHOLE, matching images/), images.bin, points3D.bin, rigs.bin, frames.bin
  sparse/0/points3D.ply   the initial points 3DGS loads (x,y,z, nx,ny,nz, r,g,b)
```
3DGS accepts only PINHOLE / SIMPLE_PINHOLE cameras, hence the undistortion, and it ignores the principal point
(it builds its projection from the fields of view alone). COLMAP's undistorter keeps the principal point where
it was, so by default each image is also cropped, with a sub-pixel shift, to be centred on it, and to a size
that every downscale factor divides: gsplat's parser scales K by (size of the image it loads) / (width // N),
and 3DGS's fields of view and nerfstudio's floor(size / N) give the exact 1 / N camera only for such sizes
(a 1530x1015 image at N = 2 put gsplat's points up to 0.49 px off at the edges). gsplat reads `sparse/0` with
pycolmap (principal point included) and maps `images_N/` to `images/` by sorted file name; for JPEG images it
ignores `images_N/` and writes its own PNG copies beside them (`images_N_png/`).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pycolmap

from ..errors import UserError
from ..log import quiet_pycolmap
from .files import atomic_output, check_inputs_outside, stage_images, write_downscaled_images
from .ply import reconstruction_points, write_ply

logger = logging.getLogger(__name__)

DEFAULT_DOWNSCALES = (2, 4, 8)


def add_points(
    reconstruction: pycolmap.Reconstruction, xyz: np.ndarray, rgb: np.ndarray
) -> None:
    """Add points without observations (dense initial points) to a reconstruction, in place."""
    for point, color in zip(np.asarray(xyz, dtype=np.float64), np.asarray(rgb, dtype=np.uint8)):
        reconstruction.add_point3D(point, pycolmap.Track(), color)


def _check_images(reconstruction: pycolmap.Reconstruction, images_dir: Path) -> list[str]:
    names = sorted(reconstruction.images[i].name for i in reconstruction.reg_image_ids())
    if not names:
        raise UserError("the reconstruction has no registered images; there is nothing to export")
    missing = [n for n in names if not (images_dir / n).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise UserError(f"{len(missing)} image(s) of the reconstruction are missing from {images_dir}: {shown}")
    if any("/" in n for n in names):
        logger.warning("image names with sub-folders: 3DGS looks images up by base name only, gsplat handles them")
    return names


def export_gsplat(
    reconstruction: pycolmap.Reconstruction,
    images_dir: Path | str,
    output_dir: Path | str,
    downscales: tuple[int, ...] = DEFAULT_DOWNSCALES,
    points: tuple[np.ndarray, np.ndarray] | None = None,
    max_image_size: int = -1,
    center_principal_point: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a 3DGS / gsplat training folder from a reconstruction and its images.

    `points` = (xyz (N,3), rgb (N,3) uint8), e.g. from `dense.dense_points`, are added to the sparse points:
    to `points3D.ply` (read by 3DGS) and, without observations, to `points3D.bin` (read by gsplat), so both
    trainers start from the same cloud. `max_image_size` > 0 caps the undistorted images' longest side.
    `center_principal_point` crops every image around its principal point, as 3DGS assumes, to a size that
    every factor of `downscales` divides.
    """
    images_dir = Path(images_dir)
    output_dir = Path(output_dir)
    check_inputs_outside(output_dir, images_dir)
    names = _check_images(reconstruction, images_dir)
    with atomic_output(output_dir, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory(
        prefix=".gsplat-work.", dir=tmp.parent
    ) as work:
        work = Path(work)
        distorted = work / "distorted"
        distorted.mkdir()
        reconstruction.write_binary(str(distorted))
        source = stage_images(images_dir, names, work / "staged")
        options = pycolmap.UndistortCameraOptions()
        options.max_image_size = max_image_size
        undistorted = work / "undistorted"
        with quiet_pycolmap():
            pycolmap.undistort_images(
                str(undistorted), str(distorted), str(source), output_type="COLMAP", undistort_options=options
            )
        shutil.move(str(undistorted / "images"), str(tmp / "images"))
        model_dir = tmp / "sparse" / "0"
        model_dir.mkdir(parents=True)
        model = pycolmap.Reconstruction(str(undistorted / "sparse"))
        _check_undistorted(model, tmp / "images", names)
        if center_principal_point:
            center_principal_points(model, tmp / "images", size_multiple=math.lcm(*map(int, downscales or (1,))))

        xyz, rgb = reconstruction_points(model)
        if points is not None:
            extra_xyz, extra_rgb = (np.asarray(a) for a in points)
            add_points(model, extra_xyz, extra_rgb)
            xyz = np.concatenate([xyz, extra_xyz.reshape(-1, 3)])
            rgb = np.concatenate([rgb, extra_rgb.reshape(-1, 3).astype(np.uint8)])
        model.write_binary(str(model_dir))
        write_ply(model_dir / "points3D.ply", xyz, rgb)
        write_downscaled_images(tmp / "images", names, tmp, tuple(downscales), rounding="half_up")
    return output_dir


def _check_undistorted(model: pycolmap.Reconstruction, images_dir: Path, names: list[str]) -> None:
    written = {model.images[i].name for i in model.reg_image_ids()}
    lost = [n for n in names if n not in written or not (images_dir / n).is_file()]
    if lost:
        raise RuntimeError(f"COLMAP's undistorter did not write {len(lost)} image(s), e.g. {lost[0]}")
    for camera in model.cameras.values():
        if camera.model not in (pycolmap.CameraModelId.PINHOLE, pycolmap.CameraModelId.SIMPLE_PINHOLE):
            raise RuntimeError(f"undistorted camera {camera.camera_id} is {camera.model.name}, not PINHOLE")


def _centred_crop(size: int, principal: float, multiple: int = 1) -> tuple[int, float]:
    """New size and offset (new pixel = old pixel - offset) that put `principal` at the centre.

    The size is a multiple of `multiple` unless the image is too small for one.
    """
    half = min(principal, size - principal)
    new_size = int(np.floor(2 * half / multiple)) * multiple
    if new_size < 1:
        new_size = max(int(np.floor(2 * half)), 1)
    return new_size, principal - new_size / 2


def center_principal_points(
    model: pycolmap.Reconstruction, images_dir: Path, tolerance_px: float = 1e-3, size_multiple: int = 1
) -> None:
    """Crop the images of each PINHOLE camera so that its principal point is the image centre (in place), and
    its width and height multiples of `size_multiple`.

    The shift is sub-pixel in general, so pixels are resampled (bicubic); keypoints move with the image.
    """
    for camera in model.cameras.values():
        fx, fy = camera.focal_length_x, camera.focal_length_y
        cx, cy = camera.principal_point_x, camera.principal_point_y
        centred = abs(cx - camera.width / 2) < tolerance_px and abs(cy - camera.height / 2) < tolerance_px
        if centred and camera.width % size_multiple == 0 and camera.height % size_multiple == 0:
            continue
        width, offset_x = _centred_crop(camera.width, cx, size_multiple)
        height, offset_y = _centred_crop(camera.height, cy, size_multiple)
        # With pixel centres at integers on both sides, new pixel (u, v) samples old (u + ox, v + oy).
        shift = np.array([[1.0, 0.0, offset_x], [0.0, 1.0, offset_y]])
        for image in model.images.values():
            if image.camera_id != camera.camera_id:
                continue
            path = images_dir / image.name
            pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if pixels is None:
                raise RuntimeError(f"cannot read the undistorted image {path}")
            cropped = cv2.warpAffine(
                pixels, shift, (width, height), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_REPLICATE,
            )
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
            if not cv2.imwrite(str(path), cropped, params):
                raise RuntimeError(f"cannot write {path}")
            for point2D in image.points2D:
                point2D.xy = point2D.xy - np.array([offset_x, offset_y])
        if camera.model == pycolmap.CameraModelId.SIMPLE_PINHOLE:
            camera.params = [fx, width / 2, height / 2]
        else:
            camera.params = [fx, fy, width / 2, height / 2]
        camera.width, camera.height = width, height
