"""Time and memory against the number of images: ours and COLMAP's mappers on 25 / 50 / 100 views of lego.

The views are evenly spaced subsets of `nerf_synthetic_lego100` (every 4th, 2nd, every view, in the order of the
frame number: the 25 are the `lego` set of the other tables). For each size, one after the other in the same
invocation:
- `ours`: `vggt_sfm.run(images, predictions=<simulated prior>)` (level `vggt`, seed 0, as `bench_pipeline.py`;
  not a VGGT output; VGGT's own time not included), default preset;
- `colmap_*`: pycolmap's SIFT extraction (default options) and exhaustive matching once per size, then on copies
  of that database `incremental_mapping`, `global_mapping` (GLOMAP) and `hierarchical_mapping`, each in its own
  subprocess; a mapper's time is extraction + matching + its mapping; the largest model is evaluated.
Every configuration runs in a subprocess of its own. Memory: the peak RSS of a subprocess is its
`ru_maxrss`; per stage of ours, the main process's peak is exact (the kernel's high-water mark, reset at each
stage start through /proc/self/clear_refs) and the forked workers' (SIFT extraction, verification) is sampled
every 50 ms as the sum of their proportional set sizes (shared pages counted once): the stage's figure is the
sum of the two. The growth exponent is the least-squares slope of log(time) (or log(memory)) on log(images).

    python benchmarks/bench_scale.py --sizes 25 50 100 --json /tmp/scale.json --readme
    python benchmarks/bench_scale.py --sizes 100 --methods ours --set refine.function_tolerance=1e-4
    python benchmarks/bench_scale.py --from-json a.json b.json --readme        # table from saved rows
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_pipeline import DATASETS, PRIOR_LEVEL, PRIOR_SEED, _fmt, _git_head  # noqa: E402
from readme_section import write_section  # noqa: E402

SOURCE = DATASETS / "nerf_synthetic_lego100"
MAPPERS = ("incremental", "global", "hierarchical")
METHODS = ("ours", "colmap")  # colmap: extraction + matching, then every mapper of MAPPERS
ROW_METHODS = ("ours",) + tuple(f"colmap_{m}" for m in MAPPERS)


def subset_names(size: int) -> list[str]:
    """`size` views spread evenly over lego100's frame numbers (r_0, r_4, ... for 25)."""
    numbers = sorted(int(p.stem.split("_")[1]) for p in (SOURCE / "images").glob("r_*.png"))
    stride = max(1, len(numbers) // size)
    return [f"r_{k}.png" for k in numbers[::stride][:size]]


def prepare_subset(size: int, root: Path) -> tuple[Path, object]:
    """A folder of links to the subset's images, and the ground truth of those images (PriorCameras)."""
    import numpy as np

    from vggt_sfm.evaluation.metrics import read_ground_truth
    from vggt_sfm.prior import PriorCameras

    names = subset_names(size)
    images = root / f"images_{size}"
    images.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = images / name
        if not link.exists():
            link.symlink_to(SOURCE / "images" / name)
    gt = read_ground_truth(SOURCE / "gt")
    index = [gt.image_names.index(name) for name in names]
    subset = PriorCameras([gt.image_names[i] for i in index], gt.image_sizes[index], gt.cam_from_world[index],
                          gt.intrinsics[index])
    assert np.all(subset.image_sizes > 0)
    return images, subset


# ---------------------------------------------------------------------------------------------------------------
# Memory per stage


def _status_kb(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _children() -> list[str]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            pids += open(f"/proc/self/task/{task}/children").read().split()
        except OSError:
            pass
    return pids


def _pss_kb(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class StageMemory:
    """Peak memory per pipeline stage: the main process's high-water mark (reset at each stage start) plus the
    sampled peak of its workers' proportional set sizes."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.stage: str | None = None
        self.main_kb: dict[str, int] = {}
        self.workers_kb: dict[str, int] = {}
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.resettable = True

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            stage = self.stage
            if stage is None:
                continue
            workers = sum(_pss_kb(pid) for pid in _children())
            self.workers_kb[stage] = max(self.workers_kb.get(stage, 0), workers)

    @contextmanager
    def measure(self, stage: str):
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.resettable = False
        self.stage = stage
        try:
            yield
        finally:
            self.main_kb[stage] = max(self.main_kb.get(stage, 0), _status_kb("VmHWM"))
            self.stage = None

    def __enter__(self) -> "StageMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def per_stage_mb(self) -> dict[str, float]:
        return {s: (self.main_kb[s] + self.workers_kb.get(s, 0)) / 1024.0 for s in self.main_kb}


# ---------------------------------------------------------------------------------------------------------------
# Workers (each in its own subprocess)


def worker_ours(size: int, root: Path, threads: int, overrides: list[str]) -> dict:
    import torch

    import vggt_sfm
    from vggt_sfm import pipeline
    from vggt_sfm.config import apply_overrides, load_preset, parse_override
    from vggt_sfm.evaluation import evaluate
    from vggt_sfm.evaluation.simulate import simulate_prior

    torch.set_num_threads(threads)
    images, gt = prepare_subset(size, root)
    prior = simulate_prior(gt, level=PRIOR_LEVEL, seed=PRIOR_SEED)
    config = apply_overrides(load_preset("default"), [parse_override(o) for o in overrides])
    memory = StageMemory()
    timed_stage = pipeline._Timer.stage

    @contextmanager
    def stage(self, name):
        with memory.measure(name), timed_stage(self, name):
            yield

    pipeline._Timer.stage = stage
    with memory:
        start = time.perf_counter()
        result = vggt_sfm.run(images, predictions=prior, config=config, progress=False)
        seconds = time.perf_counter() - start
    row = evaluate(result.reconstruction, gt).as_dict()
    row.update(time_s=seconds, stage_seconds=result.summary.stage_seconds, stage_peak_mb=memory.per_stage_mb(),
               not_refined=result.summary.not_refined, status=result.summary.status,
               ba_rounds=len((result.summary.details.get("refine") or {}).get("history") or []),
               pairs=result.summary.details.get("pairs"), overrides=overrides)
    return row


def worker_colmap_features(size: int, root: Path, threads: int) -> dict:
    """SIFT extraction and exhaustive matching into root/colmap_<size>/database.db."""
    import pycolmap

    from vggt_sfm.log import quiet_pycolmap

    images, _ = prepare_subset(size, root)
    work = root / f"colmap_{size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    database = work / "database.db"
    start = time.perf_counter()
    with quiet_pycolmap():
        pycolmap.extract_features(database, images, device=pycolmap.Device.cpu)
    extraction = time.perf_counter() - start
    with quiet_pycolmap():
        pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
    matching = time.perf_counter() - start - extraction
    return {"stage_seconds": {"extraction": extraction, "matching": matching}}


def worker_colmap_mapper(size: int, root: Path, threads: int, mapper: str) -> dict:
    import pycolmap

    from vggt_sfm.evaluation import evaluate
    from vggt_sfm.log import quiet_pycolmap

    images, gt = prepare_subset(size, root)
    work = root / f"colmap_{size}"
    database = work / f"database_{mapper}.db"
    shutil.copyfile(work / "database.db", database)
    sparse = work / f"sparse_{mapper}"
    shutil.rmtree(sparse, ignore_errors=True)
    sparse.mkdir()
    start = time.perf_counter()
    with quiet_pycolmap():
        if mapper == "incremental":
            models = pycolmap.incremental_mapping(database, images, sparse)
        elif mapper == "global":
            models = pycolmap.global_mapping(database, images, sparse)
        else:
            options = pycolmap.HierarchicalPipelineOptions()
            models = pycolmap.hierarchical_mapping(database, images, sparse, options)
    seconds = time.perf_counter() - start
    if not models:
        raise RuntimeError("no model")
    best = max(models.values(), key=lambda rec: rec.num_reg_images())
    row = evaluate(best, gt).as_dict()
    row["stage_seconds"] = {"mapping": seconds}
    return row


def worker(kind: str, size: int, root: Path, threads: int, overrides: list[str]) -> dict:
    row: dict = {"size": size, "method": kind, "commit": _git_head()}
    try:
        if kind == "ours":
            row.update(worker_ours(size, root, threads, overrides))
        elif kind == "colmap_features":
            row.update(worker_colmap_features(size, root, threads))
        else:
            row.update(worker_colmap_mapper(size, root, threads, kind.removeprefix("colmap_")))
    except Exception as error:  # a failed configuration is a result too
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        row["traceback"] = traceback.format_exc()
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row["children_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return row


def run_in_subprocess(kind: str, size: int, root: Path, threads: int, overrides: list[str], timeout: float) -> dict:
    result = root / f"row_{kind}_{size}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", kind, str(size), "--root", str(root), "--threads", str(threads),
               "--result", str(result)] + [a for o in overrides for a in ("--set", o)]
    try:
        subprocess.run(command, check=False, timeout=timeout, stdout=subprocess.DEVNULL)
        row = json.loads(result.read_text()) if result.exists() else {"error": "worker crashed"}
    except subprocess.TimeoutExpired:
        row = {"error": f"timeout after {timeout:.0f} s"}
    row.setdefault("size", size)
    row.setdefault("method", kind)
    return row


def run_size(size: int, methods: list[str], root: Path, threads: int, overrides: list[str], timeout: float) -> list[dict]:
    rows = []
    if "ours" in methods:
        rows.append(run_in_subprocess("ours", size, root, threads, overrides, timeout))
        _say(rows[-1])
    if "colmap" in methods:
        features = run_in_subprocess("colmap_features", size, root, threads, [], timeout)
        _say(features)
        for mapper in MAPPERS:
            if "error" in features:
                row = {"size": size, "method": f"colmap_{mapper}", "error": "extraction/matching: " + features["error"]}
            else:
                row = run_in_subprocess(f"colmap_{mapper}", size, root, threads, [], timeout)
                if "error" not in row:
                    row["stage_seconds"] = {**features["stage_seconds"], **row["stage_seconds"]}
                    row["time_s"] = sum(row["stage_seconds"].values())
                    row["mapper_peak_rss_mb"] = row["peak_rss_mb"]
                    row["peak_rss_mb"] = max(row["peak_rss_mb"], features["peak_rss_mb"])
            rows.append(row)
            _say(row)
    return rows


def _say(row: dict) -> None:
    status = row.get("error") or (
        f"registered {row.get('num_registered', '?')}, AUC@1 {100 * row.get('auc@1', float('nan')):.1f}, "
        f"time {_fmt(row.get('time_s') or sum(row.get('stage_seconds', {}).values()), '.1f')} s, "
        f"peak RSS {row.get('peak_rss_mb', 0):.0f} MB"
    )
    print(f"[{row['size']} / {row['method']}] {status}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Tables


def growth_exponent(sizes: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(size); None with fewer than two positive points."""
    import numpy as np

    points = [(s, v) for s, v in zip(sizes, values) if v is not None and v > 0]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def tables(rows: list[dict]) -> str:
    sizes = sorted({r["size"] for r in rows})
    by = {(r["size"], r["method"]): r for r in rows}
    lines = ["| images | method | registered | AUC@1 | AUC@5 | rot. err. median (°) | time (s) | "
             "time / COLMAP incremental | time / COLMAP global | peak RSS (MB) |", "|" + "---|" * 10]
    for size in sizes:
        for method in ROW_METHODS:
            r = by.get((size, method))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {size} | {method} | failed: {r['error']} |" + " |" * 7)
                continue
            ratios = []
            for base in ("colmap_incremental", "colmap_global"):
                b = by.get((size, base))
                ok = method == "ours" and b is not None and "error" not in b and b.get("time_s")
                ratios.append(r["time_s"] / b["time_s"] if ok else None)
            lines.append(
                f"| {size} | {method} | {r['num_registered']}/{r['num_images']} | {100 * r['auc@1']:.1f} | "
                f"{100 * r['auc@5']:.1f} | {r['rotation_error_median_deg']:.3f} | {r['time_s']:.1f} | "
                f"{_fmt(ratios[0], '.2f')} | {_fmt(ratios[1], '.2f')} | {r['peak_rss_mb']:.0f} |"
            )
    lines += ["", "Growth exponents (slope of log time and log peak RSS on log images, over "
              f"{', '.join(map(str, sizes))} images):", "",
              "| method | time exponent | peak RSS exponent |", "|---|---|---|"]
    for method in ROW_METHODS:
        sel = [by.get((s, method)) for s in sizes]
        if not any(r and "error" not in r for r in sel):
            continue
        ok = [(s, r) for s, r in zip(sizes, sel) if r and "error" not in r]
        t = growth_exponent([s for s, _ in ok], [r["time_s"] for _, r in ok])
        m = growth_exponent([s for s, _ in ok], [r["peak_rss_mb"] for _, r in ok])
        lines.append(f"| {method} | {_fmt(t, '.2f')} | {_fmt(m, '.2f')} |")
    ours = [(s, by[(s, "ours")]) for s in sizes if (s, "ours") in by and "error" not in by[(s, "ours")]]
    if ours:
        stages = list(dict.fromkeys(k for _, r in ours for k in r["stage_seconds"]))
        head = " / ".join(f"{s}" for s, _ in ours)
        lines += ["", "Ours per stage: time (s) and peak memory (MB; main process + workers) at "
                  f"{', '.join(str(s) for s, _ in ours)} images:", "",
                  f"| stage | time at {head} (s) | time exponent | peak memory at {head} (MB) |", "|---|---|---|---|"]
        for stage in stages:
            times = [r["stage_seconds"].get(stage) for _, r in ours]
            peaks = [r.get("stage_peak_mb", {}).get(stage) for _, r in ours]
            # A stage of a fraction of a second is timer noise: no exponent.
            exponent = growth_exponent([s for s, _ in ours], times) if max(t or 0 for t in times) >= 0.5 else None
            lines.append(
                f"| {stage} | {' / '.join(_fmt(t, '.1f') for t in times)} | {_fmt(exponent, '.2f')} | "
                f"{' / '.join(_fmt(p, '.0f') for p in peaks)} |"
            )
    colmap = [(s, by[(s, "colmap_incremental")]) for s in sizes
              if (s, "colmap_incremental") in by and "error" not in by[(s, "colmap_incremental")]]
    if colmap:
        lines += ["", "COLMAP per stage (s): extraction / matching / incremental, global, hierarchical mapping:", "",
                  "| images | extraction | exhaustive matching | incremental | global | hierarchical |",
                  "|---|---|---|---|---|---|"]
        for size, r in colmap:
            mapping = [by.get((size, f"colmap_{m}"), {}).get("stage_seconds", {}).get("mapping") for m in MAPPERS]
            lines.append(f"| {size} | {r['stage_seconds']['extraction']:.1f} | {r['stage_seconds']['matching']:.1f} | "
                         + " | ".join(_fmt(m, ".1f") for m in mapping) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[25, 50, 100])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="stage.key=value, for ours")
    parser.add_argument("--json", type=Path, help="write the rows here (after every row)")
    parser.add_argument("--from-json", nargs="+", type=Path, default=[], help="rows of earlier runs (--json)")
    parser.add_argument("--readme", action="store_true", help="write the tables into benchmarks/README.md")
    parser.add_argument("--note", default="", help="findings to add under the tables")
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        row = worker(args.worker[0], int(args.worker[1]), args.root, args.threads, args.overrides)
        args.result.write_text(json.dumps(row))
        return 0

    rows = [row for path in args.from_json for row in json.loads(path.read_text())]
    if not args.from_json:
        root = Path(tempfile.mkdtemp(prefix="bench_scale_"))
        try:
            for size in args.sizes:
                for row in run_size(size, args.methods, root, args.threads, args.overrides, args.timeout):
                    rows = [r for r in rows if (r["size"], r["method"]) != (row["size"], row["method"])] + [row]
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    text = tables(rows)
    print(text)
    if args.readme:
        commits = ", ".join(sorted({r["commit"] for r in rows if r.get("commit")}))
        write_section("bench_scale", "\n".join([
            "## Time and memory against the number of images (`bench_scale.py`)",
            "",
            f"Run {datetime.date.today().isoformat()} at {commits} on this machine ({os.cpu_count()} CPU cores), "
            f"{args.threads} threads, CPU only. `nerf_synthetic_lego100`, evenly spaced subsets of 25 / 50 / 100 "
            f"views; ours from the SIMULATED prior (level `{PRIOR_LEVEL}`, seed {PRIOR_SEED}; VGGT's own time not "
            "included); COLMAP: pycolmap 4.2.1 SIFT + exhaustive matching once per size, then each mapper on a copy "
            "of that database (its time: extraction + matching + mapping). Each configuration in its own "
            "subprocess; peak RSS = that subprocess's ru_maxrss (ours: per stage, the main process's high-water "
            "mark reset at each stage plus its workers' sampled PSS). AUC per the VGGT/CO3D protocol, unregistered "
            "images fail their pairs.",
            "",
            text,
        ] + (["", args.note] if args.note else [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
