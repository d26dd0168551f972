"""Tests for fwdata.synth.render: determinism, exact depth, consistent cameras, usable texture."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fwdata.dataset import camera as cam
from fwdata.synth import render as synth

H, W = 64, 112  # small frames keep the file fast


@pytest.fixture(scope="module")
def scene() -> synth.Scene:
    return synth.make_scene(3)


def pose_at(eye, target) -> np.ndarray:
    return cam.invert_pose(cam.look_at(eye, target))


def pixel_rays(K: np.ndarray, w2c: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre and world rays (H,W,3) with camera-z component 1 through pixel centres."""
    c2w = cam.invert_pose(w2c)
    rays_cam = cam.unproject_depth(np.ones((height, width)), K)
    return c2w[:3, 3], rays_cam @ c2w[:3, :3].T


# ---------------------------------------------------------------------------------- scenes


def test_scene_deterministic_per_seed():
    a, b, c = synth.make_scene(5), synth.make_scene(5), synth.make_scene(6)
    for field in ("boxes", "spheres", "texels", "surf_region"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.boxes.shape != c.boxes.shape or not np.array_equal(a.boxes, c.boxes)
    assert a.texels.shape != c.texels.shape or not np.array_equal(a.texels, c.texels)


def test_scene_layout(scene):
    assert len(scene.boxes) >= 3 and len(scene.spheres) >= 2
    keep_out = scene.free_radius + synth.OBJECT_CLEARANCE - 1e-9
    for lo, hi in scene.boxes:
        assert np.all(lo < hi)
        assert np.all(lo >= scene.room_min) and np.all(hi <= scene.room_max + 1e-9)
        dx = max(lo[0] - scene.free_center[0], 0, scene.free_center[0] - hi[0])
        dz = max(lo[2] - scene.free_center[2], 0, scene.free_center[2] - hi[2])
        assert math.hypot(dx, dz) >= keep_out
    for *c, r in scene.spheres:
        c = np.array(c)
        assert np.all(c - r >= scene.room_min) and np.all(c + r <= scene.room_max + 1e-9)
        assert math.hypot(c[0] - scene.free_center[0], c[2] - scene.free_center[2]) - r >= keep_out


def test_clip_deterministic_and_shapes():
    kw = dict(num_frames=3, height=48, width=80)
    a = synth.make_clip(1, "pan", **kw)
    b = synth.make_clip(1, "pan", **kw)
    c = synth.make_clip(2, "pan", **kw)
    assert a.frames.shape == (3, 48, 80, 3) and a.frames.dtype == np.uint8
    assert a.depth.shape == (3, 48, 80) and a.depth.dtype == np.float32
    assert a.w2c.shape == (3, 4, 4) and a.K.shape == (3, 3)
    assert a.path_kind == "pan" and a.seed == 1 and a.fps == 16.0 and a.name
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.depth, b.depth)
    np.testing.assert_array_equal(a.w2c, b.w2c)
    assert not np.array_equal(a.frames, c.frames)
    assert not np.allclose(a.w2c, c.w2c)
    assert np.all(np.isfinite(a.depth)) and np.all(a.depth > 0)


def test_default_intrinsics():
    K = synth.default_intrinsics(192, 336, 60.0)
    assert K[0, 0] == pytest.approx(168.0 / math.tan(math.radians(30.0)))
    assert K[1, 1] == K[0, 0]
    assert (K[0, 2], K[1, 2]) == (168.0, 96.0)


# ---------------------------------------------------------------------------------- depth


def test_wall_and_floor_depth_is_exact(scene):
    """A camera looking along +z: wall pixels have depth wall_z - cam_z, floor pixels the
    analytic plane intersection."""
    K = synth.default_intrinsics(H, W)
    eye = scene.free_center + np.array([0.3, 0.1, -0.5])
    w2c = pose_at(eye, eye + np.array([0.0, 0.0, 1.0]))
    np.testing.assert_allclose(w2c[:3, :3], np.eye(3), atol=1e-12)
    _, depth = synth.render_frame(scene, K, w2c, H, W, supersample=1)
    origin, rays = pixel_rays(K, w2c, H, W)
    _, sid = synth.cast_rays(scene, origin, rays)

    wall = sid == synth.FACES.index("+z")
    assert wall.sum() > 50
    np.testing.assert_allclose(depth[wall], scene.room_max[2] - eye[2], rtol=1e-4)

    floor = sid == synth.FACES.index("+y")
    assert floor.sum() > 20
    floor_depth = (scene.floor_y - eye[1]) / rays[..., 1]
    np.testing.assert_allclose(depth[floor], floor_depth[floor], rtol=1e-4)


def test_sphere_depth_at_centre_pixel():
    """Odd image size: the centre pixel's ray passes through the principal point and the
    sphere centre, so its depth is distance - radius."""
    centre, radius = np.array([0.8, 0.2, 2.5]), 0.5
    box = np.array([[[-3.5, 0.5, -3.5], [-2.5, 1.5, -2.5]]])
    sc = synth.build_scene((8.0, 3.0, 8.0), box, np.array([[*centre, radius]]), seed=0)
    h, w = 63, 111
    K = synth.default_intrinsics(h, w)
    eye = np.array([-0.2, -0.3, -0.4])
    _, depth = synth.render_frame(sc, K, pose_at(eye, centre), h, w, supersample=1)
    expected = np.linalg.norm(centre - eye) - radius
    assert depth[h // 2, w // 2] == pytest.approx(expected, rel=1e-4)
    # Pixels on the sphere are nearer than the room behind it; its angular radius is respected.
    near = depth < expected + radius + 1e-3
    ang = math.asin(radius / np.linalg.norm(centre - eye))
    r_px = K[0, 0] * math.tan(ang)
    assert abs(math.sqrt(near.sum() / math.pi) - r_px) < 2.0


def test_depth_points_lie_on_surfaces(scene):
    K = synth.default_intrinsics(H, W)
    for kind in synth.PATH_KINDS:
        w2c = synth.camera_path(kind, 9, scene, seed=0)[4]
        _, depth = synth.render_frame(scene, K, w2c, H, W, supersample=1)
        assert np.all(np.isfinite(depth)) and np.all(depth > 0)
        points = cam.unproject_depth(depth, K, cam.invert_pose(w2c)).reshape(-1, 3)
        assert synth.surface_distance(scene, points).max() < 1e-4 * depth.max()
        # And depth is the camera z of those points.
        z = cam.transform_points(w2c, points)[:, 2]
        np.testing.assert_allclose(z, depth.reshape(-1), rtol=1e-6)


def test_depth_does_not_depend_on_supersampling(scene):
    K = synth.default_intrinsics(H, W)
    w2c = synth.camera_path("orbit", 5, scene, seed=1)[2]
    rgb1, d1 = synth.render_frame(scene, K, w2c, H, W, supersample=1)
    rgb3, d3 = synth.render_frame(scene, K, w2c, H, W, supersample=3)
    np.testing.assert_array_equal(d1, d3)
    # Anti-aliased colour stays close to the single-sample colour on average.
    assert np.abs(rgb1.astype(float) - rgb3).mean() < 25


@pytest.mark.parametrize("kind", synth.PATH_KINDS)
def test_reprojected_depth_matches(scene, kind):
    K = synth.default_intrinsics(H, W)
    w2c = synth.camera_path(kind, 17, scene, seed=2)
    for i, j in ((0, 8), (16, 4)):
        _, depth_i = synth.render_frame(scene, K, w2c[i], H, W, supersample=1)
        _, depth_j = synth.render_frame(scene, K, w2c[j], H, W, supersample=1)
        uv, z = cam.reproject_depth(depth_i, K, w2c[i], K, w2c[j])
        sampled, inside = cam.sample_depth_nearest(depth_j, uv)
        visible = inside & (z > 0) & (z <= sampled * 1.01)
        assert visible.mean() > 0.3
        rel = np.abs(z[visible] - sampled[visible]) / sampled[visible]
        assert np.median(rel) < 0.005


# ---------------------------------------------------------------------------------- cameras


@pytest.mark.parametrize("kind", synth.PATH_KINDS)
@pytest.mark.parametrize("num_frames", [9, 25, 49, 81])
def test_camera_paths(scene, kind, num_frames):
    w2c = synth.camera_path(kind, num_frames, scene, seed=7)
    assert w2c.shape == (num_frames, 4, 4) and np.all(np.isfinite(w2c))
    R = w2c[:, :3, :3]
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-9)
    np.testing.assert_array_equal(w2c[:, 3], np.broadcast_to([0, 0, 0, 1.0], (num_frames, 4)))

    centres = cam.camera_centers(w2c)
    assert np.all(centres > scene.room_min) and np.all(centres < scene.room_max)
    radial = np.hypot(centres[:, 0] - scene.free_center[0], centres[:, 2] - scene.free_center[2])
    assert radial.max() <= scene.free_radius + 1e-9
    assert synth.surface_distance(scene, centres).min() > 0.5  # away from walls and objects

    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    rel = w2c[1:] @ cam.invert_pose(w2c[:-1])
    step_rot = cam.rotation_angle_deg(rel[:, :3, :3])
    assert steps.sum() > 0.15
    assert steps.max() < 0.12 if num_frames >= 25 else steps.max() < 0.3
    assert step_rot.max() < 2.0 if num_frames >= 25 else step_rot.max() < 5.0
    if num_frames >= 25:  # smooth: velocity changes little from frame to frame
        assert np.linalg.norm(np.diff(centres, 2, axis=0), axis=1).max() < 0.01
    total_rot = cam.rotation_angle_deg((w2c[-1] @ cam.invert_pose(w2c[0]))[:3, :3])
    if kind == "rotate":
        assert total_rot >= 10.0
        assert steps.sum() > 0.2  # not a pure rotation
    if kind == "orbit":
        assert total_rot >= 15.0
    if kind in ("forward", "pan") and num_frames >= 25:
        assert steps.sum() > 0.8


def test_camera_path_is_deterministic_and_checks_kind(scene):
    np.testing.assert_array_equal(synth.camera_path("forward", 9, scene, 4), synth.camera_path("forward", 9, scene, 4))
    assert not np.allclose(synth.camera_path("forward", 9, scene, 4), synth.camera_path("forward", 9, scene, 5))
    with pytest.raises(ValueError, match="unknown camera path kind"):
        synth.camera_path("spiral", 9, scene, 0)


def test_orbit_looks_at_a_fixed_point(scene):
    w2c = synth.camera_path("orbit", 25, scene, seed=3)
    c2w = cam.invert_pose(w2c)
    # Least-squares point closest to all optical axes; every axis passes near it.
    A, b = np.zeros((3, 3)), np.zeros(3)
    for pose in c2w:
        d = pose[:3, 2]
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ pose[:3, 3]
    target = np.linalg.solve(A, b)
    for pose in c2w:
        d = pose[:3, 2]
        off = target - pose[:3, 3]
        assert np.linalg.norm(off - (off @ d) * d) < 1e-6


# ---------------------------------------------------------------------------------- texture


def count_sift_keypoints(rgb: np.ndarray) -> int:
    """SIFT keypoints that COLMAP finds in a uint8 RGB image (CPU extractor, default options)."""
    import pycolmap

    gray = np.rint(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    gray = np.ascontiguousarray(np.clip(gray, 0, 255).astype(np.uint8))
    if hasattr(pycolmap, "FeatureExtractor"):  # pycolmap >= 3.12
        extractor = pycolmap.FeatureExtractor.create(pycolmap.FeatureExtractionOptions(), device=pycolmap.Device.cpu)
        keypoints, _ = extractor.extract_from_uint8_array(gray)
    else:
        keypoints, _ = pycolmap.Sift(device=pycolmap.Device.cpu).extract(gray.astype(np.float32) / 255.0)
    return len(keypoints)


def test_frames_have_rich_texture():
    pytest.importorskip("pycolmap")
    sc = synth.make_scene(11)
    K = synth.default_intrinsics(192, 336)
    for kind in ("forward", "rotate"):
        w2c = synth.camera_path(kind, 9, sc, seed=11)[4]
        rgb, _ = synth.render_frame(sc, K, w2c, 192, 336)
        assert rgb.std() > 40  # high contrast
        assert count_sift_keypoints(rgb) > 300


def test_no_aliasing_shimmer(scene):
    """A slow sideways move (~0.3 px per frame) past a distant, grazing floor changes the image
    smoothly: small temporal second differences. (Single-sample rendering without mip-mapping
    gives about 3x more here.)"""
    K = synth.default_intrinsics(H, W)
    eye = scene.free_center.copy()
    look = np.array([0.0, 0.6, 3.0])  # down at the floor far away
    frames = []
    for i in range(7):
        e = eye + np.array([0.01 * i, 0.0, 0.0])
        frames.append(synth.render_frame(scene, K, pose_at(e, e + look), H, W)[0].astype(float))
    f = np.stack(frames)
    assert np.abs(f[2:] - 2 * f[1:-1] + f[:-2]).mean() < 4.5
