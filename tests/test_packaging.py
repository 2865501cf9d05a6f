"""A non-editable install works with no source tree: the wheel carries the presets (read from pipelines/).

Builds the wheel from a copy of the sources, installs it (without dependencies) into a fresh virtual environment
that sees this interpreter's packages (torch, pycolmap, ...), and from a folder outside the repository runs
`vggt-sfm pipelines` and the README's quick start.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools

from vggt_sfm.config import list_presets

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_the_package_list_names_every_package():
    configured = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(setuptools.find_packages(str(ROOT), include=["vggt_sfm*"]))
    assert found <= configured, f"add {sorted(found - configured)} to [tool.setuptools] packages in pyproject.toml"


@pytest.mark.slow
def test_wheel_installs_and_runs_without_the_source_tree(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("vggt_sfm", "pipelines"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = wheels.glob("vggt_sfm-*.whl")
    shipped = {Path(name).name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("vggt_sfm/presets/")}
    assert shipped == {f"{name}.toml" for name in list_presets()}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(source)  # nothing of the sources is left to fall back on

    def vggt_sfm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [venv / "bin" / "vggt-sfm", *args], capture_output=True, text=True, cwd=elsewhere, timeout=600
        )

    located = subprocess.run(
        [python, "-c", "import vggt_sfm; print(vggt_sfm.__file__)"], capture_output=True, text=True, cwd=elsewhere
    )
    assert located.stdout.strip().startswith(str(venv)), located
    listed = vggt_sfm("pipelines")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(list_presets())

    fountain = ROOT / "data" / "fountain"
    run = vggt_sfm(
        "reconstruct", "--images", str(fountain / "images"), "--predictions", str(fountain / "prior_vggt_sim.npz"),
        "--output", "out/fountain", "--gt", str(fountain / "gt"),
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads((elsewhere / "out" / "fountain" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["num_registered"] == 11
    assert summary["accuracy"]["rotation_error_median_deg"] < 0.2
