"""COLMAP's own pipeline vs vggt-sfm on a simulated VGGT prior, on every ground-truth set, in one run.

For each set:
- `colmap`: pycolmap `extract_features` (SIFT, default options), `match_exhaustive`, `incremental_mapping`;
  the largest model is evaluated;
- `prior`: the simulated prior itself (level `vggt`, seed 0; no run, for reference);
- `ours`: `vggt_sfm.run(images, predictions=<that prior>)`;
- `ours_outlier`: the same prior but the middle frame (in name order) has a 20-degree rotation error;
- `ours_noprior`: `vggt_sfm.run(images, prior="none")`, no predictions (`bench_prior_none.py` tabulates it).
Each method runs in its own subprocess, so its wall time and peak memory (ru_maxrss of that process, imports
included) are its own. Accuracy is `vggt_sfm.evaluation.evaluate` against the set's ground truth.

    python benchmarks/bench_pipeline.py                       # all sets, print the table
    python benchmarks/bench_pipeline.py --sets templeSR --methods colmap
    python benchmarks/bench_pipeline.py --readme              # also write the table into benchmarks/README.md
    python benchmarks/bench_pipeline.py --methods --merge-json a.json b.json --readme   # table from saved runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from readme_section import write_section  # noqa: E402  (benchmarks/ is the script's folder)

DATASETS = REPO.parent / "shared" / "datasets"
SETS = {
    "templeSR": "middlebury_templeSR",
    "fountain": "strecha_fountain_p11",
    "herz_jesus": "strecha_herz_jesus_p8",
    "llff_fern": "llff_fern",
    "lego": "nerf_synthetic_lego",
    "lego100": "nerf_synthetic_lego100",  # all 100 views of the same scene: dense views, the scaling set
}
METHODS = ("colmap", "prior", "ours", "ours_outlier", "ours_noprior")
DEFAULT_METHODS = METHODS[:4]  # ours_noprior has its own table (bench_prior_none.py)
PRIOR_LEVEL, PRIOR_SEED = "vggt", 0
README = REPO / "benchmarks" / "README.md"


def run_colmap(images: Path, work: Path) -> "pycolmap.Reconstruction | None":
    """COLMAP's default SfM: SIFT, exhaustive matching, incremental mapping; the largest model."""
    import pycolmap

    from vggt_sfm.log import quiet_pycolmap

    database = work / "database.db"
    sparse = work / "sparse"
    sparse.mkdir(parents=True, exist_ok=True)
    with quiet_pycolmap():
        pycolmap.extract_features(database, images, device=pycolmap.Device.cpu)
    with quiet_pycolmap():
        pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
    with quiet_pycolmap():
        models = pycolmap.incremental_mapping(database, images, sparse)
    if not models:
        return None
    return max(models.values(), key=lambda rec: rec.num_reg_images())


def simulated_prior(gt: Path, outlier: bool):
    """The benchmark's prior: level vggt, seed 0; with `outlier`, the middle frame 20 degrees off."""
    from vggt_sfm.evaluation.metrics import read_ground_truth
    from vggt_sfm.evaluation.simulate import simulate_prior

    return simulate_prior(read_ground_truth(gt), level=PRIOR_LEVEL, seed=PRIOR_SEED, outliers=1 if outlier else ())


def worker(set_name: str, method: str, threads: int) -> dict:
    """Run one method on one set in this process and measure it."""
    import numpy as np

    from vggt_sfm.evaluation import evaluate

    root = DATASETS / SETS[set_name]
    images, gt = root / "images", root / "gt"
    row: dict = {"set": set_name, "method": method, "commit": _git_head()}
    try:
        if method == "prior":
            start = time.perf_counter()
            estimate = simulated_prior(gt, outlier=False)
            seconds = None
        elif method == "colmap":
            with tempfile.TemporaryDirectory(prefix="bench_colmap_") as work:
                start = time.perf_counter()
                estimate = run_colmap(images, Path(work))
                seconds = time.perf_counter() - start
        else:
            import torch

            import vggt_sfm

            torch.set_num_threads(threads)
            if method == "ours_noprior":  # `--prior none`: no predictions, COLMAP's mapper on our matches
                start = time.perf_counter()
                result = vggt_sfm.run(images, prior="none", progress=False)
            else:
                prior = simulated_prior(gt, outlier=method == "ours_outlier")
                start = time.perf_counter()
                result = vggt_sfm.run(images, predictions=prior, progress=False)
            seconds = time.perf_counter() - start
            row["unregistered"] = result.summary.unregistered
            estimate = result.reconstruction
            row["not_refined"] = result.summary.not_refined
            row["relocalized"] = result.summary.relocalized
            row["stage_seconds"] = result.summary.stage_seconds
        if estimate is None:
            raise RuntimeError("no model")
        metrics = evaluate(estimate, gt)
        row.update(metrics.as_dict())
        row["time_s"] = seconds
        if method == "ours_outlier":
            outlier_name = metrics.image_names[len(metrics.image_names) // 2]
            row["outlier"] = outlier_name
            row["outlier_rotation_error_deg"] = float(metrics.rotation_errors[metrics.image_names.index(outlier_name)])
        row["num_points"] = int(len(estimate.points3D)) if hasattr(estimate, "points3D") else 0
        row["median_focal_error"] = float(np.nanmedian(metrics.focal_errors))
    except Exception as error:  # a failed method is a result too, reported in the table
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        row["traceback"] = traceback.format_exc()
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return row


def _git_head() -> str:
    """The checkout's commit, '+' when the working tree has changes (they are what runs)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True)
        return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def run_in_subprocess(set_name: str, method: str, threads: int, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = Path(handle.name)
    command = [sys.executable, __file__, "--worker", set_name, method, "--threads", str(threads),
               "--result", str(result_path)]
    try:
        subprocess.run(command, check=False, timeout=timeout, stdout=subprocess.DEVNULL)
        text = result_path.read_text()
        row = json.loads(text) if text else {"set": set_name, "method": method, "error": "worker crashed"}
    except subprocess.TimeoutExpired:
        row = {"set": set_name, "method": method, "error": f"timeout after {timeout:.0f} s"}
    finally:
        result_path.unlink(missing_ok=True)
    return row


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None or value != value else format(value, spec)


def format_table(rows: list[dict]) -> str:
    header = ("| set | method | registered | AUC@1 | AUC@3 | AUC@5 | AUC@30 | rot. err. median (°) | "
              "centre err. median (% extent) | time (s) | time ours/COLMAP | peak RSS (MB) |")
    lines = [header, "|" + "---|" * 12]
    colmap_time = {r["set"]: r.get("time_s") for r in rows if r["method"] == "colmap"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['set']} | {r['method']} | failed: {r['error']} |" + " |" * 9)
            continue
        ratio = None
        if r["method"].startswith("ours") and colmap_time.get(r["set"]) and r.get("time_s") is not None:
            ratio = r["time_s"] / colmap_time[r["set"]]
        lines.append(
            f"| {r['set']} | {r['method']} | {r['num_registered']}/{r['num_images']} | "
            f"{100 * r['auc@1']:.1f} | {100 * r['auc@3']:.1f} | {100 * r['auc@5']:.1f} | {100 * r['auc@30']:.1f} | "
            f"{r['rotation_error_median_deg']:.3f} | {_fmt(r['center_error_median_pct'], '.2f')} | "
            f"{_fmt(r.get('time_s'), '.1f')} | {_fmt(ratio, '.2f')} | "
            f"{_fmt(r['peak_rss_mb'] if r['method'] != 'prior' else None, '.0f')} |"
        )
    return "\n".join(lines)


def write_readme_section(table: str, rows: list[dict], threads: int, note: str = "") -> None:
    """Replace (or append) this benchmark's section of benchmarks/README.md; other sections stay as they are."""
    outliers = [f"{r['set']}: {r['outlier']} {r['outlier_rotation_error_deg']:.2f}°" for r in rows
                if r.get("outlier") is not None]
    commits = sorted({r["commit"] for r in rows if r.get("commit")})
    section = "\n".join([
        "## Pipeline vs COLMAP on real sets with ground truth (`bench_pipeline.py`)",
        "",
        f"Run {datetime.date.today().isoformat()} on this machine ({os.cpu_count()} CPU cores), {threads} threads, CPU "
        "only: `python benchmarks/bench_pipeline.py --readme`. COLMAP and ours run one after the other in the same "
        "invocation for each set, so their time ratio is fair; see the note below for the machine's load.",
        "",
        "- `colmap`: pycolmap 4.2.1 `extract_features` (SIFT, default options, default max_image_size), "
        "`match_exhaustive`, `incremental_mapping`; the largest model.",
        f"- `prior`: the SIMULATED prior our pipeline starts from (ground truth + noise, level `{PRIOR_LEVEL}`, seed "
        f"{PRIOR_SEED}: 2° rotation, 3 % centre, 5 % focal, principal point at the centre; not a VGGT output).",
        "- `ours`: `vggt_sfm.run(images, predictions=prior)` with the default configuration.",
        "- `ours_outlier`: the same prior with the middle frame rotated 20° off.",
        "- AUC (%) per the VGGT/CO3D protocol over all image pairs (unregistered images fail their pairs); "
        "rotation error = median pairwise relative rotation error; centre error after a similarity alignment, "
        "in % of the scene extent (median distance of the GT camera centres to their median).",
        "- Time: the method's own wall time in its subprocess (COLMAP: extraction + matching + mapping; ours: the "
        "whole `run`, VGGT not included since the prior is given). Peak RSS: of that subprocess, imports included.",
        "",
        table,
        "",
    ] + ([f"Outlier frame, rotation error after the run: {'; '.join(outliers)}.", ""] if outliers else [])
      + ([note, ""] if note else [])
    )
    write_section("bench_pipeline", section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per method and set")
    parser.add_argument("--json", type=Path, help="also write all rows to this file")
    parser.add_argument("--merge-json", nargs="+", type=Path, default=[],
                        help="rows saved by earlier runs (--json) to put in the table; this run's rows take precedence")
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    parser.add_argument("--note", default="", help="a paragraph added under the table in the README")
    parser.add_argument("--worker", nargs=2, metavar=("SET", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        row = worker(*args.worker, threads=args.threads)
        args.result.write_text(json.dumps(row))
        return 0

    rows = []
    for path in args.merge_json:
        rows.extend(json.loads(path.read_text()))
    for set_name in args.sets:
        for method in args.methods:
            row = run_in_subprocess(set_name, method, args.threads, args.timeout)
            rows = [r for r in rows if (r["set"], r["method"]) != (set_name, method)] + [row]
            status = row.get("error") or f"AUC@30 {100 * row['auc@30']:.1f}, time {_fmt(row.get('time_s'), '.1f')} s"
            print(f"[{set_name} / {method}] {status}", file=sys.stderr, flush=True)
    order = {name: i for i, name in enumerate(SETS)}
    rows.sort(key=lambda r: (order[r["set"]], METHODS.index(r["method"])))
    table = format_table(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.readme:
        write_readme_section(table, rows, args.threads, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
