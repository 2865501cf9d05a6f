"""Images -> VGGT's input tensor, exactly as the official `load_and_preprocess_images` builds it.

`crop` (default): width 518, height scaled with the aspect ratio and rounded to a multiple of 14, rows above
518 cut evenly from top and bottom. `pad`: the longer side 518, the other rounded to a multiple of 14, then
centred on a white 518x518 canvas. Both resize with PIL's bicubic filter from 8-bit RGB. Frames that end up
with different sizes are centred on a white canvas of the largest height and width (the official loader
does the same and warns).

Images are read with `vggt_sfm.images.read_image`, so EXIF orientation is applied and transparent pixels are
white: the same pixels every other stage sees. The geometry of this mapping, `grid_from_image`, comes from
`vggt_sfm.predictions.vggt_grid_from_image` so the predictions file and the tensor cannot disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import read_image
from ..log import progress as log_progress
from ..predictions import VGGT_IMAGE_SIZE, vggt_grid_from_image, vggt_resized_size

logger = logging.getLogger(__name__)


@dataclass
class PreprocessedImages:
    """The network input for S images and how it maps back to them."""

    images: torch.Tensor  # (S,3,H,W) float32 in [0,1]
    grid_from_image: np.ndarray  # (S,3,3) original pixel -> grid pixel, pixel centres at integers
    image_sizes: list[tuple[int, int]]  # original (width, height), after EXIF orientation

    @property
    def grid_size(self) -> tuple[int, int]:
        """(width, height) of the prediction grid."""
        return int(self.images.shape[-1]), int(self.images.shape[-2])


def resize_image(image: np.ndarray, mode: str = "crop") -> np.ndarray:
    """One (H,W,3) uint8 image -> (3,h,w) float32 in [0,1], resized and cropped or padded to 518."""
    height, width = image.shape[:2]
    new_w, new_h = vggt_resized_size(width, height, mode)
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    # uint8 -> float32 then one float32 division, as torchvision's ToTensor does: bit-identical values.
    chw = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    if mode == "crop" and new_h > VGGT_IMAGE_SIZE:
        top = (new_h - VGGT_IMAGE_SIZE) // 2
        chw = chw[:, top : top + VGGT_IMAGE_SIZE]
    if mode == "pad":
        chw = _paste_centred(chw, VGGT_IMAGE_SIZE, VGGT_IMAGE_SIZE)
    return np.ascontiguousarray(chw)


def _paste_centred(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre `chw` on a white canvas; the extra row/column of an odd margin goes bottom/right."""
    _, h, w = chw.shape
    if (h, w) == (height, width):
        return chw
    canvas = np.ones((3, height, width), dtype=np.float32)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[:, top : top + h, left : left + w] = chw
    return canvas


def preprocess_images(
    paths: Sequence[Path | str], mode: str = "crop", progress: bool = False, grid_size: tuple[int, int] | None = None
) -> PreprocessedImages:
    """Read images and build VGGT's input tensor (S,3,H,W) plus `grid_from_image` for each image.

    `grid_size` (width, height), at least every frame's size: the canvas the frames are centred on, as when these
    images are part of a larger set (a VGGT window or chunk of a collection); default: the largest of these.
    Raises UserError for an unknown mode or an image that cannot be read.
    """
    if not paths:
        raise ValueError("preprocess_images needs at least one image")
    frames = []
    sizes = []
    for path in log_progress(paths, "reading images", len(paths), progress):
        image = read_image(path)
        sizes.append((image.shape[1], image.shape[0]))
        frames.append(resize_image(image, mode))
    grid_from_image, (grid_w, grid_h) = vggt_grid_from_image(sizes, mode)
    if grid_size is not None and (grid_w, grid_h) != tuple(grid_size):
        if grid_size[0] < grid_w or grid_size[1] < grid_h:
            raise ValueError(f"grid {grid_size} is smaller than the frames' {grid_w}x{grid_h}")
        # Each frame centred on the larger canvas, as `vggt_grid_from_image` centres it among a larger set.
        grid_w, grid_h = grid_size
        for k, (size, frame) in enumerate(zip(sizes, frames)):
            grid_from_image[k] = vggt_grid_from_image([size], mode)[0][0]
            grid_from_image[k, 0, 2] += (grid_w - frame.shape[2]) // 2
            grid_from_image[k, 1, 2] += (grid_h - frame.shape[1]) // 2
    shapes = sorted({f.shape[1:] for f in frames})
    if len(shapes) > 1:
        logger.warning(
            "the images give %d different input sizes (%s, as height x width); like the official VGGT loader, "
            "each is centred on a white %dx%d canvas",
            len(shapes), ", ".join(f"{h}x{w}" for h, w in shapes), grid_h, grid_w,
        )
    batch = torch.from_numpy(np.stack([_paste_centred(f, grid_h, grid_w) for f in frames]))
    return PreprocessedImages(images=batch, grid_from_image=grid_from_image, image_sizes=sizes)
