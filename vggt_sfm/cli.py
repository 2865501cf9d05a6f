"""`vggt-sfm reconstruct | predict | pipelines | evaluate | simulate | report | view`.

The command line only parses arguments and calls the Python API; everything it does is available from Python.

Exit status: 0 done; 2 a user mistake (one line on stderr); 3 `reconstruct` finished but its result failed the
sanity checks (`vggt_sfm.sanity`: no points, a large reprojection error, most frames not refined; the output is
kept for inspection and its summary.json says why); 130 Ctrl-C; 143 SIGTERM; 141 stdout closed early (e.g. piped
into `head`). `view` serves until Ctrl-C or SIGTERM, its normal end: 0.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .signals import Terminated, interruption_handled, terminate_as_interrupt

logger = logging.getLogger("vggt_sfm")

# Named options and the preset value each one overrides (`--set stage.key=value` reaches all others).
RECONSTRUCT_OVERRIDES: dict[str, str] = {
    "extractor": "features.extractor",
    "max_keypoints": "features.max_keypoints",
    "resize_max": "features.resize_max",
    "pairs": "pairs.method",
    "num_neighbors": "pairs.num_neighbors",
    "camera_model": "mapping.camera_model",
    "shared_camera": "mapping.shared_camera",
    "refine_principal_point": "refine.refine_principal_point",
    "refine_distortion": "refine.refine_extra_params",
    "ba_rounds": "refine.rounds",
    "ba": "refine.enabled",
    "database": "output.database",
    "export": "output.export",
    "dense_points": "output.dense_points",
    "downscales": "output.downscales",
    "text": "output.text",
    "report": "output.report",
    "preprocess": "predict.preprocess",
    "device": "predict.device",
    "dtype": "predict.dtype",
    "window": "predict.window",
    "window_overlap": "predict.window_overlap",
    "chunks": "predict.chunks",
    "chunk_overlap": "predict.chunk_overlap",
    "prior": "prior",
    "backend": "backend.name",
    "ray_address": "backend.address",
}


# The option that sets each parameter or configuration value an error message names (`errors.param`).
PARAMETER_OPTIONS: dict[str, str] = {
    "images_dir": "--images",
    "predictions": "--predictions",
    "output": "--output",
    "overwrite": "--overwrite",
    "weights": "--weights",
    "download": "--download",
    "device": "--device",
    "dtype": "--dtype",
    "heads": "--heads",
    "window": "--window",
    "window_overlap": "--window-overlap",
    "chunks": "--chunks",
    "chunk_overlap": "--chunk-overlap",
    **{path: "--" + name.replace("_", "-") for name, path in RECONSTRUCT_OVERRIDES.items() if name not in ("ba", "report")},
}
_PARAM = re.compile(r"`([\w.]+)(?:=([^`]*))?`")

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # as a shell reports a command ended by SIGPIPE


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help where X says something: not for flags, nor for options whose
    value comes from the preset (their default is None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unsaid = action.default is None or action.default is False or action.default == [] or action.default == argparse.SUPPRESS
        if "default" in text or not action.option_strings or unsaid:
            return text
        return f"{text} (default: %(default)s)"


def _int_list(text: str) -> list[int]:
    """`2,4,8` -> [2, 4, 8], for argparse (its error names the option and the value)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, e.g. 2,4,8; got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers of at least 1, e.g. 2,4,8; got '{text}'")
    return values


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage (and COLMAP's own output)")


def _add_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", help="VGGT checkpoint (model.pt or .safetensors); default: $VGGT_SFM_WEIGHTS or the Hugging Face cache")
    parser.add_argument("--download", action="store_true", help="download facebook/VGGT-1B (5 GB) if it is not found locally")
    parser.add_argument("--preprocess", choices=["crop", "pad"], default=None, help="VGGT input preprocessing (default: crop)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (default: auto, a GPU when there is one)")
    parser.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default: auto, bfloat16 on a GPU)")
    parser.add_argument("--window", type=int, default=None, help="run VGGT on overlapping windows of N consecutive frames in name order, for sequences (when all frames do not fit)")
    parser.add_argument("--window-overlap", type=int, default=None, help="frames shared by consecutive windows (default: a quarter of --window)")
    parser.add_argument("--chunks", type=int, default=None, help="run VGGT on chunks of at most N images that see the same scene, for unordered collections (when all frames do not fit)")
    parser.add_argument("--chunk-overlap", type=int, default=None, help="frames shared by neighbouring chunks (default: a fifth of --chunks, at most 8)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="vggt-sfm", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    rec = sub.add_parser(
        "reconstruct", help="images (+ predictions) -> bundle-adjusted COLMAP model", formatter_class=_HelpFormatter,
        description="Options without a stated default take the --pipeline preset's value "
        "(`vggt-sfm pipelines --show NAME` prints them).",
    )
    rec.add_argument("--images", required=True, help="folder of images")
    rec.add_argument("--predictions", help="predictions .npz (from `vggt-sfm predict` or the VGGT demos); default: run VGGT")
    rec.add_argument("--output", required=True, help="output folder (sparse/0, points3D.ply, summary.json, ...)")
    rec.add_argument("--prior", choices=["vggt", "none"], help="none: no VGGT (no weights, no GPU): COLMAP's mapper on our matches")
    rec.add_argument("--pipeline", default="default", help="preset name (see `vggt-sfm pipelines`) or a .toml file")
    rec.add_argument("--overwrite", action="store_true", help="replace existing results in --output")
    _add_weights(rec)
    rec.add_argument("--extractor", choices=["aliked", "disk", "sift"], help="local features")
    rec.add_argument("--max-keypoints", type=int, help="keypoints per image")
    rec.add_argument("--resize-max", type=int, help="longest image side for feature extraction")
    rec.add_argument("--pairs", choices=["auto", "exhaustive", "prior"], help="image pair selection")
    rec.add_argument("--num-neighbors", type=int, help="pairs per image when chosen from the prior")
    rec.add_argument("--camera-model", choices=["SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "OPENCV"], help="COLMAP camera model of the output")
    rec.add_argument("--shared-camera", action=argparse.BooleanOptionalAction, default=None, help="one camera for all images")
    rec.add_argument("--refine-principal-point", action=argparse.BooleanOptionalAction, default=None, help="let bundle adjustment move the principal point")
    rec.add_argument("--refine-distortion", action=argparse.BooleanOptionalAction, default=None, help="let bundle adjustment refine the distortion parameters")
    rec.add_argument("--ba-rounds", type=int, help="bundle-adjustment rounds at most")
    rec.add_argument("--no-ba", dest="ba", action="store_false", default=None, help="write the initial model without bundle adjustment")
    rec.add_argument("--database", action="store_true", default=None, help="also write OUTPUT/database.db (COLMAP 4 schema, which COLMAP 3.x reads too)")
    rec.add_argument("--export", action="append", choices=["gsplat", "nerfstudio"], help="extra export (repeatable)")
    rec.add_argument("--dense-points", type=int, help="dense initial points from depth for the exports (at most N)")
    rec.add_argument("--downscales", type=_int_list, metavar="N,N,...", help="gsplat: also write images_N, e.g. 2,4,8")
    rec.add_argument("--text", action="store_true", default=None, help="also write the text model")
    rec.add_argument("--no-report", dest="report", action="store_false", default=None, help="do not write OUTPUT/report.html")
    rec.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE", help="override any preset value")
    rec.add_argument("--backend", choices=["local", "ray"], help="where features, matching and verification run: this machine, or Ray tasks (pip install -e \".[ray]\")")
    rec.add_argument("--ray-address", help="Ray cluster to join, host:port or auto (default: a private Ray instance on this machine)")
    rec.add_argument("--gt", help="ground-truth COLMAP model of the same images: print the accuracy at the end (and keep it in summary.json)")
    _add_common(rec)
    rec.add_argument("-q", "--quiet", action="store_true", help="print only errors and the final summary (no progress, no warnings)")
    rec.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (as summary.json), for scripts")

    pred = sub.add_parser("predict", help="images -> VGGT predictions file (.npz)", formatter_class=_HelpFormatter)
    pred.add_argument("--images", required=True, help="folder of images")
    pred.add_argument("--output", required=True, help="predictions file to write (.npz)")
    pred.add_argument("--heads", default="camera,depth", help="heads to run: camera,depth[,point,track]")
    pred.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    _add_weights(pred)
    pred.add_argument("--backend", choices=["local", "ray"], default="local", help="where the VGGT passes (windows, chunks) and the chunks' image matching run: this process, or Ray tasks")
    pred.add_argument("--ray-address", help="Ray cluster to join, host:port or auto (default: a private Ray instance on this machine)")
    _add_common(pred)

    pipes = sub.add_parser("pipelines", help="list the pipeline presets", formatter_class=_HelpFormatter)
    pipes.add_argument("--show", metavar="NAME", help="print one preset's full configuration")

    ev = sub.add_parser("evaluate", help="compare a model with a ground-truth model of the same images", formatter_class=_HelpFormatter)
    ev.add_argument("--model", required=True, help="COLMAP model folder (e.g. OUTPUT/sparse/0)")
    ev.add_argument("--gt", required=True, help="ground-truth COLMAP model folder")
    ev.add_argument("--json", action="store_true", help="print all metrics as JSON")

    sim = sub.add_parser(
        "simulate", help="write a simulated VGGT-like prior from a ground-truth model (for development)",
        formatter_class=_HelpFormatter,
    )
    sim.add_argument("--gt", required=True, help="ground-truth COLMAP model folder")
    sim.add_argument("--images", required=True, help="the images folder the model belongs to")
    sim.add_argument("--output", required=True, help="predictions file to write (.npz)")
    sim.add_argument("--level", default="vggt", choices=["easy", "vggt", "hard"], help="noise level (vggt: 2 deg rotation, 3 %% centre, 5 %% focal)")
    sim.add_argument("--seed", type=int, default=0, help="random seed of the noise")
    sim.add_argument("--outlier-frames", type=int, default=0, help="frames given a 20-degree rotation error")
    sim.add_argument("--depth-from", help="COLMAP model with 3D points of the same images: add simulated depth maps")
    sim.add_argument("--failure-modes", default="", help="VGGT's structured errors to add, comma-separated: focal-bias, "
                     "drift, bad-frames, flipped, depth, or all (see vggt_sfm/evaluation/failure_modes.py)")
    rep = sub.add_parser(
        "report", help="(re)write the HTML report of an output folder or of any COLMAP model folder",
        formatter_class=_HelpFormatter,
    )
    rep.add_argument("folder", metavar="FOLDER", help="output folder of `reconstruct`, or a COLMAP model folder")
    rep.add_argument("--output", metavar="FILE", help="the HTML file to write (default: FOLDER/report.html)")
    rep.add_argument("--gt", help="ground-truth COLMAP model of the same images: add the accuracy plots")

    vw = sub.add_parser("view", help="look at a model in 3D in the browser (viser; pip install -e \".[viewer]\")",
                        formatter_class=_HelpFormatter)  # fmt: skip
    vw.add_argument("folder", metavar="FOLDER", help="output folder of `reconstruct`, or a COLMAP model folder")
    vw.add_argument("--port", type=int, default=8080, help="port to serve on (0: any free one)")
    vw.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    vw.add_argument("--images", help="the model's photos, for the thumbnails (default: the run's --images)")
    return parser


def _reconstruct_config(args: argparse.Namespace):
    from .config import apply_overrides, load_preset, parse_override

    config = load_preset(args.pipeline)
    overrides: list[tuple[list[str], Any]] = []
    for name, path in RECONSTRUCT_OVERRIDES.items():
        value = getattr(args, name, None)
        if value is not None:
            overrides.append((path.split("."), value))
    overrides += [parse_override(text) for text in args.overrides]
    return apply_overrides(config, overrides, source="command line")


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from .pipeline import run

    for option in ("chunks", "window"):
        if args.predictions and getattr(args, option, None) is not None:
            raise UserError(f"--{option} splits VGGT's own run, but --predictions {args.predictions} are used as "
                            f"they are: drop --{option}, or drop --predictions to run VGGT in {option}")
    config = _reconstruct_config(args)
    gt = None
    if args.gt:
        gt = _read_model(args.gt, "--gt")
    result = run(
        args.images,
        predictions=args.predictions,
        output=args.output,
        config=config,
        overwrite=args.overwrite,
        weights=args.weights,
        download=args.download,
        progress=not args.quiet,
        ground_truth=gt,
        command=shlex.join(["vggt-sfm", *args.argv]),
    )
    return _report_reconstruction(result, as_json=args.json)


def _report_reconstruction(result, as_json: bool) -> int:
    """Print the end of a run: the summary (or its JSON), every path written, the accuracy; FAILED on stderr."""
    from .sanity import EXIT_FAILED, STATUS_OK

    summary = result.summary
    if as_json:
        print(summary.to_json())
    else:
        print(summary.format())
        print(f"wrote {result.output}:")
        for entry in summary.paths_written:
            print(f"  {result.output}/{entry}")
        if result.accuracy is not None:
            print("accuracy vs ground truth: " + result.accuracy.summary())
    if summary.status == STATUS_OK:
        return 0
    # The reasons are in the summary printed above (and in summary.json); stderr says that the run failed.
    print(
        f"vggt-sfm: {summary.status}: the result fails the sanity checks ({len(summary.failure_reasons)} reason(s) "
        f"above); the output is kept in {result.output} for inspection",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _cmd_predict(args: argparse.Namespace) -> int:
    from .executor import BackendConfig, open_executor
    from .predict import predict

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} already exists; pass --overwrite or choose another --output")
    if output.suffix != ".npz":
        raise UserError(f"--output {output} must end in .npz")
    heads = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    with open_executor(BackendConfig(name=args.backend, address=args.ray_address)) as executor:
        predictions = predict(
            args.images,
            output=output,
            weights=args.weights,
            download=args.download,
            device=args.device or "auto",
            dtype=args.dtype or "auto",
            preprocess=args.preprocess or "crop",
            heads=heads,
            window=args.window or 0,
            window_overlap=args.window_overlap or 0,
            chunks=args.chunks or 0,
            chunk_overlap=args.chunk_overlap or 0,
            executor=executor,
        )
    print(f"wrote {output}: {predictions.num_frames} frames")
    return 0


def _cmd_pipelines(args: argparse.Namespace) -> int:
    from .config import list_presets, load_preset

    if args.show:
        print(json.dumps(load_preset(args.show).as_dict(), indent=2))
        return 0
    for name, description in list_presets().items():
        print(f"{name:12s} {description}")
    return 0


def _read_model(path: str, flag: str):
    import pycolmap

    model_dir = Path(path)
    if not model_dir.is_dir():
        raise UserError(f"{flag} {model_dir} is not a folder holding a COLMAP model")
    try:
        return pycolmap.Reconstruction(model_dir)
    except Exception as error:
        raise UserError(f"{flag} {model_dir}: cannot read a COLMAP model ({error})") from None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.metrics import evaluate
    from .report import json_ready

    result = evaluate(
        _read_model(args.model, "--model"), _read_model(args.gt, "--gt"),
        labels=(f"--model {args.model}", f"--gt {args.gt}"),
    )
    print(json.dumps(json_ready(result.as_dict()), indent=2) if args.json else result.summary())
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .evaluation.simulate import write_simulated_prior

    write_simulated_prior(
        gt=args.gt, images=args.images, output=args.output, level=args.level, seed=args.seed,
        outlier_frames=args.outlier_frames, depth_from=args.depth_from, failure_modes=args.failure_modes or None,
    )
    depth = ", depth rendered from " + args.depth_from if args.depth_from else ""
    depth += f", failure modes {args.failure_modes}" if args.failure_modes else ""
    print(f"wrote {args.output} (SIMULATED prior, level {args.level}{depth})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report_html import write_report

    gt = _read_model(args.gt, "--gt") if args.gt else None
    print(f"wrote {write_report(Path(args.folder), output=args.output, ground_truth=gt)}")
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from .viewer import view

    try:
        view(args.folder, host=args.host, port=args.port, images_dir=args.images, warn=lambda text: logger.warning(
            "%s", in_cli_terms(text)), announce=lambda line: print(line, flush=True))  # a script waits for that line
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) is how a viewer is closed: the server has stopped
        interruption_handled()
        print("viewer stopped")
    return 0


COMMANDS = {
    "reconstruct": _cmd_reconstruct,
    "predict": _cmd_predict,
    "pipelines": _cmd_pipelines,
    "evaluate": _cmd_evaluate,
    "simulate": _cmd_simulate,
    "report": _cmd_report,
    "view": _cmd_view,
}


def in_cli_terms(message: str) -> str:
    """An error message with each parameter it names (`errors.param`) written as this command line's option."""

    def option(match: re.Match) -> str:
        name, text = match.groups()
        flag = PARAMETER_OPTIONS.get(name)
        if flag is None:
            return match.group(0)
        if text is None:
            return flag
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if value is True:
            return flag
        values = value if isinstance(value, list) else [value]
        return " ".join(f"{flag} {item}" for item in values)

    return _PARAM.sub(option, message)


def _stdout_closed() -> int:
    """The reader of stdout went away (`| head`): stop quietly; later writes (at exit) go nowhere."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (captured): nothing is flushed at exit
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vggt-sfm` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from .log import configure_logging

    configure_logging(verbose=getattr(args, "verbose", False), quiet=getattr(args, "quiet", False))
    try:
        with terminate_as_interrupt():
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # here, so that a closed pipe is caught below rather than at exit
            return code
    except BrokenPipeError:
        return _stdout_closed()
    except UserError as error:
        print(f"vggt-sfm: error: {in_cli_terms(str(error))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as interrupt:
        print("vggt-sfm: interrupted; no results were written (rerun to resume from the cached stages)", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
