"""fwmodel.trajectories: preset paths with known geometry, camera files and dataset samples replayed exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fwdata.dataset import camera
from fwdata.dataset.contract import CameraFile, format_camera_txt, load_metadata, read_camera_json
from fwmodel.trajectories import TrajectoryError, preset_trajectory, resample, resolve_trajectory

T, H, W = 9, 32, 64


def _c2w(traj):
    return camera.invert_pose(traj.w2c)


def _focal(fov_deg, width=W):
    return width / (2 * math.tan(math.radians(fov_deg) / 2))


def test_orbit_circles_the_centre_looking_at_it():
    r = 1.5
    traj = preset_trajectory("orbit", T, H, W, scale=r, speed=2.0)
    c2w = _c2w(traj)
    centre = np.array([0.0, 0.0, r])
    eyes = c2w[:, :3, 3]
    np.testing.assert_allclose(np.linalg.norm(eyes - centre, axis=1), r, atol=1e-12)  # on the circle
    axis = c2w[:, :3, 2]  # optical axis in the world
    to_centre = (centre - eyes) / r
    np.testing.assert_allclose(axis, to_centre, atol=1e-12)  # looking at the centre
    np.testing.assert_allclose(eyes[:, 1], 0.0, atol=1e-12)  # a horizontal circle
    np.testing.assert_array_equal(traj.w2c[0], np.eye(4))
    # speed 2 sweeps 180 degrees: the last camera is opposite the first, 2r away
    np.testing.assert_allclose(eyes[-1], [0.0, 0.0, 2 * r], atol=1e-12)
    assert camera.rotation_angle_deg(traj.w2c[-1, :3, :3]) == pytest.approx(180.0)
    np.testing.assert_allclose(traj.K[:, 0, 0], _focal(60.0))  # the default horizontal field of view
    np.testing.assert_allclose(traj.K[:, :2, 2], np.tile([W / 2, H / 2], (T, 1)))


def test_forward_pan_zoom_static():
    fwd = preset_trajectory("forward", T, H, W, scale=2.0, speed=1.0)
    c2w = _c2w(fwd)
    np.testing.assert_allclose(c2w[:, :3, :3], np.tile(np.eye(3), (T, 1, 1)), atol=1e-12)  # no rotation
    np.testing.assert_allclose(c2w[:, :3, 3], np.stack([np.zeros(T), np.zeros(T), np.linspace(0, 1.0, T)], 1),
                               atol=1e-12)  # along +z of camera 0, 0.5 x scale

    pan = preset_trajectory("pan", T, H, W, speed=-1.0)
    c2w = _c2w(pan)
    np.testing.assert_allclose(c2w[:, :3, 3], 0.0, atol=1e-12)  # turns in place
    angles = [camera.rotation_angle_deg(R) for R in pan.w2c[:, :3, :3]]
    np.testing.assert_allclose(angles, np.linspace(0, 30.0, T), atol=1e-9)
    assert c2w[-1, 0, 2] == pytest.approx(-math.sin(math.radians(30)))  # speed -1: to the left

    zoom = preset_trajectory("zoom", T, H, W, scale=1.0, speed=0.5, fov_deg=40.0)
    np.testing.assert_array_equal(zoom.w2c, np.tile(np.eye(4), (T, 1, 1)))
    np.testing.assert_allclose(zoom.K[:, 0, 0], _focal(40.0) * np.linspace(1.0, 1.5, T))
    np.testing.assert_allclose(zoom.K[:, 1, 1], zoom.K[:, 0, 0])

    static = preset_trajectory("static", 5, H, W)
    np.testing.assert_array_equal(static.w2c, np.tile(np.eye(4), (5, 1, 1)))
    cams = static.camera_file()
    assert cams.num_frames == 5 and (cams.width, cams.height) == (W, H) and cams.scale == "normalized"


def _wavy_path(n):
    """A path whose first camera is not the identity: rotations about y and x, translations."""
    from scipy.spatial.transform import Rotation

    c2w = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        c2w[i, :3, :3] = Rotation.from_euler("yx", [10 + 5 * i, 3 * i], degrees=True).as_matrix()
        c2w[i, :3, 3] = [0.3 + 0.1 * i, -0.05 * i, 0.2 * i]
    return camera.invert_pose(c2w)


def test_realestate10k_txt_round_trips(tmp_path):
    w2c = _wavy_path(T)
    K = camera.intrinsics_matrix(50.0 + np.arange(T), 49.0 + np.arange(T), 31.0, 17.0)
    cams = CameraFile.from_arrays(w2c, K, width=W, height=H, scale="normalized")
    path = tmp_path / "cams.txt"
    path.write_text("https://www.youtube.com/watch?v=abc\n" + format_camera_txt(cams))
    traj = resolve_trajectory(str(path), T, H, W)
    np.testing.assert_allclose(traj.K, K, rtol=1e-12)
    np.testing.assert_allclose(traj.w2c, camera.relative_to_first(w2c), atol=1e-12)
    # --trajectory-scale multiplies a file's translations; --fov replaces its intrinsics
    scaled = resolve_trajectory(str(path), T, H, W, scale=2.0, fov_deg=90.0)
    np.testing.assert_allclose(scaled.w2c[:, :3, 3], 2 * camera.relative_to_first(w2c)[:, :3, 3], atol=1e-12)
    np.testing.assert_allclose(scaled.K[:, 0, 0], W / 2)


def test_camera_json_is_scaled_to_the_output_size(tmp_path):
    w2c = _wavy_path(T)
    K = camera.intrinsics_matrix(80.0, 80.0, 64.0, 32.0)
    cams = CameraFile.from_arrays(w2c, K, width=2 * W, height=2 * H, scale="metric")
    path = tmp_path / "cams.json"
    path.write_text(cams.model_dump_json())
    traj = resolve_trajectory(str(path), T, H, W)
    np.testing.assert_allclose(traj.K, np.tile(camera.intrinsics_matrix(40.0, 40.0, 32.0, 16.0), (T, 1, 1)))
    np.testing.assert_allclose(traj.w2c, camera.relative_to_first(w2c), atol=1e-12)


def test_resampling_keeps_exact_frames_and_interpolates_between():
    w2c = _wavy_path(9)
    K = camera.intrinsics_matrix(np.arange(9) + 40.0, np.arange(9) + 40.0, 32.0, 16.0)
    out_w2c, out_K = resample(w2c, K, 5)  # positions 0, 2, 4, 6, 8 exactly
    np.testing.assert_allclose(out_w2c, w2c[::2], atol=1e-12)
    np.testing.assert_allclose(out_K, K[::2])
    mid_w2c, mid_K = resample(w2c[:2], K[:2], 3)  # the middle of two cameras
    c0, c1, cm = camera.camera_centers(np.stack([w2c[0], w2c[1], mid_w2c[1]]))
    np.testing.assert_allclose(cm, (c0 + c1) / 2, atol=1e-12)
    rel = lambda a, b: camera.rotation_angle_deg(a[:3, :3] @ b[:3, :3].T)  # noqa: E731
    assert rel(mid_w2c[1], w2c[0]) == pytest.approx(rel(w2c[1], w2c[0]) / 2)
    assert mid_K[1, 0, 0] == pytest.approx(40.5)


def test_a_dataset_sample_replays_its_cameras_normalised_as_in_training(dataset):
    from fwdata.dataset.contract import POINTS_NPZ, load_npz

    meta = load_metadata(dataset)
    record = meta.samples[0]
    assert (record.num_frames, record.height, record.width) == (9, 64, 96)
    cams = read_camera_json(dataset / record.paths.camera_json)
    traj = resolve_trajectory(f"{dataset}:{record.id[:12]}", 5, 32, 48)  # a unique id prefix works
    # the scale training divides by: mean distance of the valid points from camera 0 (all frames), the
    # points resized to the model's frame size first (nearest-exact, 64x96 -> 32x48: pixels 1, 3, 5, ...)
    pts = load_npz(dataset / record.paths.points, POINTS_NPZ, record.dims)
    w0 = cams.w2c_array()[0]
    valid = pts["valid"][:, 1::2, 1::2]
    p = pts["points"][:, 1::2, 1::2][valid].astype(np.float64) @ w0[:3, :3].T + w0[:3, 3]
    s = np.linalg.norm(p, axis=1).mean()
    expected = camera.relative_to_first(cams.w2c_array())[::2]
    expected[:, :3, 3] /= s
    np.testing.assert_allclose(traj.w2c, expected, atol=1e-5)
    K = cams.intrinsics_array()[::2] * np.array([[0.5], [0.5], [1.0]])  # 64x96 -> 32x48: half the pixels
    np.testing.assert_allclose(traj.K, K, rtol=1e-6)
    assert traj.source == f"dataset {dataset} sample {record.id}"


@pytest.mark.parametrize("spec, message", [
    ("spiral", "neither a preset"),
    ("/no/such/folder:abc", "is not a dataset folder"),
])
def test_bad_specs_are_one_line(spec, message):
    with pytest.raises(TrajectoryError, match=message) as err:
        resolve_trajectory(spec, 5, H, W)
    assert "\n" not in str(err.value)


def test_bad_files_and_ids_are_one_line(tmp_path, dataset):
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1 2 3\n")
    with pytest.raises(TrajectoryError, match="expected 19 numbers"):
        resolve_trajectory(str(bad), 5, H, W)
    with pytest.raises(TrajectoryError, match="unknown"):
        resolve_trajectory(f"{dataset}:nosuchsample", 5, H, W)
    with pytest.raises(TrajectoryError, match="--trajectory-scale"):
        preset_trajectory("orbit", 5, H, W, scale=0.0)
    with pytest.raises(TrajectoryError, match="--fov"):
        preset_trajectory("orbit", 5, H, W, fov_deg=180.0)
