"""Build stages in isolation: clip planning, depth (random-tiny, priors), alignment, configs, CLI usage errors.

Fast: no SfM, tiny videos written in the test.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from fwdata.dataset import camera
from fwdata.build.align import AlignOptions, align_depth
from fwdata.build.pipeline import (
    PRESET_DIR,
    BuildConfig,
    ConfigError,
    SplitOptions,
    load_config,
    split_for,
)
from fwdata.dataset.store import clean_stale_temp_files
from fwdata.build.cli import overrides_from_options, parse_intrinsics
from fwdata.cli import app
from fwdata.build.clips import ClipOptions, crop_and_scale, find_videos, load_clip, plan_video, scale_intrinsics_to_clip
from fwdata.build.depth import (
    DepthError,
    DepthModelError,
    DepthOptions,
    DepthResult,
    check_model_available,
    get_estimator,
    load_prior,
    random_tiny_model,
)
from fwdata.build.sfm import SfmResult, choose_keyframes, matching_pairs
from fwdata.dataset.video import write_mp4


def _video(path, n=40, h=64, w=96, fps=30.0):
    """Frames whose pixel (0, 0) encodes the frame index (for checking which frames a clip took)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        frames[i] = ((xx * 2 + yy * 3) % 200)[..., None]
        frames[i, :16, :16] = (5 * i) % 256
    write_mp4(path, frames, fps=fps)
    return frames


# --------------------------------------------------------------------------- clips


def test_crop_and_scale_covers_the_output_and_keeps_square_pixels():
    (x0, y0, cw, ch), (sx, sy) = crop_and_scale(1080, 1920, 336, 592)
    assert sx == pytest.approx(sy) and sx == pytest.approx(336 / 1080)
    assert ch == pytest.approx(1080) and cw == pytest.approx(592 / sx)
    assert x0 == pytest.approx((1920 - cw) / 2) and y0 == pytest.approx(0)


def test_plan_video_stride_from_fps_clips_and_stable_ids(tmp_path):
    _video(tmp_path / "a.mp4", n=100)
    opts = ClipOptions(num_frames=9, height=32, width=48, fps=15.0)
    plan = plan_video(tmp_path / "a.mp4", opts)
    assert plan.error is None
    assert [c.stride for c in plan.clips] == [2] * 5
    assert [c.start_frame for c in plan.clips] == [0, 17, 34, 51, 68]  # non-overlapping spans of 17 frames
    assert plan.clips[1].source_frames == list(range(17, 34, 2))
    assert plan.clips[0].clip_fps == pytest.approx(15.0)
    assert [c.sample_id for c in plan_video(tmp_path / "a.mp4", opts).clips] == [c.sample_id for c in plan.clips]
    assert len({c.sample_id for c in plan.clips}) == 5
    assert len(plan_video(tmp_path / "a.mp4", opts.model_copy(update={"max_clips_per_video": 2})).clips) == 2


def test_plan_video_too_short_and_unreadable(tmp_path):
    _video(tmp_path / "a.mp4", n=12)
    plan = plan_video(tmp_path / "a.mp4", ClipOptions(num_frames=17, height=32, width=48, stride=1))
    assert plan.clips == [] and "too short" in plan.error and "12 frames" in plan.error
    (tmp_path / "b.mp4").write_text("nope")
    assert "not a readable video" in plan_video(tmp_path / "b.mp4", ClipOptions()).error


def test_truncated_video_fails_at_probe_with_a_reason(tmp_path):
    import av

    frames = np.random.default_rng(0).integers(0, 255, (40, 64, 96, 3), dtype=np.uint8)
    with av.open(str(tmp_path / "full.mp4"), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    plan = plan_video(tmp_path / "cut.mp4", ClipOptions(num_frames=33, height=64, width=96, stride=1))
    assert plan.clips == [] and plan.error.startswith("not a readable video")
    assert "truncated" in plan.error and "video_reader" not in plan.error


def test_portrait_sources_get_portrait_clips(tmp_path):
    _video(tmp_path / "p.mp4", n=20, h=96, w=64)
    plan = plan_video(tmp_path / "p.mp4", ClipOptions(num_frames=9, height=32, width=48, stride=1))
    assert (plan.clips[0].height, plan.clips[0].width) == (48, 32)
    fixed = plan_video(tmp_path / "p.mp4", ClipOptions(num_frames=9, height=32, width=48, stride=1, orientation="fixed"))
    assert (fixed.clips[0].height, fixed.clips[0].width) == (32, 48)


def test_load_clip_takes_the_planned_frames_at_the_clip_size(tmp_path):
    src = _video(tmp_path / "a.mp4", n=40)
    plan = plan_video(tmp_path / "a.mp4", ClipOptions(num_frames=5, height=32, width=48, stride=3, chunk_frames=2))
    clip = plan.clips[1]
    frames, none = load_clip(clip, chunk_frames=2)
    assert none is None
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8
    ids = np.round(frames[:, 2, 2, 0].astype(float) / 5).astype(int)  # top-left block encodes the frame index
    assert ids.tolist() == clip.source_frames
    assert np.abs(frames[:, 20:, 20:].astype(int) - src[clip.source_frames][:, 40::2, 40::2].astype(int)).mean() < 12


def test_intrinsics_map_between_source_and_clip():
    from fwdata.build.clips import ClipPlan
    from fwdata.dataset.video import VideoInfo

    (x0, y0, cw, ch), scale = crop_and_scale(720, 1280, 336, 592)
    plan = ClipPlan(source="x.mp4", source_size=1, info=VideoInfo("x.mp4", 100, 30.0, 1280, 720), start_frame=0,
                    stride=1, num_frames=5, height=336, width=592, crop_xywh=(x0, y0, cw, ch), scale=scale,
                    sample_id="x-000000-00000000")
    K_src = camera.intrinsics_matrix(1000.0, 1000.0, 640.0, 360.0)
    K_clip = scale_intrinsics_to_clip(K_src, plan)
    pts = np.array([[0.3, -0.2, 4.0], [-1.0, 0.5, 6.0]])
    uv_src, _ = camera.project_points(pts, K_src, np.eye(4))
    uv_clip, _ = camera.project_points(pts, K_clip, np.eye(4))
    expected = (uv_src - [x0, y0]) * np.asarray(scale)
    np.testing.assert_allclose(uv_clip, expected, atol=1e-9)


def test_find_videos_expands_folders_and_reports_missing(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.mp4", "d/sub/b.MOV", "d/c.txt", "d/.hidden.mp4"):
        (tmp_path / name).write_bytes(b"x")
    files, missing = find_videos([tmp_path / "d", tmp_path / "d" / "a.mp4", tmp_path / "nope.mp4"])
    assert [f.name for f in files] == ["a.mp4", "b.MOV"]
    assert missing == [str(tmp_path / "nope.mp4")]


# --------------------------------------------------------------------------- depth


def test_random_tiny_is_deterministic_and_image_dependent():
    import torch

    a, b = random_tiny_model(), random_tiny_model()
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    est = get_estimator(DepthOptions(model="random-tiny", batch_size=2))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 32, 48, 3), dtype=np.uint8)
    r1, r2 = est.predict(frames), est.predict(frames)
    assert r1.values.shape == (3, 32, 48) and r1.kind == "relative"
    np.testing.assert_array_equal(r1.values, r2.values)
    assert r1.valid.any() and np.std(r1.values[r1.valid]) > 0


def test_local_model_folder_relative_and_metric(tmp_path):
    """A transformers model folder (save_pretrained) loads offline; its config says relative or metric."""
    from fwdata.build.depth import DepthEstimator

    model = random_tiny_model()
    model.save_pretrained(tmp_path / "rel")
    model.config.depth_estimation_type = "metric"
    model.config.max_depth = 20
    model.save_pretrained(tmp_path / "metric")
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 48, 3), dtype=np.uint8)
    for name, kind in (("rel", "relative"), ("metric", "metric")):
        opts = DepthOptions(model=str(tmp_path / name), input_size=28)
        check_model_available(opts)
        est = DepthEstimator(opts)
        assert est.kind == kind and est.input_shape(32, 48) == (28, 42) and est.input_shape(64, 96) == (28, 42)
        r = est.predict(frames)
        assert r.kind == kind and r.values.shape == (2, 32, 48) and np.isfinite(r.values).all()
    assert DepthEstimator(DepthOptions(model=str(tmp_path / "metric"), kind="relative")).kind == "relative"
    assert est.predict(frames, should_stop=lambda: True) is None


def test_model_availability_errors_are_usage_errors(tmp_path):
    check_model_available(DepthOptions(model="random-tiny"))
    (tmp_path / "model").mkdir()
    with pytest.raises(DepthModelError, match="config.json"):
        check_model_available(DepthOptions(model=str(tmp_path / "model")))
    with pytest.raises(DepthModelError, match="not a folder"):
        check_model_available(DepthOptions(prior_dir=str(tmp_path / "nope")))


def _plan(tmp_path, n=20, h=32, w=48, **clip):
    _video(tmp_path / "v.mp4", n=n, h=h, w=w)
    return plan_video(tmp_path / "v.mp4", ClipOptions(num_frames=5, height=16, width=32, stride=2, **clip)).clips[0]


def test_prior_per_video_is_cropped_and_indexed_by_source_frame(tmp_path):
    plan = _plan(tmp_path)  # 32x48 source -> 16x32 clip: scale 2/3 of the centre crop x 0..48, y 4..28
    assert plan.crop_xywh == pytest.approx((0.0, 4.0, 48.0, 24.0))
    prior = tmp_path / "prior"
    prior.mkdir()
    vals = np.zeros((20, 64, 96), np.float32)  # twice the source resolution
    for i in range(20):
        vals[i] = 1.0 + i  # value = source frame + 1
    vals[:, :8, :] = 1000.0  # the top 4 source rows, outside the crop
    vals[:, :, :48] += 100.0  # the left half of the source
    np.savez(prior / "v.npz", depth=vals)
    r = load_prior(str(prior), plan)
    assert r.kind == "metric" and r.values.shape == (5, 16, 32) and r.valid.all()
    assert r.values.max() < 1000.0
    frames = np.array(plan.source_frames, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(r.values[:, :, 0], np.broadcast_to(frames + 101.0, (5, 16)))
    np.testing.assert_array_equal(r.values[:, :, -1], np.broadcast_to(frames + 1.0, (5, 16)))


def test_prior_per_clip_frame_indices_and_errors(tmp_path):
    plan = _plan(tmp_path)
    prior = tmp_path / "prior"
    prior.mkdir()
    inv = np.ones((5, 16, 32), np.float32)
    inv[:, :, :4] = 0.0  # "infinitely far": no depth
    np.savez(prior / f"{plan.sample_id}.npz", inverse_depth=inv)
    r = load_prior(str(prior), plan)
    assert r.kind == "relative" and not r.valid[:, :, :4].any() and r.valid[:, :, 4:].all()
    (prior / f"{plan.sample_id}.npz").unlink()
    np.savez(prior / "v.npz", depth=np.ones((3, 8, 8)), frame_indices=np.array([0, 2, 4]))
    with pytest.raises(DepthError, match="lacks source frames"):
        load_prior(str(prior), plan)
    np.savez(prior / "v.npz", depth=np.ones((20, 8, 8)), inverse_depth=np.ones((20, 8, 8)))
    with pytest.raises(DepthError, match="exactly one"):
        load_prior(str(prior), plan)
    (prior / "v.npz").unlink()
    with pytest.raises(DepthError, match="no depth prior"):
        load_prior(str(prior), plan)


# --------------------------------------------------------------------------- alignment


def _fake_sfm(T=3, H=48, W=64, n=300, seed=0):
    """Cameras, sparse points seen by every frame, and the true depth maps of a tilted plane scene."""
    rng = np.random.default_rng(seed)
    K = camera.intrinsics_matrix(60.0, 60.0, W / 2, H / 2)
    w2c = np.stack([camera.make_pose(np.eye(3), [0.05 * i, 0.0, 0.0]) for i in range(T)])
    yy, xx = np.mgrid[0:H, 0:W]
    z = np.stack([2.0 + 0.03 * xx + 0.02 * yy + 0.1 * i for i in range(T)]).astype(np.float64)
    f, uv, pts = [], [], []
    for i in range(T):
        u = rng.uniform(0, W, n)
        v = rng.uniform(0, H, n)
        zi = z[i, v.astype(int), u.astype(int)]
        rays = np.stack([(u - W / 2) / 60.0, (v - H / 2) / 60.0, np.ones(n)], 1) * zi[:, None]
        world = camera.transform_points(camera.invert_pose(w2c[i]), rays)
        f.append(np.full(n, i))
        uv.append(np.stack([u, v], 1))
        pts.append(world)
    pts = np.concatenate(pts)
    sfm = SfmResult(w2c=w2c, K=K, points=pts, point_errors=np.zeros(len(pts)), obs_frame=np.concatenate(f),
                    obs_point=np.arange(len(pts)), obs_uv=np.concatenate(uv), keyframes=[0], mapped=np.ones(T, bool),
                    reprojection_error=0.0, num_models=1)
    return sfm, z


def test_relative_depth_alignment_is_robust_to_outliers_and_sky():
    sfm, z = _fake_sfm()
    d = (0.4 / z + 0.7).astype(np.float32)  # affine inverse depth
    valid = np.ones(z.shape, bool)
    rng = np.random.default_rng(1)
    bad = rng.random(z.shape) < 0.25
    d_bad = np.where(bad, rng.uniform(0.5, 3.0, z.shape), d).astype(np.float32)  # 25 % garbage
    d_bad[:, :4, :] = 0.0  # "sky" rows
    valid_bad = valid & (d_bad > 0)
    res = align_depth(DepthResult(d_bad, valid_bad, "relative", "test"), sfm, AlignOptions(per_frame="never"))
    good = res.valid & ~bad
    assert np.median(np.abs(res.depth[good] - z[good]) / z[good]) < 1e-3
    assert not res.valid[:, :4].any() and res.scale == "normalized"


def test_metric_depth_makes_the_clip_metric():
    sfm, z = _fake_sfm()
    res = align_depth(DepthResult((2.5 * z).astype(np.float32), np.ones(z.shape, bool), "metric", "test"), sfm,
                      AlignOptions())
    assert res.scale == "metric"
    np.testing.assert_allclose(res.w2c[1, 0, 3], 2.5 * sfm.w2c[1, 0, 3], rtol=1e-4)
    np.testing.assert_allclose(res.depth, 2.5 * z, rtol=1e-4)
    assert res.absrel < 1e-4


def test_per_frame_refinement_only_where_it_helps():
    sfm, z = _fake_sfm()
    d = 0.4 / z + 0.7
    d[1] = 0.55 / z[1] + 0.6  # frame 1 has its own scale and shift (as single-image models do)
    res = align_depth(DepthResult(d.astype(np.float32), np.ones(z.shape, bool), "relative", "test"), sfm,
                      AlignOptions(per_frame="auto"))
    assert res.refined[1]
    assert np.median(np.abs(res.depth - z) / z) < 0.01
    never = align_depth(DepthResult(d.astype(np.float32), np.ones(z.shape, bool), "relative", "test"), sfm,
                        AlignOptions(per_frame="never"))
    assert not never.refined.any() and never.absrel > 5 * res.absrel


# --------------------------------------------------------------------------- sfm planning


def test_matching_pairs_grow_linearly():
    for T in (41, 81, 161):
        kf = choose_keyframes(T, 3)
        assert kf[0] == 0 and kf[-1] == T - 1
        pairs = matching_pairs(T, kf, overlap=4)
        assert len(pairs) <= 6 * T
        assert all(a < b for a, b in pairs)
        every = {i for p in pairs for i in p}
        assert every == set(range(T))


# --------------------------------------------------------------------------- config and CLI


def test_default_preset_equals_the_built_in_defaults():
    assert load_config(PRESET_DIR / "default.toml") == BuildConfig()
    assert load_config("default") == BuildConfig()
    fast = load_config("fast")
    assert fast.clips.num_frames == 33 and not fast.write_ply


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[clips]\nnum_frame = 33\n")
    with pytest.raises(ConfigError, match="clips.num_frame"):
        load_config(bad)
    with pytest.raises(ConfigError, match="4k\\+1"):
        load_config(None, {"clips": {"num_frames": 32}})
    with pytest.raises(ConfigError, match="no such file"):
        load_config("no-such-preset")
    assert overrides_from_options(frames=49, depth_model="random-tiny", workers=None, write_ply=False) == {
        "clips": {"num_frames": 49}, "depth": {"model": "random-tiny"}, "write_ply": False}
    assert parse_intrinsics("500, 500, 320,240") == ((500.0, 500.0, 320.0, 240.0), None)
    assert parse_intrinsics("500,500,320,240,-0.2") == ((500.0, 500.0, 320.0, 240.0), (-0.2, 0.0, 0.0, 0.0))
    assert parse_intrinsics("500,500,320,240,-0.2,0.05,0.001,-0.002") == (
        (500.0, 500.0, 320.0, 240.0), (-0.2, 0.05, 0.001, -0.002))
    for bad in ("500,500", "500,500,320,240,0.1,0.2,0.3", "500,500,320,240,nan", "0,500,320,240"):
        with pytest.raises(ValueError, match="expected 'fx,fy,cx,cy'"):
            parse_intrinsics(bad)
    assert overrides_from_options(intrinsics=(1.0, 1.0, 0.5, 0.5), distortion=(-0.1, 0.0, 0.0, 0.0)) == {
        "intrinsics": (1.0, 1.0, 0.5, 0.5), "distortion": (-0.1, 0.0, 0.0, 0.0)}
    with pytest.raises(ConfigError, match="distortion is given without intrinsics"):
        load_config(None, {"distortion": [-0.1, 0.0, 0.0, 0.0]})


def test_splits_follow_the_source_file():
    s = SplitOptions(val=0.3, test=0.3)
    names = [f"video{i}.mp4" for i in range(200)]
    splits = [split_for(f"/any/dir/{n}", s) for n in names]
    assert splits == [split_for(f"/other/{n}", s) for n in names]
    assert 30 < splits.count("val") < 90 and 30 < splits.count("test") < 90
    assert {split_for(n, SplitOptions()) for n in names} == {"train"}


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / "depth").mkdir()
    stale = tmp_path / "depth" / ".x.tmp-999999999.npz"
    stale.write_bytes(b"x")
    keep = tmp_path / "depth" / "x.npz"
    keep.write_bytes(b"x")
    assert clean_stale_temp_files(tmp_path) == 1
    assert not stale.exists() and keep.exists()


@pytest.mark.parametrize("args, message", [
    (["build", "NOPE", "--out", "OUT", "--depth-model", "random-tiny"], "input not found"),
    (["build", "VIDEOS", "--out", "OUT", "--intrinsics", "1,2"], "fx,fy,cx,cy"),
    (["build", "VIDEOS", "--out", "OUT", "--frames", "32"], "4k+1"),
    (["build", "VIDEOS", "--out", "OUT", "--config", "nope"], "no such file"),
    (["build", "VIDEOS", "--out", "OUT", "--depth-model", "MODELDIR"], "config.json"),
    (["build", "EMPTYDIR", "--out", "OUT", "--depth-model", "random-tiny"], "no video files"),
])
def test_cli_usage_errors_exit_2(tmp_path, args, message):
    (tmp_path / "videos").mkdir()
    _video(tmp_path / "videos" / "a.mp4", n=10)
    (tmp_path / "modeldir").mkdir()
    (tmp_path / "emptydir").mkdir()
    subst = {"NOPE": str(tmp_path / "nope.mp4"), "OUT": str(tmp_path / "out"), "VIDEOS": str(tmp_path / "videos"),
             "MODELDIR": str(tmp_path / "modeldir"), "EMPTYDIR": str(tmp_path / "emptydir")}
    r = CliRunner().invoke(app, [subst.get(a, a) for a in args])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())


def test_progress_shows_throughput_of_this_run():
    """The build's progress line: clips ok / failed and this run's clips per minute (skipped ones excluded)."""
    import io

    from rich.console import Console

    from fwdata.build.cli import RichBuildProgress
    from fwdata.build.pipeline import ClipOutcome

    progress = RichBuildProgress(Console(file=io.StringIO(), width=120))
    progress.start(total=5, skipped=2)
    assert progress._status() == "[green]0 ok[/]"
    progress.t_start -= 30.0  # 30 s into the run
    progress.clip_done(ClipOutcome("a", "a.mp4", 0, True))
    progress.clip_done(ClipOutcome("b", "b.mp4", 0, False, stage="sfm", reason="textureless"))
    status = progress._status()
    progress.finish()
    rate = float(status.split("[/] ")[-1].split()[0])
    assert status.startswith("[green]1 ok[/] [red]1 failed[/]") and 3.9 < rate <= 4.0  # 2 clips in ~30 s
