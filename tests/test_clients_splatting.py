"""The 3DGS, gsplat and nerfstudio readers of our exports, on tests/client_run.py's run (six fountain photos).

- The original 3D Gaussian Splatting loader (scene/dataset_readers.py, colmap_loader.py): its expectations,
  checked through tests/colmap_binary.py (a reader written from COLMAP's format description, not pycolmap) and
  its camera model rebuilt from the fields of view it keeps.
- gsplat's own parser (examples/datasets/colmap.py of a gsplat checkout, which pip's gsplat does not ship): set
  VGGT_SFM_GSPLAT_EXAMPLES to that examples/ folder and VGGT_SFM_GSPLAT_PYTHON to a Python with its
  requirements (gsplat <= 1.5.3: rmbrualla's pycolmap fork and numpy < 2; later: the official pycolmap, piexif).
- nerfstudio's dataparsers (transforms.json, and its COLMAP parser on the gsplat folder): set
  VGGT_SFM_NERFSTUDIO_PYTHON to a Python with nerfstudio (e.g. a venv: `python -m venv --system-site-packages
  /tmp/ns && /tmp/ns/bin/pip install nerfstudio`, never into this environment, whose pinned torch it would move).
  Without it, transforms.json is read by the schema nerfstudio documents, written out here.
The foreign programs run in subprocesses (tests/probe_gsplat.py, tests/probe_nerfstudio.py) and report JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from client_run import NAMES, client_run, observations, pose_difference
from colmap_binary import read_model, rotation_matrix
from PIL import Image
from test_export_formats import read_ply

from vggt_sfm.export.files import downscaled_size

HERE = Path(__file__).resolve().parent
OPENGL_FROM_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])  # camera axes: y and z flipped


def _homogeneous(matrix: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[: matrix.shape[0]] = matrix
    return out


def run_probe(python: str, script: str, *args: str | Path, timeout: int = 300) -> dict:
    """Run a probe script under another Python; the JSON it wrote (its last argument is the output path)."""
    result = subprocess.run([python, str(HERE / script), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{(result.stdout + result.stderr)[-4000:]}"
    return json.loads(Path(args[-1]).read_text())


# --- The original 3DGS loader --------------------------------------------------------------------------------


def gaussian_splatting_pixels(image, camera, xyz: np.ndarray) -> np.ndarray:
    """Where 3DGS's rasterizer puts world points, from what its loader keeps: R, T and the two fields of view.

    readColmapCameras: R = qvec2rotmat(qvec).T, T = tvec, FovX = focal2fov(fx, width), FovY = focal2fov(fy, height)
    (the principal point is dropped). getWorld2View2 gives [R.T | T]; getProjectionMatrix scales x / z by
    1 / tan(FovX / 2); the rasterizer's ndc2Pix is ((ndc + 1) * W - 1) / 2 with pixel centres at integers, +0.5
    here for COLMAP's convention.
    """
    fx = camera.params[0]
    fy = camera.params[1] if camera.model == "PINHOLE" else fx
    fov_x, fov_y = 2 * np.arctan(camera.width / (2 * fx)), 2 * np.arctan(camera.height / (2 * fy))
    R = rotation_matrix(image.qvec).T  # as 3DGS stores it
    world_view = np.eye(4)
    world_view[:3, :3], world_view[:3, 3] = R.T, image.tvec
    cam = np.c_[xyz, np.ones(len(xyz))] @ world_view.T
    ndc = np.stack([cam[:, 0] / cam[:, 2] / np.tan(fov_x / 2), cam[:, 1] / cam[:, 2] / np.tan(fov_y / 2)], 1)
    size = np.array([camera.width, camera.height])
    return ((ndc + 1) * size - 1) / 2 + 0.5


def test_3dgs_loader_reads_our_gsplat_folder():
    run = client_run()
    folder = run.output / "gs"
    model = read_model(folder / "sparse" / "0")  # cameras.bin, images.bin, points3D.bin: all 3DGS reads
    exported = pycolmap.Reconstruction(str(folder / "sparse" / "0"))
    # What we meant to write: sparse/0's cameras undistorted, its poses and points unchanged.
    assert pose_difference(model, run.model) < 1e-9
    ours_xyz = np.array([run.model.points3D[i].xyz for i in sorted(run.model.point3D_ids())])
    np.testing.assert_allclose(np.array([model.points3D[i].xyz for i in sorted(model.points3D)]), ours_xyz, atol=1e-9)
    assert len({image.name.split(".")[0] for image in model.images.values()}) == len(NAMES)  # 3DGS's image_name

    worst_against_pycolmap, residuals = 0.0, []
    for image in sorted(model.images.values(), key=lambda im: im.name):  # 3DGS sorts its cameras by name
        camera = model.cameras[image.camera_id]
        assert camera.model in ("PINHOLE", "SIMPLE_PINHOLE")  # else: "Colmap camera model not handled"
        expected = exported.cameras[image.camera_id]
        assert (camera.width, camera.height) == (expected.width, expected.height)
        np.testing.assert_allclose(camera.params, expected.params, rtol=1e-12)
        # 3DGS ignores the principal point: it must be the image centre.
        assert camera.params[-2:].tolist() == [camera.width / 2, camera.height / 2]
        with Image.open(folder / "images" / image.name) as file:  # 3DGS opens images/<name> as it is
            assert file.size == (camera.width, camera.height)
        with Image.open(folder / "images_2" / image.name) as file:  # `--images images_2`: convert.py's sizes, exactly half
            assert file.size == downscaled_size(camera.width, camera.height, 2) == (camera.width / 2, camera.height / 2)
        seen = image.point3D_ids >= 0
        xyz = np.array([model.points3D[i].xyz for i in image.point3D_ids[seen]])
        pixels = gaussian_splatting_pixels(image, camera, xyz)
        cam = (exported.images[image.image_id].cam_from_world() * xyz)
        worst_against_pycolmap = max(worst_against_pycolmap, float(np.abs(pixels - expected.img_from_cam(cam)).max()))
        residuals.append(np.linalg.norm(pixels - image.xys[seen], axis=1))
    assert worst_against_pycolmap < 1e-6  # 3DGS's camera is the exported one, to rounding
    assert np.mean(np.concatenate(residuals)) < 1.0  # and our keypoints lie where 3DGS projects their points

    # points3D.ply, which 3DGS loads (fetchPly: x, y, z, nx, ny, nz, red, green, blue), holds points3D.bin's points.
    vertices = read_ply(folder / "sparse" / "0" / "points3D.ply")
    assert {"x", "y", "z", "nx", "ny", "nz", "red", "green", "blue"} <= set(vertices.dtype.names)
    ids = sorted(model.points3D)
    np.testing.assert_allclose(np.stack([vertices[a] for a in "xyz"], 1), [model.points3D[i].xyz for i in ids], rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(np.stack([vertices[c] for c in ("red", "green", "blue")], 1), [model.points3D[i].rgb for i in ids])


# --- gsplat's parser ------------------------------------------------------------------------------------------

GSPLAT_EXAMPLES = os.environ.get("VGGT_SFM_GSPLAT_EXAMPLES")
GSPLAT_PYTHON = os.environ.get("VGGT_SFM_GSPLAT_PYTHON", sys.executable)
needs_gsplat = pytest.mark.skipif(
    not (GSPLAT_EXAMPLES and (Path(GSPLAT_EXAMPLES) / "datasets" / "colmap.py").is_file()),
    reason="gsplat's parser lives in a gsplat checkout (examples/datasets/colmap.py), not in pip's gsplat: set "
    "VGGT_SFM_GSPLAT_EXAMPLES to that examples/ folder and VGGT_SFM_GSPLAT_PYTHON to a Python with its requirements",
)


@needs_gsplat
@pytest.mark.parametrize("factor", [1, 2])
def test_gsplat_parser_reads_our_gsplat_folder(tmp_path, factor):
    run = client_run()
    folder = tmp_path / "gs"
    shutil.copytree(run.output / "gs", folder)  # gsplat may write beside our images (images_2_png)
    result = run_probe(GSPLAT_PYTHON, "probe_gsplat.py", GSPLAT_EXAMPLES, folder, factor, tmp_path / "gsplat.json")
    exported = pycolmap.Reconstruction(str(folder / "sparse" / "0"))
    images = {exported.images[i].name: exported.images[i] for i in exported.reg_image_ids()}
    assert result["image_names"] == sorted(images) == sorted(NAMES)
    assert all(n == 0 for n in result["num_distortion_params"].values())  # PINHOLE: gsplat undistorts nothing
    for name, camtoworld, camera_id in zip(result["image_names"], result["camtoworlds"], result["camera_ids"]):
        assert camera_id == images[name].camera_id
        np.testing.assert_allclose(np.linalg.inv(camtoworld), _homogeneous(images[name].cam_from_world().matrix()), atol=1e-9)
    ours_xyz = np.array([exported.points3D[i].xyz for i in sorted(exported.point3D_ids())])
    np.testing.assert_allclose(result["points"], ours_xyz, rtol=1e-6, atol=1e-4)  # float32 in gsplat

    residuals, worst = [], 0.0
    for item in result["items"]:
        name = result["image_names"][item["index"]]
        image = images[name]
        camera = exported.cameras[image.camera_id]
        height, width = item["image_shape"][:2]
        assert list(result["imsize"][str(image.camera_id)]) == [width, height]
        # gsplat scales K by (size of the image it loads) / (size // factor): exact, as our sizes are multiples
        # of the downscale factors. For JPEG it loads its own PNG resize of images/, not our images_N/.
        loaded = Path(result["image_paths"][item["index"]])
        assert loaded == (folder / "images" / name if factor == 1 else folder / f"images_{factor}_png" / f"{Path(name).stem}.png")
        assert camera.width % factor == 0 and camera.height % factor == 0
        assert (width, height) == (camera.width // factor, camera.height // factor)
        np.testing.assert_allclose(item["K"], np.diag([1 / factor, 1 / factor, 1]) @ camera.calibration_matrix(), rtol=1e-6)
        # Depth supervision: gsplat projects its points into the image; ours, scaled to that image, agree.
        xyz = np.array(result["points"])[result["point_indices"][name]]
        scale = np.array([width / camera.width, height / camera.height])
        ours = camera.img_from_cam(image.cam_from_world() * xyz) * scale
        inside = (ours[:, 0] >= 0) & (ours[:, 0] < width) & (ours[:, 1] >= 0) & (ours[:, 1] < height)
        gsplat_points = np.array(item["points"]).reshape(-1, 2)
        assert len(gsplat_points) == inside.sum()
        worst = max(worst, float(np.abs(gsplat_points - ours[inside]).max()))
        if factor == 1:  # and our keypoints lie where gsplat projects their points
            xy, seen_xyz = observations(exported, image)
            residuals.append(np.linalg.norm(camera.img_from_cam(image.cam_from_world() * seen_xyz) - xy, axis=1))
    assert worst < 1e-3  # px: gsplat's float32 points
    if factor == 1:
        assert np.mean(np.concatenate(residuals)) < 1.0


# --- nerfstudio -----------------------------------------------------------------------------------------------


def _nerfstudio_python() -> str | None:
    configured = os.environ.get("VGGT_SFM_NERFSTUDIO_PYTHON")
    if configured:
        return configured
    return sys.executable if importlib.util.find_spec("nerfstudio") is not None else None


NERFSTUDIO_PYTHON = _nerfstudio_python()
needs_nerfstudio = pytest.mark.skipif(
    NERFSTUDIO_PYTHON is None,
    reason="nerfstudio is not installed here: set VGGT_SFM_NERFSTUDIO_PYTHON to a Python that has it (a venv, "
    "`python -m venv --system-site-packages /tmp/ns && /tmp/ns/bin/pip install nerfstudio`)",
)

_NERFSTUDIO_INTRINSICS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
_NERFSTUDIO_DISTORTION = ("k1", "k2", "k3", "k4", "p1", "p2")


def read_transforms(folder: Path) -> list[dict]:
    """transforms.json by nerfstudio's documented schema: per frame, the image path, intrinsics, distortion and
    cam_from_world (3,4) in COLMAP's world and OpenCV axes.

    Intrinsics and distortion are top-level or per frame (per frame wins); `transform_matrix` is camera-to-world
    with OpenGL camera axes (x right, y up, z back) in a world that `applied_transform` (3x4, optional) made from
    the original one.
    """
    meta = json.loads((folder / "transforms.json").read_text())
    assert meta["camera_model"] in ("OPENCV", "OPENCV_FISHEYE", "PINHOLE", "SIMPLE_PINHOLE")
    world_change = _homogeneous(np.array(meta.get("applied_transform", np.eye(4)[:3].tolist())))
    frames = []
    for frame in meta["frames"]:
        fields = {**meta, **frame}
        missing = [key for key in _NERFSTUDIO_INTRINSICS if key not in fields]
        assert not missing, f"frame {frame['file_path']} lacks {missing}"
        transform = np.array(frame["transform_matrix"], dtype=np.float64)
        assert transform.shape == (4, 4) and np.allclose(transform[3], [0, 0, 0, 1])
        world_from_cam = np.linalg.inv(world_change) @ transform @ OPENGL_FROM_OPENCV
        frames.append({
            "path": folder / frame["file_path"],
            "colmap_im_id": frame.get("colmap_im_id"),
            "camera_model": meta["camera_model"],
            **{key: fields[key] for key in _NERFSTUDIO_INTRINSICS},
            "distortion": [float(fields.get(key, 0.0)) for key in _NERFSTUDIO_DISTORTION],
            "cam_from_world": np.linalg.inv(world_from_cam)[:3],
        })
    return frames


def _expected_nerfstudio_distortion(camera: pycolmap.Camera) -> list[float]:
    """nerfstudio's (k1, k2, k3, k4, p1, p2) of a COLMAP camera of the models our runs produce."""
    name, params = camera.model.name, list(camera.params)
    if name in ("SIMPLE_PINHOLE", "PINHOLE"):
        return [0.0] * 6
    if name == "SIMPLE_RADIAL":
        return [params[3], 0.0, 0.0, 0.0, 0.0, 0.0]
    if name == "RADIAL":
        return [params[3], params[4], 0.0, 0.0, 0.0, 0.0]
    if name == "OPENCV":
        return [params[4], params[5], 0.0, 0.0, params[6], params[7]]
    raise AssertionError(f"no nerfstudio distortion for {name} in this test")


def test_transforms_json_by_nerfstudios_schema_matches_sparse0():
    run = client_run()
    folder = run.output / "nerfstudio"
    frames = read_transforms(folder)
    images = {run.model.images[i].name: run.model.images[i] for i in run.model.reg_image_ids()}
    assert sorted(f["path"].relative_to(folder / "images").as_posix() for f in frames) == sorted(images) == sorted(NAMES)
    worst = 0.0
    for frame in frames:
        name = frame["path"].relative_to(folder / "images").as_posix()
        image = images[name]
        assert frame["colmap_im_id"] == image.image_id
        worst = max(worst, float(np.abs(frame["cam_from_world"] - image.cam_from_world().matrix()).max()))
        camera = run.model.cameras[image.camera_id]
        assert (frame["w"], frame["h"]) == (camera.width, camera.height)
        np.testing.assert_allclose([frame[k] for k in ("fl_x", "fl_y", "cx", "cy")],
                                   [camera.focal_length_x, camera.focal_length_y, camera.principal_point_x,
                                    camera.principal_point_y], rtol=1e-12)
        np.testing.assert_allclose(frame["distortion"], _expected_nerfstudio_distortion(camera), rtol=1e-12)
        with Image.open(frame["path"]) as file:
            assert file.size == (camera.width, camera.height)
        with Image.open(folder / "images_2" / frame["path"].name) as file:  # nerfstudio's images_N: floor(size / N)
            assert file.size == (camera.width // 2, camera.height // 2)
    assert worst < 1e-6

    # sparse_pc.ply: sparse/0's points, in the world transforms.json's poses live in.
    meta = json.loads((folder / "transforms.json").read_text())
    change = _homogeneous(np.array(meta.get("applied_transform", np.eye(4)[:3].tolist())))
    vertices = read_ply(folder / meta["ply_file_path"])
    xyz = np.array([run.model.points3D[i].xyz for i in sorted(run.model.point3D_ids())])
    expected = (np.c_[xyz, np.ones(len(xyz))] @ change.T)[:, :3]
    np.testing.assert_allclose(np.stack([vertices[a] for a in "xyz"], 1), expected, rtol=1e-6, atol=1e-4)


def _queries(reconstruction: pycolmap.Reconstruction, per_image: int = 200) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Up to `per_image` observed keypoints per image, with their 3D points."""
    queries = {}
    for image_id in reconstruction.reg_image_ids():
        image = reconstruction.images[image_id]
        xy, xyz = observations(reconstruction, image)
        keep = np.linspace(0, len(xy) - 1, min(per_image, len(xy))).astype(int)
        queries[image.name] = (xy[keep], xyz[keep])
    return queries


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.arctan2(np.linalg.norm(np.cross(a, b), axis=1), np.sum(a * b, axis=1))


@needs_nerfstudio
@pytest.mark.parametrize("parser", ["nerfstudio", "colmap"])
def test_nerfstudio_dataparsers_read_our_files(tmp_path, parser):
    """nerfstudio's transforms.json parser (splatfacto's settings) on our nerfstudio export, and its COLMAP parser
    (its own binary reader) on our gsplat folder: the same cameras, rays and points as our model, in its frame."""
    run = client_run()
    if parser == "nerfstudio":
        data, reference = run.output / "nerfstudio", run.model
    else:
        data = tmp_path / "gs"
        shutil.copytree(run.output / "gs", data, ignore=shutil.ignore_patterns("images_*"))
        reference = pycolmap.Reconstruction(str(data / "sparse" / "0"))
    queries = _queries(reference)
    (tmp_path / "queries.json").write_text(json.dumps({name: xy.tolist() for name, (xy, _) in queries.items()}))
    result = run_probe(NERFSTUDIO_PYTHON, "probe_nerfstudio.py", parser, data, tmp_path / "queries.json", tmp_path / "out.json")

    images = {reference.images[i].name: reference.images[i] for i in reference.reg_image_ids()}
    assert result["names"] == sorted(images) == sorted(NAMES)
    output_from_world = _homogeneous(np.array(result["dataparser_transform"]))
    scale = result["dataparser_scale"]
    worst_pose, worst_angle = 0.0, 0.0
    for index, name in enumerate(result["names"]):
        image = images[name]
        camera = reference.cameras[image.camera_id]
        assert result["camera_type"][index] == 1  # PERSPECTIVE
        assert (result["width"][index], result["height"][index]) == (camera.width, camera.height)
        np.testing.assert_allclose(
            [result[k][index] for k in ("fx", "fy", "cx", "cy")],
            [camera.focal_length_x, camera.focal_length_y, camera.principal_point_x, camera.principal_point_y], rtol=1e-6)
        np.testing.assert_allclose(result["distortion_params"][index], _expected_nerfstudio_distortion(camera), rtol=1e-6, atol=1e-9)
        # The pose, brought into nerfstudio's output frame (float32 there).
        world_from_cam = np.linalg.inv(_homogeneous(image.cam_from_world().matrix())) @ OPENGL_FROM_OPENCV
        expected = output_from_world @ world_from_cam
        expected[:3, 3] *= scale
        worst_pose = max(worst_pose, float(np.abs(np.array(result["camera_to_worlds"][index]) - expected[:3]).max()))
        # Rays through our keypoints miss their 3D points by the angle COLMAP's camera model gives (the residual).
        xy, xyz = queries[name]
        rays = result["rays"][name]
        points = scale * (np.c_[xyz, np.ones(len(xyz))] @ output_from_world.T)[:, :3]
        nerfstudio_angles = _angles(np.array(rays["directions"]), points - np.array(rays["origins"]))
        colmap_rays = np.c_[camera.cam_from_img(xy), np.ones(len(xy))]
        colmap_angles = _angles(colmap_rays, image.cam_from_world() * xyz)
        worst_angle = max(worst_angle, float(np.abs(nerfstudio_angles - colmap_angles).max()))
    assert worst_pose < 1e-5
    assert worst_angle < 1e-5  # radians; 1e-5 is 0.014 px at this focal length

    xyz = np.array([reference.points3D[i].xyz for i in sorted(reference.point3D_ids())])
    expected = scale * (np.c_[xyz, np.ones(len(xyz))] @ output_from_world.T)[:, :3]
    np.testing.assert_allclose(result["points3D_xyz"], expected, rtol=1e-5, atol=1e-5)
    rgb = np.array([reference.points3D[i].color for i in sorted(reference.point3D_ids())])
    np.testing.assert_array_equal(result["points3D_rgb"], rgb)
