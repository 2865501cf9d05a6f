"""nerfstudio's dataset layout: `transforms.json`, `sparse_pc.ply` and the images.

Conventions follow nerfstudio's `process_data/colmap_utils.py` (`colmap_to_json`, `parse_colmap_camera_params`):
- intrinsics in pixels with COLMAP's pixel convention (nerfstudio also puts pixel centres at +0.5); one camera
  for all images -> top-level `w, h, fl_x, fl_y, cx, cy, k1, k2, p1, p2, camera_model`; otherwise per frame;
  COLMAP's pinhole and radial models become "OPENCV", the fisheye ones "OPENCV_FISHEYE" (k1..k4);
- `transform_matrix`: camera-to-world with OpenGL camera axes (x right, y up, z back: columns 1 and 2 negated),
  in a world whose axes are permuted (x, z, y) with the new z negated, unless `keep_original_world_coordinate`;
  that world change is `applied_transform` (3x4), and `sparse_pc.ply` holds the points in the changed world.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap

from ..errors import UserError, param
from .files import atomic_output, check_inputs_outside, copy_images, write_downscaled_images
from .ply import reconstruction_points, write_ply

# COLMAP model -> (nerfstudio camera_model, names of the parameters after fx, fy, cx, cy).
_PERSPECTIVE = ("k1", "k2", "p1", "p2")
_FISHEYE = ("k1", "k2", "k3", "k4")


def _camera_fields(camera: pycolmap.Camera) -> dict:
    """nerfstudio's intrinsics fields for one COLMAP camera."""
    model = camera.model.name
    p = [float(v) for v in camera.params]
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE"):
        fx = fy = p[0]
        cx, cy = p[1], p[2]
        extra = p[3:]
    elif model in ("PINHOLE", "OPENCV", "OPENCV_FISHEYE"):
        fx, fy, cx, cy = p[:4]
        extra = p[4:]
    else:
        raise UserError(
            f"nerfstudio cannot represent COLMAP's {model} camera; refine with a PINHOLE, SIMPLE_RADIAL, RADIAL, "
            f"OPENCV or fisheye camera model, or use {param('output.export', ['gsplat'])} (undistorted images)"
        )
    fisheye = "FISHEYE" in model
    names = _FISHEYE if fisheye else _PERSPECTIVE
    values = list(extra) + [0.0] * (len(names) - len(extra))
    fields = {"w": int(camera.width), "h": int(camera.height), "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy}
    fields.update(dict(zip(names, values)))
    fields["camera_model"] = "OPENCV_FISHEYE" if fisheye else "OPENCV"
    return fields


def applied_transform(keep_original_world_coordinate: bool = False) -> np.ndarray:
    """(3,4) the world change nerfstudio applies: axes permuted to (x, z, -y), so that z points up."""
    transform = np.eye(4)[:3]
    if not keep_original_world_coordinate:
        transform = transform[[0, 2, 1]]
        transform[2] *= -1
    return transform


def camera_to_world_opengl(cam_from_world: np.ndarray, world_change: np.ndarray) -> np.ndarray:
    """(4,4) nerfstudio `transform_matrix` from a (3,4) OpenCV cam_from_world and the (3,4) world change."""
    world_from_cam = np.eye(4)
    R, t = cam_from_world[:, :3], cam_from_world[:, 3]
    world_from_cam[:3, :3] = R.T
    world_from_cam[:3, 3] = -R.T @ t
    world_from_cam[:3, 1:3] *= -1  # OpenCV camera axes -> OpenGL (y up, z back)
    change = np.eye(4)
    change[:3] = world_change
    return change @ world_from_cam


def export_nerfstudio(
    reconstruction: pycolmap.Reconstruction,
    images_dir: Path | str,
    output_dir: Path | str,
    points: tuple[np.ndarray, np.ndarray] | None = None,
    downscales: tuple[int, ...] = (),
    keep_original_world_coordinate: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `transforms.json`, `sparse_pc.ply` and `images/` (plus `images_N/` per downscale) for nerfstudio.

    Only registered images are written. `points` = (xyz (N,3), rgb (N,3) uint8), e.g. dense initial points for
    splatfacto, are added to the model's points in `sparse_pc.ply`. Downscaled sizes are floor(size / N), as
    ns-process-data's ffmpeg resize gives.
    """
    images_dir = Path(images_dir)
    output_dir = Path(output_dir)
    check_inputs_outside(output_dir, images_dir)
    image_ids = sorted(reconstruction.reg_image_ids())
    if not image_ids:
        raise UserError("the reconstruction has no registered images; there is nothing to export")
    names = [reconstruction.images[i].name for i in image_ids]
    missing = [n for n in names if not (images_dir / n).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of the reconstruction are missing from {images_dir}, e.g. {missing[0]}")

    camera_ids = {reconstruction.images[i].camera_id for i in image_ids}
    fields = {cid: _camera_fields(reconstruction.cameras[cid]) for cid in camera_ids}
    shared = len({json.dumps(f, sort_keys=True) for f in fields.values()}) == 1
    world_change = applied_transform(keep_original_world_coordinate)

    models = {f["camera_model"] for f in fields.values()}
    if len(models) > 1:
        raise UserError("nerfstudio needs one camera type for all images, but this model mixes fisheye and perspective cameras")
    # nerfstudio reads camera_model only at the top level, so it stays there even with per-frame intrinsics.
    out: dict = dict(next(iter(fields.values()))) if shared else {"camera_model": models.pop()}
    frames = []
    for image_id, name in zip(image_ids, names):
        image = reconstruction.images[image_id]
        frame = {
            "file_path": f"images/{name}",
            "transform_matrix": camera_to_world_opengl(image.cam_from_world().matrix(), world_change).tolist(),
            "colmap_im_id": int(image_id),
        }
        if not shared:
            frame.update(fields[image.camera_id])
        frames.append(frame)
    out["frames"] = frames
    if not keep_original_world_coordinate:
        out["applied_transform"] = world_change.tolist()
    out["ply_file_path"] = "sparse_pc.ply"

    xyz, rgb = reconstruction_points(reconstruction)
    if points is not None:
        xyz = np.concatenate([xyz, np.asarray(points[0], dtype=np.float64).reshape(-1, 3)])
        rgb = np.concatenate([rgb, np.asarray(points[1], dtype=np.uint8).reshape(-1, 3)])
    xyz = xyz @ world_change[:, :3].T + world_change[:, 3]

    # nerfstudio looks for downscaled images by base name only (images_N/<file name>).
    base_names = [Path(n).name for n in names]
    if downscales and len(set(base_names)) < len(base_names):
        raise UserError("nerfstudio finds downscaled images by file name alone, and some images in different "
                        "sub-folders share a name; rename them or export without downscales")

    with atomic_output(output_dir, overwrite=overwrite) as tmp:
        copy_images(images_dir, names, tmp / "images")
        write_downscaled_images(
            tmp / "images", names, tmp, tuple(downscales), rounding="floor", output_names=base_names
        )
        write_ply(tmp / "sparse_pc.ply", xyz, rgb)
        with open(tmp / "transforms.json", "w", encoding="utf-8") as f:
            json.dump(out, f, indent=4)
    return output_dir
