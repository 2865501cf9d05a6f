"""Pipeline presets: every shipped preset loads; bad files name the key; the command line overrides values."""

from pathlib import Path

import pytest

from vggt_sfm.cli import RECONSTRUCT_OVERRIDES, _reconstruct_config, build_parser
from vggt_sfm.config import (
    PipelineConfig,
    apply_overrides,
    list_presets,
    load_preset,
    parse_override,
)
from vggt_sfm.errors import UserError


def test_every_shipped_preset_loads():
    presets = list_presets()
    assert {"default", "fast", "accurate", "gsplat", "colmap-init"} <= set(presets)
    assert all(presets.values()), "every preset starts with a one-line description"
    fast, accurate = load_preset("fast"), load_preset("accurate")
    assert fast.features.extractor == "sift" and fast.features.resize_max < accurate.features.resize_max
    assert accurate.features.max_keypoints > load_preset("default").features.max_keypoints
    gsplat = load_preset("gsplat")
    assert gsplat.output.export == ["gsplat"] and gsplat.output.dense_points > 0
    assert gsplat.features.max_keypoints == accurate.features.max_keypoints  # inherits "accurate"
    init = load_preset("colmap-init")
    assert init.output.database and not init.refine.enabled


def test_bad_preset_files_name_the_key(tmp_path: Path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[features]\nmax_keypoint = 100\n")
    with pytest.raises(UserError, match="unknown key 'features.max_keypoint'"):
        load_preset(bad_key)
    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text("[refine]\nrounds = 'many'\n")
    with pytest.raises(UserError, match="'refine.rounds' must be an integer"):
        load_preset(bad_type)
    bad_stage = tmp_path / "bad_stage.toml"
    bad_stage.write_text("[featurez]\nmax_keypoints = 1\n")
    with pytest.raises(UserError, match="unknown key 'featurez'"):
        load_preset(bad_stage)
    with pytest.raises(UserError, match="unknown pipeline preset 'nope'"):
        load_preset("nope")
    bad_export = tmp_path / "bad_export.toml"
    bad_export.write_text("[output]\nexport = ['ply']\n")
    with pytest.raises(UserError, match="unknown export 'ply'"):
        load_preset(bad_export)


def test_user_file_extends_a_preset(tmp_path: Path):
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "fast"\n[features]\nmax_keypoints = 1000\n')
    config = load_preset(mine)
    assert config.features.extractor == "sift" and config.features.max_keypoints == 1000


def test_overrides():
    config = apply_overrides(PipelineConfig(), [parse_override("features.max_keypoints=123"), parse_override("mapping.camera_model=PINHOLE")])
    assert config.features.max_keypoints == 123 and config.mapping.camera_model == "PINHOLE"
    with pytest.raises(UserError, match="^overrides: 'features.max_keypoints' must be an integer"):
        apply_overrides(PipelineConfig(), [parse_override("features.max_keypoints=lots")])


def test_every_named_option_overrides_a_real_preset_value():
    config = PipelineConfig()
    for path in RECONSTRUCT_OVERRIDES.values():
        *stages, key = path.split(".")  # "prior" is a top-level key
        assert hasattr(getattr(config, stages[0]) if stages else config, key), path
    args = build_parser().parse_args(
        ["reconstruct", "--images", "i", "--output", "o", "--pipeline", "accurate", "--max-keypoints", "500",
         "--no-ba", "--export", "nerfstudio", "--set", "refine.rounds=2", "--no-shared-camera"]
    )
    config = _reconstruct_config(args)
    assert config.features.max_keypoints == 500 and config.features.resize_max == 1600
    assert not config.refine.enabled and config.refine.rounds == 2
    assert config.output.export == ["nerfstudio"] and config.mapping.shared_camera is False


def test_the_readme_way_to_pick_a_preset_and_change_a_value():
    import vggt_sfm

    config = vggt_sfm.apply_overrides(vggt_sfm.load_preset("accurate"), [(["features", "max_keypoints"], 4096)])
    assert config.features.max_keypoints == 4096
    assert config.features.extractor == vggt_sfm.load_preset("accurate").features.extractor == "aliked"
    assert "apply_overrides(load_preset(" in vggt_sfm.run.__doc__
