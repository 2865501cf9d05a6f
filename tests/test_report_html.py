"""OUTPUT/report.html: written by every run, self-contained, every plot present with data; opened in a real
headless Chromium (Debian's `chromium` + `chromium-driver`) with no request leaving the page and no console error;
`vggt-sfm report` for an output folder and for a plain COLMAP model; bad input.

A small real scene: four fountain photos (data/fountain) with their simulated prior and ground truth, few keypoints.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pycolmap
import pytest
from browser import browser_unavailable, distinct_colours, headless_chromium

from vggt_sfm import pipeline, report_html
from vggt_sfm.cli import main
from vggt_sfm.config import config_from_dict
from vggt_sfm.errors import UserError
from vggt_sfm.predictions import load_predictions, save_predictions
from vggt_sfm.report_html import GROUND_TRUTH_PLOTS, PLOT_IDS, PRIOR_FILE, REPORT_FILE

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "fountain"
NAMES = [f"{i:04d}.jpg" for i in range(4)]
SMALL = {"features": {"max_keypoints": 512, "resize_max": 640}}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_scene")
    images = root / "images"
    images.mkdir()
    for name in NAMES:
        (images / name).write_bytes((DATA / "images" / name).read_bytes())
    save_predictions(load_predictions(DATA / "prior_vggt_sim.npz").subset(NAMES), root / "prior.npz")
    return {"root": root, "images": images, "prior": root / "prior.npz"}


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_output(scene) -> Path:
    """One command-line run with ground truth; its output folder."""
    output = scene["root"] / "out"
    code, stdout, stderr = _cli([
        "reconstruct", "--images", str(scene["images"]), "--predictions", str(scene["prior"]), "--output", str(output),
        "--set", "features.max_keypoints=512", "--set", "features.resize_max=640", "--gt", str(DATA / "gt"), "--quiet",
    ])  # fmt: skip
    assert code == 0, stderr
    assert f"{output}/{REPORT_FILE}" in stdout  # listed with the paths written
    return output


def plot_data(page: str) -> dict[str, list[dict]]:
    """Each plot's traces, from the `Plotly.newPlot("id", [traces], ...)` calls the page holds."""
    decoder = json.JSONDecoder()
    plots = {}
    for match in re.finditer(r'Plotly\.newPlot\(\s*"([\w-]+)",\s*', page):
        plots[match.group(1)], _ = decoder.raw_decode(page, match.end())
    return plots


def _values(array) -> int:
    """How many values a trace array holds (plotly writes numeric arrays as base64 typed arrays)."""
    if isinstance(array, dict) and "bdata" in array:
        import base64

        return len(base64.b64decode(array["bdata"])) // np.dtype(array["dtype"]).itemsize
    if isinstance(array, list):
        return sum(_values(item) if isinstance(item, list) else item is not None for item in array)
    return 0


def _decoded(array) -> np.ndarray:
    if isinstance(array, dict):
        import base64

        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return np.asarray(array, dtype=float)


def _has_data(traces: list[dict]) -> bool:
    return any(_values(trace.get(axis)) > 0 for trace in traces for axis in ("x", "y", "z"))


def test_a_run_writes_a_self_contained_report_with_every_plot(run_output):
    page = (run_output / REPORT_FILE).read_text()
    summary = json.loads((run_output / "summary.json").read_text())
    assert REPORT_FILE in summary["paths_written"] and PRIOR_FILE in summary["paths_written"]
    # Self-contained: no script, link, image or frame taken from elsewhere; plotly's bundle is inline.
    for tag in re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", page, flags=re.IGNORECASE):
        assert not re.search(r"(?:src|href)\s*=", tag, flags=re.IGNORECASE), tag
    assert len(page) > 1_000_000 and "plotly.js" in page[:20000]
    assert str(run_output) in page and ".partial" not in page.split("<script", 1)[0]  # named as the final folder

    plots = plot_data(page)
    assert set(plots) == set(PLOT_IDS), set(PLOT_IDS) ^ set(plots)
    for plot_id, traces in plots.items():
        assert _has_data(traces), plot_id
        assert f'id="{plot_id}"' in page
    rec = pycolmap.Reconstruction(run_output / "sparse" / "0")
    # The figures hold the model's numbers: every observation, every point, every BA round, every stage.
    scene = {trace["name"].split(" (")[0]: trace for trace in plots["plot-scene"]}
    assert {"points", "prior cameras", "cameras", "camera centres"} <= set(scene)
    assert _values(scene["camera centres"]["x"]) == rec.num_reg_images() == 4
    assert _values(plots["plot-reprojection-errors"][0]["x"]) == rec.compute_num_observations()
    assert _decoded(plots["plot-track-lengths"][0]["y"]).sum() == rec.num_points3D()
    history = summary["details"]["refine"]["history"]
    assert _values(plots["plot-ba-rounds"][0]["y"]) == len(history) > 0
    assert _decoded(plots["plot-ba-rounds"][1]["y"])[-1] == history[-1]["num_points"] > 0
    assert _values(plots["plot-stage-times"][0]["x"]) == len(summary["stage_seconds"])
    matrix = np.asarray(plots["plot-match-matrix"][0]["z"])
    assert matrix.shape == (4, 4) and matrix.sum() > 0 and (matrix == matrix.T).all()
    assert sorted(summary["details"]["match_graph"]["image_names"]) == NAMES
    per_image = summary["details"]["ground_truth"]["per_image"]
    assert len(per_image) == 11 and sum(row["registered"] for row in per_image) == 4  # gt has all 11 photos
    assert _decoded(plots["plot-gt-auc"][0]["y"]).max() <= 1.0
    # The prior's change: a simulated 2-degree prior moves by about that much.
    changes = np.concatenate([_decoded(t["y"]) for t in plots["plot-prior-change"] if t["yaxis"] == "y"])
    assert len(changes) == 4 and 0.2 < np.median(changes) < 6.0
    prior = json.loads((run_output / PRIOR_FILE).read_text())
    assert prior["image_names"] == NAMES and np.asarray(prior["cam_from_world"]).shape == (4, 3, 4)


def test_report_command_rebuilds_an_output_and_reports_a_plain_model(run_output, tmp_path):
    (run_output / REPORT_FILE).unlink()
    code, stdout, stderr = _cli(["report", str(run_output)])
    assert code == 0, stderr
    assert stdout.strip() == f"wrote {run_output / REPORT_FILE}"
    assert set(plot_data((run_output / REPORT_FILE).read_text())) == set(PLOT_IDS)

    # A plain COLMAP model: the parts that need only the model; the run's own plots say there is no data.
    model = tmp_path / "model"
    shutil.copytree(run_output / "sparse" / "0", model)
    code, stdout, stderr = _cli(["report", str(model)])
    assert code == 0, stderr
    page = (model / REPORT_FILE).read_text()
    plots = plot_data(page)
    assert set(plots) == set(PLOT_IDS) - set(GROUND_TRUTH_PLOTS)
    for plot_id in ("plot-scene", "plot-reprojection-errors", "plot-track-lengths", "plot-observations",
                    "plot-features-matches", "plot-match-matrix"):  # fmt: skip
        assert _has_data(plots[plot_id]), plot_id
    for plot_id in ("plot-prior-change", "plot-ba-rounds", "plot-stage-times"):
        assert not _has_data(plots[plot_id]), plot_id
    assert page.count("no data: ") >= 3 and "3D points seen by both" in page

    # --output elsewhere, and --gt adds the accuracy plots to any model.
    target = tmp_path / "elsewhere.html"
    code, _, stderr = _cli(["report", str(model), "--output", str(target), "--gt", str(DATA / "gt")])
    assert code == 0, stderr
    plots = plot_data(target.read_text())
    assert all(_has_data(plots[plot_id]) for plot_id in GROUND_TRUTH_PLOTS)


def test_no_report_writes_none(scene):
    output = scene["root"] / "no_report"
    code, stdout, stderr = _cli([
        "reconstruct", "--images", str(scene["images"]), "--predictions", str(scene["prior"]), "--output", str(output),
        "--set", "features.max_keypoints=512", "--set", "features.resize_max=640", "--no-report", "--quiet",
    ])  # fmt: skip
    assert code == 0, stderr
    assert not (output / REPORT_FILE).exists() and REPORT_FILE not in stdout
    assert (output / PRIOR_FILE).exists()  # so that `vggt-sfm report` can still compare with the prior
    code, _, stderr = _cli(["report", str(output)])
    assert code == 0 and (output / REPORT_FILE).exists(), stderr


def test_a_failing_report_costs_the_run_nothing(scene, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a plotting bug")

    monkeypatch.setattr(report_html, "render_page", broken)
    output = scene["root"] / "broken_report"
    result = pipeline.run(scene["images"], predictions=scene["prior"], output=output, config=config_from_dict(SMALL))
    assert result.summary.status == "ok" and (output / "sparse" / "0" / "images.bin").exists()
    assert not (output / REPORT_FILE).exists() and not list(output.glob(".*partial"))
    assert REPORT_FILE not in json.loads((output / "summary.json").read_text())["paths_written"]
    assert "report.html was not written (RuntimeError: a plotting bug)" in caplog.text


def test_a_folder_that_is_not_a_model_is_one_clear_line(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"not a model")
    for folder in (tmp_path, tmp_path / "missing"):
        code, stdout, stderr = _cli(["report", str(folder)])
        assert code == 2 and stdout == ""
        assert len(stderr.strip().splitlines()) == 1 and str(folder) in stderr, stderr
    assert "neither a vggt-sfm output" in _cli(["report", str(tmp_path)])[2]
    (tmp_path / "cameras.bin").write_bytes(b"garbage")
    (tmp_path / "images.bin").write_bytes(b"garbage")
    code, _, stderr = _cli(["report", str(tmp_path)])
    assert code == 2 and "cannot read a COLMAP model" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_report_into_a_missing_folder_is_one_clear_line(run_output, tmp_path):
    target = tmp_path / "missing" / "r.html"
    code, _, stderr = _cli(["report", str(run_output), "--output", str(target)])
    assert code == 2 and f"its folder {target.parent} does not exist" in stderr, stderr


def test_a_model_without_points_or_with_one_image_still_gets_a_report(run_output, tmp_path):
    rec = pycolmap.Reconstruction(run_output / "sparse" / "0")
    for point_id in list(rec.point3D_ids()):
        rec.delete_point3D(point_id)
    no_points = tmp_path / "no_points"
    no_points.mkdir()
    rec.write(no_points)
    code, _, stderr = _cli(["report", str(no_points)])
    assert code == 0, stderr
    plots = plot_data((no_points / REPORT_FILE).read_text())
    assert _has_data(plots["plot-scene"])  # the cameras
    assert not _has_data(plots["plot-reprojection-errors"]) and not _has_data(plots["plot-track-lengths"])

    rec = pycolmap.Reconstruction(run_output / "sparse" / "0")
    for frame_id in sorted(rec.reg_frame_ids())[1:]:
        rec.deregister_frame(frame_id)
    one_image = tmp_path / "one_image"
    one_image.mkdir()
    rec.write(one_image)
    code, _, stderr = _cli(["report", str(one_image)])
    assert code == 0, stderr
    page = (one_image / REPORT_FILE).read_text()
    assert "images registered</td><td>1 of 1" in page and _has_data(plot_data(page)["plot-scene"])


def test_missing_plotly_is_one_line_naming_the_install(run_output, monkeypatch, scene):
    monkeypatch.setitem(sys.modules, "plotly", None)  # `import plotly` raises ImportError
    code, _, stderr = _cli(["report", str(run_output)])
    assert code == 2 and "pip install plotly" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    # A run refuses before any work (rather than after it), and says how to go without the report.
    output = scene["root"] / "no_plotly"
    with pytest.raises(UserError, match="pip install plotly.*--no-report"):
        pipeline.run(scene["images"], predictions=scene["prior"], output=output, config=config_from_dict(SMALL))
    assert not output.exists()


@pytest.mark.skipif(browser_unavailable() is not None, reason=str(browser_unavailable()))
def test_the_report_renders_in_headless_chromium_offline(run_output, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium(tmp_path)
    try:
        driver.get_log("performance")  # drop the browser's own start-up page
        driver.get((run_output / REPORT_FILE).as_uri())
        ids = list(PLOT_IDS)
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return arguments[0].every(id => { const e = document.getElementById(id);"
            " return e && e.classList.contains('js-plotly-plot') && e._fullLayout; })", ids))  # fmt: skip
        traces = driver.execute_script("return arguments[0].map(id => document.getElementById(id).data.length)", ids)
        assert all(count > 0 for count in traces), dict(zip(ids, traces))
        assert driver.execute_script("return !!document.querySelector('#plot-scene canvas')")  # WebGL drew it

        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
        report_uri = run_output.joinpath(REPORT_FILE).as_uri()
        requested = {}  # url -> the document that asked for it
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                requested[message["params"]["request"]["url"]] = message["params"].get("documentURL", "")
        # Anything over the network fails, whoever asked; of the rest, only the report's own requests count
        # (Chromium 150 loads its new-tab page from chrome:// and chrome-untrusted:// at start-up).
        leaving = [url for url, document in requested.items()
                   if url.startswith(("http:", "https:", "ws:", "wss:", "ftp:"))
                   or (document == report_uri and not url.startswith(("file:", "data:", "blob:", "about:")))]
        assert leaving == [] and report_uri in requested, requested

        page_png = driver.get_screenshot_as_png()
        scene_png = driver.find_element(By.ID, "plot-scene").screenshot_as_png
        (tmp_path / "report.png").write_bytes(page_png)
        assert distinct_colours(page_png) > 100  # text, frusta, points: not a blank page
        assert distinct_colours(scene_png) > 30  # the 3D view itself drew frusta and points
    finally:
        driver.quit()
