"""A pipeline setting against the default over several draws of the simulated prior (accuracy, not time).

One prior draw can flatter or hide a change: on lego the default's median rotation error ranges from 0.6 to 3 deg
between draws. This runs the default preset and each variant (`--variant stage.key=value[,stage.key=value]`, in
`--set` syntax) on the same draws (`simulate_prior`, level `vggt`, seeds `--seeds`) and reports per draw and on
average: images registered, AUC@1/@5 and the median pairwise rotation error against the ground truth.

    python benchmarks/bench_draws.py --sets lego templeSR --seeds 0 1 2 3 4 --variant refine.max_reproj_error_px=4.0

`--leave-one-out` adds the check that a setting generalises: for each set held out, the variant the other sets
choose (best mean rank of the mean rotation error over them) and how it does on the held-out set, against the
default and against the variant that set alone would choose.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_pipeline import DATASETS, PRIOR_LEVEL, SETS, _git_head  # noqa: E402
from readme_section import write_section  # noqa: E402


def run(set_name: str, seeds: list[int], variants: list[str]) -> list[dict]:
    import vggt_sfm
    from vggt_sfm.config import apply_overrides, load_preset, parse_override
    from vggt_sfm.evaluation import evaluate
    from vggt_sfm.evaluation.metrics import read_ground_truth
    from vggt_sfm.evaluation.simulate import simulate_prior

    root = DATASETS / SETS[set_name]
    gt = read_ground_truth(root / "gt")
    rows = []
    for seed in seeds:
        prior = simulate_prior(gt, level=PRIOR_LEVEL, seed=seed)
        for variant in ["default"] + variants:
            overrides = [] if variant == "default" else [parse_override(part) for part in variant.split(",")]
            config = apply_overrides(load_preset("default"), overrides)
            result = vggt_sfm.run(root / "images", predictions=prior, config=config, progress=False)
            metrics = evaluate(result.reconstruction, root / "gt").as_dict()
            rows.append({"set": set_name, "seed": seed, "variant": variant, **metrics})
            print(f"[{set_name} seed {seed} {variant}] AUC@1 {100 * metrics['auc@1']:.1f} "
                  f"rot {metrics['rotation_error_median_deg']:.3f}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| set | variant | registered (all draws) | AUC@1 per draw | mean AUC@1 | mean AUC@5 | rot. med. per draw (°) | "
             "mean rot. med. (°) | worst rot. med. (°) |", "|" + "---|" * 9]
    keys = list(dict.fromkeys((r["set"], r["variant"]) for r in rows))
    for set_name, variant in keys:
        sel = [r for r in rows if (r["set"], r["variant"]) == (set_name, variant)]
        rot = [r["rotation_error_median_deg"] for r in sel]
        auc1 = " / ".join(f"{100 * r['auc@1']:.1f}" for r in sel)
        rots = " / ".join(f"{v:.3f}" for v in rot)
        lines.append(
            f"| {set_name} | {variant} | {sum(r['num_registered'] for r in sel)}/{sum(r['num_images'] for r in sel)} | "
            f"{auc1} | {100 * sum(r['auc@1'] for r in sel) / len(sel):.1f} | "
            f"{100 * sum(r['auc@5'] for r in sel) / len(sel):.1f} | {rots} | "
            f"{sum(rot) / len(rot):.3f} | {max(rot):.3f} |"
        )
    return "\n".join(lines)


def _mean(rows: list[dict], set_name: str, variant: str, key: str) -> float:
    values = [r[key] for r in rows if (r["set"], r["variant"]) == (set_name, variant)]
    return sum(values) / len(values)


def leave_one_out(rows: list[dict]) -> str:
    """Per held-out set: the variant the other sets choose, and its result there."""
    sets = list(dict.fromkeys(r["set"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    rank = {}  # (set, variant) -> rank of its mean rotation error among the variants on that set (0 = best)
    for set_name in sets:
        ordered = sorted(variants, key=lambda v: _mean(rows, set_name, v, "rotation_error_median_deg"))
        rank.update({(set_name, v): ordered.index(v) for v in variants})
    lines = ["| held out | chosen by the others | its mean rot. med. (°) | default's | best there (variant) | "
             "its mean AUC@1 | default's |", "|" + "---|" * 7]
    for held in sets:
        others = [s for s in sets if s != held]
        chosen = min(variants, key=lambda v: (sum(rank[(s, v)] for s in others), v != "default"))
        best = min(variants, key=lambda v: _mean(rows, held, v, "rotation_error_median_deg"))
        rot = {v: _mean(rows, held, v, "rotation_error_median_deg") for v in (chosen, "default", best)}
        auc = {v: 100 * _mean(rows, held, v, "auc@1") for v in (chosen, "default")}
        lines.append(
            f"| {held} | {chosen} | {rot[chosen]:.3f} | {rot['default']:.3f} | {rot[best]:.3f} ({best}) | "
            f"{auc[chosen]:.1f} | {auc['default']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--variant", action="append", default=[], help="stage.key=value[,stage.key=value]")
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    parser.add_argument("--leave-one-out", action="store_true", help="add the leave-one-out check of the variants")
    parser.add_argument("--json", type=Path, help="also save the rows here")
    parser.add_argument("--from-json", type=Path, nargs="+", help="tabulate rows saved by earlier --json runs")
    parser.add_argument("--note", default="", help="findings to add under the tables")
    args = parser.parse_args()
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text())]
    else:
        rows = [row for set_name in args.sets for row in run(set_name, args.seeds, args.variant)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    text = table(rows)
    if args.leave_one_out:
        text += "\n\nLeave one out (each set held out in turn; the variant chosen on the other sets):\n\n"
        text += leave_one_out(rows)
    if args.note:
        text += "\n\n" + args.note
    print(text)
    if args.readme:
        sets = list(dict.fromkeys(row["set"] for row in rows))
        seeds = sorted({row["seed"] for row in rows})
        variants = [v for v in dict.fromkeys(row["variant"] for row in rows) if v != "default"]
        command = " ".join(["python benchmarks/bench_draws.py --sets", *sets, "--seeds", *map(str, seeds)]
                           + [f"--variant {v}" for v in variants] + ["--leave-one-out"] * args.leave_one_out)
        # The leave-one-out check has its own section, so that it does not replace the tables the defaults came from.
        write_section("bench_draws_loo" if args.leave_one_out else "bench_draws", "\n".join([
            "## Do the defaults generalise? Leave one set out (`bench_draws.py --leave-one-out`)" if args.leave_one_out
            else "## The default against variants over several prior draws (`bench_draws.py`)",
            "",
            f"Run {datetime.date.today().isoformat()} at {_git_head()}: `{command}`. The same simulated priors "
            f"(level `{PRIOR_LEVEL}`, one per seed) for every variant; accuracy only (times are in the other tables).",
            "",
            text,
        ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
