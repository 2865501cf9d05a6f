"""One real command-line run whose files the client tests hand to other programs (built once per test session).

Six fountain photos (data/fountain, 1536x1024 JPEG) with their simulated prior, few keypoints so the run takes
about 15 s on 2 cores: `vggt-sfm reconstruct ... --database --export gsplat --export nerfstudio --downscales 2`.
The run's SIMPLE_RADIAL camera makes the gsplat export undistort and re-centre, as on real photos.
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
from export_scene import temporary_folder

from vggt_sfm.cli import main
from vggt_sfm.predictions import load_predictions, save_predictions

FOUNTAIN = Path(__file__).resolve().parents[1] / "data" / "fountain"
NAMES = [f"{i:04d}.jpg" for i in range(6)]
OPTIONS = ["--set", "features.max_keypoints=1024", "--set", "features.resize_max=800", "--no-report",
           "--database", "--export", "gsplat", "--export", "nerfstudio", "--downscales", "2"]


@dataclass
class ClientRun:
    images: Path  # the photos the run read
    output: Path  # OUTPUT: sparse/0, database.db, gs/, nerfstudio/
    model: pycolmap.Reconstruction  # OUTPUT/sparse/0 as pycolmap reads it: what we meant to write

    @property
    def sparse(self) -> Path:
        return self.output / "sparse" / "0"


@functools.lru_cache(maxsize=1)
def client_run() -> ClientRun:
    root = temporary_folder()
    images = root / "images"
    images.mkdir()
    for name in NAMES:
        (images / name).write_bytes((FOUNTAIN / "images" / name).read_bytes())
    save_predictions(load_predictions(FOUNTAIN / "prior_vggt_sim.npz").subset(NAMES), root / "prior.npz")
    output = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["reconstruct", "--images", str(images), "--predictions", str(root / "prior.npz"),
                     "--output", str(output), *OPTIONS])
    assert code == 0, stdout.getvalue()
    model = pycolmap.Reconstruction(str(output / "sparse" / "0"))
    assert model.num_reg_images() == len(NAMES), stdout.getvalue()
    return ClientRun(images, output, model)


def pose_difference(model, reference: pycolmap.Reconstruction) -> float:
    """Largest entry of cam_from_world(model) - cam_from_world(reference) over the images, matched by name.

    `model` is a colmap_binary.Model (an independent reading of some files); it must hold exactly the
    reference's registered images.
    """
    by_name = {reference.images[i].name: reference.images[i] for i in reference.reg_image_ids()}
    assert sorted(image.name for image in model.images.values()) == sorted(by_name)
    return max(
        float(np.abs(image.cam_from_world() - by_name[image.name].cam_from_world().matrix()).max())
        for image in model.images.values()
    )


def observations(reconstruction: pycolmap.Reconstruction, image: pycolmap.Image) -> tuple[np.ndarray, np.ndarray]:
    """(N,2) keypoints of `image` that have a 3D point, and (N,3) those points."""
    seen = [p for p in image.points2D if p.has_point3D()]
    xy = np.array([p.xy for p in seen]).reshape(-1, 2)
    xyz = np.array([reconstruction.points3D[p.point3D_id].xyz for p in seen]).reshape(-1, 3)
    return xy, xyz
