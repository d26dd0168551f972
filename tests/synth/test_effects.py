"""Camera effects of the synthetic renderer (fwdata.synth.effects, fwdata.dataset.lens): each changes the
frames as its model says while depth, points and cameras stay the exact pinhole ground truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from fwdata.cli import app
from fwdata.dataset import camera as cam
from fwdata.dataset.contract import DEPTH_NPZ, load_metadata, load_npz, read_camera_json
from fwdata.dataset.layout import marker_path
from fwdata.dataset.video import probe, read_frames
from fwdata.synth import effects as fx
from fwdata.synth import render as synth
from fwdata.synth.dataset import SynthOptions, check_options, realistic_options, synthetic_id, write_synthetic_dataset
from fwdata.dataset.lens import Lens, LensError, check_lens, distort_pixels, undistort_pixels
from fwdata.validate import validate_dataset
from fwdata.validate.results import ValidateOptions

H, W = 64, 112
T = 5


def opencv_project(X_cam: np.ndarray, K: np.ndarray, k1: float, k2: float, p1: float, p2: float) -> np.ndarray:
    """cv2.projectPoints written out (distCoeffs k1, k2, p1, p2), for points in the camera frame."""
    x, y = X_cam[..., 0] / X_cam[..., 2], X_cam[..., 1] / X_cam[..., 2]
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([K[0, 0] * xd + K[0, 2], K[1, 1] * yd + K[1, 2]], axis=-1)


@pytest.fixture(scope="module")
def clean():
    """The clean clip every effect is compared with (make_clip and make_effects_clip without effects agree)."""
    a = synth.make_clip(4, "pan", num_frames=T, height=H, width=W)
    b = fx.make_effects_clip(4, "pan", fx.Effects(), num_frames=T, height=H, width=W)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.depth, b.depth)
    np.testing.assert_array_equal(a.w2c, b.w2c)
    return a


def effects_clip(**kw) -> synth.SyntheticClip:
    return fx.make_effects_clip(4, "pan", fx.Effects(**kw), num_frames=T, height=H, width=W)


def assert_same_truth(clip, clean):
    np.testing.assert_array_equal(clip.depth, clean.depth)
    np.testing.assert_array_equal(clip.w2c, clean.w2c)
    np.testing.assert_array_equal(clip.K, clean.K)


# ---------------------------------------------------------------------------------- lens


def test_lens_model_is_opencv_and_inverts():
    K = synth.default_intrinsics(192, 336)
    lens = Lens(-0.3, 0.08, 0.002, -0.001)
    rng = np.random.default_rng(0)
    uv = rng.uniform([0, 0], [336, 192], (500, 2))
    X = np.concatenate([(uv - K[:2, 2]) / K[0, 0], np.ones((500, 1))], axis=1) * rng.uniform(1, 5, (500, 1))
    np.testing.assert_allclose(distort_pixels(uv, K, lens), opencv_project(X, K, *(-0.3, 0.08, 0.002, -0.001)),
                               atol=1e-9)
    np.testing.assert_allclose(distort_pixels(undistort_pixels(uv, K, lens), K, lens), uv, atol=1e-7)
    # the documented range works at 60 degrees; a fold-over is refused with a clear message
    for k1, k2 in ((-0.35, 0.1), (-0.25, 0.0), (0.15, 0.0), (0.15, -0.05)):
        check_lens(Lens(k1, k2), K, 192, 336)
    with pytest.raises(LensError, match="folds over"):
        check_lens(Lens(-0.5), K, 192, 336)
    with pytest.raises(ValueError, match="folds over"):
        check_options(SynthOptions(effects=fx.Effects(k1=-0.5)))


def white_sphere_scene(centre, radius) -> synth.Scene:
    """A black room with one white sphere: its silhouette is easy to measure."""
    sc = synth.build_scene((8.0, 3.0, 8.0), np.zeros((0, 2, 3)), np.array([[*centre, radius]]), seed=0)
    rgba = sc.texels.view(np.uint8).reshape(-1, 4).copy()
    rgba[:, :3] = 0
    sid = sc.sphere_surface(0)
    ah, aw = sc.atlas_shape
    r0, c0, h, w = sc.surf_region[sid]
    for k in range(synth.MIP_LEVELS):
        lv = rgba[sc.level_offset[k]:sc.level_offset[k] + (ah >> k) * (aw >> k)].reshape(ah >> k, aw >> k, 4)
        lv[r0 >> k:(r0 + h) >> k, c0 >> k:(c0 + w) >> k, :3] = 255
    sc.texels = rgba.view(np.uint32).ravel()
    return sc


def test_distorted_frame_shows_a_point_where_the_model_says():
    """A small sphere seen through a strong lens: the centroid of its silhouette is at the OpenCV
    projection of its centre (within 0.5 px), far from the pinhole projection; depth stays pinhole."""
    h, w = 128, 224
    K = synth.default_intrinsics(h, w)
    k = (-0.3, 0.08, 0.002, -0.001)
    lens = Lens(*k)
    w2c = np.eye(4)
    w2c[:3, 3] = [0.0, 0.0, 3.5]  # camera at z=-3.5 looking along +z
    centre = np.array([1.1, -0.55, -1.0])  # about 3/4 of the way to the top-right corner
    radius = 0.09
    sc = white_sphere_scene(centre, radius)
    X = cam.transform_points(w2c, centre[None])[0]
    want = opencv_project(X, K, *k)
    pinhole = (K @ X / X[2])[:2]
    assert np.linalg.norm(want - pinhole) > 5.0  # the lens moves it by many pixels

    def centroid(rgb):
        m = rgb[..., 0] > 40  # sphere at least 0.5 x 255 (ambient), background 0
        assert m.sum() > 40
        vv, uu = np.nonzero(m)
        return np.array([uu.mean() + 0.5, vv.mean() + 0.5])

    rgb_l, depth_l = synth.render_frame(sc, K, w2c, h, w, supersample=2, lens=lens)
    rgb_p, depth_p = synth.render_frame(sc, K, w2c, h, w, supersample=2)
    assert np.linalg.norm(centroid(rgb_p) - pinhole) < 0.5  # the measurement itself is unbiased
    assert np.linalg.norm(centroid(rgb_l) - want) < 0.5
    np.testing.assert_array_equal(depth_l, depth_p)


def test_lens_screen_windows_cut_nothing():
    """Objects are only tested inside their (distorted) screen window: the same hits as testing every ray."""
    sc = synth.make_scene(3)
    K = synth.default_intrinsics(H, W)
    lens = Lens(-0.3, 0.08, 0.003, -0.003)
    for pose in synth.camera_path("orbit", 5, sc, seed=1)[[0, 4]]:
        dirs, origin, K_grid, grid = synth._distorted_camera_rays(K, pose, H, W, 2, np.float32, lens)
        t_win, s_win = synth._trace(sc, origin, dirs, K_grid, pose, grid)
        t_all, s_all = synth._trace(sc, origin, dirs)
        np.testing.assert_array_equal(s_win, s_all)
        np.testing.assert_array_equal(t_win, t_all)


# ---------------------------------------------------------------------------------- sensor


def test_noise_has_the_configured_std(clean):
    clip = effects_clip(noise_std=4.0)
    assert_same_truth(clip, clean)
    diff = clip.frames.astype(float) - clean.frames
    assert abs(diff.mean()) < 0.1
    assert diff.std() == pytest.approx(math.sqrt(4.0**2 + 1 / 6), rel=0.04)  # plus the two roundings
    assert clip.effects["noise"]["std"] == 4.0
    again = effects_clip(noise_std=4.0)
    np.testing.assert_array_equal(again.frames, clip.frames)  # seeded


def test_exposure_and_white_balance_drift(clean):
    up = effects_clip(exposure_drift=1.0)
    down = effects_clip(exposure_drift=-1.0)
    assert_same_truth(up, clean)
    gains = fx.exposure_gains(T, 1.0)
    np.testing.assert_allclose(gains, 2.0 ** np.linspace(-0.5, 0.5, T))
    np.testing.assert_allclose(np.array(up.effects["gains_rgb"])[:, 0], gains, rtol=1e-5)
    assert np.all(np.diff(up.frames.mean(axis=(1, 2, 3))) > 0)
    assert np.all(np.diff(down.frames.mean(axis=(1, 2, 3))) < 0)
    base = clean.frames.astype(float)
    for i in range(T):  # where nothing saturates, frame = gain x clean frame
        ok = base[i] * gains[i] < 250
        ratio = up.frames[i].astype(float)[ok].sum() / base[i][ok].sum()
        assert ratio == pytest.approx(gains[i], rel=0.01)

    wb = effects_clip(wb_drift=0.6)
    g = np.array(wb.effects["gains_rgb"])
    assert g.shape == (T, 3)
    np.testing.assert_allclose(np.log2(g[-1]) - np.log2(g[0]), np.log2(g[-1]) * 2, atol=1e-5)  # centred ramp
    red_blue = np.log2(g[-1, 0]) - np.log2(g[-1, 2])
    assert abs(red_blue) > 0.05  # a colour shift, of a seeded sign
    for i in (0, T - 1):
        for c in range(3):
            ok = base[i, ..., c] * g[i, c] < 250
            ratio = wb.frames[i, ..., c].astype(float)[ok].sum() / base[i, ..., c][ok].sum()
            assert ratio == pytest.approx(g[i, c], rel=0.01)


def test_motion_blur_averages_the_exposure(clean):
    clip = effects_clip(blur_shutter=1.0, blur_samples=3)
    assert_same_truth(clip, clean)
    assert clip.effects["motion_blur"]["pose"] == "cameras are the mid-exposure poses"

    def sharpness(img):
        g = img.astype(float).mean(axis=-1)
        return np.abs(g[1:-1, 2:] + g[1:-1, :-2] + g[2:, 1:-1] + g[:-2, 1:-1] - 4 * g[1:-1, 1:-1]).mean()

    for i in range(T):
        assert sharpness(clip.frames[i]) < 0.93 * sharpness(clean.frames[i])
    # frame 2 is the mean of renders at the sub-frame poses (-1/3, 0, +1/3 of a frame interval)
    scene = synth.make_scene(4)
    K = clean.K
    subs = [synth.render_radiance(scene, K, fx.interpolate_pose(clean.w2c, 2 + o), H, W)[0]
            for o in fx.blur_offsets(1.0, 3)]
    expected = np.clip(np.rint(np.mean(subs, axis=0) * 255), 0, 255)
    assert np.abs(clip.frames[2].astype(float) - expected).max() <= 1.0
    # the pose interpolation: exact at samples, halfway = mean centre, rigid
    np.testing.assert_array_equal(fx.interpolate_pose(clean.w2c, 3.0), clean.w2c[3])
    mid = fx.interpolate_pose(clean.w2c, 1.5)
    c = cam.camera_centers(clean.w2c)
    np.testing.assert_allclose(cam.camera_centers(mid[None])[0], (c[1] + c[2]) / 2, atol=1e-12)
    np.testing.assert_allclose(mid[:3, :3] @ mid[:3, :3].T, np.eye(3), atol=1e-12)


# ---------------------------------------------------------------------------------- motion and scene


def test_keyframe_steps_are_k_times_larger():
    k = 3
    clip = fx.make_effects_clip(4, "forward", fx.Effects(keyframe_step=k), num_frames=T, height=H, width=W)
    dense = synth.camera_path("forward", (T - 1) * k + 1, synth.make_scene(4), 4)
    np.testing.assert_array_equal(clip.w2c, dense[::k])
    steps = np.linalg.norm(np.diff(cam.camera_centers(clip.w2c), axis=0), axis=1)
    dense_steps = np.linalg.norm(np.diff(cam.camera_centers(dense), axis=0), axis=1)
    assert steps.mean() == pytest.approx(k * dense_steps.mean(), rel=0.02)
    rot = cam.rotation_angle_deg((clip.w2c[1:] @ cam.invert_pose(clip.w2c[:-1]))[:, :3, :3])
    dense_rot = cam.rotation_angle_deg((dense[1:] @ cam.invert_pose(dense[:-1]))[:, :3, :3])
    # rotations about changing axes compose to a little less than the sum of the k dense steps
    assert 0.85 * k * dense_rot.mean() < rot.mean() <= k * dense_rot.mean() + 1e-9
    # the ground truth is that of the keyframe poses
    _, depth = synth.render_frame(synth.make_scene(4), clip.K, clip.w2c[2], H, W, supersample=1)
    np.testing.assert_array_equal(clip.depth[2], depth)
    assert clip.effects["keyframe_step"] == k


def test_spin_path_is_rotation_dominant():
    sc = synth.make_scene(3)
    for n in (9, 49):
        w2c = synth.camera_path("spin", n, sc, seed=5)
        centres = cam.camera_centers(w2c)
        total_rot = cam.rotation_angle_deg((w2c[-1] @ cam.invert_pose(w2c[0]))[:3, :3])
        travel = np.linalg.norm(np.diff(centres, axis=0), axis=1).sum()
        assert total_rot >= 29.0 and travel < 0.2
        step_rot = cam.rotation_angle_deg((w2c[1:] @ cam.invert_pose(w2c[:-1]))[:, :3, :3])
        assert step_rot.max() < (7.0 if n < 25 else 4.0)
        assert np.hypot(centres[:, 0] - sc.free_center[0], centres[:, 2] - sc.free_center[2]).max() <= sc.free_radius
    assert "spin" not in synth.PATH_KINDS  # not in the default cycle: the default datasets do not change
    check_options(SynthOptions(path_kinds=["spin"]))


def test_low_texture_faces_are_nearly_uniform():
    sc = synth.make_scene(4)
    flat, faces = fx.flatten_room_faces(sc, 3, 0.02, np.random.default_rng(0))
    assert len(faces) == 3 and set(faces) <= {0, 1, 4, 5}  # walls first
    rgba0 = sc.texels.view(np.uint8).reshape(-1, 4)
    rgba1 = flat.texels.view(np.uint8).reshape(-1, 4)
    ah, aw = sc.atlas_shape

    def region(rgba, sid, k=0):
        lv = rgba[sc.level_offset[k]:sc.level_offset[k] + (ah >> k) * (aw >> k)].reshape(ah >> k, aw >> k, 4)
        r0, c0, h, w = sc.surf_region[sid] >> k
        return lv[r0:r0 + h, c0:c0 + w, :3].astype(float)

    for sid in range(sc.num_surfaces):
        before, after = region(rgba0, sid), region(rgba1, sid)
        if sid in faces:
            lum = after.mean(axis=-1)
            assert lum.std() / lum.mean() < 0.04 and region(rgba0, sid).mean(axis=-1).std() / lum.mean() > 0.15
            np.testing.assert_allclose(after.mean(axis=(0, 1)), before.mean(axis=(0, 1)), atol=2.0)
            np.testing.assert_allclose(region(rgba1, sid, 2).mean(), after.mean(), atol=1.0)  # mips follow
        else:
            np.testing.assert_array_equal(after, before)
    # rendered: the flattened faces are flat in the image too; the geometry is unchanged
    K = synth.default_intrinsics(H, W)
    pose = synth.camera_path("rotate", 5, sc, seed=4)[2]
    dirs, origin, _ = synth._camera_rays(K, pose, H, W, 1, np.float64)
    _, sid = synth.cast_rays(sc, origin, dirs)
    rgb0, d0 = synth.render_frame(sc, K, pose, H, W)
    rgb1, d1 = synth.render_frame(flat, K, pose, H, W)
    np.testing.assert_array_equal(d0, d1)
    seen = [f for f in faces if (sid == f).sum() > 100]
    assert seen
    for f in seen:
        m = sid == f
        assert rgb1[m].astype(float).std(axis=0).max() < 8 < rgb0[m].astype(float).std(axis=0).max()


def test_moving_sphere_depth_is_the_ray_distance():
    clip = fx.make_effects_clip(6, "orbit", fx.Effects(moving_object=True, k1=-0.1), num_frames=T, height=H, width=W)
    truth = clip.effects["moving_object"]
    assert truth["in_depth"] is True
    r = truth["radius"]
    world = cam.transform_points(cam.invert_pose(clip.w2c[0]), np.array(truth["centers"]))
    scene = synth.make_scene(6)
    seen = []
    for i in range(T):
        c2w = cam.invert_pose(clip.w2c[i])
        rays = cam.unproject_depth(np.ones((H, W)), clip.K) @ c2w[:3, :3].T  # camera-z 1: t = z-depth
        o = c2w[:3, 3]
        t_static, _ = synth.cast_rays(scene, o, rays)
        oc = o - world[i]
        a = np.einsum("...i,...i->...", rays, rays)
        b = rays @ oc
        disc = b * b - a * (oc @ oc - r * r)
        t_sphere = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
        on = (disc >= 0) & (t_sphere > 0) & (t_sphere < t_static)
        np.testing.assert_allclose(clip.depth[i][on], t_sphere[on], rtol=1e-5)
        np.testing.assert_allclose(clip.depth[i][~on], t_static[~on], rtol=1e-5)
        seen.append(on.sum())
    assert sum(n > 20 for n in seen) >= 2  # it is in view in several frames ...
    steps = np.linalg.norm(np.diff(world, axis=0), axis=1)
    assert steps.min() > 0.05 and np.ptp(steps) < 1e-5  # ... and moves at a constant velocity
    # it never comes near the camera
    assert np.linalg.norm(world - cam.camera_centers(clip.w2c), axis=1).min() > r + 0.3


# ---------------------------------------------------------------------------------- video and preset


def test_h264_at_a_target_bitrate(clean, tmp_path):
    frames = effects_clip(noise_std=2.0).frames
    bits = int(0.2 * H * W * 16)
    fx.encode_h264(tmp_path / "a.mp4", frames, 16.0, bit_rate=bits)
    fx.encode_h264(tmp_path / "b.mp4", frames, 16.0, bit_rate=bits)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()  # deterministic
    import av

    with av.open(str(tmp_path / "a.mp4")) as c:
        payload = sum(p.size for p in c.demux(video=0) if p.size)
    assert 0.5 * bits < payload * 8 / (T / 16.0) < 2.0 * bits
    decoded = read_frames(tmp_path / "a.mp4")
    assert decoded.shape == frames.shape
    fx.encode_h264(tmp_path / "c.mp4", frames, 16.0, crf=40)
    err_low = np.abs(read_frames(tmp_path / "c.mp4").astype(float) - frames).mean()
    fx.encode_h264(tmp_path / "d.mp4", frames, 16.0, crf=18)
    err_high = np.abs(read_frames(tmp_path / "d.mp4").astype(float) - frames).mean()
    assert err_low > 1.5 * err_high


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    out = tmp_path_factory.mktemp("realistic")
    opts = realistic_options(num_scenes=2, num_frames=9, height=H, width=W, write_ply=True)
    meta = write_synthetic_dataset(out, opts)
    return out, opts, meta


def test_realistic_preset_passes_validate(realistic):
    out, opts, meta = realistic
    report = validate_dataset(ValidateOptions(dataset=out, workers=0))
    contract = [f for f in report.findings if f.check.split(".")[0] in ("schema", "integrity", "cross")]
    assert contract == [], contract
    for c in report.checks:
        if c.id.split(".")[0] in ("schema", "integrity", "cross"):
            assert c.outcome in ("passed", "skipped", "off"), c
    assert report.exit_code == 0 or all(f.check.startswith("gate.") for f in report.findings)
    assert {s.split("_")[1] for s in (r.id for r in meta.samples)} == {"orbit", "forward"}


def test_realistic_preset_records_its_ground_truth(realistic):
    out, opts, meta = realistic
    assert opts.effects == fx.REALISTIC and tuple(opts.path_kinds) == synth.ALL_PATH_KINDS
    assert meta.provenance.options["effects"] == fx.REALISTIC.changed()
    rec = meta.sample(synthetic_id(0, "orbit", 9, fx.REALISTIC, H, W))
    assert rec.id != synthetic_id(0, "orbit", 9) and rec.id.startswith("synth_orbit_seed0_fx-")
    truth = rec.provenance.options["ground_truth"]
    lens = dict(truth["lens"])
    assert "pinhole" in lens.pop("applies_to")
    assert lens == {"model": "OPENCV", "k1": -0.12, "k2": 0.03, "p1": 0.0008, "p2": -0.0005}
    assert {"noise", "motion_blur", "gains_rgb", "keyframe_step", "low_texture_faces", "moving_object",
            "h264"} <= set(truth)
    assert any(n.startswith("lens OPENCV k1=-0.12") for n in rec.notes)
    # cameras stay pinhole; depth is the renderer's exact ground truth
    cams = read_camera_json(out / rec.paths.camera_json)
    assert cams.camera_model == "PINHOLE"
    clip = fx.make_effects_clip(0, "orbit", fx.REALISTIC, num_frames=9, height=H, width=W)
    np.testing.assert_allclose(cams.w2c_array(), cam.relative_to_first(clip.w2c), atol=1e-12)
    np.testing.assert_array_equal(load_npz(out / rec.paths.depth, DEPTH_NPZ, rec.dims)["depth"], clip.depth)
    np.testing.assert_allclose(np.array(truth["moving_object"]["centers"]),
                               np.array(clip.effects["moving_object"]["centers"]))
    # the video is the H.264 encode at the target bitrate, and the marker names it
    info = probe(out / rec.paths.video)
    assert info.num_frames == 9
    size_bits = (out / rec.paths.video).stat().st_size * 8
    assert size_bits < 3 * truth["h264"]["bit_rate"] * 9 / 16.0 + 8 * 2000  # plus the mp4 header
    marker = json.loads(marker_path(out, rec.id).read_text())
    assert marker["video_sha256"] == rec.video_sha256
    # a rerun skips the finished clips
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    write_synthetic_dataset(out, opts)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")} == before


def test_cli_preset_and_flags(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["synth", str(tmp_path / "a"), "--preset", "realistic", "--scenes", "1", "--frames", "5",
                            "--height", "32", "--width", "48", "--no-ply", "-q", "--noise", "0", "--h264-crf", "30",
                            "--paths", "spin"])
    assert r.exit_code == 0, r.output
    meta = load_metadata(tmp_path / "a")
    (rec,) = meta.samples
    assert rec.id.startswith("synth_spin_seed0_fx-") and rec.paths.points_ply is None
    effects = meta.provenance.options["effects"]
    assert "noise_std" not in effects and effects["h264_crf"] == 30 and "h264_bpp" not in effects
    assert effects["k1"] == fx.REALISTIC.k1
    assert rec.provenance.options["ground_truth"]["h264"] == {"crf": 30}
    r = runner.invoke(app, ["synth", str(tmp_path / "b"), "--preset", "cinematic"])
    assert r.exit_code == 2 and "unknown preset" in r.output
    r = runner.invoke(app, ["synth", str(tmp_path / "b"), "--k1", "-0.6"])
    assert r.exit_code == 2 and "folds over" in r.output
    r = runner.invoke(app, ["synth", str(tmp_path / "b"), "--h264-bpp", "0.1", "--h264-crf", "20"])
    assert r.exit_code == 2 and "not both" in r.output
    assert not (tmp_path / "b").exists()


def test_defaults_are_off():
    assert not SynthOptions().effects.active and fx.Effects().changed() == {}
    assert not fx.Effects(blur_samples=9, low_texture_contrast=0.1).active  # no effect on their own
    assert synthetic_id(0, "orbit", 9, fx.Effects()) == synthetic_id(0, "orbit", 9)
