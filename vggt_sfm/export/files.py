"""Writing outputs safely: atomic replacement of files and folders, and the image copies exports need.

Every export is built in a temporary sibling of its target (same parent, so the final rename stays on one
filesystem) and renamed into place at the end: a crash or an error never leaves a half-written export, and an
existing export is replaced only when the caller asks for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import UserError, param
from ..images import read_image

logger = logging.getLogger(__name__)

# EXIF tag 0x0112; values other than 1 mean the stored pixels must be rotated or mirrored for display.
_EXIF_ORIENTATION = 0x0112
_SAFE_MODES = ("RGB", "L")
_JPEG_QUALITY = 95


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to."""
    if target.exists() and not overwrite:
        kind = "folder" if target.is_dir() else "file"
        raise UserError(f"{kind} {target} already exists; pass {param('overwrite', True)} to replace it, or choose another output")


def check_inputs_outside(output_dir: Path, *inputs: Path) -> None:
    """Refuse an export folder that holds its own inputs: replacing it would delete them."""
    output = output_dir.resolve()
    for path in inputs:
        resolved = path.resolve()
        if resolved == output or output in resolved.parents:
            raise UserError(f"the export folder {output_dir} contains the input {path}; choose another output folder")


@contextlib.contextmanager
def atomic_output(target: Path | str, overwrite: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on failure it is removed.

    With `directory=True` the temporary folder exists already; otherwise the caller creates the file.
    """
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=target.parent))
        # mkdtemp makes the folder private (0700), and the mode would survive the rename: give it the umask's.
        os.chmod(tmp, 0o777 & ~current_umask())
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".partial" + target.suffix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written for {target}")
        check_target(target, overwrite)  # it may have appeared while we were writing
        if target.exists() and (target.is_dir() or tmp.is_dir()):
            # A folder cannot be replaced in one rename: move the old one aside first, delete it afterwards.
            old = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=target.parent))
            old.rmdir()
            target.rename(old)
            tmp.rename(target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def image_needs_reencoding(path: Path) -> bool:
    """Whether other tools would read different pixels than we do (EXIF rotation, alpha, 16-bit, palette)."""
    with Image.open(path) as image:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        return orientation not in (0, 1) or image.mode not in _SAFE_MODES


def write_image(array: np.ndarray, path: Path) -> None:
    """Save an RGB uint8 array in the format the file name asks for (JPEG at high quality)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=_JPEG_QUALITY, subsampling=0)
    else:
        image.save(path)


def copy_images(images_dir: Path, names: list[str], output_dir: Path) -> None:
    """Copy the named images to `output_dir`, keeping relative names.

    Files whose stored pixels differ from what vggt-sfm reads (EXIF orientation, alpha, 16-bit) are written as
    the pixels we used, so the cameras and the copied images agree for every downstream reader.
    """
    for name in names:
        source = images_dir / name
        destination = output_dir / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if image_needs_reencoding(source):
            write_image(read_image(source), destination)
        else:
            shutil.copyfile(source, destination)


def stage_images(images_dir: Path, names: list[str], staging_dir: Path) -> Path:
    """A folder from which COLMAP reads the same pixels we do: `images_dir` itself when it is safe, else a copy."""
    risky = [name for name in names if image_needs_reencoding(images_dir / name)]
    if not risky:
        return images_dir
    logger.info("re-encoding %d image(s) with EXIF rotation, alpha or 16-bit pixels for COLMAP", len(risky))
    copy_images(images_dir, names, staging_dir)
    return staging_dir


def downscaled_size(width: int, height: int, factor: int, rounding: str = "half_up") -> tuple[int, int]:
    """Size of an image downscaled by `factor`.

    `half_up` is ImageMagick's percentage resize (3DGS's convert.py: floor(w * p + 0.5), at least 1);
    `floor` is ffmpeg's `scale=iw/N:ih/N` (nerfstudio's ns-process-data).
    """
    if rounding == "half_up":
        return max(int(np.floor(width / factor + 0.5)), 1), max(int(np.floor(height / factor + 0.5)), 1)
    if rounding == "floor":
        return max(width // factor, 1), max(height // factor, 1)
    raise ValueError(f"unknown rounding {rounding!r}")


def write_downscaled_images(
    source_dir: Path,
    names: list[str],
    output_root: Path,
    factors: tuple[int, ...],
    rounding: str = "half_up",
    output_names: list[str] | None = None,
) -> None:
    """Write `output_root/images_<f>/<output name>` for each factor, resized from `source_dir/<name>` with PIL."""
    for factor in factors:
        if int(factor) != factor or factor < 2:
            raise UserError(f"downscale factors must be integers of at least 2, got {factor}")
    if not factors:
        return
    for name, output_name in zip(names, output_names or names):
        with Image.open(source_dir / name) as opened:
            image = ImageOps.exif_transpose(opened)
            image = image.convert("RGB") if image.mode not in _SAFE_MODES else image.copy()
        for factor in factors:
            size = downscaled_size(image.width, image.height, int(factor), rounding)
            resized = image.resize(size, Image.Resampling.LANCZOS)
            write_image(np.asarray(resized), output_root / f"images_{int(factor)}" / output_name)
