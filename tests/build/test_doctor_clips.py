"""`fwdata doctor` plans clips with the build's own code (issue 14, item 15): the stride derived from
the frame rate, `--config` like `fwdata build`, and why a video gives no clip."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from fwdata.build.clips import ClipOptions, plan_video
from fwdata.cli import app
from fwdata.dataset.video import write_mp4
from fwdata.doctor import BYTES_PER_PIXEL, estimate_dataset_bytes

runner = CliRunner()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    # 30 fps: the default target of 16 fps gives stride round(30 / 16) = 2
    write_mp4(root / "short.mp4", np.zeros((40, 64, 96, 3), np.uint8), fps=30)
    write_mp4(root / "long.mp4", np.full((200, 64, 96, 3), 90, np.uint8), fps=30)
    (root / "notes.mp4").write_text("not a video")
    return root


def test_the_estimate_is_the_builds_own_plan(videos):
    long, short = videos / "long.mp4", videos / "short.mp4"
    for opts in (ClipOptions(num_frames=49, height=32, width=48),  # stride 2: span 97, clips at 0 and 97
                 ClipOptions(num_frames=49, height=32, width=48, max_clips_per_video=1),
                 ClipOptions(num_frames=17, height=32, width=48, clip_gap=5),
                 ClipOptions(num_frames=9, height=32, width=48, stride=3),
                 ClipOptions(num_frames=9, height=32, width=48, fps=30)):
        est = estimate_dataset_bytes([long], opts)
        plan = plan_video(long, opts)
        assert est.clips == len(plan.clips) > 0, opts
        assert est.strides == [plan.clips[0].stride]
        assert est.bytes == int(len(plan.clips) * opts.num_frames * 32 * 48 * BYTES_PER_PIXEL)
    assert estimate_dataset_bytes([long], ClipOptions(num_frames=49, height=32, width=48)).clips == 2
    assert estimate_dataset_bytes([long], ClipOptions(num_frames=49, height=32, width=48, stride=1)).clips == 4

    est = estimate_dataset_bytes([short, long, videos / "notes.mp4"], ClipOptions(num_frames=49, height=32, width=48))
    assert (est.videos, est.clips) == (3, 2)
    reasons = dict(est.no_clip)
    assert reasons[str(short)] == plan_video(short, ClipOptions(num_frames=49, height=32, width=48)).error
    assert reasons[str(short)].startswith("too short: 40 frames, a clip of 49 frames at stride 2 needs 97")
    assert "not a readable video" in reasons[str(videos / "notes.mp4")]


def test_doctor_says_why_a_video_gives_no_clip(videos, tmp_path):
    r = runner.invoke(app, ["doctor", str(videos / "short.mp4"), str(videos / "long.mp4"), "--out", str(tmp_path),
                            "--depth-model", "random-tiny", "--frames", "49", "--height", "32", "--width", "48"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert f"no clip from {videos / 'short.mp4'}: too short: 40 frames, a clip of 49 frames at stride 2 needs 97; " \
           "lower --frames or --stride" in lines
    assert "estimate: 2 videos -> 2 clips of 49 frames at stride 2, 32x48 (HxW), about 0.00 GB" in lines

    # only the short video: no clip at all is a problem (the build would fail every input)
    r = runner.invoke(app, ["doctor", str(videos / "short.mp4"), "--out", str(tmp_path), "--depth-model",
                            "random-tiny", "--frames", "49", "--height", "32", "--width", "48"])
    assert r.exit_code == 1, r.output
    assert any(line.startswith("PROBLEM clips: 0 clips from 1 video") for line in r.stdout.splitlines()), r.output
    assert "estimate: 1 video -> 0 clips of 49 frames, 32x48 (HxW), about 0.00 GB" in r.stdout.splitlines()
    assert "stride 2 needs 97" in r.stdout


def test_doctor_takes_the_build_preset(videos, tmp_path):
    # fast: 33 frames at 192x336, one clip per video; 30 fps -> stride 2, span 65 > 40 frames of short.mp4
    r = runner.invoke(app, ["doctor", str(videos), "--out", str(tmp_path), "--config", "fast",
                            "--depth-model", "random-tiny"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "estimate: 3 videos -> 1 clip of 33 frames at stride 2, 192x336 (HxW), about 0.03 GB" in lines
    assert any(line.startswith(f"no clip from {videos / 'short.mp4'}: too short: 40 frames, a clip of 33 frames at "
                               "stride 2 needs 65") for line in lines), r.output
    assert any(line.startswith(f"no clip from {videos / 'notes.mp4'}: not a readable video") for line in lines)
    # options override the preset as in `fwdata build`
    r = runner.invoke(app, ["doctor", str(videos / "long.mp4"), "--out", str(tmp_path), "--config", "fast",
                            "--max-clips", "0", "--stride", "1", "--depth-model", "random-tiny"])
    assert any(line.startswith("estimate: 1 video -> 6 clips of 33 frames at stride 1,")
               for line in r.stdout.splitlines()), r.output
    # a bad clip option is one line, exit 2, like the build
    r = runner.invoke(app, ["doctor", str(videos), "--out", str(tmp_path), "--frames", "50"])
    assert r.exit_code == 2 and "4k+1" in r.stderr and "\n" not in r.stderr.strip(), r.output


def test_doctor_never_counts_the_output_dataset_as_input(videos, tmp_path):
    out = tmp_path / "ds"
    (out / "videos").mkdir(parents=True)
    write_mp4(out / "videos" / "clip.mp4", np.zeros((200, 64, 96, 3), np.uint8), fps=30)
    r = runner.invoke(app, ["doctor", str(videos / "long.mp4"), str(out), "--out", str(out), "--depth-model",
                            "random-tiny", "--frames", "49", "--height", "32", "--width", "48"])
    assert any(line.startswith("estimate: 1 video -> 2 clips of 49 frames") for line in r.stdout.splitlines()), \
        r.output
