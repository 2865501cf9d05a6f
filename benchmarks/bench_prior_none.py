"""`--prior none` against COLMAP's own pipeline and against our run from a (simulated) VGGT prior, per set.

For each set, one after the other in this invocation, each in its own subprocess (`bench_pipeline.worker`):
`colmap` (pycolmap extract / match_exhaustive / incremental_mapping), `ours` (`vggt_sfm.run` from the
simulated prior of `bench_pipeline.py`) and `ours_noprior` (`vggt_sfm.run(images, prior="none")`). The table
gives registration, AUC@1, the median pairwise rotation error, and the time of the run without a prior as a
ratio against COLMAP and against `ours`, all from the same invocation.

    python benchmarks/bench_prior_none.py --sets templeSR llff_fern --readme
    python benchmarks/bench_prior_none.py --sets --merge-json rows.json --readme     # table from saved rows
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import SETS, _fmt, run_in_subprocess  # noqa: E402
from readme_section import write_section  # noqa: E402

METHODS = ("colmap", "ours", "ours_noprior")
# Cheapest first (measured times of bench_pipeline.py), so that an interrupted run still has the small sets.
ORDER = ("templeSR", "lego", "llff_fern", "herz_jesus", "fountain")


def format_table(rows: list[dict]) -> str:
    header = ("| set | method | registered | AUC@1 | AUC@5 | rot. err. median (°) | centre err. median (% extent) | "
              "time (s) | time / COLMAP | time / ours (VGGT prior) |")
    lines = [header, "|" + "---|" * 10]
    times = {(r["set"], r["method"]): r.get("time_s") for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['set']} | {r['method']} | failed: {r['error']} |" + " |" * 7)
            continue
        colmap, ours = times.get((r["set"], "colmap")), times.get((r["set"], "ours"))
        ratio_colmap = r["time_s"] / colmap if r["method"] != "colmap" and colmap else None
        ratio_ours = r["time_s"] / ours if r["method"] == "ours_noprior" and ours else None
        lines.append(
            f"| {r['set']} | {r['method']} | {r['num_registered']}/{r['num_images']} | {100 * r['auc@1']:.1f} | "
            f"{100 * r['auc@5']:.1f} | {r['rotation_error_median_deg']:.3f} | "
            f"{_fmt(r['center_error_median_pct'], '.2f')} | {_fmt(r.get('time_s'), '.1f')} | "
            f"{_fmt(ratio_colmap, '.2f')} | {_fmt(ratio_ours, '.2f')} |"
        )
    return "\n".join(lines)


def write_readme_section(table: str, rows: list[dict], threads: int, note: str) -> None:
    commits = ", ".join(sorted({r["commit"] for r in rows if r.get("commit")}))
    unregistered = [f"{r['set']}: {', '.join(r['unregistered'])}" for r in rows
                    if r["method"] == "ours_noprior" and r.get("unregistered")]
    section = "\n".join([
        "## Without the VGGT weights: `--prior none` vs COLMAP (`bench_prior_none.py`)",
        "",
        f"Run {datetime.date.today().isoformat()} at {commits} on this machine ({os.cpu_count()} CPU cores), "
        f"{threads} threads, CPU only: `python benchmarks/bench_prior_none.py --readme`. The three methods run one "
        "after the other for each set in the same invocation, so the time ratios are fair.",
        "",
        "- `colmap`: COLMAP's own pipeline as in `bench_pipeline.py` (SIFT at default size, exhaustive matching, "
        "incremental mapping); the largest model.",
        "- `ours`: `vggt_sfm.run(images, predictions=prior)` from the SIMULATED VGGT-level prior of "
        "`bench_pipeline.py` (VGGT's own time not included).",
        "- `ours_noprior`: `vggt_sfm.run(images, prior=\"none\")`: our SIFT features, exhaustive pairs (retrieval "
        "beyond 30 images), RANSAC verification, COLMAP's incremental mapper through pycolmap, our refinement.",
        "- Metrics as in `bench_pipeline.py` (AUC over all image pairs, unregistered images fail their pairs).",
        "",
        table,
        "",
    ] + ([f"Not registered without a prior: {'; '.join(unregistered)}.", ""] if unregistered else [])
      + ([note, ""] if note else []))
    write_section("bench_prior_none", section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="*", default=list(ORDER), choices=list(SETS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per method and set")
    parser.add_argument("--json", type=Path, help="also write all rows to this file (rows are added as they come)")
    parser.add_argument("--merge-json", nargs="+", type=Path, default=[], help="rows of earlier runs to include")
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    parser.add_argument("--note", default="", help="a paragraph added under the table in the README")
    args = parser.parse_args()

    rows = [row for path in args.merge_json for row in json.loads(path.read_text())]
    for set_name in args.sets:
        for method in METHODS:
            row = run_in_subprocess(set_name, method, args.threads, args.timeout)
            rows = [r for r in rows if (r["set"], r["method"]) != (set_name, method)] + [row]
            status = row.get("error") or f"AUC@1 {100 * row['auc@1']:.1f}, time {_fmt(row.get('time_s'), '.1f')} s"
            print(f"[{set_name} / {method}] {status}", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    order = {name: i for i, name in enumerate(ORDER)}
    rows.sort(key=lambda r: (order.get(r["set"], len(order)), METHODS.index(r["method"])))
    table = format_table(rows)
    print(table)
    if args.readme:
        write_readme_section(table, rows, args.threads, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
