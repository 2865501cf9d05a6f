"""VGGT preprocessing: the tensor matches an independent PIL computation, and grid_from_image is right."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vggt_sfm.errors import UserError
from vggt_sfm.model.preprocess import preprocess_images


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (bicubic resizing of noise would be dominated by ringing)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def _expected(path, mode: str) -> np.ndarray:
    """What the official loader computes, written out with PIL and the documented sizes."""
    image = Image.open(path)
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    image = image.convert("RGB")
    w, h = image.size
    if mode == "crop" or w >= h:
        nw, nh = 518, round(h * (518 / w) / 14) * 14
    else:
        nw, nh = round(w * (518 / h) / 14) * 14, 518
    chw = np.asarray(image.resize((nw, nh), Image.Resampling.BICUBIC), dtype=np.float32).transpose(2, 0, 1) / 255
    if mode == "crop" and nh > 518:
        top = (nh - 518) // 2
        chw = chw[:, top : top + 518]
    if mode == "pad":
        canvas = np.ones((3, 518, 518), np.float32)
        top, left = (518 - nh) // 2, (518 - nw) // 2
        canvas[:, top : top + nh, left : left + nw] = chw
        chw = canvas
    return chw


@pytest.fixture
def image_files(tmp_path):
    landscape = tmp_path / "landscape.jpg"
    Image.fromarray(_photo(640, 480, 0)).save(landscape, quality=95)
    portrait = tmp_path / "portrait.png"
    Image.fromarray(_photo(300, 500, 1)).save(portrait)
    rgba = _photo(250, 170, 2)
    alpha = np.full(rgba.shape[:2], 255, np.uint8)
    alpha[:, :60] = 0  # fully transparent strip -> white
    alpha[:, 60:120] = 128
    rgba_path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgba, alpha]), mode="RGBA").save(rgba_path)
    return {"landscape": landscape, "portrait": portrait, "rgba": rgba_path}


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("name", ["landscape", "portrait", "rgba"])
def test_single_image_matches_pil(image_files, name, mode):
    out = preprocess_images([image_files[name]], mode)
    expected = _expected(image_files[name], mode)
    assert out.images.dtype == torch.float32
    assert tuple(out.images.shape) == (1, *expected.shape)
    assert out.images.shape[-1] % 14 == 0 and out.images.shape[-2] % 14 == 0
    np.testing.assert_array_equal(out.images[0].numpy(), expected)
    assert out.grid_size == (expected.shape[2], expected.shape[1])


def test_rgba_transparent_pixels_are_white(image_files):
    out = preprocess_images([image_files["rgba"]], "crop")
    # The transparent strip spans 60/250 of the width; well inside it the input is pure white.
    np.testing.assert_allclose(out.images[0, :, :, :100].numpy(), 1.0, atol=1e-6)


def test_mixed_sizes_are_centred_on_white(image_files, caplog):
    paths = [image_files["landscape"], image_files["portrait"]]
    with caplog.at_level(logging.WARNING):
        out = preprocess_images(paths, "crop")
    assert "different input sizes" in caplog.text
    # Landscape 640x480 -> 518x392, portrait 300x500 -> 518x868 cropped to 518x518: canvas 518x518.
    assert tuple(out.images.shape) == (2, 3, 518, 518)
    top = (518 - 392) // 2
    land = out.images[0].numpy()
    np.testing.assert_array_equal(land[:, top : top + 392], _expected(image_files["landscape"], "crop"))
    assert np.all(land[:, :top] == 1.0) and np.all(land[:, top + 392 :] == 1.0)
    np.testing.assert_array_equal(out.images[1].numpy(), _expected(image_files["portrait"], "crop"))


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_grid_from_image_maps_corners_and_centres(image_files, mode):
    paths = [image_files["landscape"], image_files["portrait"], image_files["rgba"]]
    out = preprocess_images(paths, mode)
    grid_w, grid_h = out.grid_size
    for G, (w, h) in zip(out.grid_from_image, out.image_sizes):
        # Placement of the resized image on the grid, from the documented sizes.
        if mode == "crop":
            nw, nh = 518, round(h * 518 / w / 14) * 14
            left, top = (grid_w - nw) // 2, (grid_h - min(nh, 518)) // 2 - max(nh - 518, 0) // 2
        else:
            nw, nh = (518, round(h * 518 / w / 14) * 14) if w >= h else (round(w * 518 / h / 14) * 14, 518)
            left, top = (518 - nw) // 2, (518 - nh) // 2
        sx, sy = nw / w, nh / h

        def to_grid(x, y):
            return (G @ np.array([x, y, 1.0]))[:2]

        # Pixel edges (centres at integers): the image's outer edges land on the resized image's edges.
        np.testing.assert_allclose(to_grid(-0.5, -0.5), [left - 0.5, top - 0.5], atol=1e-9)
        np.testing.assert_allclose(to_grid(w - 0.5, h - 0.5), [left + nw - 0.5, top + nh - 0.5], atol=1e-9)
        np.testing.assert_allclose(to_grid((w - 1) / 2, (h - 1) / 2), [left + (nw - 1) / 2, top + (nh - 1) / 2])
        np.testing.assert_allclose([G[0, 0], G[1, 1]], [sx, sy])


def test_grid_from_image_follows_the_pixels(tmp_path):
    """A dark blob's centroid in the tensor is where grid_from_image sends its centroid in the image."""
    for i, (w, h) in enumerate([(700, 450), (400, 620)]):
        image = np.full((h, w, 3), 255, np.uint8)
        cx, cy = 0.3 * w, 0.6 * h
        yy, xx = np.mgrid[0:h, 0:w]
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.06 * w) ** 2] = 0
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    for mode in ("crop", "pad"):
        out = preprocess_images([tmp_path / "0.png", tmp_path / "1.png"], mode)
        for frame, (w, h) in enumerate(out.image_sizes):
            original = np.asarray(Image.open(tmp_path / f"{frame}.png"))[..., 0] < 128
            ys, xs = np.nonzero(original)
            expected = (out.grid_from_image[frame] @ np.array([xs.mean(), ys.mean(), 1.0]))[:2]
            darkness = 1.0 - out.images[frame, 0].numpy()
            gy, gx = np.mgrid[0 : darkness.shape[0], 0 : darkness.shape[1]]
            found = np.array([(gx * darkness).sum(), (gy * darkness).sum()]) / darkness.sum()
            np.testing.assert_allclose(found, expected, atol=0.25)


def test_bad_mode_and_corrupt_image(image_files, tmp_path):
    with pytest.raises(UserError, match="preprocessing mode"):
        preprocess_images([image_files["landscape"]], "stretch")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        preprocess_images([broken])
