"""Reading images the same way everywhere: orientation, bit depth, channels, corrupt files."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt_sfm.errors import UserError
from vggt_sfm.images import list_images, read_image, read_image_info, scan_images


def _gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], axis=2).astype(np.uint8)


def test_exif_orientation_is_applied(tmp_path: Path):
    rgb = _gradient(40, 20)
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rotated.jpg")
    assert out.shape == (40, 20, 3)
    info = read_image_info(tmp_path / "rotated.jpg", "rotated.jpg")
    assert (info.width, info.height) == (20, 40)
    # The displayed image is the stored one turned clockwise: its top-left was the stored bottom-left.
    expected = np.rot90(rgb, k=-1)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 6
    # PNG carries EXIF too (an eXIf chunk); the scan reads it without decoding the pixels.
    image.save(tmp_path / "rotated.png", exif=exif)
    assert read_image(tmp_path / "rotated.png").shape == (40, 20, 3)
    info = read_image_info(tmp_path / "rotated.png", "rotated.png")
    assert (info.width, info.height) == (20, 40)


def test_sixteen_bit_grey_and_rgba(tmp_path: Path):
    grey16 = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    out = read_image(tmp_path / "grey16.png")
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.array_equal(out[..., 0], out[..., 2])

    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:5, :, 3] = 255  # top half opaque red-ish, bottom half transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = read_image(tmp_path / "alpha.png")
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[9, 9]) == (255, 255, 255)

    Image.fromarray(_gradient(8, 8)[..., 0], "L").save(tmp_path / "grey8.png")
    assert read_image(tmp_path / "grey8.png").shape == (8, 8, 3)


def test_listing_and_corrupt_images(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        list_images(tmp_path / "missing")
    with pytest.raises(UserError, match="no images"):
        list_images(tmp_path)
    for name in ("b.jpg", "a.png", "sub/c.JPG"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(_gradient(16, 12)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    # A real photo cut short near its end: the scan decodes JPEGs at reduced scale, which must still see it.
    photo = (Path(__file__).parent.parent / "data" / "fountain" / "images").glob("*.jpg")
    data = next(iter(sorted(photo))).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(0.95 * len(data))])
    # Real PNGs cut short, and with one flipped byte in the pixel data: the scan checks PNGs by their CRCs.
    png = next(iter(sorted((Path(__file__).parent.parent / "data" / "templeSR" / "images").glob("*.png")))).read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: int(0.95 * len(png))])
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    names = list_images(tmp_path)
    assert names == ["a.png", "b.jpg", "broken.jpg", "cut.jpg", "cut.png", "flipped.png", "sub/c.JPG"]
    with pytest.raises(UserError, match="broken.jpg"):
        read_image(tmp_path / "broken.jpg")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vggt_sfm.images")
    logger.addHandler(handler)
    try:
        infos = scan_images(tmp_path)
    finally:
        logger.removeHandler(handler)
    assert [i.name for i in infos] == ["a.png", "b.jpg", "sub/c.JPG"]
    assert any("broken.jpg" in r.getMessage() for r in records)
    assert any("cut.jpg" in r.getMessage() for r in records)
    assert any("cut.png" in r.getMessage() for r in records) and any("flipped.png" in r.getMessage() for r in records)
    with pytest.raises(UserError, match="at least 5"):
        scan_images(tmp_path, min_images=5)
