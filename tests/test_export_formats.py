"""Model, PLY, 3DGS / gsplat and nerfstudio exports of a real reconstruction, read back as those tools read them."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pycolmap
import pytest
from export_scene import TEMPLE, temple_model, temporary_folder
from PIL import Image

from vggt_sfm.errors import UserError
from vggt_sfm.export.colmap import write_model
from vggt_sfm.export.files import atomic_output, downscaled_size
from vggt_sfm.export.gsplat import export_gsplat
from vggt_sfm.export.nerfstudio import export_nerfstudio
from vggt_sfm.export.ply import reconstruction_points, write_ply
from vggt_sfm.images import read_image

IMAGES = TEMPLE / "images"

_PLY_TYPES = {"float": "<f4", "double": "<f8", "uchar": "u1", "uint8": "u1"}


def read_ply(path) -> np.ndarray:
    """A binary little-endian PLY's vertices as a structured array (what plyfile gives 3DGS's fetchPly)."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    assert lines[0] == "ply" and lines[1] == "format binary_little_endian 1.0"
    count = int(next(line for line in lines if line.startswith("element vertex")).split()[-1])
    fields = [(line.split()[2], _PLY_TYPES[line.split()[1]]) for line in lines if line.startswith("property")]
    return np.frombuffer(data[end:], dtype=np.dtype(fields), count=count)


def extra_points(model: pycolmap.Reconstruction, count: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    xyz, _ = reconstruction_points(model)
    rng = np.random.default_rng(seed)
    picked = xyz[rng.choice(len(xyz), count)] + rng.normal(scale=1e-3, size=(count, 3))
    return picked, rng.integers(0, 256, size=(count, 3), dtype=np.uint8)


def with_distortion(model: pycolmap.Reconstruction) -> pycolmap.Reconstruction:
    """The model with different OPENCV cameras per image (intrinsics and distortion vary)."""
    for camera in model.cameras.values():
        fx, fy, cx, cy = camera.params
        c = camera.camera_id
        camera.model = pycolmap.CameraModelId.OPENCV
        camera.params = [fx * (1 + 0.01 * c), fy, cx + c, cy - c, -0.04 - 0.002 * c, 0.01, 5e-4, -3e-4]
    return model


def sample_grey(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear grey values at COLMAP-convention pixel positions."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    maps = (xy - 0.5).astype(np.float32)
    return cv2.remap(grey, maps[:, 0].reshape(-1, 1), maps[:, 1].reshape(-1, 1), cv2.INTER_LINEAR)[:, 0]


def test_write_ply_is_read_by_pycolmap_with_3dgs_fields():
    folder = temporary_folder()
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(1000, 3)) * 10
    rgb = rng.integers(0, 256, size=(1000, 3), dtype=np.uint8)
    for double in (False, True):
        path = folder / f"points_{double}.ply"
        write_ply(path, xyz, rgb, double=double)
        vertices = read_ply(path)
        assert vertices.dtype.names == ("x", "y", "z", "nx", "ny", "nz", "red", "green", "blue")
        stored = np.stack([vertices["x"], vertices["y"], vertices["z"]], 1)
        np.testing.assert_allclose(stored, xyz, rtol=0 if double else 1e-6, atol=0 if double else 1e-5)
        np.testing.assert_array_equal(np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1), rgb)
        model = pycolmap.Reconstruction()
        model.import_PLY(str(path))
        imported = np.array([p.xyz for p in model.points3D.values()])
        np.testing.assert_allclose(np.sort(imported, axis=0), np.sort(stored, axis=0), atol=1e-5)
    with pytest.raises(UserError, match="already exists"):
        write_ply(folder / "points_False.ply", xyz, rgb)


def test_atomic_output_leaves_nothing_behind_on_failure():
    folder = temporary_folder()
    target = folder / "export"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(target) as tmp:
            (tmp / "half-written.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(folder.iterdir()) == []


def test_write_model_round_trip_and_overwrite():
    model = temple_model()
    folder = temporary_folder()
    target = folder / "sparse" / "0"
    write_model(model, target, text=True)
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted(f"{n}.{ext}" for n in ("cameras", "images", "points3D", "rigs", "frames") for ext in ("bin", "txt"))
    for reader in ("read_binary", "read_text"):
        back = pycolmap.Reconstruction()
        getattr(back, reader)(str(target))
        assert back.num_reg_images() == model.num_reg_images() and back.num_points3D() == model.num_points3D()
        for image_id, image in model.images.items():
            pose = back.images[image_id].cam_from_world()
            assert pose.rotation.angle_to(image.cam_from_world().rotation) < 1e-9
    with pytest.raises(UserError, match="overwrite=True"):
        write_model(model, target)
    write_model(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.bin" for n in ("cameras", "images", "points3D", "rigs", "frames"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["0"]


@pytest.mark.parametrize("distorted", [False, True], ids=["pinhole", "opencv"])
def test_gsplat_layout_reads_like_3dgs_and_gsplat(distorted):
    model = temple_model()
    if distorted:
        model = with_distortion(model)
    points = extra_points(model)
    output = temporary_folder() / "gs"
    factors = (4,) if distorted else (2, 4, 8)
    export_gsplat(model, IMAGES, output, downscales=factors, points=points)

    exported = pycolmap.Reconstruction(str(output / "sparse" / "0"))  # gsplat's Parser reads it like this
    assert exported.num_reg_images() == model.num_reg_images()
    for image in exported.images.values():
        camera = exported.cameras[image.camera_id]
        # 3DGS readColmapCameras: PINHOLE / SIMPLE_PINHOLE only; the image is images/<base name>; the principal
        # point is assumed to be the centre, and the image size is the camera size.
        assert camera.model in (pycolmap.CameraModelId.PINHOLE, pycolmap.CameraModelId.SIMPLE_PINHOLE)
        assert camera.principal_point_x == camera.width / 2 and camera.principal_point_y == camera.height / 2
        with Image.open(output / "images" / image.name.split("/")[-1]) as file:
            assert file.size == (camera.width, camera.height)
        # The exported image and camera show what the input image and camera showed, at every 3D point.
        original = model.images[image.image_id]
        xyz = np.array([model.points3D[p.point3D_id].xyz for p in original.points2D if p.has_point3D()])
        xy_in = model.cameras[original.camera_id].img_from_cam(original.cam_from_world() * xyz)
        xy_out = camera.img_from_cam(image.cam_from_world() * xyz)
        grey_in = sample_grey(read_image(IMAGES / original.name), xy_in)
        exported_pixels = read_image(output / "images" / image.name)
        difference = np.abs(sample_grey(exported_pixels, xy_out) - grey_in).mean()
        shifted = np.abs(sample_grey(exported_pixels, xy_out + [1.5, 0]) - grey_in).mean()
        assert difference < 0.5 * shifted, (difference, shifted)
        # Keypoints moved with the pixels: their residuals are the input model's, carried through the warp.
        residual_in = np.array([p.xy for p in original.points2D if p.has_point3D()]) - xy_in
        residual_out = np.array([p.xy for p in image.points2D if p.has_point3D()]) - xy_out
        if distorted:
            ratio = np.linalg.norm(residual_out, axis=1) / np.linalg.norm(residual_in, axis=1)
            assert 0.9 < np.median(ratio) < 1.1
        else:
            np.testing.assert_allclose(residual_out, residual_in, atol=1e-6)

    # gsplat maps images_N to images by sorted file lists and rescales K by the actual size.
    files = sorted(p.name for p in (output / "images").iterdir())
    for factor in factors:
        assert sorted(p.name for p in (output / f"images_{factor}").iterdir()) == files
        for image in exported.images.values():
            camera = exported.cameras[image.camera_id]
            with Image.open(output / f"images_{factor}" / image.name) as file:
                assert file.size == downscaled_size(camera.width, camera.height, factor)  # 3DGS's convert.py
                # gsplat scales K by the actual size, which is the exact 1 / factor to half a pixel over the image.
                for size, colmap_size in zip(file.size, (camera.width, camera.height)):
                    assert abs(size - colmap_size / factor) <= 0.5
    assert sorted(p.name for p in output.iterdir()) == ["images"] + [f"images_{f}" for f in factors] + ["sparse"]

    # Initial points: 3DGS reads points3D.ply (with normals), gsplat points3D.bin: the same cloud.
    vertices = read_ply(output / "sparse" / "0" / "points3D.ply")
    assert {"nx", "ny", "nz"} <= set(vertices.dtype.names)
    assert len(vertices) == model.num_points3D() + len(points[0]) == exported.num_points3D()
    ply_xyz = np.stack([vertices["x"], vertices["y"], vertices["z"]], 1)
    bin_xyz, bin_rgb = reconstruction_points(exported)
    np.testing.assert_allclose(ply_xyz, bin_xyz, atol=1e-5)
    np.testing.assert_allclose(ply_xyz[-len(points[0]):], points[0], atol=1e-5)
    np.testing.assert_array_equal(bin_rgb[-len(points[1]):], points[1])
    assert sorted(p.name for p in output.parent.iterdir()) == ["gs"]  # no work folders left


def test_gsplat_export_refuses_an_existing_folder():
    model = temple_model()
    output = temporary_folder() / "gs"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="overwrite=True"):
        export_gsplat(model, IMAGES, output, downscales=())
    assert (output / "keep.txt").read_text() == "mine"
    export_gsplat(model, IMAGES, output, downscales=(), overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "sparse" / "0" / "cameras.bin").is_file()
    # Even with overwrite, a folder holding the input images is never replaced.
    with pytest.raises(UserError, match="contains the input"):
        export_nerfstudio(model, IMAGES, IMAGES.parent, overwrite=True)
    assert (IMAGES / "templeSR0001.png").is_file()


def nerfstudio_pixels(meta: dict, frame: dict, xyz: np.ndarray) -> np.ndarray:
    """Project COLMAP-world points with a camera rebuilt from transforms.json, as nerfstudio defines it."""
    fields = {**meta, **frame}
    change = np.eye(4)
    if "applied_transform" in meta:
        change[:3] = np.array(meta["applied_transform"])
    world = np.c_[xyz, np.ones(len(xyz))] @ change.T  # nerfstudio's world (the frame of sparse_pc.ply)
    c2w = np.array(frame["transform_matrix"])
    cam = world @ np.linalg.inv(c2w).T  # OpenGL camera: x right, y up, looking down -z
    x, y = cam[:, 0] / -cam[:, 2], -cam[:, 1] / -cam[:, 2]
    k1, k2, p1, p2 = (fields.get(k, 0.0) for k in ("k1", "k2", "p1", "p2"))
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + 2 * p2 * x * y + p1 * (r2 + 2 * y * y)
    return np.stack([fields["fl_x"] * xd + fields["cx"], fields["fl_y"] * yd + fields["cy"]], 1)


@pytest.mark.parametrize(
    "variant", ["shared", "per_frame_distorted", "original_world"]
)
def test_nerfstudio_cameras_project_like_the_colmap_model(variant):
    model = temple_model()
    if variant == "per_frame_distorted":
        model = with_distortion(model)
    output = temporary_folder() / "ns"
    export_nerfstudio(
        model, IMAGES, output, downscales=(2,) if variant == "shared" else (),
        keep_original_world_coordinate=variant == "original_world",
    )
    meta = json.loads((output / "transforms.json").read_text())
    assert meta["ply_file_path"] == "sparse_pc.ply" and meta["camera_model"] == "OPENCV"
    assert ("applied_transform" in meta) == (variant != "original_world")
    per_frame = variant == "per_frame_distorted"
    assert ("fl_x" in meta) != per_frame and all(("fl_x" in f) == per_frame for f in meta["frames"])
    assert len(meta["frames"]) == model.num_reg_images()

    worst = 0.0
    for frame in meta["frames"]:
        image = model.images[frame["colmap_im_id"]]
        assert frame["file_path"] == f"images/{image.name}"
        camera = model.cameras[image.camera_id]
        with Image.open(output / frame["file_path"]) as file:
            assert file.size == (meta.get("w", frame.get("w")), meta.get("h", frame.get("h"))) == (camera.width, camera.height)
        xyz = np.array([model.points3D[p.point3D_id].xyz for p in image.points2D if p.has_point3D()])
        expected = camera.img_from_cam(image.cam_from_world() * xyz)
        worst = max(worst, float(np.abs(nerfstudio_pixels(meta, frame, xyz) - expected).max()))
    assert worst < 1e-6

    # sparse_pc.ply holds the points in nerfstudio's world.
    vertices = read_ply(output / "sparse_pc.ply")
    xyz, rgb = reconstruction_points(model)
    change = np.array(meta.get("applied_transform", np.eye(4)[:3].tolist()))
    stored = np.stack([vertices["x"], vertices["y"], vertices["z"]], 1)
    np.testing.assert_allclose(stored, xyz @ change[:, :3].T + change[:, 3], atol=1e-5)
    np.testing.assert_array_equal(np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1), rgb)
    if variant == "shared":
        # nerfstudio looks for images_2/<file name>, sized like ns-process-data's ffmpeg (floor).
        for frame in meta["frames"]:
            with Image.open(output / "images_2" / frame["file_path"].split("/")[-1]) as file:
                assert file.size == (meta["w"] // 2, meta["h"] // 2)


def test_nerfstudio_refuses_cameras_it_cannot_represent():
    model = temple_model()
    camera = model.cameras[1]
    camera.model = pycolmap.CameraModelId.FOV
    camera.params = [1500.0, 1500.0, 320.0, 240.0, 0.01]
    output = temporary_folder() / "ns"
    with pytest.raises(UserError, match="FOV"):
        export_nerfstudio(model, IMAGES, output)
    assert not output.exists()


def test_exif_rotated_photos_are_exported_as_seen():
    # A phone photo: pixels stored landscape, EXIF orientation 6 (display rotated to portrait).
    folder = temporary_folder()
    images = folder / "images"
    images.mkdir()
    stored = Image.open(IMAGES / "templeSR0001.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(images / "phone.jpg", quality=95, exif=exif)
    seen = read_image(images / "phone.jpg")
    height, width = seen.shape[:2]
    assert (width, height) == (480, 640)

    model = pycolmap.Reconstruction()
    camera = pycolmap.Camera(camera_id=1, model="SIMPLE_RADIAL", width=width, height=height,
                             params=[800.0, width / 2 + 3, height / 2 - 2, -0.02])
    model.add_camera_with_trivial_rig(camera)
    model.add_image_with_trivial_frame(
        pycolmap.Image(name="phone.jpg", camera_id=1, image_id=1), pycolmap.Rigid3d()
    )
    export_nerfstudio(model, images, folder / "ns")
    with Image.open(folder / "ns" / "images" / "phone.jpg") as copied:  # nerfstudio ignores EXIF orientation
        assert copied.size == (width, height)
        assert np.abs(np.asarray(copied, dtype=float) - seen).mean() < 3.0
    export_gsplat(model, images, folder / "gs", downscales=(2,))
    exported = pycolmap.Reconstruction(str(folder / "gs" / "sparse" / "0"))
    undistorted = exported.cameras[exported.images[1].camera_id]
    assert undistorted.height > undistorted.width  # portrait, as seen
    with Image.open(folder / "gs" / "images" / "phone.jpg") as file:
        assert file.size == (undistorted.width, undistorted.height)
