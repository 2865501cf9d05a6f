"""VGGT-1B's parameter layout and the camera/geometry conventions around the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from vggt_sfm.model import (
    VGGT,
    extrinsics_intrinsics_to_pose_encoding,
    pose_encoding_to_extrinsics_intrinsics,
    unproject_depth_map_to_point_map,
)

KEYS_FILE = Path(__file__).parent / "fixtures" / "vggt_parity" / "vggt1b_state_dict_keys.txt"


def test_vggt1b_has_exactly_the_checkpoint_keys_and_shapes():
    """A strict load of the released model.pt succeeds exactly when keys and shapes agree."""
    with torch.device("meta"):
        model = VGGT()
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected = {}
    for line in KEYS_FILE.read_text().splitlines():
        name, shape, _ = line.split("\t")
        expected[name] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    assert len(expected) == 1797
    assert sorted(set(expected) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(expected)) == [], "unexpected keys"
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}
    assert sum(p.numel() for p in model.parameters()) == 1_256_537_516


def test_pose_encoding_round_trip_and_quaternion_convention():
    rng = np.random.default_rng(3)
    rotations = Rotation.random(6, random_state=4)
    extrinsics = torch.zeros(2, 3, 3, 4, dtype=torch.float64)
    extrinsics[..., :3] = torch.from_numpy(rotations.as_matrix()).view(2, 3, 3, 3)
    extrinsics[..., 3] = torch.from_numpy(rng.normal(size=(2, 3, 3)))
    h, w = 280, 518
    intrinsics = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    intrinsics[..., 0, 0] = torch.from_numpy(rng.uniform(300, 600, (2, 3)))
    intrinsics[..., 1, 1] = torch.from_numpy(rng.uniform(300, 600, (2, 3)))
    intrinsics[..., 0, 2], intrinsics[..., 1, 2], intrinsics[..., 2, 2] = w / 2, h / 2, 1

    enc = extrinsics_intrinsics_to_pose_encoding(extrinsics, intrinsics, (h, w))
    assert enc.shape == (2, 3, 9) and enc.dtype == torch.float32
    # Scalar-last quaternions with w >= 0, the same as scipy's.
    expected_quat = rotations.as_quat()
    expected_quat *= np.sign(expected_quat[:, 3:])
    np.testing.assert_allclose(enc[..., 3:7].reshape(6, 4).numpy(), expected_quat, atol=1e-6)

    extr_back, intr_back = pose_encoding_to_extrinsics_intrinsics(enc.double(), (h, w))
    np.testing.assert_allclose(extr_back.numpy(), extrinsics.numpy(), atol=1e-5)
    np.testing.assert_allclose(intr_back.numpy(), intrinsics.numpy(), rtol=1e-5)
    # Unnormalised quaternions decode to the same rotation.
    scaled = enc.double().clone()
    scaled[..., 3:7] *= 3.0
    np.testing.assert_allclose(pose_encoding_to_extrinsics_intrinsics(scaled, (h, w))[0].numpy(), extr_back, atol=1e-12)


@pytest.mark.parametrize("as_numpy", [True, False])
def test_unprojection_inverts_projection_with_integer_pixel_centres(as_numpy):
    """Project known world points with the same cameras; unprojecting their depth gives them back."""
    rng = np.random.default_rng(0)
    s, h, w = 2, 6, 9
    rot = Rotation.random(s, random_state=1).as_matrix()
    trans = rng.normal(size=(s, 3))
    extrinsics = np.concatenate([rot, trans[..., None]], axis=-1)
    intrinsics = np.tile(np.array([[7.0, 0, w / 2], [0, 8.0, h / 2], [0, 0, 1]]), (s, 1, 1))
    depth = rng.uniform(1, 3, (s, h, w, 1))

    points = unproject_depth_map_to_point_map(
        depth if as_numpy else torch.from_numpy(depth),
        extrinsics if as_numpy else torch.from_numpy(extrinsics),
        intrinsics if as_numpy else torch.from_numpy(intrinsics),
    )
    assert isinstance(points, np.ndarray) == as_numpy
    points = np.asarray(points)
    assert points.shape == (s, h, w, 3)
    cam = np.einsum("sij,shwj->shwi", rot, points) + trans[:, None, None]
    np.testing.assert_allclose(cam[..., 2], depth[..., 0], rtol=1e-10)
    uv = np.einsum("sij,shwj->shwi", intrinsics, cam)
    uv = uv[..., :2] / uv[..., 2:]
    grid_v, grid_u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    np.testing.assert_allclose(uv[..., 0], np.broadcast_to(grid_u, (s, h, w)), atol=1e-9)
    np.testing.assert_allclose(uv[..., 1], np.broadcast_to(grid_v, (s, h, w)), atol=1e-9)
