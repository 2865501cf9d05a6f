"""VGGT-1B forward pass on CPU: our implementation vs the official one, and our bf16 CPU mode vs fp32.

Every configuration runs in its own subprocess, one at a time: build VGGT-1B with seeded random weights (no
checkpoint needed), preprocess real photos (Middlebury temple, `pad` mode, so frames are 518x518), run one
forward pass under `torch.inference_mode()` and record its wall time and the process's peak RSS (VmHWM: imports,
weights and activations; "after build" is the RSS before the forward pass).

Configurations: frames (2, 4) x heads (`camera+depth`, and `all` = camera, depth, point and track with 64 query
points) x implementation (`ours`, and `official` with --official), all fp32; plus `ours` camera+depth in
bf16 autocast (the aggregator; heads in fp32), compared with `ours` fp32 on the same weights and images:
rotation and translation-direction angle, relative translation, field-of-view difference, relative depth error.

The official code is not part of this project: fetch facebookresearch/vggt somewhere outside the repository
and pass the folder holding its `vggt/` package (it also needs `einops`; a folder with it can be given with
--official-deps).

    python benchmarks/bench_model.py --official /work/official_vggt --official-deps /work/official_vggt/_deps
    python benchmarks/bench_model.py --frames 2 --heads camera+depth --impls ours      # one quick row
    python benchmarks/bench_model.py ... --readme     # also write the table into benchmarks/README.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from readme_section import write_section  # noqa: E402  (benchmarks/ is the script's folder)

IMAGES = REPO.parent / "shared" / "datasets" / "middlebury_templeSR" / "images"
README = REPO / "benchmarks" / "README.md"
SEED = 0
NUM_QUERIES = 64
HEADS = {"camera+depth": ("camera", "depth"), "all": ("camera", "depth", "point", "track")}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _images(frames: int):
    from vggt_sfm.model.preprocess import preprocess_images

    paths = sorted(IMAGES.glob("*.png"))[:frames]
    return preprocess_images(paths, "pad").images  # 640x480 photos -> 518x518 frames


def _build(impl: str, heads: tuple[str, ...], official: str | None):
    import torch

    torch.manual_seed(SEED)
    if impl == "ours":
        from vggt_sfm.model import VGGT

        flags = {f"enable_{h}": h in heads for h in ("camera", "depth", "point", "track")}
        model = VGGT(**flags)
    else:
        sys.path.insert(0, official)
        from vggt.models.vggt import VGGT

        model = VGGT(enable_point="point" in heads, enable_track="track" in heads)
    return model.eval().requires_grad_(False)


def worker(impl: str, frames: int, heads_name: str, dtype: str, threads: int, official: str | None, out: Path) -> dict:
    """One configuration in this process; writes the camera/depth outputs to `out` (.npz) for comparisons."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    heads = HEADS[heads_name]
    images = _images(frames)
    start = time.perf_counter()
    model = _build(impl, heads, official)
    build_s = time.perf_counter() - start
    rss_built = _status_mb("VmRSS")
    queries = None
    if "track" in heads:
        queries = torch.rand(NUM_QUERIES, 2, generator=torch.Generator().manual_seed(SEED)) * 517

    lowp = dtype == "bfloat16"
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=lowp):
        if impl == "ours":
            result = model(images, query_points=queries, heads=heads)
        else:
            result = model(images, query_points=queries)
    forward_s = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    peak = _status_mb("VmHWM")

    from vggt_sfm.model import pose_encoding_to_extrinsics_intrinsics

    extrinsic, intrinsic = pose_encoding_to_extrinsics_intrinsics(result["pose_enc"][0].float(), images.shape[-2:])
    np.savez(
        out,
        extrinsic=extrinsic.double().numpy(),
        intrinsic=intrinsic.double().numpy(),
        depth=result["depth"][0, ..., 0].float().numpy(),
    )
    return {
        "impl": impl,
        "frames": frames,
        "heads": heads_name,
        "dtype": dtype,
        "threads": threads,
        "build_s": round(build_s, 1),
        "forward_s": round(forward_s, 1),
        "forward_cpu_s": round(cpu_s, 1),
        "load_avg": round((load_before + os.getloadavg()[0]) / 2, 1),
        "rss_after_build_gb": round(rss_built / 1024, 2),
        "peak_rss_gb": round(peak / 1024, 2),
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_config(impl: str, frames: int, heads: str, dtype: str, args: argparse.Namespace, work: Path) -> dict:
    """Run one configuration in a fresh subprocess and return its measurements."""
    tag = f"{impl}_{frames}_{heads}_{dtype}".replace("+", "-")
    result_path, out_path = work / f"{tag}.json", work / f"{tag}.npz"
    command = [
        sys.executable, __file__, "--worker", impl, str(frames), heads, dtype,
        "--threads", str(args.threads), "--result", str(result_path), "--out", str(out_path),
    ]
    env = dict(os.environ)
    if impl == "official":
        command += ["--official", args.official]
        if args.official_deps:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.official_deps, env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"impl": impl, "frames": frames, "heads": heads, "dtype": dtype, "error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(result_path.read_text())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["outputs"] = str(out_path)
    return result


def compare(reference: str, other: str) -> dict:
    """How far `other`'s cameras and depth are from `reference`'s (same weights, same images)."""
    import numpy as np

    a, b = np.load(reference), np.load(other)
    rot_deg, dir_deg, trans_rel = [], [], []
    for ea, eb in zip(a["extrinsic"], b["extrinsic"]):
        cos = (np.trace(ea[:, :3].T @ eb[:, :3]) - 1) / 2
        rot_deg.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
        ta, tb = ea[:, 3], eb[:, 3]
        norm = np.linalg.norm(ta)
        trans_rel.append(np.linalg.norm(ta - tb) / max(norm, 1e-12))
        if norm > 1e-9 and np.linalg.norm(tb) > 1e-9:
            dir_deg.append(np.degrees(np.arccos(np.clip(ta @ tb / norm / np.linalg.norm(tb), -1, 1))))
    # Field of view, not focal length: random weights can give FoV 0 (the camera head's ReLU), an infinite focal.
    width = 2 * a["intrinsic"][:, 0, 2]
    fov_a, fov_b = (np.degrees(2 * np.arctan(width / 2 / K[:, 0, 0])) for K in (a["intrinsic"], b["intrinsic"]))
    da, db = a["depth"], b["depth"]
    rel = np.abs(db - da) / np.maximum(np.abs(da), 1e-12)
    return {
        "rotation_deg_max": float(np.max(rot_deg)),
        "translation_dir_deg_max": float(np.max(dir_deg)) if dir_deg else float("nan"),
        "translation_rel_max": float(np.max(trans_rel)),
        "fov_deg_max": float(np.max(np.abs(fov_b - fov_a))),
        "depth_rel_median": float(np.median(rel)),
        "depth_rel_p99": float(np.percentile(rel, 99)),
        "depth_range_fp32": [float(da.min()), float(da.max())],
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def table(rows: list[dict]) -> str:
    lines = [
        "| impl | frames | heads | dtype | forward wall (s) | forward CPU (s) | peak RSS (GB) | RSS after build (GB) | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['frames']} | {r['heads']} | {r['dtype']} | error: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['impl']} | {r['frames']} | {r['heads']} | {r['dtype']} | {r['forward_s']} | {r['forward_cpu_s']} | "
            f"{r['peak_rss_gb']} | {r['rss_after_build_gb']} | {r['load_avg']} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """ours / official for each configuration both ran."""
    index = {(r["impl"], r["frames"], r["heads"], r["dtype"]): r for r in rows if "error" not in r}
    lines = [
        "| frames | heads | wall time ours/official | CPU time ours/official | peak RSS ours/official | peak minus weights ours/official |",
        "|---|---|---|---|---|---|",
    ]
    for (impl, frames, heads, dtype), r in index.items():
        o = index.get(("official", frames, heads, dtype))
        if impl != "ours" or o is None:
            continue
        act = (r["peak_rss_gb"] - r["rss_after_build_gb"]) / max(o["peak_rss_gb"] - o["rss_after_build_gb"], 1e-9)
        lines.append(
            f"| {frames} | {heads} | {r['forward_s'] / o['forward_s']:.2f} | {r['forward_cpu_s'] / o['forward_cpu_s']:.2f} | "
            f"{r['peak_rss_gb'] / o['peak_rss_gb']:.2f} | {act:.2f} |"
        )
    return "\n".join(lines)


def write_readme(text: str) -> None:
    """Replace (or append) this benchmark's section of benchmarks/README.md, leaving the rest alone."""
    write_section("bench_model", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--impls", nargs="+", default=["ours", "official"], choices=["ours", "official"])
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 CPU rows")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--official", help="folder holding the official `vggt/` package (not part of this repo)")
    parser.add_argument("--official-deps", help="extra folder for the official code's imports (einops)")
    parser.add_argument("--readme", action="store_true", help="write the results into benchmarks/README.md")
    parser.add_argument("--json", help="also write all results to this file")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "FRAMES", "HEADS", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        impl, frames, heads, dtype = args.worker
        result = worker(impl, int(frames), heads, dtype, args.threads, args.official, Path(args.out))
        Path(args.result).write_text(json.dumps(result))
        return

    impls = [i for i in args.impls if i == "ours" or args.official]
    if "official" in args.impls and not args.official:
        print("no --official folder: measuring ours only", file=sys.stderr)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        work = Path(tmp)
        plan = [(impl, f, h, "float32") for f in args.frames for h in args.heads for impl in impls]
        if not args.no_bf16:
            plan += [("ours", f, "camera+depth", "bfloat16") for f in args.frames]
        for impl, frames, heads, dtype in plan:
            print(f"running {impl} {frames} frames {heads} {dtype} ...", file=sys.stderr, flush=True)
            rows.append(run_config(impl, frames, heads, dtype, args, work))
            print("  " + json.dumps({k: v for k, v in rows[-1].items() if k != "outputs"}), file=sys.stderr, flush=True)
        drift = {}
        for frames in args.frames:
            fp32 = next((r for r in rows if (r["impl"], r["frames"], r["heads"], r["dtype"]) == ("ours", frames, "camera+depth", "float32") and "error" not in r), None)
            bf16 = next((r for r in rows if (r["impl"], r["frames"], r["heads"], r["dtype"]) == ("ours", frames, "camera+depth", "bfloat16") and "error" not in r), None)
            if fp32 and bf16:
                drift[frames] = compare(fp32["outputs"], bf16["outputs"])

    date = datetime.date.today().isoformat()
    lines = [f"Run {date} on {machine()}, {args.threads} threads.", "", table(rows)]
    if any(r["impl"] == "official" for r in rows):
        lines += ["", ratios(rows)]
    if drift:
        lines += ["", "bf16 CPU mode vs fp32 (ours, camera+depth, same random weights, real images):", "",
                  "| frames | rotation max (deg) | translation direction max (deg) | translation rel. max | horizontal FoV max (deg) | depth rel. median | depth rel. p99 |",
                  "|---|---|---|---|---|---|---|"]
        for frames, d in drift.items():
            lines.append(
                f"| {frames} | {d['rotation_deg_max']:.3f} | {d['translation_dir_deg_max']:.3f} | {d['translation_rel_max']:.4f} | "
                f"{d['fov_deg_max']:.3f} | {d['depth_rel_median']:.4f} | {d['depth_rel_p99']:.4f} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bf16_drift": drift}, indent=1))
    if args.readme:
        write_readme("## VGGT-1B forward on CPU (`bench_model.py`)\n\n" + text)


if __name__ == "__main__":
    main()
