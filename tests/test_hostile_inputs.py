"""Hostile and broken inputs, and runs that end badly: every case ends in one clear line or a clean result.

Real photos (the repo's data/fountain and data/templeSR), real pycolmap, real processes where it matters (a
second run holding the lock, SIGTERM, a read-only mount). Runs use 3-5 of fountain's photos with few keypoints so
that the whole file stays within a minute or two on 2 cores.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest
from PIL import Image

from vggt_sfm import cache as cache_module
from vggt_sfm import pipeline
from vggt_sfm.cli import main
from vggt_sfm.config import config_from_dict
from vggt_sfm.errors import UserError
from vggt_sfm.features import Features, FeatureConfig, extract_features
from vggt_sfm.images import read_image, scan_images
from vggt_sfm.matching import PairMatches, VerifiedMatches
from vggt_sfm.predictions import Predictions, load_predictions, save_predictions
from vggt_sfm.prior import PriorCameras
from vggt_sfm.tracks import Tracks
from vggt_sfm.view_graph import CheckedPrior, ViewGraphReport

ROOT = Path(__file__).resolve().parents[1]
FOUNTAIN = ROOT / "data" / "fountain"
TEMPLE = ROOT / "data" / "templeSR"
SMALL = {"features": {"extractor": "sift", "max_keypoints": 512, "resize_max": 640}}
SMALL_FLAGS = ["--max-keypoints", "512", "--resize-max", "640"]


def _scene(root: Path, count: int = 4, names: list[str] | None = None) -> tuple[Path, Path]:
    """`count` fountain photos (full size) in root/images and their simulated prior in root/pred.npz."""
    names = names or sorted(p.name for p in (FOUNTAIN / "images").iterdir())[:count]
    images = root / "images"
    images.mkdir(parents=True)
    for name in names:
        (images / name).write_bytes((FOUNTAIN / "images" / name).read_bytes())
    predictions = root / "pred.npz"
    save_predictions(load_predictions(FOUNTAIN / "prior_vggt_sim.npz").subset(names), predictions)
    return images, predictions


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["reconstruct", *args])
    return code, capsys.readouterr().err.strip()


def _one_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vggt-sfm: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _same(a, b) -> bool:
    """Equal results: the same types, and every field and array equal (NaN equal to NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------------
# 1. Predictions that cannot be right


def _save(path: Path, good: Predictions, **changes) -> None:
    arrays = {
        "image_names": np.array(good.image_names),
        "extrinsic": good.cam_from_world,
        "intrinsic": good.intrinsics,
        "grid_from_image": good.grid_from_image,
    }
    arrays.update(changes)
    np.savez(path, **arrays)


@pytest.mark.parametrize("case", ["not_rotation", "mirror", "zero_focal", "negative_focal", "depth_grids", "depth_shape", "truncated", "damaged"])
def test_broken_predictions_are_refused_in_one_line(capsys, tmp_path: Path, case: str):
    images, good_path = _scene(tmp_path, 3)
    good = load_predictions(good_path)
    path = tmp_path / "bad.npz"
    frames, grid = good.num_frames, (350, 518)  # fountain's prediction grid: 518x350
    if case == "not_rotation":
        extrinsic = good.cam_from_world.copy()
        extrinsic[1, :, :3] *= 1.5  # a scaled rotation
        _save(path, good, extrinsic=extrinsic)
        needles = ["is not a rotation", "frame 1 (0001.jpg)"]
    elif case == "mirror":
        extrinsic = good.cam_from_world.copy()
        extrinsic[2, 0, :3] *= -1  # det -1: a reflection
        _save(path, good, extrinsic=extrinsic)
        needles = ["is not a rotation", "frame 2 (0002.jpg)"]
    elif case in ("zero_focal", "negative_focal"):
        intrinsic = good.intrinsics.copy()
        intrinsic[0, 0, 0] = 0.0 if case == "zero_focal" else -intrinsic[0, 0, 0]
        _save(path, good, intrinsic=intrinsic)
        needles = ["focal lengths", "must be positive", "frame 0 (0000.jpg)"]
    elif case == "depth_grids":
        _save(path, good, depth=np.ones((frames, *grid), np.float32), depth_conf=np.ones((frames, 392, 518), np.float32))
        needles = ["different grids", "'depth' 518x350", "'depth_conf' 518x392"]
    elif case == "depth_shape":
        _save(path, good, depth=np.ones((frames, *grid[::-1]), np.float32))  # (W, H): transposed
        needles = ["were made for images of about", "0000.jpg is 1536x1024", "predict again"]
    elif case == "truncated":
        data = good_path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        needles = ["is truncated", "copy it again"]
    else:
        data = bytearray(good_path.read_bytes())
        with zipfile.ZipFile(good_path) as archive:
            member = archive.getinfo("extrinsic.npy")
        data[member.header_offset + 30 + len(member.filename) + 128 + 8] ^= 0xFF  # in its numbers: the CRC fails
        path.write_bytes(bytes(data))
        needles = ["is damaged", "copy it again"]
    code, err = _cli(capsys, "--images", str(images), "--predictions", str(path), "--output", str(tmp_path / "out"))
    line = _one_line(code, err, *needles)
    if "predictions file" in line:
        assert str(path) in line
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []


def test_predictions_of_another_image_set_are_refused(capsys, tmp_path: Path):
    """Issue #13: temple photos named 0000.png ... with fountain's prior exited 0 at 81 px reprojection error;
    fountain photos with the temple's prior the other way round."""
    images = tmp_path / "temple"
    images.mkdir()
    fountain = load_predictions(FOUNTAIN / "prior_vggt_sim.npz")
    for source, name in zip(sorted((TEMPLE / "images").iterdir())[:4], fountain.image_names):
        Image.open(source).convert("RGB").save(images / name, quality=95)  # 640x480, named like fountain's
    code, err = _cli(capsys, "--images", str(images), "--predictions", str(FOUNTAIN / "prior_vggt_sim.npz"),
                     "--output", str(tmp_path / "out"), *SMALL_FLAGS)
    _one_line(code, err, str(FOUNTAIN / "prior_vggt_sim.npz"), "images of about 1536x1024", "is 640x480",
              "predict again for this images folder")

    temple = load_predictions(TEMPLE / "prior_vggt_sim.npz")
    renamed = Predictions(**{**temple.__dict__, "image_names": [f"{i:04d}.jpg" for i in range(temple.num_frames)]})
    save_predictions(renamed, tmp_path / "temple_as_fountain.npz")
    code, err = _cli(capsys, "--images", str(FOUNTAIN / "images"), "--predictions", str(tmp_path / "temple_as_fountain.npz"),
                     "--output", str(tmp_path / "out"), *SMALL_FLAGS)
    _one_line(code, err, "images of about 640x480", "is 1536x1024")
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []


def test_official_file_with_an_unreadable_image_still_gets_the_image_sizes(tmp_path: Path):
    """Official VGGT files have no names: frames follow the sorted images, unreadable ones included. Sizes used to
    be passed only when no image was skipped, which refused every such folder."""
    images, predictions = _scene(tmp_path, 4)
    good = load_predictions(predictions)
    (images / "0002.jpg").write_bytes((images / "0002.jpg").read_bytes()[:5000])  # truncated: skipped
    official = tmp_path / "official.npz"
    np.savez(official, extrinsic=good.cam_from_world[None], intrinsic=good.intrinsics[None])
    result = pipeline.run(images, predictions=official, config=config_from_dict(SMALL))
    assert result.summary.skipped_images == ["0002.jpg"]
    assert result.reconstruction.num_reg_images() == 3


# ---------------------------------------------------------------------------------------------------------------
# 2. Predictions and images folder that do not quite agree


def test_predictions_of_a_deleted_photo_are_ignored_with_a_warning(tmp_path: Path, caplog):
    images, predictions = _scene(tmp_path, 4)
    (images / "0003.jpg").unlink()  # the blurry one
    with caplog.at_level(logging.WARNING, logger="vggt_sfm"):
        result = pipeline.run(images, predictions=predictions, config=config_from_dict(SMALL))
    assert result.reconstruction.num_reg_images() == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ignoring 1 of their 4 frames" in w and "0003.jpg" in w for w in warnings), warnings


def test_photos_without_a_prediction_are_refused_naming_them(capsys, tmp_path: Path):
    images, predictions = _scene(tmp_path, 4)
    save_predictions(load_predictions(predictions).subset(["0000.jpg", "0001.jpg", "0002.jpg"]), predictions)
    code, err = _cli(capsys, "--images", str(images), "--predictions", str(predictions), "--output", str(tmp_path / "out"))
    _one_line(code, err, str(predictions), "no frame for 1 of the 4 image(s)", "0003.jpg", "predict again")


# ---------------------------------------------------------------------------------------------------------------
# 3. The stage cache is data, never code


class _Exploit:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_cache_entries_round_trip_every_stage_result(tmp_path: Path):
    rng = np.random.default_rng(0)
    features = [
        Features(rng.random((n, 2)), rng.random((n, 128)).astype(np.float32), rng.random(n).astype(np.float32),
                 (640, 480), "sift", 1.5, rng.integers(0, 255, (n, 3)).astype(np.uint8))
        for n in (5, 0, 7)
    ]
    features[1].colors = None
    raw = PairMatches(np.array([[0, 1], [1, 2]]), [np.zeros((3, 2), np.int64), np.ones((0, 2), np.int64)],
                      [np.ones(3, np.float32), np.ones(0, np.float32)])
    verified = VerifiedMatches(np.array([[0, 1]]), [np.zeros((3, 2), np.int64)], ["prior"], np.array([3]), np.array([0.7]))
    predictions = load_predictions(FOUNTAIN / "prior_vggt_sim.npz")
    predictions.extras = {"something": np.arange(3)}
    tracks = Tracks(np.array([0, 0]), np.array([0, 1]), np.array([2, 3]), 1)
    prior = PriorCameras(["a.jpg", "b.jpg"], np.array([[640, 480]] * 2), rng.random((2, 3, 4)), rng.random((2, 3, 3)))
    checked = CheckedPrior(prior, raw, verified, [1], [], ViewGraphReport(failed=["b.jpg"], dropped_pairs=2,
                                                                        rotation_change_deg={"b.jpg": 170.0}))
    for value in (features, raw, verified, predictions, tracks, checked, {"a": (1, 2.5, None, "x")}):
        path = tmp_path / "entry.npz"
        cache_module.write_entry(path, value)
        back = cache_module.read_entry(path)
        assert _same(back, value), value


@pytest.mark.parametrize("planted", ["pickle", "garbage", "other_version", "foreign_npz"])
def test_a_planted_or_damaged_cache_entry_is_recomputed_never_executed(tmp_path: Path, caplog, planted: str):
    store = cache_module.StageCache(tmp_path / "cache")
    key = cache_module.stage_key("features", "some inputs")
    path = store.path(key)
    marker = tmp_path / "marker"
    if planted == "pickle":
        payload = pickle.dumps(_Exploit(marker))
        path.write_bytes(payload)
        path.with_suffix(".pkl").write_bytes(payload)  # where the pickle cache used to keep it
    elif planted == "garbage":
        path.write_bytes(os.urandom(1000))
    elif planted == "other_version":
        cache_module.write_entry(path, [1, 2])
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        structure = json.loads(str(arrays["structure.json"]))
        structure["version"] = 99
        arrays["structure.json"] = np.array(json.dumps(structure))
        np.savez(path, **arrays)
    else:
        np.savez(path, x=np.arange(3))
    with caplog.at_level(logging.WARNING, logger="vggt_sfm"):
        value, cached = store.get_or_compute(key, lambda: [3, 4])
    assert (value, cached) == ([3, 4], False)
    assert not marker.exists(), "a cache entry ran code"
    assert any("ignoring unreadable cache entry" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert store.get_or_compute(key, lambda: [5])[0] == [3, 4]  # the recomputed entry replaced the planted one


def test_a_pipeline_run_never_unpickles_a_planted_cache(tmp_path: Path):
    images, predictions = _scene(tmp_path, 3)
    out = tmp_path / "out"
    config = config_from_dict(SMALL)
    pipeline.run(images, predictions=predictions, output=out, config=config)
    marker = tmp_path / "marker"
    entries = sorted((out / "cache").glob("*.npz"))
    assert {p.name.split("-")[0] for p in entries} == {"features", "matches", "verification", "view_graph"}
    for entry in entries:  # someone hands over this output folder with a poisoned cache
        entry.write_bytes(pickle.dumps(_Exploit(marker)))
    result = pipeline.run(images, predictions=predictions, output=out, config=config, overwrite=True)
    assert not marker.exists()
    assert result.summary.cached_stages == []
    assert result.reconstruction.num_reg_images() == 3


# ---------------------------------------------------------------------------------------------------------------
# 4. An interrupted feature extraction resumes image by image


def test_interrupted_feature_extraction_resumes_where_it_stopped(tmp_path: Path, monkeypatch):
    images, predictions = _scene(tmp_path, 4)
    out = tmp_path / "out"
    config = config_from_dict({**SMALL, "features": {**SMALL["features"], "num_workers": 1}})
    from vggt_sfm import features as features_module

    real = features_module.extract_image
    extracted: list[int] = []

    def interrupted_after_two(image, *args, **kwargs):
        if len(extracted) == 2:
            raise KeyboardInterrupt
        extracted.append(image.shape[1])
        return real(image, *args, **kwargs)

    monkeypatch.setattr(features_module, "extract_image", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(images, predictions=predictions, output=out, config=config)
    work = tmp_path / ".out.partial"
    (store,) = (work / "cache").glob("features-*.h5")
    with h5py.File(store, "r") as handle:  # one group per image, marked complete once written
        assert sum(bool(group.attrs.get("complete")) for group in handle.values()) == 2
    assert not out.exists() and not list((work / "cache").glob("features-*.npz"))

    extracted.clear()
    monkeypatch.setattr(features_module, "extract_image", lambda image, *a, **k: (extracted.append(1), real(image, *a, **k))[1])
    result = pipeline.run(images, predictions=predictions, output=out, config=config)
    assert len(extracted) == 2, "only the two images not extracted before the interrupt are extracted again"
    assert result.reconstruction.num_reg_images() == 4

    monkeypatch.undo()
    (entry,) = (out / "cache").glob("features-*.npz")
    resumed = cache_module.read_entry(entry)  # refers to the store, read image by image
    fresh = extract_features(images, sorted(p.name for p in images.iterdir()), config.features, progress=False)
    assert _same(list(resumed), fresh)


# ---------------------------------------------------------------------------------------------------------------
# 5. Two runs writing the same output


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from vggt_sfm.output_folder import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_the_same_output_refuses_and_a_dead_ones_lock_does_not_block(capsys, tmp_path: Path):
    images, predictions = _scene(tmp_path, 3)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = _cli(capsys, "--images", str(images), "--predictions", str(predictions), "--output", str(out), *SMALL_FLAGS)
        _one_line(code, err, f"another vggt-sfm run (pid {holder.pid}) is writing {out}", "choose another --output")
        assert not out.exists() and _hidden(tmp_path) == [".out.lock"]  # the other run's lock, untouched
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its file stays behind
        holder.wait()
    assert (tmp_path / ".out.lock").exists()
    code, err = _cli(capsys, "--images", str(images), "--predictions", str(predictions), "--output", str(out), *SMALL_FLAGS)
    assert code == 0, err
    assert pycolmap.Reconstruction(out / "sparse" / "0").num_reg_images() == 3
    assert _hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# 6. A full disk or a read-only output


def test_disk_full_while_writing_keeps_the_previous_result(capsys, tmp_path: Path, monkeypatch):
    images, predictions = _scene(tmp_path, 3)
    out = tmp_path / "out"
    args = ["--images", str(images), "--predictions", str(predictions), "--output", str(out), *SMALL_FLAGS]
    assert _cli(capsys, *args)[0] == 0
    before = {p.name: p.read_bytes() for p in (out / "sparse" / "0").iterdir()}

    from vggt_sfm import outputs

    def full_disk(path, *args, **kwargs):
        Path(path).write_bytes(b"ply\n")  # a file half-written when the space ran out
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs, "write_ply", full_disk)
    code, err = _cli(capsys, *args, "--overwrite")
    _one_line(code, err, f"cannot write {out}: No space left on device", "free some space",
              f"the previous results in {out} are unchanged", "cache is kept in", "rerun with the same --output")
    assert {p.name: p.read_bytes() for p in (out / "sparse" / "0").iterdir()} == before
    # The finished stages' cache is kept to resume from; the half-written files are not.
    assert sorted(p.name for p in (tmp_path / ".out.partial").iterdir()) == ["cache"]


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux mount namespaces")
def test_read_only_output_folder_keeps_the_previous_result(tmp_path: Path):
    """Tests run as root, where chmod does not stop a write: the parent folder is bind-mounted read-only in a
    private mount namespace (`unshare -m`) for the second run alone."""
    images, predictions = _scene(tmp_path / "in", 3)
    parent = tmp_path / "results"
    out = parent / "out"
    command = [sys.executable, "-m", "vggt_sfm", "reconstruct", "--images", str(images), "--predictions",
               str(predictions), "--output", str(out), *SMALL_FLAGS]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in (out / "sparse" / "0").iterdir()}
    shell = f"mount --bind {parent} {parent} && mount -o remount,ro,bind {parent} && exec \"$@\""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a read-only folder here: {probe.stderr.strip()}")
    second = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", *command, "--overwrite"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot write {out}: Read-only file system" in lines[0], lines
    assert {p.name: p.read_bytes() for p in (out / "sparse" / "0").iterdir()} == before


# ---------------------------------------------------------------------------------------------------------------
# 7. SIGTERM


def test_sigterm_leaves_no_partial_model_and_the_rerun_resumes(tmp_path: Path):
    images, predictions = _scene(tmp_path, 5)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vggt_sfm", "reconstruct", "--images", str(images), "--predictions",
               str(predictions), "--output", str(out), "--max-keypoints", "1024", "--resize-max", "1024"]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / ".out.partial" / "cache"
    deadline = time.monotonic() + 240
    while not list(cache.glob("features-*.npz")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before the features were stored"
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists(), "no partial sparse/0"
    assert sorted(p.name for p in (tmp_path / ".out.partial").iterdir()) == ["cache"]

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "features" in summary["cached_stages"]
    assert pycolmap.Reconstruction(out / "sparse" / "0").num_reg_images() == 5


def test_a_sigterm_whose_exception_was_swallowed_still_stops_the_run_before_it_publishes(tmp_path: Path):
    # CI saw it: the signal landed in logging's fork callback, whose exceptions Python ignores, and the run went on
    # to publish its result with exit code 0.
    from vggt_sfm.executor import fork_map
    from vggt_sfm.output_folder import commit_output
    from vggt_sfm.signals import Terminated, terminate_as_interrupt

    work, output = tmp_path / ".out.partial", tmp_path / "out"
    work.mkdir()
    with pytest.raises(Terminated):
        with terminate_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs here
            except KeyboardInterrupt:
                pass  # swallowed, as in an ignored callback
            with pytest.raises(Terminated):
                list(fork_map(abs, [-1, -2, -3], workers=2))
            commit_output(work, output)
    assert work.exists() and not output.exists()
    # Handled, so it does not stop the next run in this process (CI saw the test after this one stopped by it).
    assert list(fork_map(abs, [-1, -2, -3], workers=2)) == [1, 2, 3]
    commit_output(work, output)
    assert output.exists()


# ---------------------------------------------------------------------------------------------------------------
# 8. Odd, broken and huge image files


def _gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    noise = rng.integers(0, 30, (height, width))
    return np.clip(np.stack([x, y, 255 - x], axis=2) + noise[..., None], 0, 255).astype(np.uint8)


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small, valid 1-bit PNG of width x height (zeros compress to almost nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_a_folder_of_odd_files_reads_the_valid_ones_and_names_the_rest(tmp_path: Path, caplog):
    for i in range(60):
        Image.fromarray(_gradient(64, 48, i)).save(tmp_path / f"plain_{i:03d}.jpg", quality=90)
    rgb = _gradient(80, 60)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    grey16 = (np.linspace(0, 65535, 80 * 60).reshape(60, 80)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    rgb16 = rgb.astype(np.uint16) * 257
    import cv2

    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # 48-bit PNG (OpenCV writes BGR)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    stored = Image.fromarray(np.rot90(rgb, k=1).copy())  # shown upright after EXIF orientation 6 (turn clockwise)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    with Image.open(FOUNTAIN / "images" / "0000.jpg") as photo:  # 12000x8000: 96 MP, above Pillow's warning
        photo.resize((12000, 8000), Image.BILINEAR).save(tmp_path / "huge.jpg", quality=80)
    _png_claiming(tmp_path / "bomb.png", 20000, 20000)  # 400 MP
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000))
    photo = (FOUNTAIN / "images" / "0000.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(photo[: len(photo) // 2])

    with caplog.at_level(logging.WARNING, logger="vggt_sfm"):
        infos = {info.name: info for info in scan_images(tmp_path)}
    skipped = {"bomb.png", "corrupt.jpg", "truncated.jpg"}
    assert len(infos) == 60 + 6 and not skipped & set(infos)
    messages = " ".join(r.getMessage() for r in caplog.records)
    for name in skipped:
        assert str(tmp_path / name) in messages
    assert "larger than the 179 megapixels vggt-sfm reads" in messages
    assert (infos["rotated.jpg"].width, infos["rotated.jpg"].height) == (80, 60)
    assert (infos["huge.jpg"].width, infos["huge.jpg"].height) == (12000, 8000)

    def close(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
        return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < tolerance

    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    assert close(read_image(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, 2), 0.01)
    assert close(read_image(tmp_path / "grey16.png")[..., 0], np.round(grey16 / 257).astype(np.uint8), 0.01)
    assert close(read_image(tmp_path / "rgb16.png"), rgb, 0.6)
    assert close(read_image(tmp_path / "cmyk.jpg"), rgb, 8)
    assert close(read_image(tmp_path / "rotated.jpg"), rgb, 8)
    assert read_image(tmp_path / "huge.jpg").shape == (8000, 12000, 3)
    features = extract_features(tmp_path, ["huge.jpg"], FeatureConfig(extractor="sift", max_keypoints=256, resize_max=1024), progress=False)
    assert features[0].num_keypoints == 256 and features[0].keypoints[:, 0].max() > 6000  # all of it, downscaled
    with pytest.raises(UserError, match="bomb.png is larger than"):
        read_image(tmp_path / "bomb.png")


def test_a_scene_of_odd_photos_reconstructs_and_names_the_broken_ones(tmp_path: Path):
    """Fountain photos as CMYK JPEG, 48-bit PNG, greyscale and EXIF-rotated files, plus a corrupt and a truncated
    one: the broken two are skipped and named, the four others are registered."""
    names = sorted(p.name for p in (FOUNTAIN / "images").iterdir())[:6]
    images = tmp_path / "images"
    images.mkdir()
    photos = {n: np.asarray(Image.open(FOUNTAIN / "images" / n).convert("RGB")) for n in names}
    Image.fromarray(photos["0000.jpg"]).convert("CMYK").save(images / "0000.jpg", quality=95)
    import cv2

    cv2.imwrite(str(images / "0001.png"), (photos["0001.jpg"].astype(np.uint16) * 257)[..., ::-1])
    Image.fromarray(photos["0002.jpg"]).convert("L").save(images / "0002.jpg", quality=95)
    stored = Image.fromarray(np.rot90(photos["0003.jpg"], k=-1).copy())  # orientation 8: shown turned back
    exif = stored.getexif()
    exif[0x0112] = 8
    stored.save(images / "0003.jpg", exif=exif, quality=95)
    (images / "0004.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(5000))
    data = (FOUNTAIN / "images" / "0005.jpg").read_bytes()
    (images / "0005.jpg").write_bytes(data[: len(data) // 3])
    prior = load_predictions(FOUNTAIN / "prior_vggt_sim.npz").subset(names)
    prior.image_names = [n.replace("0001.jpg", "0001.png") for n in prior.image_names]
    result = pipeline.run(images, predictions=prior, config=config_from_dict(SMALL))
    assert result.summary.skipped_images == ["0004.jpg", "0005.jpg"]
    assert result.reconstruction.num_reg_images() == 4
    assert 0 < result.summary.mean_reprojection_error < 2.0
    cameras = {image.name: result.reconstruction.cameras[image.camera_id] for image in result.reconstruction.images.values()}
    assert (cameras["0003.jpg"].width, cameras["0003.jpg"].height) == (1536, 1024)


# ---------------------------------------------------------------------------------------------------------------
# 9. Output folders get the umask's modes


def test_output_folders_get_the_umasks_modes(tmp_path: Path):
    images, predictions = _scene(tmp_path, 3)
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        config = config_from_dict({**SMALL, "output": {"export": ["gsplat", "nerfstudio"]}})
        pipeline.run(images, predictions=predictions, output=out, config=config)
    finally:
        os.umask(previous)
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert {"sparse/0", "gs", "gs/sparse/0", "nerfstudio", "cache"} <= {p.relative_to(out).as_posix() for p in folders}
    modes = {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders}
    assert set(modes.values()) == {"0o755"}, modes
    files = {oct(stat.S_IMODE(p.stat().st_mode)) for p in out.rglob("*") if p.is_file()}
    assert files == {"0o644"}, files


# ---------------------------------------------------------------------------------------------------------------
# 10. Failed runs leave nothing behind (or only their finished cache, and say so)


@pytest.mark.parametrize("case", ["missing_images", "missing_weights", "wrong_predictions", "gsplat_without_depth"])
def test_a_run_failing_before_any_stage_finished_leaves_nothing(capsys, tmp_path: Path, case: str, monkeypatch):
    images, predictions = _scene(tmp_path / "in", 3)
    parent = tmp_path / "results"
    parent.mkdir()
    args = ["--images", str(images), "--predictions", str(predictions), "--output", str(parent / "out")]
    if case == "missing_images":
        args[1] = str(tmp_path / "nowhere")
        needle = "images folder not found"
    elif case == "missing_weights":
        monkeypatch.delenv("VGGT_SFM_WEIGHTS", raising=False)
        args = args[:2] + args[4:] + ["--weights", str(tmp_path / "model.pt")]
        needle = "model.pt"
    elif case == "wrong_predictions":
        args[3] = str(FOUNTAIN / "gt" / "cameras.txt")
        needle = "not an .npz archive"
    else:
        args += ["--pipeline", "gsplat"]
        needle = "need depth predictions"
    code, err = _cli(capsys, *args)
    _one_line(code, err, needle)
    assert list(parent.iterdir()) == [], "a failed run left files behind"


def test_a_run_failing_later_keeps_only_its_finished_cache_and_says_so(tmp_path: Path, monkeypatch, caplog):
    images, predictions = _scene(tmp_path / "in", 3)
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in mapping")

    monkeypatch.setattr(pipeline.mapping_stage, "initialize_reconstruction", broken)
    with caplog.at_level(logging.WARNING, logger="vggt_sfm"), pytest.raises(RuntimeError):
        pipeline.run(images, predictions=predictions, output=out, config=config_from_dict(SMALL))
    assert not out.exists() and _hidden(tmp_path) == [".out.partial"]
    kept = sorted({p.name.split("-")[0] for p in (tmp_path / ".out.partial" / "cache").iterdir()})
    assert kept == ["features", "matches", "verification", "view_graph"]
    assert any("finished stages' cache is kept in" in r.getMessage() for r in caplog.records)
