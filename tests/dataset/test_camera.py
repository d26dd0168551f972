"""Tests for fwdata.dataset.camera: known values and round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fwdata.dataset import camera as cam

ATOL = 1e-10


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    return Rotation.random(n, random_state=rng).as_matrix()


def random_poses(rng: np.random.Generator, n: int, trans_scale: float = 3.0) -> np.ndarray:
    return cam.make_pose(random_rotations(rng, n), rng.normal(scale=trans_scale, size=(n, 3)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------ poses


def test_invert_pose_round_trip(rng):
    T = random_poses(rng, 6)
    T_inv = cam.invert_pose(T)
    assert T_inv.shape == (6, 4, 4)
    np.testing.assert_allclose(T_inv @ T, np.broadcast_to(np.eye(4), (6, 4, 4)), atol=ATOL)
    np.testing.assert_allclose(T @ T_inv, np.broadcast_to(np.eye(4), (6, 4, 4)), atol=ATOL)
    np.testing.assert_allclose(T_inv, np.linalg.inv(T), atol=ATOL)
    np.testing.assert_allclose(cam.c2w_to_w2c(cam.w2c_to_c2w(T)), T, atol=ATOL)


def test_invert_pose_known_value():
    R = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    T = cam.make_pose(R, [1.0, 2.0, 3.0])
    expected = cam.make_pose(R.T, -R.T @ np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(cam.invert_pose(T), expected, atol=ATOL)
    # R^T = rotation by -90 deg about z: (1,2,3) -> (2,-1,3), negated
    np.testing.assert_allclose(cam.invert_pose(T)[:3, 3], [-2.0, 1.0, -3.0], atol=ATOL)


def test_make_pose_broadcasts():
    t = np.arange(15, dtype=float).reshape(5, 3)
    T = cam.make_pose(np.eye(3), t)
    assert T.shape == (5, 4, 4)
    np.testing.assert_array_equal(T[:, :3, 3], t)
    np.testing.assert_array_equal(T[:, 3], np.broadcast_to([0, 0, 0, 1], (5, 4)))


def test_camera_centers(rng):
    # translation only: w2c t = (1,2,3) puts the camera at (-1,-2,-3)
    np.testing.assert_allclose(cam.camera_centers(cam.make_pose(np.eye(3), [1, 2, 3])), [-1, -2, -3])
    centres = rng.normal(size=(4, 3))
    c2w = cam.make_pose(random_rotations(rng, 4), centres)
    np.testing.assert_allclose(cam.camera_centers(cam.invert_pose(c2w)), centres, atol=ATOL)


def test_opencv_opengl_round_trip(rng):
    T = random_poses(rng, 3)
    np.testing.assert_allclose(cam.opengl_to_opencv_c2w(cam.opencv_to_opengl_c2w(T)), T, atol=ATOL)
    np.testing.assert_allclose(cam.opengl_to_opencv_w2c(cam.opencv_to_opengl_w2c(T)), T, atol=ATOL)
    # the w2c and c2w versions describe the same camera
    np.testing.assert_allclose(
        cam.opencv_to_opengl_w2c(T),
        cam.invert_pose(cam.opencv_to_opengl_c2w(cam.invert_pose(T))),
        atol=ATOL,
    )
    # the camera centre does not move
    np.testing.assert_allclose(
        cam.camera_centers(cam.opencv_to_opengl_w2c(T)), cam.camera_centers(T), atol=ATOL
    )


def test_opencv_to_opengl_known_point():
    # OpenCV camera at the origin looking along +z; a point right, below and in front of it
    w2c_gl = cam.opencv_to_opengl_w2c(np.eye(4))
    p_gl = cam.transform_points(w2c_gl, [[1.0, 2.0, 3.0]])
    # in OpenGL axes (y up, z backward): still right, now negative y (below), negative z (in front)
    np.testing.assert_allclose(p_gl, [[1.0, -2.0, -3.0]])
    c2w_gl = cam.opencv_to_opengl_c2w(np.eye(4))
    np.testing.assert_allclose(c2w_gl[:3, :3], np.diag([1.0, -1.0, -1.0]))


def test_relative_to_first(rng):
    w2c = random_poses(rng, 5)
    rel = cam.relative_to_first(w2c)
    np.testing.assert_allclose(rel[0], np.eye(4), atol=ATOL)
    for i, j in [(0, 1), (1, 3), (4, 2)]:
        np.testing.assert_allclose(
            rel[j] @ cam.invert_pose(rel[i]), w2c[j] @ cam.invert_pose(w2c[i]), atol=1e-9
        )
    # independent of the original world frame
    G = random_poses(rng, 1)[0]
    np.testing.assert_allclose(cam.relative_to_first(w2c @ G), rel, atol=1e-9)


# ------------------------------------------------------------------------------- intrinsics


def test_intrinsics_and_normalisation_known_values():
    K = cam.intrinsics_matrix(500.0, 400.0, 320.0, 240.0)
    np.testing.assert_array_equal(K, [[500, 0, 320], [0, 400, 240], [0, 0, 1]])
    norm = cam.normalize_intrinsics(K, width=640, height=480)
    np.testing.assert_allclose(norm, [500 / 640, 400 / 480, 0.5, 0.5])
    np.testing.assert_allclose(cam.denormalize_intrinsics(norm, 640, 480), K)


def test_normalisation_round_trip_batch(rng):
    fx, fy = rng.uniform(100, 900, size=(2, 7))
    cx, cy = rng.uniform(100, 300, size=(2, 7))
    K = cam.intrinsics_matrix(fx, fy, cx, cy)
    assert K.shape == (7, 3, 3)
    norm = cam.normalize_intrinsics(K, 832, 480)
    assert norm.shape == (7, 4)
    np.testing.assert_allclose(cam.denormalize_intrinsics(norm, 832, 480), K, atol=1e-9)


def test_fov_focal_known_values():
    assert cam.focal_to_fov(320.0, 640.0) == pytest.approx(math.pi / 2)
    assert cam.fov_to_focal(math.pi / 2, 640.0) == pytest.approx(320.0)
    assert cam.fov_to_focal(math.radians(60.0), 2.0) == pytest.approx(math.sqrt(3.0))
    f = np.array([100.0, 250.0, 1000.0])
    np.testing.assert_allclose(cam.fov_to_focal(cam.focal_to_fov(f, 480), 480), f)


# -------------------------------------------------------------------------- quaternions, 9-d


def test_quaternion_known_value():
    Rz90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    s = math.sqrt(0.5)
    np.testing.assert_allclose(cam.rotation_to_quaternion_xyzw(Rz90), [0, 0, s, s], atol=ATOL)
    np.testing.assert_allclose(cam.quaternion_xyzw_to_rotation([0, 0, s, s]), Rz90, atol=ATOL)
    # not normalised input is normalised
    np.testing.assert_allclose(cam.quaternion_xyzw_to_rotation([0, 0, 3, 3]), Rz90, atol=ATOL)
    # identity
    np.testing.assert_allclose(cam.rotation_to_quaternion_xyzw(np.eye(3)), [0, 0, 0, 1])


def test_quaternion_canonical_sign_and_round_trip(rng):
    # 270 deg about z == -90 deg: canonical quaternion has w >= 0
    R = Rotation.from_rotvec([0, 0, 1.5 * math.pi]).as_matrix()
    s = math.sqrt(0.5)
    np.testing.assert_allclose(cam.rotation_to_quaternion_xyzw(R), [0, 0, -s, s], atol=ATOL)
    Rs = random_rotations(rng, 24).reshape(2, 3, 4, 3, 3)
    q = cam.rotation_to_quaternion_xyzw(Rs)
    assert q.shape == (2, 3, 4, 4)
    assert np.all(q[..., 3] >= 0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0)
    np.testing.assert_allclose(cam.quaternion_xyzw_to_rotation(q), Rs, atol=ATOL)
    np.testing.assert_allclose(cam.quaternion_xyzw_to_rotation(-q), Rs, atol=ATOL)


def test_rotation_angle_deg():
    R = Rotation.from_rotvec([[0, 0, math.radians(30)], [math.radians(170), 0, 0]]).as_matrix()
    np.testing.assert_allclose(cam.rotation_angle_deg(R), [30.0, 170.0])


def test_encode_identity_pose_known_value():
    H, W = 480, 640
    K = cam.intrinsics_matrix(320.0, 320.0, W / 2, H / 2)
    enc = cam.encode_pose(np.eye(4), K, H, W)
    fov_h = 2 * math.atan(480 / 640)
    np.testing.assert_allclose(enc, [0, 0, 0, 0, 0, 0, 1, fov_h, math.pi / 2], atol=ATOL)
    w2c, K2 = cam.decode_pose(enc, H, W)
    np.testing.assert_allclose(w2c, np.eye(4), atol=ATOL)
    np.testing.assert_allclose(K2, K, atol=1e-9)


def test_encode_decode_round_trip(rng):
    H, W = 480, 832
    w2c = random_poses(rng, 12).reshape(3, 4, 4, 4)
    fx, fy = rng.uniform(200, 900, size=(2, 3, 4))
    K = cam.intrinsics_matrix(fx, fy, W / 2, H / 2)
    enc = cam.encode_pose(w2c, K, H, W)
    assert enc.shape == (3, 4, 9)
    assert np.all(enc[..., 6] >= 0)
    np.testing.assert_allclose(enc[..., :3], w2c[..., :3, 3])
    w2c2, K2 = cam.decode_pose(enc, H, W)
    np.testing.assert_allclose(w2c2, w2c, atol=1e-9)
    np.testing.assert_allclose(K2, K, atol=1e-8)
    np.testing.assert_allclose(cam.encode_pose(w2c2, K2, H, W), enc, atol=1e-9)


def test_decode_centres_principal_point():
    H, W = 480, 640
    K = cam.intrinsics_matrix(500.0, 510.0, 300.0, 250.0)
    _, K2 = cam.decode_pose(cam.encode_pose(np.eye(4), K, H, W), H, W)
    np.testing.assert_allclose(K2, cam.intrinsics_matrix(500.0, 510.0, W / 2, H / 2), atol=1e-9)


# ------------------------------------------------------------------------------- alignment


def random_sim3(rng):
    return float(rng.uniform(0.3, 3.0)), random_rotations(rng, 1)[0], rng.normal(size=3)


def test_umeyama_exact(rng):
    src = rng.normal(size=(20, 3))
    s0, R0, t0 = random_sim3(rng)
    dst = s0 * src @ R0.T + t0
    s, R, t = cam.umeyama(src, dst)
    assert s == pytest.approx(s0, rel=1e-10)
    np.testing.assert_allclose(R, R0, atol=1e-10)
    np.testing.assert_allclose(t, t0, atol=1e-10)
    # the inverse map
    s_i, R_i, t_i = cam.umeyama(dst, src)
    assert s_i == pytest.approx(1 / s0, rel=1e-10)
    np.testing.assert_allclose(R_i, R0.T, atol=1e-10)


def test_umeyama_rigid_and_noisy(rng):
    src = rng.normal(size=(200, 3))
    _, R0, t0 = random_sim3(rng)
    dst = src @ R0.T + t0
    s, R, t = cam.umeyama(src, dst, with_scale=False)
    assert s == 1.0
    np.testing.assert_allclose(R, R0, atol=1e-10)
    np.testing.assert_allclose(t, t0, atol=1e-10)

    s0 = 2.0
    noisy = s0 * src @ R0.T + t0 + rng.normal(scale=0.01, size=src.shape)
    s, R, t = cam.umeyama(src, noisy)
    assert s == pytest.approx(s0, rel=1e-2)
    assert cam.rotation_angle_deg(R.T @ R0) < 0.5
    np.testing.assert_allclose(t, t0, atol=0.01)


def test_umeyama_reflection_gives_rotation(rng):
    src = rng.normal(size=(10, 3))
    dst = src * np.array([1.0, 1.0, -1.0])  # a mirror image: best proper rotation, det = +1
    _, R, _ = cam.umeyama(src, dst)
    assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-10)


def test_umeyama_degenerate_raises():
    with pytest.raises(ValueError):
        cam.umeyama(np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError):
        cam.umeyama(np.tile([1.0, 2.0, 3.0], (5, 1)), np.random.default_rng(0).normal(size=(5, 3)))
    with pytest.raises(ValueError):
        cam.umeyama(np.random.default_rng(0).normal(size=(5, 3)), np.tile([1.0, 2.0, 3.0], (5, 1)))
    with pytest.raises(ValueError):
        cam.umeyama(np.zeros((5, 3)), np.zeros((4, 3)))


def test_trajectory_metrics_sim3_copy_is_perfect(rng):
    gt_w2c = random_poses(rng, 10)
    s0, R0, t0 = random_sim3(rng)
    gt_c2w = cam.invert_pose(gt_w2c)
    est_c2w = cam.make_pose(R0 @ gt_c2w[:, :3, :3], s0 * gt_c2w[:, :3, 3] @ R0.T + t0)
    est_w2c = cam.invert_pose(est_c2w)

    m = cam.trajectory_metrics(est_w2c, gt_w2c)
    assert set(m) == {"ate", "ate_rel", "rpe_trans", "rpe_rot_deg", "scale"}
    assert m["ate"] == pytest.approx(0.0, abs=1e-9)
    assert m["ate_rel"] == pytest.approx(0.0, abs=1e-9)
    assert m["rpe_trans"] == pytest.approx(0.0, abs=1e-9)
    assert m["rpe_rot_deg"] == pytest.approx(0.0, abs=1e-5)
    assert m["scale"] == pytest.approx(1 / s0, rel=1e-10)

    s, R, t, aligned = cam.sim3_align(est_w2c, gt_w2c)
    assert s == pytest.approx(1 / s0, rel=1e-10)
    np.testing.assert_allclose(aligned, gt_w2c, atol=1e-9)


def test_trajectory_metrics_known_perturbation():
    # gt: identity rotations, centres on the corners of a square in the z = 0 plane (a loop);
    # est: the same centres pushed +-a along z with zero mean and no correlation with x, y.
    a = 0.3
    gt_c = np.array([[1.0, 1, 0], [1, -1, 0], [-1, -1, 0], [-1, 1, 0]])
    e = np.array([a, -a, a, -a])
    est_c = gt_c + np.stack([np.zeros(4), np.zeros(4), e], axis=1)
    gt_w2c = cam.invert_pose(cam.make_pose(np.eye(3), gt_c))
    est_w2c = cam.invert_pose(cam.make_pose(np.eye(3), est_c))

    # Umeyama: R = I, s = V / (V + a^2) with V = mean |gt_c - mean|^2 = 2,
    # residual_i = (s - 1) gt_i + s e_i  =>  ATE^2 = (s - 1)^2 V + s^2 a^2 = V a^2 / (V + a^2)
    V = 2.0
    s = V / (V + a**2)
    ate = a * math.sqrt(V / (V + a**2))
    m = cam.trajectory_metrics(est_w2c, gt_w2c)
    assert m["scale"] == pytest.approx(s, rel=1e-10)
    assert m["ate"] == pytest.approx(ate, rel=1e-10)
    assert m["ate_rel"] == pytest.approx(ate / (2 * math.sqrt(2)), rel=1e-10)  # extent = diagonal
    # consecutive steps: gt moves 2 in x or y, est additionally 2a in z; error = (s-1) dgt + s de
    assert m["rpe_trans"] == pytest.approx(2 * math.sqrt((s - 1) ** 2 + (s * a) ** 2), rel=1e-10)
    assert m["rpe_rot_deg"] == pytest.approx(0.0, abs=1e-9)
    # two-step motions are diagonals with no z change: error = (s-1) * 2 sqrt(2)
    m2 = cam.trajectory_metrics(est_w2c, gt_w2c, delta=2)
    assert m2["rpe_trans"] == pytest.approx((1 - s) * 2 * math.sqrt(2), rel=1e-10)


def test_trajectory_metrics_rotation_drift():
    # same centres, est rotation drifts by theta about the optical axis per frame
    theta = 2.0
    n = 6
    gt_c = np.stack([np.arange(n, dtype=float), np.sin(np.arange(n)), np.zeros(n)], axis=1)
    gt_w2c = cam.invert_pose(cam.make_pose(np.eye(3), gt_c))
    drift = Rotation.from_rotvec(
        np.stack([np.zeros(n), np.zeros(n), np.radians(theta) * np.arange(n)], axis=1)
    ).as_matrix()
    est_w2c = gt_w2c.copy()
    est_w2c[:, :3, :3] = drift @ gt_w2c[:, :3, :3]
    est_w2c[:, :3, 3] = -np.einsum("nij,nj->ni", est_w2c[:, :3, :3], gt_c)
    m = cam.trajectory_metrics(est_w2c, gt_w2c)
    assert m["ate"] == pytest.approx(0.0, abs=1e-9)
    assert m["scale"] == pytest.approx(1.0, rel=1e-10)
    assert m["rpe_rot_deg"] == pytest.approx(theta, rel=1e-8)


def test_trajectory_metrics_bad_input(rng):
    w2c = random_poses(rng, 4)
    with pytest.raises(ValueError):
        cam.trajectory_metrics(w2c, w2c, delta=4)
    with pytest.raises(ValueError):
        cam.trajectory_metrics(w2c[:3], w2c)


# ---------------------------------------------------------------------- pixels and depth


def test_pixel_grid():
    g = cam.pixel_grid(2, 3)
    assert g.shape == (2, 3, 2)
    np.testing.assert_array_equal(g[0, 0], [0.5, 0.5])
    np.testing.assert_array_equal(g[1, 2], [2.5, 1.5])


def test_unproject_known_value():
    H, W = 4, 6
    K = cam.intrinsics_matrix(100.0, 50.0, W / 2, H / 2)
    depth = np.full((H, W), 2.0)
    pts = cam.unproject_depth(depth, K)
    assert pts.shape == (H, W, 3)
    # pixel (u=0, v=0) has centre (0.5, 0.5): x = (0.5 - 3) / 100 * 2, y = (0.5 - 2) / 50 * 2
    np.testing.assert_allclose(pts[0, 0], [-0.05, -0.06, 2.0])
    # world frame: a camera at (1, 2, 3) with identity rotation shifts the points
    pts_w = cam.unproject_depth(depth, K, cam.make_pose(np.eye(3), [1.0, 2.0, 3.0]))
    np.testing.assert_allclose(pts_w, pts + [1.0, 2.0, 3.0])


def test_unproject_project_round_trip(rng):
    T, H, W = 3, 5, 7
    depth = rng.uniform(0.5, 10.0, size=(T, H, W))
    K = cam.intrinsics_matrix(80.0, 90.0, 3.2, 2.7)
    c2w = cam.invert_pose(random_poses(rng, T))
    pts = cam.unproject_depth(depth, K, c2w)
    assert pts.shape == (T, H, W, 3)
    uv, z = cam.project_points(pts.reshape(T, H * W, 3), K, cam.invert_pose(c2w))
    assert uv.shape == (T, H * W, 2) and z.shape == (T, H * W)
    np.testing.assert_allclose(uv.reshape(T, H, W, 2), np.broadcast_to(cam.pixel_grid(H, W), (T, H, W, 2)), atol=1e-9)
    np.testing.assert_allclose(z.reshape(T, H, W), depth, atol=1e-9)


def test_reproject_same_camera_is_identity(rng):
    H, W = 4, 5
    depth = rng.uniform(1.0, 3.0, size=(H, W))
    K = cam.intrinsics_matrix(60.0, 60.0, W / 2, H / 2)
    w2c = random_poses(rng, 1)[0]
    uv, z = cam.reproject_depth(depth, K, w2c, K, w2c)
    np.testing.assert_allclose(uv, cam.pixel_grid(H, W), atol=1e-9)
    np.testing.assert_allclose(z, depth, atol=1e-9)
    values, inside = cam.sample_depth_nearest(depth, uv)
    assert inside.all()
    np.testing.assert_array_equal(values, depth)


def test_reproject_fronto_parallel_plane():
    H, W = 6, 8
    f, Z = 10.0, 5.0
    K = cam.intrinsics_matrix(f, f, W / 2, H / 2)
    depth_a = np.full((H, W), Z)
    w2c_a = np.eye(4)
    tx, ty, tz = 0.5, -0.25, 1.0
    w2c_b = cam.invert_pose(cam.make_pose(np.eye(3), [tx, ty, tz]))  # camera b centred at (tx,ty,tz)
    uv_b, z_b = cam.reproject_depth(depth_a, K, w2c_a, K, w2c_b)

    grid = cam.pixel_grid(H, W)
    x = (grid[..., 0] - W / 2) / f * Z
    y = (grid[..., 1] - H / 2) / f * Z
    np.testing.assert_allclose(z_b, Z - tz)
    np.testing.assert_allclose(uv_b[..., 0], f * (x - tx) / (Z - tz) + W / 2)
    np.testing.assert_allclose(uv_b[..., 1], f * (y - ty) / (Z - tz) + H / 2)

    # frame b sees the same plane at depth Z - tz: the consistency check agrees where inside
    depth_b = np.full((H, W), Z - tz)
    values, inside = cam.sample_depth_nearest(depth_b, uv_b)
    assert inside.any() and not inside.all()
    np.testing.assert_allclose(values[inside], z_b[inside])
    assert np.isnan(values[~inside]).all()


def test_sample_depth_nearest_known_values():
    depth = np.arange(12, dtype=float).reshape(3, 4)
    uv = np.array(
        [[0.5, 0.5], [0.0, 0.0], [3.99, 2.99], [1.2, 2.7], [4.0, 0.5], [-0.01, 1.0], [np.nan, 1.0]]
    )
    values, inside = cam.sample_depth_nearest(depth, uv)
    np.testing.assert_array_equal(inside, [True, True, True, True, False, False, False])
    np.testing.assert_array_equal(values[:4], [0.0, 0.0, 11.0, 9.0])
    assert np.isnan(values[4:]).all()


# ------------------------------------------------------------------------------ rays, look-at


def test_plucker_rays_properties(rng):
    H, W = 5, 7
    K = cam.intrinsics_matrix(rng.uniform(5, 20, size=2), 9.0, 3.1, 2.4)
    c2w = cam.invert_pose(random_poses(rng, 2))
    rays = cam.plucker_rays(K, c2w, H, W)
    assert rays.shape == (2, H, W, 6)
    m, d = rays[..., :3], rays[..., 3:]
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0)
    np.testing.assert_allclose(np.sum(m * d, axis=-1), 0.0, atol=1e-9)
    # d points from the camera centre to the unprojected pixel centres
    pts = cam.unproject_depth(np.ones((2, H, W)), K, c2w)
    direction = pts - c2w[:, None, None, :3, 3]
    np.testing.assert_allclose(d, direction / np.linalg.norm(direction, axis=-1, keepdims=True), atol=1e-9)
    np.testing.assert_allclose(m, np.cross(c2w[:, None, None, :3, 3], d), atol=1e-9)


def test_plucker_centre_pixel_identity_camera():
    H, W = 5, 7
    K = cam.intrinsics_matrix(10.0, 10.0, W / 2, H / 2)
    rays = cam.plucker_rays(K, np.eye(4), H, W)
    np.testing.assert_allclose(rays[H // 2, W // 2], [0, 0, 0, 0, 0, 1], atol=ATOL)
    # a camera translated to o: the centre ray is still +z, moment o x z
    o = np.array([1.0, 2.0, 3.0])
    rays = cam.plucker_rays(K, cam.make_pose(np.eye(3), o), H, W)
    np.testing.assert_allclose(rays[H // 2, W // 2], [2.0, -1.0, 0.0, 0, 0, 1], atol=ATOL)


def test_look_at_identity_and_target_at_principal_point(rng):
    np.testing.assert_allclose(cam.look_at([0, 0, 0], [0, 0, 1]), np.eye(4), atol=ATOL)
    K = cam.intrinsics_matrix(50.0, 50.0, 32.0, 24.0)
    for _ in range(5):
        eye, target = rng.normal(scale=3.0, size=(2, 3))
        c2w = cam.look_at(eye, target)
        R = c2w[:3, :3]
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
        np.testing.assert_allclose(c2w[:3, 3], eye)
        w2c = cam.invert_pose(c2w)
        uv, z = cam.project_points(target[None], K, w2c)
        np.testing.assert_allclose(uv[0], [32.0, 24.0], atol=1e-9)
        assert z[0] == pytest.approx(np.linalg.norm(target - eye))
        # a point above the target (world up = -y) appears above the image centre
        uv_up, _ = cam.project_points((target + [0.0, -0.5, 0.0])[None], K, w2c)
        assert uv_up[0, 1] < 24.0


def test_look_at_degenerate_raises():
    with pytest.raises(ValueError):
        cam.look_at([1, 1, 1], [1, 1, 1])
    with pytest.raises(ValueError):
        cam.look_at([0, 0, 0], [0, 5, 0])  # looking straight along up
