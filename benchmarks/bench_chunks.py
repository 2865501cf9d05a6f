"""Chunks of similar views vs one pass vs windows, on the NeRF lego at 25, 50 and 100 views in shuffled order.

VGGT-1B cannot run here (no weights), so every VGGT pass is SIMULATED (`vggt_sfm.evaluation.simulated_vggt`): the
ground-truth cameras of the pass's frames with VGGT-like noise (level `vggt`) drawn for that pass alone, in a frame
of its own, depth rendered from our own reconstruction of the 100 views. `predict` runs unchanged on it:
- `one pass`: all frames in one pass (one draw);
- `chunks N`: `predict --chunks N` (chunks formed from the photos, each simulated on its own, one global merge);
- `windows N`: `predict --window N` (windows of N frames in name order, each simulated on its own, merged as a
  path). The files are renamed by a hash of their content, so name order says nothing about the views: what
  `--window` gives on an unordered collection.
Each prior is evaluated, then reconstructed with the default pipeline (`vggt_sfm.run`) and evaluated again.
All runs happen in one process, one after the other; times are wall times (`predict` includes forming the chunks).

    python benchmarks/bench_chunks.py                          # 25, 50, 100 views; chunks and windows of 16
    python benchmarks/bench_chunks.py --views 25 --size 12 --readme
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_pipeline import DATASETS, PRIOR_LEVEL, SETS, _git_head  # noqa: E402
from readme_section import write_section  # noqa: E402

VIEW_SEED = 0  # which views make the 25 and 50 (a random subset of the 100)
MODEL_SEEDS = [0]  # the simulated VGGT's noise draws (each pass's draw follows from the seed and its frames)


def renamed_set(work: Path):
    """lego100 copied under names that are a hash of each file (shuffled order), and its ground truth renamed."""
    import numpy as np

    from vggt_sfm.evaluation.metrics import read_ground_truth
    from vggt_sfm.prior import PriorCameras

    root = DATASETS / SETS["lego100"]
    gt = read_ground_truth(root / "gt")
    names = {}
    images = work / "lego100"
    images.mkdir()
    for name in gt.image_names:
        data = (root / "images" / name).read_bytes()
        names[name] = hashlib.sha1(data).hexdigest()[:10] + ".png"
        (images / names[name]).write_bytes(data)
    renamed = PriorCameras([names[n] for n in gt.image_names], gt.image_sizes, gt.cam_from_world, gt.intrinsics)
    order = np.argsort(renamed.image_names)
    return images, PriorCameras([renamed.image_names[i] for i in order], renamed.image_sizes[order],
                                renamed.cam_from_world[order], renamed.intrinsics[order])  # fmt: skip


def subset(images: Path, gt, count: int, work: Path):
    """A folder of `count` of the views (a fixed random choice) and their ground truth."""
    import numpy as np

    from vggt_sfm.prior import PriorCameras

    chosen = np.sort(np.random.default_rng(VIEW_SEED).permutation(gt.num_images)[:count])
    folder = work / f"views{count}"
    folder.mkdir(exist_ok=True)
    for i in chosen:
        shutil.copy(images / gt.image_names[i], folder / gt.image_names[i])
    return folder, PriorCameras([gt.image_names[i] for i in chosen], gt.image_sizes[chosen], gt.cam_from_world[chosen],
                                gt.intrinsics[chosen])  # fmt: skip


def reconstruction_of(images: Path, gt, keep: str | None):
    """Our reconstruction of the 100 views from a one-pass simulated prior, whose points the simulated depth is
    rendered from; read from (or written to) the folder `keep` when given."""
    import pycolmap

    import vggt_sfm
    from vggt_sfm.evaluation.simulate import simulate_prior

    if keep and (Path(keep) / "images.bin").exists():
        return pycolmap.Reconstruction(keep)
    start = time.perf_counter()
    model = vggt_sfm.run(images, predictions=simulate_prior(gt, level=PRIOR_LEVEL, seed=0), progress=False).reconstruction
    print(f"depth model: {model.num_reg_images()} images, {model.num_points3D()} points, "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        model.write(keep)
    return model


def run_views(count: int, images: Path, gt, depth_model, size: int, work: Path, seed: int) -> list[dict]:
    import vggt_sfm
    from vggt_sfm.evaluation import evaluate
    from vggt_sfm.evaluation.simulated_vggt import SimulatedVGGT
    from vggt_sfm.merge import MERGE_REPORT_KEY
    from vggt_sfm.predict import predict

    folder, truth = subset(images, gt, count, work)
    rows = []
    for prior_name, options in (("one pass", {}), (f"chunks {size}", {"chunks": size}), (f"windows {size}", {"window": size})):
        model = SimulatedVGGT(truth, folder, depth_model, level=PRIOR_LEVEL, seed=seed)
        row = {"views": count, "prior": prior_name, "seed": seed}
        try:
            start = time.perf_counter()
            prior = predict(folder, model=model, max_frames=10**6, progress=False, **options)
            row["predict_s"] = time.perf_counter() - start
        except Exception as error:  # a merge that cannot tie the passes together is a result too
            rows.append({**row, "error": str(error).splitlines()[0]})
            continue
        report = json.loads(str(prior.extras[MERGE_REPORT_KEY])) if MERGE_REPORT_KEY in prior.extras else None
        row["passes"] = len(model.calls)
        row["pass_pairs"] = len(report["edges"]) if report else 0
        row["left_out"] = (sum(e["status"] != "used" for e in report["edges"]) + len(report["dropped"])) if report else 0
        prior_metrics = evaluate(prior, truth)
        start = time.perf_counter()
        result = vggt_sfm.run(folder, predictions=prior, progress=False)
        row["time_s"] = time.perf_counter() - start
        metrics = evaluate(result.reconstruction, truth)
        row.update({
            "images": count, "prior_auc@3": prior_metrics.auc[3], "prior_auc@30": prior_metrics.auc[30],
            "prior_rot_med": float(prior_metrics.as_dict()["rotation_error_median_deg"]),
            "prior_centre_med": float(prior_metrics.as_dict()["center_error_median_pct"]) / 100.0,
            "registered": metrics.num_registered, "auc@1": metrics.auc[1], "auc@3": metrics.auc[3],
            "auc@30": metrics.auc[30], "rot_med": float(metrics.as_dict()["rotation_error_median_deg"]),
            "status": result.summary.status,
        })  # fmt: skip
        rows.append(row)
        print(f"[lego {count} / {prior_name} / seed {seed}] {row['passes']} passes, prior AUC@30 {100 * row['prior_auc@30']:.1f}, "
              f"result {row['registered']}/{count} AUC@1 {100 * row['auc@1']:.1f} rot {row['rot_med']:.3f} deg "
              f"({row['status']}), predict {row['predict_s']:.1f} s, run {row['time_s']:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """One line per views and prior, the draws side by side (in seed order) and their means."""
    lines = ["| views | prior | VGGT passes (pairs sharing frames, left out) | prior AUC@30 | prior rot. med. (°) | "
             "prior centre med. (%) | registered | AUC@1 per draw | mean AUC@1 | mean AUC@3 | rot. med. per draw (°) | "
             "status | predict (s) | reconstruct (s) |", "|" + "---|" * 14]  # fmt: skip
    for views, prior in dict.fromkeys((r["views"], r["prior"]) for r in rows):
        group = [r for r in rows if (r["views"], r["prior"]) == (views, prior)]
        done = [r for r in group if "error" not in r]
        failed = [r["error"] for r in group if "error" in r]
        if not done:
            lines.append(f"| {views} | {prior} | failed: {failed[0]} |" + " |" * 11)
            continue

        def each(key: str, scale: float = 1.0, digits: int = 1) -> str:
            return " / ".join(f"{scale * r[key]:.{digits}f}" for r in done)

        def mean(key: str, scale: float = 1.0, digits: int = 1) -> str:
            return f"{scale * sum(r[key] for r in done) / len(done):.{digits}f}"

        registered = " / ".join(f"{r['registered']}/{r['images']}" for r in done)
        status = " / ".join(r["status"] for r in done) + (f" ({len(failed)} failed: {failed[0]})" if failed else "")
        lines.append(
            f"| {views} | {prior} | {each('passes', digits=0)} ({each('pass_pairs', digits=0)}, "
            f"{each('left_out', digits=0)}) | {each('prior_auc@30', 100)} | {each('prior_rot_med', digits=2)} | "
            f"{each('prior_centre_med', 100)} | {registered} | {each('auc@1', 100)} | {mean('auc@1', 100)} | "
            f"{mean('auc@3', 100)} | {each('rot_med', digits=3)} | {status} | {mean('predict_s')} | {mean('time_s')} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", nargs="+", type=int, default=[25, 50, 100], help="views of lego100 per run")
    parser.add_argument("--size", type=int, default=16, help="frames per chunk and per window")
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    parser.add_argument("--seeds", nargs="+", type=int, default=MODEL_SEEDS, help="simulated VGGT noise draws")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--depth-model", help="folder to keep the reconstruction the depth is rendered from (reused)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_chunks_") as tmp:
        work = Path(tmp)
        images, gt = renamed_set(work)
        depth_model = reconstruction_of(images, gt, args.depth_model)
        rows = [row for count in args.views for seed in args.seeds
                for row in run_views(count, images, gt, depth_model, args.size, work, seed)]  # fmt: skip
    text = table(rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.readme:
        command = "python benchmarks/bench_chunks.py" + (f" --views {' '.join(map(str, args.views))}" if args.views != [25, 50, 100] else "") \
            + (f" --size {args.size}" if args.size != 16 else "") \
            + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != MODEL_SEEDS else "")  # fmt: skip
        write_section("bench_chunks", "\n".join([
            "## Chunks of similar views vs one pass vs windows (`bench_chunks.py`)",
            "",
            f"Run {datetime.date.today().isoformat()} at {_git_head()} on this machine (2 shared CPU cores), CPU only: "
            f"`{command}`. NeRF lego, {', '.join(map(str, args.views))} of its 100 views (a fixed random choice), "
            f"{len(args.seeds)} draw(s) of the simulated VGGT's noise per row, "
            "the files named by a hash of their content (shuffled order). Every VGGT pass is SIMULATED "
            f"(`evaluation/simulated_vggt.py`: ground truth + VGGT-like noise, level `{PRIOR_LEVEL}`, a draw of its own "
            "per pass and a frame of its own, depth rendered from our reconstruction of the 100 views): `one pass` is "
            f"one pass over all frames; `chunks {args.size}` is `predict --chunks {args.size}` (chunks formed from the "
            "photos, one global merge); "
            f"`windows {args.size}` is `predict --window {args.size}` (name order, which here says nothing about the "
            "views; merged as a path). Prior = the merged predictions before any matching; the rest is the default "
            "pipeline's result. AUC (%) per the VGGT/CO3D protocol; rotation = median pairwise relative rotation "
            "error. `predict` includes forming the chunks (features, retrieval, verified matches).",
            "",
            text,
        ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
