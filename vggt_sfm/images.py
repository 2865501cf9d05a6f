"""List, read and validate the input images.

Every image is read the same way everywhere (features, colours, VGGT preprocessing, exports): EXIF orientation
applied, 16-bit scaled to 8-bit, grey expanded to RGB, RGBA composited on white (as VGGT's loader does).
Sizes are the oriented sizes, so they match the pixels that features and cameras refer to.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError, param

logger = logging.getLogger(__name__)

ORIENTATION_TAG = 0x0112  # EXIF orientation
# Pillow refuses images above twice its warning threshold (decompression bombs); so do we, with a reason.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageInfo:
    """One readable input image."""

    name: str  # path relative to the images folder, with forward slashes
    width: int  # after EXIF orientation
    height: int


def list_images(images_dir: Path | str) -> list[str]:
    """Names (relative, sorted) of the image files below `images_dir`, searched recursively."""
    images_dir = Path(images_dir)
    if not images_dir.exists():
        raise UserError(f"images folder not found: {images_dir} (pass an existing folder of photos as {param('images_dir')})")
    if not images_dir.is_dir():
        raise UserError(f"{param('images_dir')} must be a folder, but {images_dir} is a file")
    names = sorted(
        p.relative_to(images_dir).as_posix()
        for p in images_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not names:
        raise UserError(
            f"no images in {images_dir} (expected files ending in {', '.join(IMAGE_SUFFIXES)})"
        )
    return names


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn every way a file can fail to decode into one UserError naming it.

    Images up to Pillow's decompression-bomb limit (MAX_PIXELS, about 179 MP: 16000x11000) are read, above its
    warning threshold too (a 12000x8000 photo is 96 MP; features see it downscaled to `resize_max`). Larger ones
    are skipped: one would take over 0.5 GB in RGB per image and process, and a small file claiming such a size is
    more often a broken or hostile one than a photo.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError:
        raise UserError(
            f"image {path} is larger than the {MAX_PIXELS / 1e6:.0f} megapixels vggt-sfm reads (downscale it, or "
            "remove it)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise UserError(f"cannot read image {path}: {error} (replace or remove the file)") from None


def _open_decoded(path: Path, reduce: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """An image decoded, and its full (width, height) as stored; `reduce` lets JPEG decode at 1/8 scale, which
    still reads every byte (a truncated file is still caught) at a fraction of the cost."""
    with _reading(path):
        image = Image.open(path)
        size = image.size
        if reduce:
            image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
    return image, size


def _png_orientation(path: Path) -> tuple[tuple[int, int], int] | None:
    """(width, height) and EXIF orientation of a PNG, checked without decoding its pixels: every chunk's CRC is
    verified, which catches a truncated or corrupt file 20x faster than a decode. None when not a PNG."""
    with _reading(path), Image.open(path) as image:
        if image.format != "PNG":
            return None
        size = image.size
        image.verify()
        raw = image.info.get("exif")
    orientation = 1
    if raw:
        try:
            exif = Image.Exif()
            exif.load(raw)
            orientation = exif.get(ORIENTATION_TAG, 1)
        except Exception:  # a broken EXIF block is ignored by read_image too
            pass
    return size, orientation


def _open_oriented(path: Path) -> Image.Image:
    image, _ = _open_decoded(path)
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not lose a readable image
        return image


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey (PNG/TIFF): scale the full range to 8 bits.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        array = np.clip(np.round(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        array = np.clip(np.round(array * 255.0 / max(array.max(), 1e-12)), 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image(path: Path | str) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB with EXIF orientation applied.

    Raises UserError naming the file when it cannot be decoded.
    """
    path = Path(path)
    image = _open_oriented(path)
    try:
        return _to_rgb8(image)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot decode image {path}: {error} (replace or remove the file)") from None


def read_image_info(path: Path | str, name: str) -> ImageInfo:
    """Size of an image after EXIF orientation, checking that it decodes."""
    path = Path(path)
    png = _png_orientation(path)
    if png is not None:
        (width, height), orientation = png
    else:
        image, (width, height) = _open_decoded(path, reduce=True)
        try:
            orientation = image.getexif().get(ORIENTATION_TAG, 1)
        except Exception:  # a broken EXIF block is ignored by read_image too
            orientation = 1
    if orientation in (5, 6, 7, 8):  # the transpositions that swap the axes
        width, height = height, width
    return ImageInfo(name=name, width=width, height=height)


def scan_images(
    images_dir: Path | str, names: list[str] | None = None, min_images: int = 2
) -> list[ImageInfo]:
    """Check every image of a folder (or the given names) and return the readable ones.

    A corrupt or unreadable image is skipped with a warning; fewer than `min_images` readable images is an error.
    """
    images_dir = Path(images_dir)
    if names is None:
        names = list_images(images_dir)
    infos = []
    for name in names:
        path = images_dir / name
        if not path.is_file():
            raise UserError(f"image {path} not found (the predictions name it; check {param('images_dir')})")
        try:
            infos.append(read_image_info(path, name))
        except UserError as error:
            logger.warning("skipping %s", error)
    if len(infos) < min_images:
        raise UserError(
            f"only {len(infos)} readable image(s) in {images_dir}; at least {min_images} are needed"
        )
    return infos
