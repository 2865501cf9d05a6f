"""Run gsplat's own COLMAP parser (examples/datasets/colmap.py of a gsplat checkout) on a folder; write what it read.

    PYTHON probe_gsplat.py GSPLAT_EXAMPLES_DIR DATA_DIR FACTOR OUTPUT.json

Runs under the Python that gsplat's examples need (gsplat <= 1.5.3: rmbrualla's pycolmap fork and numpy < 2;
later: the official pycolmap), so it imports nothing from vggt-sfm. It builds `Parser(DATA_DIR, factor=FACTOR,
normalize=False)` and every item of `Dataset(parser, split, load_depths=True)` for both splits, as
simple_trainer.py does, and writes their cameras, image paths and sizes, points and projected depth points as JSON.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    examples, data_dir, factor, output = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sys.path.insert(0, examples)
    from datasets.colmap import Dataset, Parser  # gsplat's examples, from the checkout given

    parser = Parser(data_dir=data_dir, factor=factor, normalize=False, test_every=8)
    items = []
    for split in ("train", "val"):
        dataset = Dataset(parser, split=split, load_depths=True)
        for i in range(len(dataset)):
            item = dataset[i]
            index = int(dataset.indices[i])
            items.append({
                "split": split,
                "index": index,
                "K": item["K"].numpy().tolist(),
                "camtoworld": item["camtoworld"].numpy().tolist(),
                "image_shape": list(item["image"].shape),
                "points": item["points"].numpy().tolist(),
                "depths": item["depths"].numpy().tolist(),
            })
    result = {
        "image_names": list(parser.image_names),
        "image_paths": list(parser.image_paths),
        "camera_ids": [int(c) for c in parser.camera_ids],
        "camtoworlds": parser.camtoworlds.tolist(),
        "Ks": {str(k): v.tolist() for k, v in parser.Ks_dict.items()},
        "num_distortion_params": {str(k): int(len(v)) for k, v in parser.params_dict.items()},
        "imsize": {str(k): list(v) for k, v in parser.imsize_dict.items()},
        "points": parser.points.tolist(),
        "points_rgb": parser.points_rgb.tolist(),
        "point_indices": {k: v.tolist() for k, v in parser.point_indices.items()},
        "items": items,
    }
    with open(output, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
