"""The end of a run, as a new user meets it: the sanity status of the result, every path written, summary.json's
contents, progress on a terminal (and none when piped), `--quiet` and `--json`.

A small real scene: four fountain photos (data/fountain) with their simulated prior, few keypoints so each run
takes seconds; the failing case is the same scene with identity extrinsics (every camera at the origin).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path

import numpy as np
import pycolmap
import pytest

import vggt_sfm
from vggt_sfm import pipeline
from vggt_sfm.cli import main
from vggt_sfm.config import config_from_dict
from vggt_sfm.predictions import load_predictions, save_predictions
from vggt_sfm.report import AFTER_BA_KEY, BEFORE_BA_KEY
from vggt_sfm.sanity import EXIT_FAILED, check_run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "fountain"
NAMES = [f"{i:04d}.jpg" for i in range(4)]
SMALL = ["--set", "features.max_keypoints=512", "--set", "features.resize_max=640"]


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scene")
    images = root / "images"
    images.mkdir()
    for name in NAMES:
        (images / name).write_bytes((DATA / "images" / name).read_bytes())
    predictions = load_predictions(DATA / "prior_vggt_sim.npz").subset(NAMES)
    save_predictions(predictions, root / "prior.npz")
    predictions.cam_from_world[:] = np.eye(4)[:3]  # what a broken predictor may write: every camera at the origin
    save_predictions(predictions, root / "identity.npz")
    return {"root": root, "images": images, "prior": root / "prior.npz", "identity": root / "identity.npz"}


def _args(scene, output: Path, predictions: str = "prior") -> list[str]:
    return ["reconstruct", "--images", str(scene["images"]), "--predictions", str(scene[predictions]),
            "--output", str(output), *SMALL]


@pytest.fixture(scope="module")
def good_run(scene):
    """One command-line run with ground truth, a database and an export; (exit code, stdout, output folder)."""
    output = scene["root"] / "good"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(_args(scene, output) + ["--gt", str(DATA / "gt"), "--database", "--export", "nerfstudio"])
    return code, stdout.getvalue(), output


def test_a_good_run_lists_every_path_it_wrote(good_run):
    code, stdout, output = good_run
    assert code == 0, stdout
    listed = [line.strip() for line in stdout.splitlines() if line.startswith("  ")]
    for expected in ("sparse/0/", "points3D.ply", "summary.json", "database.db", "nerfstudio/", "cache/"):
        assert f"{output}/{expected}" in listed, (expected, listed)
    for path in listed:
        assert Path(path).exists(), path
    assert pycolmap.Reconstruction(output / "sparse" / "0").num_reg_images() == 4
    assert "accuracy vs ground truth: registered 4/11" in stdout


def test_summary_json_holds_config_version_command_accuracy_and_labelled_errors(good_run):
    code, _, output = good_run
    summary = _strict_json((output / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["failure_reasons"] == []
    assert summary["version"] == vggt_sfm.__version__
    assert summary["command"].startswith("vggt-sfm reconstruct --images ")
    assert "features.max_keypoints=512" in summary["command"]
    # The resolved configuration: the default preset with the command line's overrides.
    assert summary["config"]["features"]["max_keypoints"] == 512
    assert summary["config"]["output"]["database"] is True and summary["config"]["output"]["export"] == ["nerfstudio"]
    assert summary["accuracy"]["num_registered"] == 4 and summary["accuracy"]["num_images"] == 11
    assert summary["accuracy"]["rotation_error_median_deg"] is not None
    # Before and after bundle adjustment are named; the top-level error is the final model's.
    mapping, refine = summary["details"]["mapping"], summary["details"]["refine"]
    assert "mean_reprojection_error" not in mapping and "mean_reprojection_error" not in refine
    assert mapping[BEFORE_BA_KEY] == pytest.approx(summary["initial_mean_reprojection_error"])
    assert refine[AFTER_BA_KEY] == pytest.approx(summary["mean_reprojection_error"], rel=1e-6)
    assert summary["initial_mean_reprojection_error"] > summary["mean_reprojection_error"]
    assert set(summary["paths_written"]) >= {"sparse/0/", "points3D.ply", "summary.json", "database.db", "nerfstudio/"}


def test_a_model_without_points_fails_keeps_its_output_and_leaks_no_warning(scene):
    output = scene["root"] / "identity_api"
    config = config_from_dict({"features": {"max_keypoints": 512, "resize_max": 640}, "pairs": {"method": "exhaustive"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's divide-by-zero in mapping used to leak here
        result = pipeline.run(scene["images"], predictions=scene["identity"], output=output, config=config)
    summary = result.summary
    assert summary.num_points == 0 and summary.status == "FAILED"
    reasons = " | ".join(summary.failure_reasons)
    assert "camera centres all coincide" in reasons and "no 3D points" in reasons
    assert "4 of 4 images were not refined" in reasons
    assert "FAILED: " in summary.format()
    # Kept for inspection, and saying why.
    written = _strict_json((output / "summary.json").read_text())
    assert written["status"] == "FAILED" and written["failure_reasons"] == summary.failure_reasons
    assert (output / "sparse" / "0" / "images.bin").exists()


def test_quiet_failed_run_exits_3_with_only_the_summary_and_the_failure(scene):
    output = scene["root"] / "identity_cli"
    result = subprocess.run(
        [sys.executable, "-m", "vggt_sfm", *_args(scene, output, "identity"), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == EXIT_FAILED == 3, result.stderr
    assert "no 3D points were triangulated" in result.stdout
    # --quiet: no warnings (mapping warns per image here), no progress; one line saying the run FAILED.
    assert result.stderr.strip().splitlines() == [
        f"vggt-sfm: FAILED: the result fails the sanity checks (3 reason(s) above); the output is kept in {output} "
        "for inspection"
    ]
    assert _strict_json((output / "summary.json").read_text())["status"] == "FAILED"


def test_json_prints_only_the_summary_and_piped_output_has_no_progress(scene):
    output = scene["root"] / "json"
    result = subprocess.run(
        [sys.executable, "-m", "vggt_sfm", *_args(scene, output), "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    printed = _strict_json(result.stdout)
    written = _strict_json((output / "summary.json").read_text())
    assert printed == written and printed["num_registered"] == 4
    assert "\r" not in result.stderr and "it/s" not in result.stderr and "..." not in result.stderr


def _run_on_terminal(args: list[str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal (120 columns); returns the exit code and what the terminal got."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "vggt_sfm", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal, cwd=ROOT,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    return process.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_a_terminal_shows_stage_progress_with_counts(scene):
    output = scene["root"] / "terminal"
    code, shown = _run_on_terminal(_args(scene, output))
    assert code == 0, shown
    for stage in ("features", "matching", "initialization", "bundle adjustment", "write"):
        assert f"vggt-sfm: {stage} ..." in shown, (stage, shown[-2000:])
    # The per-image bar of feature extraction (tqdm: done/total, rate, time left); a loaded machine may deliver
    # all four images before the bar redraws, so any count of the four is accepted.
    assert re.search(r"features: +\d+%\|[^|]*\| [0-4]/4 \[", shown), shown
    assert "bundle adjustment rounds:" in shown  # and a bar of the rounds
    assert "\r\x1b[K" in shown  # each stage line is replaced, not stacked


def test_sanity_limits():
    assert check_run(10, 500, 0.4, []) == []
    assert check_run(10, 500, 12.0, [])[0].startswith("mean reprojection error 12.00 px is above 4 px")
    assert check_run(10, 500, 12.0, [], bundle_adjusted=False) == []  # the initial model keeps the prior's errors
    assert check_run(10, 500, float("nan"), []) != []
    assert check_run(10, 500, 0.4, [f"{i}.jpg" for i in range(6)]) == [
        "6 of 10 images were not refined (too few triangulated observations; they kept their predicted pose)"
    ]
    assert check_run(10, 500, 0.4, [f"{i}.jpg" for i in range(5)]) == []
