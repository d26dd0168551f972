"""Camera maths in torch, for the model side: the 9-d pose encoding and Plucker rays.

Same conventions as `fwdata.dataset.camera` (the numpy source of truth; tests check they agree):
OpenCV axes, w2c extrinsics, pixel centres at +0.5, encoding `[t(3), q_xyzw(4), fov_h, fov_w]` with
`t`, `q` from the w2c matrix (w >= 0) and `fov_h = 2 atan(H / (2 fy))`, `fov_w = 2 atan(W / (2 fx))`;
decoding puts the principal point at (W/2, H/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quaternion_to_rotation(q: torch.Tensor) -> torch.Tensor:
    """Quaternions [..., 4] (x, y, z, w; normalised here) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = F.normalize(q, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def rotation_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] (x, y, z, w) with w >= 0.

    Picks the best-conditioned of the four closed-form candidates (as PyTorch3D does).
    """
    m = R.unbind(-1)
    m00, m10, m20 = m[0].unbind(-1)
    m01, m11, m21 = m[1].unbind(-1)
    m02, m12, m22 = m[2].unbind(-1)
    # 4 * {w^2, x^2, y^2, z^2}
    q_abs = torch.sqrt(
        torch.clamp(
            torch.stack(
                [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
            ),
            min=0,
        )
    )
    candidates = torch.stack(
        [  # each row is 2|q_i| * (w, x, y, z) for the candidate with the largest |q_i|
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    ) / (2.0 * q_abs[..., None].clamp(min=0.1))
    best = q_abs.argmax(dim=-1)
    wxyz = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    xyzw = F.normalize(wxyz[..., [1, 2, 3, 0]], dim=-1)
    return torch.where(xyzw[..., 3:] < 0, -xyzw, xyzw)


def encode_pose(w2c: torch.Tensor, K: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """w2c [..., 4, 4] (or [..., 3, 4]) and K [..., 3, 3] -> encoding [..., 9]."""
    t = w2c[..., :3, 3]
    q = rotation_to_quaternion(w2c[..., :3, :3])
    fov_h = 2 * torch.atan(height / (2 * K[..., 1, 1]))
    fov_w = 2 * torch.atan(width / (2 * K[..., 0, 0]))
    return torch.cat([t, q, fov_h[..., None], fov_w[..., None]], dim=-1)


def decode_pose(enc: torch.Tensor, height: float, width: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoding [..., 9] -> (w2c [..., 4, 4], K [..., 3, 3]) with the principal point at (W/2, H/2)."""
    batch = enc.shape[:-1]
    w2c = torch.zeros(*batch, 4, 4, dtype=enc.dtype, device=enc.device)
    w2c[..., :3, :3] = quaternion_to_rotation(enc[..., 3:7])
    w2c[..., :3, 3] = enc[..., :3]
    w2c[..., 3, 3] = 1
    fy = height / (2 * torch.tan(enc[..., 7] / 2))
    fx = width / (2 * torch.tan(enc[..., 8] / 2))
    K = torch.zeros(*batch, 3, 3, dtype=enc.dtype, device=enc.device)
    K[..., 0, 0], K[..., 1, 1] = fx, fy
    K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = width / 2, height / 2, 1
    return w2c, K


def plucker_rays(
    K: torch.Tensor, c2w: torch.Tensor, height: int, width: int, release_double_scaled: bool = False
) -> torch.Tensor:
    """Plucker ray map [..., H, W, 6] = [o x d, d] through pixel centres, in the world frame.

    K [..., 3, 3] in pixels, c2w [..., 4, 4]. `release_double_scaled=True` reproduces the published
    inference quirk: the pixel intrinsics are multiplied by W (fx, cx) and H (fy, cy) a second time,
    which makes every ray of a frame point almost the same way. Only for matching the release.
    """
    fx, fy, cx, cy = K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]
    if release_double_scaled:
        fx, fy, cx, cy = fx * width, fy * height, cx * width, cy * height
    v, u = torch.meshgrid(
        torch.arange(height, dtype=K.dtype, device=K.device) + 0.5,
        torch.arange(width, dtype=K.dtype, device=K.device) + 0.5,
        indexing="ij",
    )
    view = (...,) + (None, None)
    rays = torch.stack(
        [(u - cx[view]) / fx[view], (v - cy[view]) / fy[view], torch.ones_like(u).expand_as(u - cx[view])], dim=-1
    )  # [..., H, W, 3] in the camera frame, z = 1
    d = F.normalize(torch.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], rays), dim=-1)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    return torch.cat([torch.cross(o, d, dim=-1), d], dim=-1)
