"""The predictions file contract: reading, writing, validation, and the pixel mappings."""

from pathlib import Path

import numpy as np
import pytest

from vggt_sfm.errors import UserError
from vggt_sfm.predictions import (
    Predictions,
    load_predictions,
    match_images,
    save_predictions,
    vggt_grid_from_image,
)


def _predictions(num: int = 3, with_depth: bool = True) -> Predictions:
    rng = np.random.default_rng(0)
    K = np.array([[400.0, 0, 259], [0, 410.0, 196], [0, 0, 1]])
    grid, _ = vggt_grid_from_image([(640, 480)] * num, "crop")
    return Predictions(
        image_names=[f"img{i}.png" for i in range(num)],
        cam_from_world=np.concatenate([np.tile(np.eye(3), (num, 1, 1)), rng.normal(size=(num, 3, 1))], axis=2),
        intrinsics=np.tile(K, (num, 1, 1)),
        grid_from_image=grid,
        depth=rng.uniform(1, 2, size=(num, 392, 518)).astype(np.float32) if with_depth else None,
        depth_conf=rng.uniform(1, 5, size=(num, 392, 518)).astype(np.float32) if with_depth else None,
    )


def test_round_trip(tmp_path: Path):
    pred = _predictions()
    save_predictions(pred, tmp_path / "p.npz")
    back = load_predictions(tmp_path / "p.npz")
    assert back.image_names == pred.image_names
    np.testing.assert_allclose(back.cam_from_world, pred.cam_from_world, atol=1e-6)
    np.testing.assert_allclose(back.grid_from_image, pred.grid_from_image)
    assert back.depth.shape == (3, 392, 518)


def test_crop_geometry_matches_the_official_loader():
    # 640x480 -> width 518, height round(480*518/640/14)*14 = 392: no crop, no padding.
    G, size = vggt_grid_from_image([(640, 480)], "crop")
    assert size == (518, 392)
    # The image's outer edges (-0.5 and W-0.5 in integer-centre pixels) map to the grid's outer edges.
    corners = np.array([[-0.5, -0.5, 1], [639.5, 479.5, 1]]) @ G[0].T
    np.testing.assert_allclose(corners[:, :2], [[-0.5, -0.5], [517.5, 391.5]])
    # Portrait: width 518, height round(640*518/480/14)*14 = 686 -> centre crop of 84 rows.
    G, size = vggt_grid_from_image([(480, 640)], "crop")
    assert size == (518, 518)
    top = np.array([0 - 0.5, -0.5, 1]) @ G[0].T
    assert top[1] == pytest.approx(-0.5 - 84)
    # Pad mode, landscape: 518x392 padded to 518x518 with 63 rows on top.
    G, size = vggt_grid_from_image([(640, 480)], "pad")
    assert size == (518, 518)
    assert (np.array([-0.5, -0.5, 1]) @ G[0].T)[1] == pytest.approx(-0.5 + 63)


def test_image_intrinsics_and_depth_sampling():
    pred = _predictions()
    K = pred.image_intrinsics()[0]
    # A ray through the grid principal point leaves the original image at the mapped, +0.5-shifted point.
    G = pred.grid_from_image[0]
    pp_image = np.linalg.solve(G, [259, 196, 1])[:2] + 0.5
    np.testing.assert_allclose(K[:2, 2], pp_image, atol=1e-9)
    assert K[0, 0] == pytest.approx(400 / G[0, 0])
    # Depth sampled at an original pixel equals the grid value at the mapped position.
    pred.depth[0] = np.arange(392 * 518, dtype=np.float32).reshape(392, 518)
    xy = np.array([[320.5, 240.5]])
    grid = pred.grid_points(0, xy)[0]
    depth, conf = pred.sample_depth(0, xy)
    x0, y0 = int(np.floor(grid[0])), int(np.floor(grid[1]))
    wx, wy = grid[0] - x0, grid[1] - y0
    expected = (
        pred.depth[0, y0, x0] * (1 - wx) * (1 - wy) + pred.depth[0, y0, x0 + 1] * wx * (1 - wy)
        + pred.depth[0, y0 + 1, x0] * (1 - wx) * wy + pred.depth[0, y0 + 1, x0 + 1] * wx * wy
    )
    assert depth[0] == pytest.approx(expected, rel=1e-5)
    outside, conf = pred.sample_depth(0, np.array([[-50.0, 10.0]]))
    assert outside[0] == 0 and conf[0] == 0


def test_official_demo_file_without_names(tmp_path: Path):
    pred = _predictions(with_depth=False)
    np.savez(tmp_path / "official.npz", extrinsic=pred.cam_from_world[None], intrinsic=pred.intrinsics[None])
    sizes = {"c.png": (480, 640), "a.png": (640, 480), "b.png": (640, 480)}
    back = load_predictions(tmp_path / "official.npz", image_sizes=sizes, preprocess="crop")
    assert back.image_names == ["a.png", "b.png", "c.png"]
    expected, _ = vggt_grid_from_image([sizes[n] for n in back.image_names], "crop")
    np.testing.assert_allclose(back.grid_from_image, expected)
    with pytest.raises(UserError, match="has 3 frames but the images folder has 2"):
        load_predictions(tmp_path / "official.npz", image_sizes={"a.png": (1, 1), "b.png": (1, 1)})


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"plain text", "not an .npz"),
        ({"intrinsic": np.zeros((2, 3, 3))}, "lacks the required key 'extrinsic'"),
        ({"extrinsic": np.zeros((2, 3, 3)), "intrinsic": np.zeros((2, 3, 3))}, "shape"),
        ({"extrinsic": np.full((2, 3, 4), np.nan), "intrinsic": np.zeros((2, 3, 3))}, "NaN or infinite"),
        (
            {"extrinsic": np.zeros((2, 3, 4)), "intrinsic": np.zeros((2, 3, 3)), "image_names": np.array(["a"])},
            "1 image_names but 2 cameras",
        ),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, content, message):
    path = tmp_path / "bad.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    with pytest.raises(UserError, match=message) as info:
        load_predictions(path)
    assert str(path) in str(info.value)


def test_names_must_match_the_images():
    pred = _predictions()
    subset = match_images(pred, ["img2.png", "img0.png"], "p.npz")
    assert subset.image_names == ["img2.png", "img0.png"]
    np.testing.assert_array_equal(subset.cam_from_world[0], pred.cam_from_world[2])
    with pytest.raises(UserError, match="no frame for 1 of the 2 image"):
        match_images(pred, ["img0.png", "other.png"], "p.npz")
