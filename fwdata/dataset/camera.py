"""Camera maths: the one place for poses, intrinsics, projections and trajectory metrics.

Conventions (used by every function here):

- OpenCV camera axes: x right, y down, z forward.
- Extrinsics are world-to-camera (w2c) 4x4 matrices, ``X_cam = R @ X_world + t``; c2w is the inverse.
- Pixel convention (COLMAP): the centre of pixel column ``u`` / row ``v`` is at image coordinate
  ``(u + 0.5, v + 0.5)``, so a centred principal point is ``(W/2, H/2)``. Projections return
  coordinates in this convention; pixel ``(u, v)`` covers ``[u, u+1) x [v, v+1)``.
- Intrinsics ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` in pixels. Normalised intrinsics are
  ``(fx/W, fy/H, cx/W, cy/H)`` (RealEstate10K layout).
- Depth is z-depth (distance along the optical axis), in the units of the camera translation.
- 9-d pose encoding (VGGT ``absT_quaR_FoV``): ``[t(3), q_xyzw(4), fov_h, fov_w]`` with ``t`` and
  ``q`` from the w2c matrix and field of view in radians.

Everything is numpy, float64 internally; most functions accept leading batch dimensions.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial.distance import pdist
from scipy.spatial.transform import Rotation

__all__ = [
    "invert_pose",
    "w2c_to_c2w",
    "c2w_to_w2c",
    "make_pose",
    "transform_points",
    "opencv_to_opengl_c2w",
    "opengl_to_opencv_c2w",
    "opencv_to_opengl_w2c",
    "opengl_to_opencv_w2c",
    "intrinsics_matrix",
    "normalize_intrinsics",
    "denormalize_intrinsics",
    "subsample_intrinsics",
    "focal_to_fov",
    "fov_to_focal",
    "rotation_to_quaternion_xyzw",
    "quaternion_xyzw_to_rotation",
    "rotation_angle_deg",
    "encode_pose",
    "decode_pose",
    "relative_to_first",
    "camera_centers",
    "umeyama",
    "sim3_align",
    "trajectory_metrics",
    "pixel_grid",
    "unproject_depth",
    "project_points",
    "reproject_depth",
    "sample_depth_nearest",
    "plucker_rays",
    "look_at",
]

F64 = NDArray[np.float64]

# Flip of the camera y and z axes: OpenCV (x right, y down, z forward) <-> OpenGL (x right, y up,
# z backward). It is its own inverse.
_CV_GL_FLIP = np.diag([1.0, -1.0, -1.0, 1.0])


def _f64(x: ArrayLike) -> F64:
    return np.asarray(x, dtype=np.float64)


def _transpose(m: F64) -> F64:
    return np.swapaxes(m, -1, -2)


# --------------------------------------------------------------------------------------------
# Poses
# --------------------------------------------------------------------------------------------


def invert_pose(T: ArrayLike) -> F64:
    """Rigid inverse of ``T`` (...,4,4): ``[R t] -> [R^T, -R^T t]``. Turns w2c into c2w and back."""
    T = _f64(T)
    R = T[..., :3, :3]
    t = T[..., :3, 3]
    Rt = _transpose(R)
    return make_pose(Rt, -np.einsum("...ij,...j->...i", Rt, t))


w2c_to_c2w = invert_pose
c2w_to_w2c = invert_pose


def make_pose(R: ArrayLike, t: ArrayLike) -> F64:
    """4x4 pose from rotation ``R`` (...,3,3) and translation ``t`` (...,3); batch dims broadcast."""
    R = _f64(R)
    t = _f64(t)
    batch = np.broadcast_shapes(R.shape[:-2], t.shape[:-1])
    T = np.zeros(batch + (4, 4), dtype=np.float64)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T


def transform_points(T: ArrayLike, points: ArrayLike) -> F64:
    """Apply 4x4 transform(s) ``T`` (...,4,4) to points (...,N,3): ``R @ p + t`` -> (...,N,3)."""
    T = _f64(T)
    points = _f64(points)
    return points @ _transpose(T[..., :3, :3]) + T[..., None, :3, 3]


def opencv_to_opengl_c2w(c2w: ArrayLike) -> F64:
    """c2w (...,4,4) with OpenCV camera axes -> c2w with OpenGL camera axes (y up, z backward).

    Only the camera axes change (the y and z columns of the rotation flip sign); the world frame
    and the camera centre are unchanged.
    """
    return _f64(c2w) @ _CV_GL_FLIP


def opengl_to_opencv_c2w(c2w: ArrayLike) -> F64:
    """c2w (...,4,4) with OpenGL camera axes -> c2w with OpenCV camera axes (inverse of the above)."""
    return _f64(c2w) @ _CV_GL_FLIP


def opencv_to_opengl_w2c(w2c: ArrayLike) -> F64:
    """w2c (...,4,4) with OpenCV camera axes -> w2c with OpenGL camera axes (rows y, z flip)."""
    return _CV_GL_FLIP @ _f64(w2c)


def opengl_to_opencv_w2c(w2c: ArrayLike) -> F64:
    """w2c (...,4,4) with OpenGL camera axes -> w2c with OpenCV camera axes."""
    return _CV_GL_FLIP @ _f64(w2c)


def camera_centers(w2c: ArrayLike) -> F64:
    """Camera centres in the world frame, ``-R^T t``, from w2c (...,4,4) -> (...,3)."""
    w2c = _f64(w2c)
    R = w2c[..., :3, :3]
    t = w2c[..., :3, 3]
    return -np.einsum("...ji,...j->...i", R, t)


def relative_to_first(w2c: ArrayLike) -> F64:
    """Re-express a trajectory (T,4,4) w2c so frame 0 is the world frame: ``w2c_i @ inv(w2c_0)``.

    Frame 0 becomes the identity; relative motions ``w2c_j @ inv(w2c_i)`` are unchanged.
    """
    w2c = _f64(w2c)
    return w2c @ invert_pose(w2c[0])


# --------------------------------------------------------------------------------------------
# Intrinsics and field of view
# --------------------------------------------------------------------------------------------


def intrinsics_matrix(fx: ArrayLike, fy: ArrayLike, cx: ArrayLike, cy: ArrayLike) -> F64:
    """K (...,3,3) from focal lengths and principal point in pixels (scalars or arrays, broadcast)."""
    fx, fy, cx, cy = np.broadcast_arrays(_f64(fx), _f64(fy), _f64(cx), _f64(cy))
    K = np.zeros(fx.shape + (3, 3), dtype=np.float64)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = cx
    K[..., 1, 2] = cy
    K[..., 2, 2] = 1.0
    return K


def normalize_intrinsics(K: ArrayLike, width: ArrayLike, height: ArrayLike) -> F64:
    """K (...,3,3) in pixels -> (...,4) ``(fx/W, fy/H, cx/W, cy/H)`` (RealEstate10K layout)."""
    K = _f64(K)
    width = _f64(width)
    height = _f64(height)
    return np.stack(
        [
            K[..., 0, 0] / width,
            K[..., 1, 1] / height,
            K[..., 0, 2] / width,
            K[..., 1, 2] / height,
        ],
        axis=-1,
    )


def denormalize_intrinsics(norm: ArrayLike, width: ArrayLike, height: ArrayLike) -> F64:
    """(...,4) ``(fx/W, fy/H, cx/W, cy/H)`` -> K (...,3,3) in pixels."""
    norm = _f64(norm)
    width = _f64(width)
    height = _f64(height)
    return intrinsics_matrix(
        norm[..., 0] * width, norm[..., 1] * height, norm[..., 2] * width, norm[..., 3] * height
    )


def subsample_intrinsics(K: ArrayLike, stride: int) -> F64:
    """Intrinsics (...,3,3) of the image made of every ``stride``-th pixel, ``image[::stride, ::stride]``.

    Pixel ``j`` of the subsampled image is pixel ``stride * j`` of the original, and both keep the
    pixel-centre-at-+0.5 convention, so ``f' = f / s`` and ``c' = (c + (s - 1) / 2) / s``. Then
    ``unproject_depth(depth[::s, ::s], subsample_intrinsics(K, s))`` equals
    ``unproject_depth(depth, K)[::s, ::s]`` at a fraction of the cost.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    K = _f64(K).copy()
    s = float(stride)
    K[..., 0, 0] /= s
    K[..., 1, 1] /= s
    K[..., 0, 2] = (K[..., 0, 2] + (s - 1.0) / 2.0) / s
    K[..., 1, 2] = (K[..., 1, 2] + (s - 1.0) / 2.0) / s
    return K


def focal_to_fov(focal_px: ArrayLike, size_px: ArrayLike) -> F64:
    """Full field of view in radians, ``2 atan(size / (2 f))``, for an image side of ``size_px``."""
    return 2.0 * np.arctan(_f64(size_px) / (2.0 * _f64(focal_px)))


def fov_to_focal(fov_rad: ArrayLike, size_px: ArrayLike) -> F64:
    """Focal length in pixels, ``size / (2 tan(fov / 2))``, from a full field of view in radians."""
    return _f64(size_px) / (2.0 * np.tan(_f64(fov_rad) / 2.0))


# --------------------------------------------------------------------------------------------
# Rotations and the 9-d pose encoding
# --------------------------------------------------------------------------------------------


def rotation_to_quaternion_xyzw(R: ArrayLike) -> F64:
    """Rotation matrices (...,3,3) -> unit quaternions (...,4) in ``(x, y, z, w)`` order, ``w >= 0``.

    A matrix that is not exactly orthonormal is projected to the nearest rotation (scipy).
    """
    R = _f64(R)
    batch = R.shape[:-2]
    q = Rotation.from_matrix(R.reshape(-1, 3, 3)).as_quat()  # scipy order: x, y, z, w
    q = np.where(q[:, 3:4] < 0.0, -q, q)
    return q.reshape(batch + (4,))


def quaternion_xyzw_to_rotation(q: ArrayLike) -> F64:
    """Quaternions (...,4) in ``(x, y, z, w)`` order (normalised here) -> rotation matrices (...,3,3)."""
    q = _f64(q)
    batch = q.shape[:-1]
    R = Rotation.from_quat(q.reshape(-1, 4)).as_matrix()
    return R.reshape(batch + (3, 3))


def rotation_angle_deg(R: ArrayLike) -> F64:
    """Rotation angle in degrees (in [0, 180]) of rotation matrices (...,3,3) -> (...)."""
    R = _f64(R)
    batch = R.shape[:-2]
    angle = Rotation.from_matrix(R.reshape(-1, 3, 3)).magnitude()
    return np.degrees(angle).reshape(batch)


def encode_pose(w2c: ArrayLike, K: ArrayLike, height: float, width: float) -> F64:
    """w2c (...,4,4) and K (...,3,3) -> 9-d encoding (...,9) ``[t, q_xyzw, fov_h, fov_w]``.

    ``t`` is the w2c translation, ``q`` the w2c rotation (canonical sign, w >= 0), and
    ``fov_h = 2 atan(H / (2 fy))``, ``fov_w = 2 atan(W / (2 fx))`` in radians. The principal point
    is not encoded (decoding puts it at the image centre).
    """
    w2c = _f64(w2c)
    K = _f64(K)
    t = w2c[..., :3, 3]
    q = rotation_to_quaternion_xyzw(w2c[..., :3, :3])
    fov_h = focal_to_fov(K[..., 1, 1], height)
    fov_w = focal_to_fov(K[..., 0, 0], width)
    batch = np.broadcast_shapes(t.shape[:-1], fov_h.shape)
    return np.concatenate(
        [
            np.broadcast_to(t, batch + (3,)),
            np.broadcast_to(q, batch + (4,)),
            np.broadcast_to(fov_h, batch)[..., None],
            np.broadcast_to(fov_w, batch)[..., None],
        ],
        axis=-1,
    )


def decode_pose(enc: ArrayLike, height: float, width: float) -> tuple[F64, F64]:
    """9-d encoding (...,9) -> (w2c (...,4,4), K (...,3,3)); principal point at ``(W/2, H/2)``."""
    enc = _f64(enc)
    w2c = make_pose(quaternion_xyzw_to_rotation(enc[..., 3:7]), enc[..., :3])
    fy = fov_to_focal(enc[..., 7], height)
    fx = fov_to_focal(enc[..., 8], width)
    K = intrinsics_matrix(fx, fy, width / 2.0, height / 2.0)
    return w2c, K


# --------------------------------------------------------------------------------------------
# Alignment and trajectory metrics
# --------------------------------------------------------------------------------------------


def _is_degenerate(points: F64) -> bool:
    """True when all points coincide (up to floating-point noise relative to their magnitude)."""
    spread = np.abs(points - points.mean(axis=0)).max()
    magnitude = max(float(np.abs(points).max()), 1e-300)
    return bool(spread <= 1e-12 * magnitude) or not np.isfinite(spread)


def umeyama(
    src: ArrayLike, dst: ArrayLike, with_scale: bool = True
) -> tuple[float, F64, F64]:
    """Similarity (or rigid) transform minimising ``sum ||dst - (s R src + t)||^2`` (Umeyama 1991).

    ``src``, ``dst``: (N,3) corresponding points. Returns ``(s, R (3,3), t (3,))``; ``s = 1`` when
    ``with_scale`` is False. Raises ValueError when N < 3, shapes differ, values are not finite, or
    either point set is degenerate (all points identical). Collinear points are accepted (the
    rotation about the line is then arbitrary, but the aligned points are not).
    """
    src = _f64(src)
    dst = _f64(dst)
    if src.ndim != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise ValueError(f"umeyama needs two (N,3) arrays of equal shape, got {src.shape} and {dst.shape}")
    n = src.shape[0]
    if n < 3:
        raise ValueError(f"umeyama needs at least 3 point pairs, got {n}")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise ValueError("umeyama got non-finite points")
    if _is_degenerate(src) or _is_degenerate(dst):
        raise ValueError("umeyama got a degenerate point set (all points identical)")

    mu_src = src.mean(axis=0)
    mu_dst = dst.mean(axis=0)
    src_c = src - mu_src
    dst_c = dst - mu_dst
    var_src = float(np.mean(np.sum(src_c**2, axis=1)))
    cov = dst_c.T @ src_c / n  # Sigma_xy in the paper (dst ~ y, src ~ x)

    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0.0:
        S[2, 2] = -1.0
    R = U @ S @ Vt
    s = float(np.sum(D * np.diag(S)) / var_src) if with_scale else 1.0
    t = mu_dst - s * R @ mu_src
    return s, R, t


def sim3_align(est_w2c: ArrayLike, gt_w2c: ArrayLike) -> tuple[float, F64, F64, F64]:
    """Align an estimated trajectory onto the ground truth with a Sim(3) fitted on camera centres.

    ``est_w2c``, ``gt_w2c``: (T,4,4). Returns ``(s, R, t, aligned_est_w2c)`` where gt-world points
    are ``s R x_est + t``; ``aligned_est_w2c`` (T,4,4) are rigid w2c poses in the gt world and gt
    units (camera rotations rotated by R, centres mapped by the similarity).
    """
    est_w2c = _f64(est_w2c)
    gt_w2c = _f64(gt_w2c)
    s, R, t = umeyama(camera_centers(est_w2c), camera_centers(gt_w2c), with_scale=True)
    est_c2w = invert_pose(est_w2c)
    aligned_c2w = make_pose(R @ est_c2w[..., :3, :3], s * est_c2w[..., :3, 3] @ R.T + t)
    return s, R, t, invert_pose(aligned_c2w)


def trajectory_metrics(est_w2c: ArrayLike, gt_w2c: ArrayLike, delta: int = 1) -> dict[str, float]:
    """Trajectory errors of ``est_w2c`` against ``gt_w2c`` (both (T,4,4)), in gt units.

    - ``ate``: RMSE of camera centres after Sim(3) alignment (Umeyama) of est centres onto gt.
    - ``ate_rel``: ``ate`` divided by the gt extent, the largest distance between any two gt
      camera centres.
    - ``rpe_trans``: RMSE over i of ``||t_rel_est * scale - t_rel_gt||`` for the relative motions
      ``inv(c2w_i) @ c2w_{i+delta}`` (pose of frame i+delta in camera i's frame), i.e. the
      translation of ``inv(rel_gt) @ rel_est`` after applying the ATE scale to est.
    - ``rpe_rot_deg``: mean rotation angle (degrees) of ``inv(rel_gt) @ rel_est``.
    - ``scale``: the Sim(3) scale (est units -> gt units).

    Relative motions do not depend on the world frame, so RPE only uses the alignment's scale.
    Raises ValueError for T < 3, ``delta`` out of range, or a trajectory whose centres do not move.
    """
    est_w2c = _f64(est_w2c)
    gt_w2c = _f64(gt_w2c)
    if est_w2c.shape != gt_w2c.shape or est_w2c.shape[1:] != (4, 4):
        raise ValueError(f"trajectory_metrics needs two (T,4,4) arrays, got {est_w2c.shape} and {gt_w2c.shape}")
    n = est_w2c.shape[0]
    if not 1 <= delta < n:
        raise ValueError(f"delta must be in [1, {n - 1}] for a trajectory of {n} frames, got {delta}")

    est_c = camera_centers(est_w2c)
    gt_c = camera_centers(gt_w2c)
    s, R, t = umeyama(est_c, gt_c, with_scale=True)
    aligned_c = s * est_c @ R.T + t
    ate = float(np.sqrt(np.mean(np.sum((aligned_c - gt_c) ** 2, axis=1))))
    extent = float(pdist(gt_c).max())

    # Relative motion i -> i+delta: inv(c2w_i) @ c2w_{i+delta} = w2c_i @ inv(w2c_{i+delta}).
    rel_est = est_w2c[:-delta] @ invert_pose(est_w2c[delta:])
    rel_gt = gt_w2c[:-delta] @ invert_pose(gt_w2c[delta:])
    rel_est[:, :3, 3] *= s
    err = invert_pose(rel_gt) @ rel_est
    rpe_trans = float(np.sqrt(np.mean(np.sum(err[:, :3, 3] ** 2, axis=1))))
    rpe_rot_deg = float(np.mean(rotation_angle_deg(err[:, :3, :3])))

    return {
        "ate": ate,
        "ate_rel": ate / extent,
        "rpe_trans": rpe_trans,
        "rpe_rot_deg": rpe_rot_deg,
        "scale": float(s),
    }


# --------------------------------------------------------------------------------------------
# Pixels, depth, projection
# --------------------------------------------------------------------------------------------


def pixel_grid(height: int, width: int) -> F64:
    """Pixel-centre coordinates (H,W,2): ``[v, u] -> (u + 0.5, v + 0.5)``."""
    u = np.arange(width, dtype=np.float64) + 0.5
    v = np.arange(height, dtype=np.float64) + 0.5
    uu, vv = np.meshgrid(u, v, indexing="xy")
    return np.stack([uu, vv], axis=-1)


def _camera_rays(K: F64, height: int, width: int) -> F64:
    """Rays ``K^-1 [u+0.5, v+0.5, 1]`` (...,H,W,3) with z = 1, in the camera frame."""
    pix = pixel_grid(height, width)
    pix_h = np.concatenate([pix, np.ones((height, width, 1))], axis=-1)
    K_inv = np.linalg.inv(K)
    return pix_h @ _transpose(K_inv)[..., None, :, :]


def unproject_depth(depth: ArrayLike, K: ArrayLike, c2w: ArrayLike | None = None) -> F64:
    """z-depth (...,H,W) -> 3D points (...,H,W,3).

    ``K`` (...,3,3); points are in the camera frame when ``c2w`` is None, else in the world frame of
    ``c2w`` (...,4,4). Batch dims of depth, K and c2w broadcast. Invalid depth (<= 0, nan) gives
    meaningless points: mask them with the depth's valid mask.
    """
    depth = _f64(depth)
    K = _f64(K)
    height, width = depth.shape[-2:]
    points = _camera_rays(K, height, width) * depth[..., None]
    if c2w is None:
        return points
    c2w = _f64(c2w)
    return points @ _transpose(c2w[..., :3, :3])[..., None, :, :] + c2w[..., None, None, :3, 3]


def project_points(points: ArrayLike, K: ArrayLike, w2c: ArrayLike) -> tuple[F64, F64]:
    """World points (...,N,3) -> pixel coordinates uv (...,N,2) and camera z-depth (...,N).

    ``K`` (...,3,3), ``w2c`` (...,4,4). uv follows the pixel-centre-at-+0.5 convention. Points with
    ``z <= 0`` (behind the camera) give meaningless uv (inf at z = 0): check ``z > 0``.
    """
    points = _f64(points)
    K = _f64(K)
    cam = transform_points(_f64(w2c), points)
    z = cam[..., 2]
    img = cam @ _transpose(K)
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = img[..., :2] / img[..., 2:3]
    return uv, z


def reproject_depth(
    depth_a: ArrayLike, K_a: ArrayLike, w2c_a: ArrayLike, K_b: ArrayLike, w2c_b: ArrayLike
) -> tuple[F64, F64]:
    """Where each pixel of frame a lands in frame b: (uv_b (H,W,2), z_b (H,W)).

    ``depth_a`` (H,W) is z-depth of frame a; ``K_*`` (3,3), ``w2c_*`` (4,4). ``z_b`` is the depth of
    the point in camera b; compare it with ``sample_depth_nearest(depth_b, uv_b)``.
    """
    points_a = unproject_depth(depth_a, K_a)  # camera a frame
    a_to_b = _f64(w2c_b) @ invert_pose(w2c_a)
    return project_points(points_a, K_b, a_to_b)


def sample_depth_nearest(depth: ArrayLike, uv: ArrayLike) -> tuple[F64, NDArray[np.bool_]]:
    """Nearest-pixel lookup of ``depth`` (H,W) at pixel coordinates ``uv`` (...,2).

    Pixel ``(col, row) = (floor(u), floor(v))`` (pixel centres at +0.5). Returns
    ``(values (...), inside (...))``; ``inside`` is False for non-finite uv or uv outside
    ``[0, W) x [0, H)``, where values are nan.
    """
    depth = _f64(depth)
    uv = _f64(uv)
    height, width = depth.shape
    u = uv[..., 0]
    v = uv[..., 1]
    inside = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    col = np.zeros(u.shape, dtype=np.int64)
    row = np.zeros(v.shape, dtype=np.int64)
    col[inside] = np.floor(u[inside]).astype(np.int64)
    row[inside] = np.floor(v[inside]).astype(np.int64)
    values = np.where(inside, depth[row, col], np.nan)
    return values, inside


def plucker_rays(K: ArrayLike, c2w: ArrayLike, height: int, width: int) -> F64:
    """Plücker ray map (...,H,W,6) = ``[o x d, d]`` through pixel centres, in the world frame.

    ``d`` is the unit ray direction, ``o`` the camera centre (translation of ``c2w`` (...,4,4));
    ``K`` (...,3,3). Batch dims of K and c2w broadcast.
    """
    K = _f64(K)
    c2w = _f64(c2w)
    rays = _camera_rays(K, height, width)
    d = rays @ _transpose(c2w[..., :3, :3])[..., None, :, :]
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.broadcast_to(c2w[..., None, None, :3, 3], d.shape)
    return np.concatenate([np.cross(o, d), d], axis=-1)


def look_at(
    eye: ArrayLike, target: ArrayLike, up: ArrayLike = (0.0, -1.0, 0.0)
) -> F64:
    """c2w (4,4) in OpenCV camera axes for a camera at ``eye`` looking at ``target``.

    The camera z axis points from eye to target and its y axis (image down) points away from
    ``up``. ``up`` is the world's up direction; the default ``(0, -1, 0)`` is up in an OpenCV-style
    world where y points down (so a camera at the origin looking along +z gets the identity).
    Raises ValueError when eye == target or ``up`` is parallel to the viewing direction.
    """
    eye = _f64(eye)
    target = _f64(target)
    up = _f64(up)
    z = target - eye
    z_norm = np.linalg.norm(z)
    if z_norm == 0.0:
        raise ValueError("look_at: eye and target coincide")
    z = z / z_norm
    x = np.cross(z, up)
    x_norm = np.linalg.norm(x)
    if x_norm < 1e-12 * max(np.linalg.norm(up), 1e-300):
        raise ValueError("look_at: up is parallel to the viewing direction")
    x = x / x_norm
    y = np.cross(z, x)
    return make_pose(np.stack([x, y, z], axis=-1), eye)
