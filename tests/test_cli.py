"""Bad input on the command line: one clear line naming the problem, exit status 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt_sfm.cli import main
from vggt_sfm.predictions import load_predictions, save_predictions

DATA = Path(__file__).resolve().parents[1] / "data" / "templeSR"


@pytest.fixture()
def scene(tmp_path: Path) -> dict[str, Path]:
    """Three real images with their (simulated) predictions."""
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(p.name for p in (DATA / "images").iterdir())[:3]
    for name in names:
        (images / name).write_bytes((DATA / "images" / name).read_bytes())
    predictions = load_predictions(DATA / "prior_vggt_sim.npz").subset(names)
    save_predictions(predictions, tmp_path / "pred.npz")
    return {"images": images, "predictions": tmp_path / "pred.npz", "root": tmp_path}


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(["reconstruct", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vggt-sfm: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_and_empty_images_folder(capsys, tmp_path: Path):
    code, err = _run(capsys, "--images", str(tmp_path / "nope"), "--predictions", "p.npz", "--output", str(tmp_path / "o"))
    _assert_one_line(code, err, "images folder not found", "nope")
    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, "--images", str(tmp_path / "empty"), "--predictions", "p.npz", "--output", str(tmp_path / "o"))
    _assert_one_line(code, err, "no images in", "empty")


def test_too_few_images_after_a_corrupt_one(capsys, scene):
    for name in sorted(p.name for p in scene["images"].iterdir())[1:]:
        (scene["images"] / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, err = _run(capsys, "--images", str(scene["images"]), "--predictions", str(scene["predictions"]), "--output", str(scene["root"] / "o"))
    assert code == 2
    assert "only 1 readable image(s)" in err.splitlines()[-1]
    assert "cannot read image" in err  # each skipped file is named in a warning
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["missing", "not_npz", "no_key", "nan", "count", "names"])
def test_bad_predictions(capsys, scene, case):
    path = scene["root"] / "bad.npz"
    good = load_predictions(scene["predictions"])
    if case == "missing":
        path = scene["root"] / "absent.npz"
        needles = ["predictions file not found", "absent.npz"]
    elif case == "not_npz":
        path.write_text("extrinsic,intrinsic\n")
        needles = ["not an .npz", "bad.npz"]
    elif case == "no_key":
        np.savez(path, extrinsic=good.cam_from_world, image_names=np.array(good.image_names))
        needles = ["lacks the required key 'intrinsic'"]
    elif case == "nan":
        broken = good.cam_from_world.copy()
        broken[1, 0, 3] = np.nan
        np.savez(path, extrinsic=broken, intrinsic=good.intrinsics, image_names=np.array(good.image_names))
        needles = ["NaN or infinite", "extrinsic"]
    elif case == "count":
        np.savez(path, extrinsic=good.cam_from_world[:2], intrinsic=good.intrinsics[:2])
        needles = ["has 2 frames but the images folder has 3"]
    else:
        names = list(good.image_names)
        names[0] = "someone_else.png"
        np.savez(path, extrinsic=good.cam_from_world, intrinsic=good.intrinsics, image_names=np.array(names))
        needles = ["someone_else.png", "no frame for 1 of the 3 image(s)", names and good.image_names[0]]
    code, err = _run(capsys, "--images", str(scene["images"]), "--predictions", str(path), "--output", str(scene["root"] / "o"))
    _assert_one_line(code, err, *needles)


def test_existing_output_is_not_overwritten(capsys, scene):
    out = scene["root"] / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    code, err = _run(capsys, "--images", str(scene["images"]), "--predictions", str(scene["predictions"]), "--output", str(out))
    _assert_one_line(code, err, "already holds results", "--overwrite")
    assert (out / "keep.txt").read_text() == "earlier results"


def test_bad_preset_and_weights_messages(capsys, scene, tmp_path: Path, monkeypatch):
    preset = tmp_path / "p.toml"
    preset.write_text("[matching]\nmin_inlier = 3\n")
    code, err = _run(capsys, "--images", str(scene["images"]), "--output", str(tmp_path / "o"), "--pipeline", str(preset))
    _assert_one_line(code, err, "unknown key 'matching.min_inlier'")
    code, err = _run(capsys, "--images", str(scene["images"]), "--output", str(tmp_path / "o"), "--window", "1")
    _assert_one_line(code, err, "predict.window must be 0 (one pass) or at least 2 frames")


def test_real_entry_point_exits_cleanly(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "vggt_sfm", "reconstruct", "--images", str(tmp_path / "missing"),
         "--predictions", "x.npz", "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"vggt-sfm: error: images folder not found: {tmp_path / 'missing'} (pass an existing folder of photos as --images)"
    ]
