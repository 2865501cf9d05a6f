"""COLMAP's own command line (Debian's COLMAP 3.8, not the pycolmap 4 we write with) reads our files.

`model_analyzer` and `model_converter` read OUTPUT/sparse/0 (and the text files of `--text`); `point_triangulator` (our model + our database) and
`mapper` (our database alone) register every image. What they read back is compared with what we wrote: the
model as pycolmap reads it, and the same files through tests/colmap_binary.py, a reader written from COLMAP's
format description. The run is tests/client_run.py's (six fountain photos, `--database`, both exports).
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from client_run import NAMES, client_run, pose_difference
from colmap_binary import read_model

from vggt_sfm.evaluation import evaluate
from vggt_sfm.export.colmap import write_model
from vggt_sfm.export.database import COLMAP3_PRIOR_COLUMNS
from vggt_sfm.log import quiet_pycolmap

COLMAP = shutil.which("colmap")
needs_colmap = pytest.mark.skipif(
    COLMAP is None, reason="COLMAP's command line is not installed (Debian/Ubuntu: apt-get install colmap, as .ci/run does)"
)
POSE_TOLERANCE = 1e-6
_GLOG_DIR = tempfile.TemporaryDirectory(prefix="colmap-logs-")


def colmap(*args: str | Path) -> str:
    """Run a COLMAP command (no display: Qt's offscreen platform); its output, after checking it succeeded."""
    # glog writes a log file per run into /tmp unless told where: a folder removed when the tests end.
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "GLOG_log_dir": _GLOG_DIR.name}
    result = subprocess.run([COLMAP, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"colmap {args[0]} failed ({result.returncode}):\n{output[-3000:]}"
    return output


def model_statistics(path: Path) -> dict[str, float]:
    """`colmap model_analyzer`'s figures: 'Registered images', 'Points', 'Mean reprojection error', ..."""
    output = colmap("model_analyzer", "--path", path)
    statistics = {key: float(value) for key, value in re.findall(r"^([A-Za-z ]+): ([0-9.]+)(?:px)?$", output, re.M)}
    assert {"Cameras", "Registered images", "Points", "Observations"} <= set(statistics), output
    return statistics


def database_copy(folder: Path) -> Path:
    """A copy of the run's database: COLMAP 3.8 writes to the file it opens (its schema version, at least)."""
    path = folder / "database.db"
    shutil.copyfile(client_run().output / "database.db", path)
    return path


@needs_colmap
@pytest.mark.parametrize("files", ["binary", "text"])
def test_model_analyzer_counts_what_we_wrote(tmp_path, files):
    run = client_run()
    folder = run.sparse
    if files == "text":  # what `--text` adds, alone (COLMAP reads the .bin files when both are there)
        folder = write_model(run.model, tmp_path / "0", text=True)
        for path in folder.glob("*.bin"):
            path.unlink()
        assert pose_difference(read_model(folder, ".txt"), run.model) < POSE_TOLERANCE
    statistics = model_statistics(folder)
    ours = run.model
    assert statistics["Cameras"] == ours.num_cameras()
    assert statistics["Images"] == statistics["Registered images"] == ours.num_reg_images() == len(NAMES)
    assert statistics["Points"] == ours.num_points3D()
    assert statistics["Observations"] == ours.compute_num_observations()
    assert statistics["Mean track length"] == pytest.approx(ours.compute_mean_track_length(), abs=1e-5)
    assert statistics["Mean reprojection error"] == pytest.approx(ours.compute_mean_reprojection_error(), abs=1e-5)


@needs_colmap
def test_model_converter_writes_our_model_as_text(tmp_path):
    run = client_run()
    colmap("model_converter", "--input_path", run.sparse, "--output_path", tmp_path, "--output_type", "TXT")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cameras.txt", "images.txt", "points3D.txt"]
    ours = run.model
    for model in (read_model(tmp_path, ".txt"), read_model(run.sparse, ".bin")):  # COLMAP 3.8's text, our bytes
        assert pose_difference(model, ours) < POSE_TOLERANCE
        assert len(model.cameras) == ours.num_cameras()
        for camera_id, camera in model.cameras.items():
            expected = ours.cameras[camera_id]
            assert camera.model == expected.model.name and (camera.width, camera.height) == (expected.width, expected.height)
            np.testing.assert_allclose(camera.params, expected.params, rtol=1e-12)
        for image_id, image in model.images.items():
            expected = ours.images[image_id]
            assert image.camera_id == expected.camera_id
            np.testing.assert_allclose(image.xys, np.array([p.xy for p in expected.points2D]), atol=1e-9)
            has_point = np.array([p.has_point3D() for p in expected.points2D])
            np.testing.assert_array_equal(image.point3D_ids >= 0, has_point)
        assert sorted(model.points3D) == sorted(ours.point3D_ids())
        for point3D_id, point in model.points3D.items():
            expected = ours.points3D[point3D_id]
            np.testing.assert_allclose(point.xyz, expected.xyz, atol=1e-9)
            np.testing.assert_array_equal(point.rgb, expected.color)
            track = sorted(zip(point.image_ids, point.point2D_idxs))
            assert track == sorted((e.image_id, e.point2D_idx) for e in expected.track.elements)


@needs_colmap
def test_point_triangulator_reads_our_model_and_database(tmp_path):
    """COLMAP 3.8 triangulates our matches at our poses, as COLMAP 4 does from the same two files."""
    run = client_run()
    output = tmp_path / "colmap3"
    output.mkdir()
    colmap("point_triangulator", "--database_path", database_copy(tmp_path), "--image_path", run.images,
           "--input_path", run.sparse, "--output_path", output, "--clear_points", "1", "--Mapper.num_threads", "2")
    statistics = model_statistics(output)
    assert statistics["Registered images"] == len(NAMES)
    assert pose_difference(read_model(output), run.model) < POSE_TOLERANCE  # the poses stay ours

    reference = tmp_path / "colmap4"
    reference.mkdir()
    shutil.copyfile(run.output / "database.db", tmp_path / "database4.db")
    with quiet_pycolmap():
        colmap4 = pycolmap.triangulate_points(pycolmap.Reconstruction(run.model), str(tmp_path / "database4.db"),
                                              str(run.images), str(reference))
    assert statistics["Points"] >= 0.5 * run.model.num_points3D()
    assert statistics["Points"] == pytest.approx(colmap4.num_points3D(), rel=0.02)
    assert statistics["Mean reprojection error"] == pytest.approx(colmap4.compute_mean_reprojection_error(), abs=0.01)
    assert statistics["Mean reprojection error"] < 1.0


@needs_colmap
def test_mapper_registers_every_image_from_our_database(tmp_path):
    run = client_run()
    database = database_copy(tmp_path)
    output = tmp_path / "sparse"
    output.mkdir()
    colmap("mapper", "--database_path", database, "--image_path", run.images, "--output_path", output,
           "--Mapper.num_threads", "2", "--random_seed", "0")
    assert [p.name for p in output.iterdir()] == ["0"]  # one model
    statistics = model_statistics(output / "0")
    assert statistics["Registered images"] == len(NAMES)
    assert statistics["Mean reprojection error"] < 1.0
    # The mapper's cameras are ours, up to the similarity it cannot know.
    result = evaluate(pycolmap.Reconstruction(str(output / "0")), run.model)
    assert result.num_registered == len(NAMES)
    assert np.max(result.rotation_errors) < 0.5  # degrees

    # COLMAP 4 still reads the database after COLMAP 3.8 opened it (and set its own schema version).
    with pycolmap.Database.open(str(database)) as db:
        assert db.num_images() == len(NAMES) and db.num_pose_priors() == len(NAMES)
        assert db.num_verified_image_pairs() > 0


def test_database_holds_pose_priors_in_both_schemas():
    """COLMAP 4's pose_priors and COLMAP 3.x's images.prior_t* carry the same positions; 3.x's rotation prior is NULL."""
    run = client_run()
    path = run.output / "database.db"
    with pycolmap.Database.open(str(path)) as db:
        positions = {prior.corr_data_id.id: prior.position for prior in db.read_all_pose_priors()}
    assert len(positions) == len(NAMES)
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(images)")]
        rows = connection.execute(f"SELECT image_id, {', '.join(COLMAP3_PRIOR_COLUMNS)} FROM images").fetchall()
    finally:
        connection.close()
    # COLMAP 3.x reads `SELECT * FROM images` by position: the priors must be columns 3 to 9.
    assert columns == ["image_id", "name", "camera_id", *COLMAP3_PRIOR_COLUMNS]
    assert len(rows) == len(NAMES)
    for image_id, qw, qx, qy, qz, tx, ty, tz in rows:
        assert (qw, qx, qy, qz) == (None, None, None, None)
        np.testing.assert_allclose([tx, ty, tz], positions[image_id], rtol=0, atol=1e-12)
