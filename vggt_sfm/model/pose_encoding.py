"""VGGT's camera encoding `absT_quaR_FoV` and its conversion to/from extrinsics and intrinsics.

The 9-vector is [t_x, t_y, t_z, q_x, q_y, q_z, q_w, fov_h, fov_w]:
  * [R|t] is cam_from_world in OpenCV axes (x right, y down, z forward); the quaternion is scalar-last
    (XYZW) and need not be normalised (decoding divides by its squared norm).
  * The intrinsics are a pinhole of the network input (H, W): fy = (H/2) / tan(fov_h/2),
    fx = (W/2) / tan(fov_w/2), principal point (W/2, H/2) with pixel centres at integers (VGGT's
    convention; add 0.5 for COLMAP's).
"""

from __future__ import annotations

import torch


def quaternion_to_rotation_matrix(quat: torch.Tensor) -> torch.Tensor:
    """XYZW quaternions [..., 4] (any non-zero norm) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = quat.unbind(-1)
    s = 2.0 / (quat * quat).sum(-1)
    rows = (
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def rotation_matrix_to_quaternion(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> unit XYZW quaternions [..., 4] with w >= 0.

    Of the four algebraically equivalent formulas, the one dividing by the largest of |w|, |x|, |y|, |z|
    is used for every matrix (numerically stable everywhere).
    """
    m = rot.flatten(-2)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    # twice the magnitudes of w, x, y, z
    mag = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), dim=-1
    ).clamp(min=0).sqrt()
    # candidate i, as (w, x, y, z) * 2 * mag_i
    candidates = torch.stack(
        (
            torch.stack((mag[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01), dim=-1),
            torch.stack((m21 - m12, mag[..., 1] ** 2, m10 + m01, m02 + m20), dim=-1),
            torch.stack((m02 - m20, m10 + m01, mag[..., 2] ** 2, m12 + m21), dim=-1),
            torch.stack((m10 - m01, m20 + m02, m21 + m12, mag[..., 3] ** 2), dim=-1),
        ),
        dim=-2,
    ) / (2 * mag.clamp(min=0.1))[..., None]
    best = mag.argmax(dim=-1)
    wxyz = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    xyzw = wxyz[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:] < 0, -xyzw, xyzw)


def pose_encoding_to_extrinsics_intrinsics(
    pose_enc: torch.Tensor, image_size_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 9] encodings -> cam_from_world extrinsics [..., 3, 4] and intrinsics [..., 3, 3] (see module doc)."""
    h, w = image_size_hw
    extrinsics = torch.cat((quaternion_to_rotation_matrix(pose_enc[..., 3:7]), pose_enc[..., :3, None]), dim=-1)
    fy = (h / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (w / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    intrinsics = pose_enc.new_zeros(*pose_enc.shape[:-1], 3, 3)
    intrinsics[..., 0, 0] = fx
    intrinsics[..., 1, 1] = fy
    intrinsics[..., 0, 2] = w / 2.0
    intrinsics[..., 1, 2] = h / 2.0
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics


def extrinsics_intrinsics_to_pose_encoding(
    extrinsics: torch.Tensor, intrinsics: torch.Tensor, image_size_hw: tuple[int, int]
) -> torch.Tensor:
    """cam_from_world [..., 3, 4] and pinhole intrinsics [..., 3, 3] -> [..., 9] encodings (float32)."""
    h, w = image_size_hw
    quat = rotation_matrix_to_quaternion(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((h / 2.0) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((w / 2.0) / intrinsics[..., 0, 0])
    return torch.cat((extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]), dim=-1).float()
