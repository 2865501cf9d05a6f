"""`predict`: a real images folder -> a predictions file that reads back right; every bad input is one clear error.

The model is the tiny official-parity model (random "strong" weights saved by the official implementation),
loaded through the same checkpoint loader as VGGT-1B; the images are real photos (Middlebury temple).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vggt_sfm.errors import UserError
from vggt_sfm.model import VGGTConfig
from vggt_sfm.model.preprocess import preprocess_images
from vggt_sfm.model.weights import ENV_VAR, load_model
from vggt_sfm.predict import estimate_memory, predict
from vggt_sfm.predictions import load_predictions, vggt_grid_from_image

FIXTURES = Path(__file__).parent / "fixtures" / "vggt_parity"
TEMPLE = Path(__file__).resolve().parents[1] / "data" / "templeSR" / "images"
HEADS = ("camera", "depth", "point")


@pytest.fixture(scope="module")
def model():
    meta = str(np.load(FIXTURES / "tiny_conv_strong_s1__in_2x70x98.npz")["meta_json"])
    return load_model(FIXTURES / "tiny_conv_strong_s1.pt", config=VGGTConfig.from_meta(meta), heads=HEADS)


def _temple(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in TEMPLE.glob("*.png"))[:count]
    for name in names:
        shutil.copy(TEMPLE / name, folder / name)
    return names


@pytest.fixture(scope="module")
def predicted(model, tmp_path_factory):
    """Three real photos plus a text file and a corrupt image, predicted once with all three heads."""
    folder = tmp_path_factory.mktemp("images")
    names = _temple(folder, 3)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = tmp_path_factory.mktemp("out") / "predictions.npz"
    handler_records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = handler_records.append
    logging.getLogger("vggt_sfm").addHandler(handler)
    try:
        result = predict(folder, output=output, device="cpu", heads=HEADS, model=model, progress=False)
    finally:
        logging.getLogger("vggt_sfm").removeHandler(handler)
    return folder, names, output, result, [r.getMessage() for r in handler_records]


def test_predictions_file_reads_back(predicted):
    folder, names, output, result, messages = predicted
    assert any("broken.png" in m for m in messages), messages  # skipped with a warning
    loaded = load_predictions(output)
    assert loaded.image_names == names == result.image_names
    grid, (grid_w, grid_h) = vggt_grid_from_image([(640, 480)] * 3, "crop")
    assert (grid_w, grid_h) == (518, 392)
    assert loaded.cam_from_world.shape == (3, 3, 4) and loaded.intrinsics.shape == (3, 3, 3)
    assert loaded.depth.shape == loaded.depth_conf.shape == (3, grid_h, grid_w)
    assert loaded.world_points.shape == (3, grid_h, grid_w, 3)
    np.testing.assert_allclose(loaded.grid_from_image, grid)
    np.testing.assert_allclose(loaded.cam_from_world, result.cam_from_world, atol=1e-6)
    np.testing.assert_allclose(loaded.depth, result.depth)
    assert np.all(loaded.depth > 0) and np.all(loaded.depth_conf > 1)
    # Rotations are rotations; VGGT's principal point is the grid centre (W/2, H/2).
    rotations = loaded.cam_from_world[:, :, :3]
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (3, 3, 3)), atol=1e-5)
    np.testing.assert_allclose(loaded.intrinsics[:, 0, 2], grid_w / 2)
    np.testing.assert_allclose(loaded.intrinsics[:, 1, 2], grid_h / 2)
    # Back in original pixels (COLMAP convention): focal scaled by 640/518, centre shifted by half a grid pixel.
    K = loaded.image_intrinsics()
    np.testing.assert_allclose(K[:, 0, 0], loaded.intrinsics[:, 0, 0] * 640 / 518, rtol=1e-6)
    np.testing.assert_allclose(K[:, 0, 2], (grid_w / 2 + 0.5) * 640 / 518, rtol=1e-6)


def test_predictions_equal_a_direct_model_call(predicted, model):
    folder, names, _, result, _ = predicted
    batch = preprocess_images([folder / n for n in names], "crop")
    with torch.inference_mode():
        out = model(batch.images, heads=("camera", "depth"))
    np.testing.assert_allclose(result.depth, out["depth"][0, ..., 0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.depth_conf, out["depth_conf"][0].numpy(), rtol=1e-5, atol=1e-5)


def _rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = (np.trace(a[:, :3].T @ b[:, :3]) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


def test_single_image_and_bf16_cpu_mode(model, tmp_path):
    _temple(tmp_path / "one", 1)
    fp32 = predict(tmp_path / "one", device="cpu", dtype="float32", model=model, progress=False)
    bf16 = predict(tmp_path / "one", device="cpu", dtype="bfloat16", model=model, progress=False)
    assert fp32.num_frames == bf16.num_frames == 1 and fp32.world_points is None
    assert _rotation_angle_deg(fp32.cam_from_world[0], bf16.cam_from_world[0]) < 3.0
    assert np.median(np.abs(bf16.depth - fp32.depth) / fp32.depth) < 0.02
    assert not np.array_equal(bf16.depth, fp32.depth)  # it did run in another precision


def test_different_sizes_are_padded_and_said(model, tmp_path, caplog):
    folder = tmp_path / "mixed"
    name = _temple(folder, 1)[0]
    portrait = np.asarray(Image.open(folder / name)).transpose(1, 0, 2)
    Image.fromarray(np.ascontiguousarray(portrait)).save(folder / "portrait.png")
    with caplog.at_level(logging.WARNING):
        result = predict(folder, device="cpu", model=model, progress=False)
    assert "different input sizes" in caplog.text
    assert result.depth.shape == (2, 518, 518)
    expected, _ = vggt_grid_from_image([(480, 640), (640, 480)], "crop")  # sorted: portrait.png, templeSR0001.png
    assert result.image_names == ["portrait.png", name]
    np.testing.assert_allclose(result.grid_from_image, expected)


def test_bad_folders_give_one_line(tmp_path, model):
    with pytest.raises(UserError, match="not found"):
        predict(tmp_path / "missing", model=model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        predict(tmp_path / "empty", model=model)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hello")
    with pytest.raises(UserError, match="no images"):
        predict(tmp_path / "text", model=model)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(UserError, match="0 readable"):
        predict(tmp_path / "corrupt", model=model)


def test_bad_options(tmp_path, model):
    _temple(tmp_path / "im", 1)
    for kwargs, pattern in [
        ({"heads": ("camera", "track")}, "track head"),
        ({"heads": ("normals",)}, "unknown head"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"dtype": "float16", "device": "cpu"}, "float16 is for CUDA"),
        ({"device": "tpu"}, "device"),
        ({"preprocess": "stretch"}, "preprocessing mode"),
    ]:
        with pytest.raises(UserError, match=pattern):
            predict(tmp_path / "im", model=model, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            predict(tmp_path / "im", device="cuda", model=model)


def test_refuses_frames_that_do_not_fit(tmp_path, model, monkeypatch):
    _temple(tmp_path / "im", 4)
    with pytest.raises(UserError, match="at most 2 frames"):
        predict(tmp_path / "im", model=model, max_frames=2)
    # Free memory for exactly two frames of VGGT-1B (weights included): four are refused, naming how many fit.
    import vggt_sfm.predict as predict_module

    estimate = estimate_memory(VGGTConfig(), (518, 392), ("camera", "depth"), torch.device("cpu"))
    room = estimate.needed(2) + estimate.per_frame // 2
    monkeypatch.setattr(predict_module, "available_memory", lambda device: int(room / predict_module.USABLE_FRACTION) + 1)
    with pytest.raises(UserError, match=r"4 frames need about .* GB .* about 2 frames fit.* \(`window=2`\)"):
        predict(tmp_path / "im", weights=tmp_path / "never-read.pt")
    with pytest.raises(UserError, match=r"a window of 3 frames needs about .* GB .*smaller `window` \(at most 2\)"):
        predict(tmp_path / "im", weights=tmp_path / "never-read.pt", window=3, window_overlap=1)
    # On CPU every window's depth maps stay in the same memory until the merge (6 frames in the 3 windows of 2,
    # the 4 beyond the pass kept and copied once): a window that fits is not enough.
    assert estimate.maps_per_frame == 8 * 518 * 392  # depth and confidence, float32
    for spare, refused in ((1 << 20, True), (8 * estimate.maps_per_frame, False)):
        free = estimate.needed(2) + spare
        monkeypatch.setattr(predict_module, "available_memory", lambda device: int(free / predict_module.USABLE_FRACTION) + 1)
        expected = "windows of 2 frames over 4 images need about" if refused else "never-read.pt"
        with pytest.raises(UserError, match=expected):
            predict(tmp_path / "im", weights=tmp_path / "never-read.pt", window=2, window_overlap=1)


def test_max_frames_is_the_most_that_fits():
    estimate = estimate_memory(VGGTConfig(), (518, 518), ("camera", "depth"), torch.device("cpu"))
    gb = 2**30
    for available in (4 * gb, 5.5 * gb, 6 * gb, 8 * gb, 24 * gb, 80 * gb):
        estimate.available = int(available)
        fit = estimate.max_frames()
        usable = available * 0.9
        assert fit == 0 or estimate.needed(fit) <= usable
        assert estimate.needed(fit + 1) > usable
    # VGGT-1B's fp32 weights alone are about 4.6 GB (camera and depth heads), frames then cost ~0.1 GB each.
    assert 4.5e9 < estimate.weights < 4.8e9
    assert 0.05e9 < estimate.per_frame < 0.2e9


def test_weights_problems_reach_the_user(tmp_path, monkeypatch):
    _temple(tmp_path / "im", 2)
    for name in (ENV_VAR, "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="no VGGT weights found.*`download=True`"):
        predict(tmp_path / "im", max_frames=10)
    # The tiny checkpoint is not VGGT-1B: the loader names tensors it lacks.
    with pytest.raises(UserError, match=r"tiny_conv_strong_s1.pt lacks \d+ of VGGT's \d+ tensors, e.g. aggregator\."):
        predict(tmp_path / "im", weights=FIXTURES / "tiny_conv_strong_s1.pt", max_frames=10)


@pytest.mark.slow
def test_windows_chain_the_model_outputs(model, tmp_path):
    """Five real photos in windows of three sharing one frame: the first window is a plain pass over its frames,
    the second is the pass over its own frames carried by one similarity (depth scaled by its scale)."""
    names = _temple(tmp_path / "im", 5)
    kwargs = dict(device="cpu", model=model, progress=False)
    windowed = predict(tmp_path / "im", window=3, window_overlap=1, **kwargs)
    assert windowed.image_names == names and windowed.depth.shape[0] == 5
    for window, new in ((names[:3], names[:3]), (names[2:], names[3:])):  # a shared frame keeps the first prediction
        folder = tmp_path / f"only_{window[0]}"
        _temple(folder, 5)
        for name in set(names) - set(window):
            (folder / name).unlink()
        alone = predict(folder, **kwargs).subset(new)
        part = windowed.subset(new)
        ratio = part.depth / alone.depth
        assert np.ptp(ratio) < 1e-4 * ratio.mean()  # one scale for the whole window
        if window[0] == names[0]:
            np.testing.assert_array_equal(part.cam_from_world, alone.cam_from_world)
            np.testing.assert_array_equal(part.depth, alone.depth)
        np.testing.assert_array_equal(part.intrinsics, alone.intrinsics)  # pixels: untouched by the similarity
        relative = part.cam_from_world[:, :, :3] @ part.cam_from_world[0, :, :3].T
        np.testing.assert_allclose(relative, alone.cam_from_world[:, :, :3] @ alone.cam_from_world[0, :, :3].T, atol=1e-6)
    # A window that holds every frame is one pass.
    whole = predict(tmp_path / "im", window=8, **kwargs)
    np.testing.assert_array_equal(whole.depth, predict(tmp_path / "im", **kwargs).depth)


def test_bad_windows(model, tmp_path):
    _temple(tmp_path / "im", 3)
    with pytest.raises(UserError, match="at least 2"):
        predict(tmp_path / "im", model=model, window=1)
    with pytest.raises(UserError, match="overlap"):
        predict(tmp_path / "im", model=model, window=2, window_overlap=2)
    with pytest.raises(UserError, match="needs the depth head"):
        predict(tmp_path / "im", model=model, window=2, heads=("camera",))
