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
