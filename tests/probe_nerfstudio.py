"""Run one of nerfstudio's own dataparsers on a folder; write the cameras, the rays through given pixels and the points.

    PYTHON probe_nerfstudio.py nerfstudio|colmap DATA_DIR QUERIES.json OUTPUT.json

Runs under a Python with nerfstudio installed (a throwaway venv: it pins numpy < 2 and more), so it imports
nothing from vggt-sfm. `nerfstudio` is the transforms.json parser with splatfacto's setting (load_3D_points) and
its default orientation, centring and scaling; `colmap` the COLMAP-model parser reading DATA_DIR/sparse/0 with
nerfstudio's own binary reader. Both with eval_mode="all", so every frame comes out. QUERIES.json maps image
file names to pixel positions [[x, y], ...] (pixel centres at +0.5, as COLMAP and nerfstudio put them); the rays
through them come back in nerfstudio's output frame, with `dataparser_transform` and `dataparser_scale`, which
map COLMAP's world to that frame.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    kind, data, queries_path, output = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    import torch

    if kind == "nerfstudio":
        from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

        config = NerfstudioDataParserConfig(data=data, load_3D_points=True, eval_mode="all")
    elif kind == "colmap":
        from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

        config = ColmapDataParserConfig(data=data, colmap_path=Path("sparse/0"), eval_mode="all")
    else:
        raise SystemExit(f"unknown parser {kind!r}")
    outputs = config.setup().get_dataparser_outputs(split="train")
    cameras = outputs.cameras
    queries = json.loads(Path(queries_path).read_text())
    names = [Path(f).name for f in outputs.image_filenames]
    rays = {}
    for index, name in enumerate(names):
        xy = torch.tensor(queries.get(name, []), dtype=torch.float32).reshape(-1, 2)
        bundle = cameras.generate_rays(camera_indices=index, coords=xy[:, [1, 0]])  # nerfstudio's coords are (y, x)
        rays[name] = {"origins": bundle.origins.reshape(-1, 3).tolist(), "directions": bundle.directions.reshape(-1, 3).tolist()}
    result = {
        "image_filenames": [str(f) for f in outputs.image_filenames],
        "names": names,
        "camera_type": [int(t) for t in cameras.camera_type.reshape(-1)],
        "fx": cameras.fx.reshape(-1).tolist(),
        "fy": cameras.fy.reshape(-1).tolist(),
        "cx": cameras.cx.reshape(-1).tolist(),
        "cy": cameras.cy.reshape(-1).tolist(),
        "width": cameras.width.reshape(-1).tolist(),
        "height": cameras.height.reshape(-1).tolist(),
        "distortion_params": cameras.distortion_params.reshape(len(names), -1).tolist()
        if cameras.distortion_params is not None else None,
        "camera_to_worlds": cameras.camera_to_worlds.tolist(),
        "dataparser_transform": outputs.dataparser_transform.tolist(),
        "dataparser_scale": float(outputs.dataparser_scale),
        "points3D_xyz": outputs.metadata["points3D_xyz"].tolist() if "points3D_xyz" in outputs.metadata else None,
        "points3D_rgb": outputs.metadata["points3D_rgb"].tolist() if "points3D_rgb" in outputs.metadata else None,
        "rays": rays,
    }
    Path(output).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
