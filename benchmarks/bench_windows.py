"""Predicting in overlapping windows vs one pass: the prior and the reconstruction, on real sets with ground truth.

VGGT-1B cannot run here (no weights), so the predictions are simulated from the ground truth (`simulate_prior`,
level `vggt`), with depth maps rendered from our own reconstruction of the set (`depth_from`):
- `one pass`: one simulated prediction of all frames (one noise draw, one frame), as VGGT gives when all fit;
- `windows W/K`: windows of W frames sharing K (`vggt_sfm.windows.window_ranges`), each simulated on its own
  (its own noise, its own random similarity frame, as VGGT puts each window in a frame of its own), then chained
  by `vggt_sfm.windows.chain_windows` exactly as `predict --window` chains VGGT's windows.
Each prior is evaluated, then reconstructed with the default pipeline (`vggt_sfm.run`) and evaluated again.
All runs of a set happen in one process, one after the other; times are the `run` wall times.

    python benchmarks/bench_windows.py                   # fern, lego, templeSR; windows 8/2 and 5/2
    python benchmarks/bench_windows.py --sets llff_fern --windows 6/2 --readme
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_pipeline import DATASETS, PRIOR_LEVEL, SETS, _git_head, simulated_prior  # noqa: E402
from readme_section import write_section  # noqa: E402

WINDOW_SEED = 100  # window k is simulated with seed WINDOW_SEED + k


def windowed_prior(gt, depth_model, window: int, overlap: int):
    """Per-window simulated predictions chained into one frame (see the module docstring)."""
    from vggt_sfm.evaluation.simulate import simulate_prior
    from vggt_sfm.prior import PriorCameras
    from vggt_sfm.windows import chain_windows, window_ranges

    order = sorted(range(gt.num_images), key=lambda i: gt.image_names[i])
    windows = []
    for k, (start, stop) in enumerate(window_ranges(len(order), window, overlap)):
        ids = order[start:stop]
        subset = PriorCameras([gt.image_names[i] for i in ids], gt.image_sizes[ids], gt.cam_from_world[ids], gt.intrinsics[ids])
        windows.append(simulate_prior(subset, level=PRIOR_LEVEL, seed=WINDOW_SEED + k, depth_from=depth_model))
    return chain_windows(windows)


def run_set(set_name: str, windows: list[tuple[int, int]]) -> list[dict]:
    import vggt_sfm
    from vggt_sfm.evaluation import evaluate
    from vggt_sfm.evaluation.metrics import read_ground_truth
    from vggt_sfm.evaluation.simulate import simulate_prior

    root = DATASETS / SETS[set_name]
    images, gt_path = root / "images", root / "gt"
    gt = read_ground_truth(gt_path)
    # The depth maps come from a reconstruction of the set (its points), made from the benchmark's prior.
    depth_model = vggt_sfm.run(images, predictions=simulated_prior(gt_path, outlier=False), progress=False).reconstruction
    priors = {"one pass": simulate_prior(gt, level=PRIOR_LEVEL, seed=WINDOW_SEED, depth_from=depth_model)}
    rows = []
    for window, overlap in windows:
        try:
            priors[f"windows {window}/{overlap}"] = windowed_prior(gt, depth_model, window, overlap)
        except Exception as error:  # e.g. a shared frame without simulated depth: a result too
            rows.append({"set": set_name, "prior": f"windows {window}/{overlap}", "error": str(error).splitlines()[0]})
    for name, prior in priors.items():
        prior_metrics = evaluate(prior, gt_path)
        start = time.perf_counter()
        result = vggt_sfm.run(images, predictions=prior, progress=False)
        seconds = time.perf_counter() - start
        metrics = evaluate(result.reconstruction, gt_path)
        rows.append({
            "set": set_name, "prior": name, "images": gt.num_images,
            "prior_auc@3": prior_metrics.auc[3], "prior_auc@30": prior_metrics.auc[30],
            "prior_rot_med": float(prior_metrics.as_dict()["rotation_error_median_deg"]),
            "registered": metrics.num_registered, "auc@1": metrics.auc[1], "auc@3": metrics.auc[3], "auc@30": metrics.auc[30],
            "rot_med": float(metrics.as_dict()["rotation_error_median_deg"]), "time_s": seconds,
        })
        r = rows[-1]
        print(f"[{set_name} / {name}] prior AUC@30 {100 * r['prior_auc@30']:.1f}, result {r['registered']}/{r['images']} "
              f"AUC@1 {100 * r['auc@1']:.1f} rot {r['rot_med']:.3f} deg, {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| set | prior | prior AUC@3 / AUC@30 | prior rot. med. (°) | registered | AUC@1 | AUC@3 | AUC@30 | "
             "rot. med. (°) | time (s) | time / one pass |", "|" + "---|" * 11]
    base = {r["set"]: r["time_s"] for r in rows if r["prior"] == "one pass"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['set']} | {r['prior']} | failed: {r['error']} |" + " |" * 8)
            continue
        lines.append(
            f"| {r['set']} | {r['prior']} | {100 * r['prior_auc@3']:.1f} / {100 * r['prior_auc@30']:.1f} | "
            f"{r['prior_rot_med']:.2f} | {r['registered']}/{r['images']} | {100 * r['auc@1']:.1f} | "
            f"{100 * r['auc@3']:.1f} | {100 * r['auc@30']:.1f} | {r['rot_med']:.3f} | {r['time_s']:.1f} | "
            f"{r['time_s'] / base[r['set']]:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["llff_fern", "lego", "templeSR"], choices=list(SETS))
    parser.add_argument("--windows", nargs="+", default=["8/2", "5/2"], help="WINDOW/OVERLAP, e.g. 8/2")
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args()
    windows = [tuple(int(x) for x in spec.split("/")) for spec in args.windows]
    rows = [row for set_name in args.sets for row in run_set(set_name, windows)]
    text = table(rows)
    print(text)
    if args.readme:
        write_section("bench_windows", "\n".join([
            "## Overlapping windows vs one pass (`bench_windows.py`)",
            "",
            f"Run {datetime.date.today().isoformat()} at {_git_head()} on this machine, CPU only: "
            f"`python benchmarks/bench_windows.py --sets {' '.join(args.sets)} --windows {' '.join(args.windows)}`. "
            "SIMULATED predictions (ground truth + VGGT-like noise, level "
            f"`{PRIOR_LEVEL}`; depth rendered from our reconstruction of the set): `one pass` is one prediction of all "
            "frames; `windows W/K` simulates every window of W frames (K shared with the previous) on its own, in its "
            "own frame with its own noise, and chains them as `predict --window W --window-overlap K` does. Prior = "
            "the chained predictions before any matching; the rest is the default pipeline's result. AUC (%) per "
            "the VGGT/CO3D protocol; rotation = median pairwise relative rotation error.",
            "",
            text,
        ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
