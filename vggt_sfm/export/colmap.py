"""The reconstruction as a COLMAP model folder (`sparse/0`): cameras, images, points3D, rigs and frames."""

from __future__ import annotations

from pathlib import Path

import pycolmap

from .files import atomic_output


def write_model(
    reconstruction: pycolmap.Reconstruction,
    directory: Path | str,
    text: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the model in COLMAP's binary format (and also as text with `text=True`) into `directory`.

    The folder appears complete or not at all; an existing one is replaced only with `overwrite=True`.
    COLMAP readers prefer the .bin files when both are present; legacy readers (3DGS, nerfstudio) ignore the
    rigs and frames files that COLMAP 4 adds.
    """
    directory = Path(directory)
    with atomic_output(directory, overwrite=overwrite) as tmp:
        reconstruction.write_binary(str(tmp))
        if text:
            reconstruction.write_text(str(tmp))
    return directory
