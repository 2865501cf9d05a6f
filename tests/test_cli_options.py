"""The command line's own surface: --version, help for every option, clear option errors, a closed stdout, and
`evaluate` against a ground truth of other images."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import vggt_sfm
from vggt_sfm.cli import EXIT_BROKEN_PIPE, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
FOUNTAIN_GT = ROOT / "data" / "fountain" / "gt"
TEMPLE_GT = ROOT / "data" / "templeSR" / "gt"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vggt-sfm {vggt_sfm.__version__}"


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, command in {"vggt-sfm": parser, **_subcommands(parser)}.items()
        for action in command._actions
        if action.option_strings and not action.help
    ]
    assert missing == []


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: default)" in text  # --pipeline
    assert "take the --pipeline preset's value" in text
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: vggt)" in text and "(default: 0)" in text


def test_downscales_names_the_bad_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", "--images", "i", "--output", "o", "--downscales", "2,x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --downscales: expected whole numbers separated by commas, e.g. 2,4,8; got '2,x'" in err
    assert "lambda" not in err
    args = build_parser().parse_args(["reconstruct", "--images", "i", "--output", "o", "--downscales", "2,4,8"])
    assert args.downscales == [2, 4, 8]


def test_a_closed_stdout_ends_quietly():
    """`vggt-sfm pipelines --show default | head` used to end in a BrokenPipeError traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "vggt_sfm", "pipelines", "--show", "default"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    process.stdout.close()  # the reader is gone before the command writes
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert err == ""


def test_evaluate_against_other_images_is_an_error_naming_both(capsys):
    code = main(["evaluate", "--model", str(FOUNTAIN_GT), "--gt", str(TEMPLE_GT)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        f"vggt-sfm: error: --model {FOUNTAIN_GT} and --gt {TEMPLE_GT} have no image in common "
        "(e.g. 0000.jpg vs templeSR0001.png): give the ground truth of the same images"
    )


def test_evaluate_says_a_partial_overlap(tmp_path, capsys):
    import pycolmap

    model = pycolmap.Reconstruction(str(FOUNTAIN_GT))
    for image_id in [i for i, image in model.images.items() if image.name >= "0008.jpg"]:
        model.deregister_frame(model.images[image_id].frame_id)
    model.write(str(tmp_path))
    code = main(["evaluate", "--model", str(tmp_path), "--gt", str(FOUNTAIN_GT)])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.startswith("registered 8/11")
    assert f"3 of the 11 images of --gt {FOUNTAIN_GT} are not in --model {tmp_path}" in captured.err


def test_errors_name_the_callers_own_terms(tmp_path, capsys):
    """The same mistake in Python names the parameter; on the command line, the option."""
    from vggt_sfm import pipeline
    from vggt_sfm.errors import UserError
    from vggt_sfm.export.files import check_target

    with pytest.raises(UserError) as info:
        pipeline.run(tmp_path / "missing", predictions="p.npz")
    assert str(info.value) == f"images folder not found: {tmp_path / 'missing'} (pass an existing folder of photos as `images_dir`)"
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="pass `overwrite=True` to replace it") as info:
        check_target(tmp_path / "taken", overwrite=False)
    assert "--" not in str(info.value)

    code = main(["reconstruct", "--images", str(tmp_path / "missing"), "--predictions", "p.npz", "--output", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"vggt-sfm: error: images folder not found: {tmp_path / 'missing'} (pass an existing folder of photos as --images)"
    )


def test_in_cli_terms_writes_values_as_options():
    from vggt_sfm.cli import in_cli_terms
    from vggt_sfm.errors import param

    assert in_cli_terms(f"use {param('device', 'cpu')}") == "use --device cpu"
    assert in_cli_terms(f"set {param('output.dense_points', 0)}") == "set --dense-points 0"
    assert in_cli_terms(f"use {param('output.export', ['gsplat'])}") == "use --export gsplat"
    assert in_cli_terms(f"run again with {param('download', True)}") == "run again with --download"
    assert in_cli_terms("run `vggt-sfm predict` first") == "run `vggt-sfm predict` first"  # not a parameter


def test_reconstruct_refuses_a_ground_truth_of_other_images_before_any_work(tmp_path, capsys):
    fountain = ROOT / "data" / "fountain"
    code = main(["reconstruct", "--images", str(fountain / "images"), "--predictions", str(fountain / "prior_vggt_sim.npz"),
                 "--output", str(tmp_path / "out"), "--gt", str(TEMPLE_GT)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"vggt-sfm: error: images folder {fountain / 'images'} and the ground truth have no image in common "
        "(e.g. 0000.jpg vs templeSR0001.png): give the ground truth of the same images"
    )
    assert list(tmp_path.iterdir()) == []  # not even a work folder


def test_a_bad_override_is_named_by_where_it_came_from(capsys):
    code = main(["reconstruct", "--images", "i", "--output", "o", "--set", "features.max_keypoints=lots"])
    assert code == 2
    assert capsys.readouterr().err.startswith("vggt-sfm: error: command line: 'features.max_keypoints' must be an integer")


@pytest.mark.parametrize("split", [["--chunks", "8"], ["--window", "8"]])
def test_a_split_of_vggt_with_given_predictions_is_refused_in_one_line(tmp_path, capsys, split):
    # --chunks / --window split VGGT's own run; with --predictions nothing runs VGGT, and silently ignoring the
    # option would let a user believe the run was split.
    prior = ROOT / "data" / "fountain" / "prior_vggt_sim.npz"
    code = main(["reconstruct", "--images", str(ROOT / "data" / "fountain" / "images"), "--predictions", str(prior),
                 "--output", str(tmp_path / "out"), *split])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{split[0]} splits VGGT's own run" in err and str(prior) in err and f"drop {split[0]}" in err
    assert not (tmp_path / "out").exists()


def test_a_presets_split_with_given_predictions_is_named_as_unused(tmp_path, caplog):
    from vggt_sfm.config import config_from_dict
    from vggt_sfm.pipeline import run
    from vggt_sfm.predictions import load_predictions

    names = [f"{i:04d}.jpg" for i in range(3)]
    images = tmp_path / "images"
    images.mkdir()
    for name in names:
        (images / name).write_bytes((ROOT / "data" / "fountain" / "images" / name).read_bytes())
    prior = load_predictions(ROOT / "data" / "fountain" / "prior_vggt_sim.npz").subset(names)
    config = config_from_dict({"predict": {"chunks": 8}, "features": {"max_keypoints": 256, "resize_max": 480},
                               "refine": {"enabled": False}})  # fmt: skip
    with caplog.at_level("WARNING", logger="vggt_sfm"):
        result = run(images, predictions=prior, config=config, progress=False)
    assert "predict.chunks is not used: the predictions given are used as they are" in caplog.text
    assert result.summary.num_registered == 3
