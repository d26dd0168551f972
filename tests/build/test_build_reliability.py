"""What a build must never do: drop a video, build from a file that changed, lose its history."""

from __future__ import annotations

import shutil

import pytest

from fwdata.build.clips import ClipOptions, plan_video
from fwdata.build.pipeline import ClipJob, StepError, load_config, step_decode

OPTS = ClipOptions(num_frames=17, height=96, width=160, stride=1)


def _same_size_other_content(src, dst):
    """A copy of `src` with one byte changed in the middle (same name, same size)."""
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))


def test_same_name_and_size_but_other_content_gets_another_id(inputs, tmp_path):
    src = next((inputs / "videos").glob("synth_orbit_*.mp4"))
    a, b = tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4"
    a.parent.mkdir()
    shutil.copy(src, a)
    _same_size_other_content(src, b)
    assert a.stat().st_size == b.stat().st_size
    ida, idb = plan_video(a, OPTS).clips[0].sample_id, plan_video(b, OPTS).clips[0].sample_id
    assert ida != idb
    # the same content under another folder keeps its id (moving the input folder keeps ids)
    c = tmp_path / "c" / "clip.mp4"
    c.parent.mkdir()
    shutil.copy(src, c)
    assert plan_video(c, OPTS).clips[0].sample_id == ida


def test_a_source_replaced_after_probing_is_refused(inputs, tmp_path):
    src = next((inputs / "videos").glob("synth_orbit_*.mp4"))
    video = tmp_path / "clip.mp4"
    shutil.copy(src, video)
    plan = plan_video(video, OPTS).clips[0]
    job = ClipJob(plan=plan, config=load_config(None, {"clips": OPTS.model_dump()}), out=tmp_path / "ds")
    _same_size_other_content(src, video)
    with pytest.raises(StepError, match="changed since the build started"):
        step_decode(job)
    video.unlink()
    with pytest.raises(StepError, match="gone"):
        step_decode(job)


def test_each_sample_keeps_what_made_it_and_the_dataset_keeps_every_run(inputs, tmp_path):
    from fwdata.build.pipeline import build_dataset
    from fwdata.dataset.contract import load_metadata
    from fwdata.dataset.store import file_sha256
    from fwdata.validate import ValidateOptions, validate_dataset

    video = next((inputs / "videos").glob("synth_forward_*.mp4"))
    ds = tmp_path / "ds"
    clips = {"num_frames": 17, "height": 128, "width": 224, "stride": 2}
    first = build_dataset([video], ds, load_config(None, {"clips": clips, "depth": {"model": "random-tiny"}}))
    assert first.built == 1
    empty = tmp_path / "no_priors"
    empty.mkdir()
    second = build_dataset([video], ds, load_config(None, {"clips": clips, "depth": {"prior_dir": str(empty)}}))
    assert (second.built, second.skipped) == (0, 1)

    meta = load_metadata(ds)
    (rec,) = meta.samples
    depth = next(m for m in rec.provenance.models if m.role == "depth")
    assert depth.name == "random-tiny" and depth.random_init, "the sample says what really made it"
    assert rec.provenance.options["depth"]["model"] == "random-tiny"
    assert meta.provenance.options["depth"]["prior_dir"] == str(empty)  # the last run's options
    assert any(m.random_init for m in meta.provenance.models), "the dataset lists every model of its samples"
    assert [(r.built, r.skipped) for r in meta.provenance.runs] == [(1, 0), (0, 1)]
    assert rec.video_sha256 == file_sha256(ds / rec.paths.video)
    report = validate_dataset(ValidateOptions(dataset=ds, workers=0))
    assert "gate.random_init_model" in {f.check for f in report.findings} and report.exit_code == 1


@pytest.mark.parametrize("case", ["out_is_a_file", "under_a_file", "videos_symlinked_out", "markers_symlinked_out"])
def test_a_bad_output_folder_is_one_line_and_touches_nothing_outside(inputs, tmp_path, case):
    import os
    import subprocess
    import sys

    video = next((inputs / "videos").glob("synth_forward_*.mp4"))
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / ".keep.tmp-999999.json"  # looks like a dead writer's temp file
    victim.write_text("not ours")
    out = tmp_path / "ds"
    if case == "out_is_a_file":
        out.write_text("x")
    elif case == "under_a_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "ds"
    else:
        out.mkdir()
        if case == "videos_symlinked_out":
            os.symlink(outside, out / "videos")
        else:
            (out / ".fwdata").mkdir()
            os.symlink(outside, out / ".fwdata" / "done")
    r = subprocess.run([sys.executable, "-m", "fwdata.cli", "build", str(video), "--out", str(out), "-q",
                        "--depth-model", "random-tiny", "--frames", "17", "--height", "96", "--width", "160"],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert victim.exists() and sorted(p.name for p in outside.iterdir()) == [victim.name], "nothing outside changed"


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        for tid in __import__("os").listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out |= {int(x) for x in f.read().split()}
    except FileNotFoundError:
        pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_workers_die_with_the_build(inputs, tmp_path, sig):
    """kill -9 or SIGTERM of the build: no worker goes on (SIGTERM behaves like Ctrl-C: exit 143)."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "fwdata.cli", "build", str(inputs / "videos"), "--out", str(tmp_path / "ds"), "-q",
           "-j", "2", "--depth-model", "random-tiny", "--frames", "33", "--height", "192", "--width", "336"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        workers = {c for c in _children(proc.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()}
        if len(workers) >= 2:
            break
        time.sleep(0.2)
    assert len(workers) >= 2, "the build started two workers"
    time.sleep(3)  # inside a clip
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=60)
    if sig == "SIGTERM":
        assert proc.returncode == 143
    t0 = time.time()
    while time.time() - t0 < 20 and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "no worker outlives the build"


def test_a_blank_frame_is_a_reason_not_an_internal_error(inputs):
    from fwdata.build.sfm import SfmError, SfmOptions, run_sfm
    from fwdata.dataset.video import read_frames

    frames = read_frames(next((inputs / "videos").glob("synth_orbit_*.mp4"))).copy()
    frames[10] = 0
    with pytest.raises(SfmError, match=r"could not be registered \(frames 10\)"):
        run_sfm(frames, SfmOptions(num_threads=1))


def test_variable_frame_rate_timestamps_are_the_presentation_times(tmp_path):
    from fractions import Fraction

    import av
    import numpy as np

    pts_ms = [0, 40, 80, 200, 240, 280, 520, 560, 600, 640, 680, 900, 940, 980, 1020, 1060, 1100]  # uneven gaps
    path = tmp_path / "vfr.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 160, 96, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for t in pts_ms:
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (96, 160, 3), dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    plan = plan_video(path, ClipOptions(num_frames=17, height=96, width=160, stride=1)).clips[0]
    np.testing.assert_allclose(plan.timestamps, np.array(pts_ms) / 1000.0, atol=2e-3)


def test_control_characters_in_names_cannot_forge_summary_lines():
    from fwdata.build.cli import _shown

    assert _shown("evil.mp4\n  built 99, failed 0") == "evil.mp4\\n  built 99, failed 0"
    assert "\n" not in _shown("a\r\nb\x1b[2J") and _shown("café [x].mp4") == "café \\[x].mp4"


def test_a_source_with_concealed_damage_is_refused_not_labelled(inputs, tmp_path):
    """Three flipped bytes: the decoder conceals the damage (decord returns frames and only prints to
    stderr); the build must refuse the clip with a reason instead of labelling damaged frames."""
    import numpy as np

    from fwdata.dataset.video import decode_problems, read_frames

    src = next((inputs / "videos").glob("synth_orbit_*.mp4"))
    base = src.read_bytes()
    assert decode_problems(src, 0.0, 2.1) == []
    rng = np.random.default_rng(1)
    damaged = tmp_path / "damaged.mp4"
    for _ in range(40):  # find flips that decode "fine" but make the decoder complain (most do)
        data = bytearray(base)
        for off in rng.integers(len(base) // 10, len(base), 3):
            data[off] ^= 0xFF
        damaged.write_bytes(bytes(data))
        try:
            read_frames(damaged)
        except Exception:
            continue
        if decode_problems(damaged, 0.0, 2.1):
            break
    else:
        pytest.fail("no concealed damage found in 40 tries")
    plan = plan_video(damaged, OPTS).clips[0]
    job = ClipJob(plan=plan, config=load_config(None, {"clips": OPTS.model_dump()}), out=tmp_path / "ds")
    with pytest.raises(StepError, match="the source is damaged: the decoder reported"):
        step_decode(job)


def test_reruns_never_take_their_own_clips_never_mix_clip_options_and_keep_old_failures(inputs, tmp_path):
    from fwdata.build.pipeline import ConfigError, build_dataset

    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    folder_a.mkdir()
    folder_b.mkdir()
    shutil.copy(next((inputs / "videos").glob("synth_forward_*.mp4")), folder_a / "forward.mp4")
    (folder_a / "notes.mp4").write_text("not a video\n")
    shutil.copy(next((inputs / "videos").glob("synth_pan_*.mp4")), folder_b / "pan.mp4")
    ds = folder_a / "ds"  # the dataset inside an input folder
    over = {"clips": {"num_frames": 17, "height": 128, "width": 224, "stride": 2}, "depth": {"model": "random-tiny"}}
    first = build_dataset([folder_a], ds, load_config(None, over))
    assert first.built == 1 and [f.source for f in first.failures] == [str(folder_a / "notes.mp4")]
    again = build_dataset([folder_a], ds, load_config(None, over))
    assert (again.num_videos, again.built, again.skipped) == (2, 0, 1), "the dataset's own videos are not inputs"

    other = {**over, "clips": {**over["clips"], "num_frames": 9}}
    with pytest.raises(ConfigError, match="num_frames 17 -> 9"):
        build_dataset([folder_b], ds, load_config(None, other))

    build_dataset([folder_b], ds, load_config(None, over))
    from fwdata.dataset.contract import load_metadata

    meta = load_metadata(ds)
    assert len(meta.samples) == 2
    assert [(f.source, f.run) for f in meta.failures] == [(str(folder_a / "notes.mp4"), 1)], \
        "a failure of an earlier run stays listed, with the run that last saw it"
    assert [r.failed for r in meta.provenance.runs] == [1, 1, 0]


def test_a_text_file_named_on_the_command_line_is_not_a_readable_video(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video\n")
    error = plan_video(notes, OPTS).error
    assert error.startswith("not a readable video") and "seek_accurate" not in error


@pytest.mark.parametrize("offline", ["1", ""])
def test_an_unavailable_depth_model_fails_at_once(monkeypatch, tmp_path, offline):
    """No local copy and no way to reach the hub: one clear line within seconds, not 30 s of retries."""
    import socket
    import time

    from fwdata.build.depth import DepthModelError, DepthOptions, check_model_available

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    if not offline:  # the hub's name does not resolve (as on a machine without internet)
        def no_dns(*a, **k):
            raise socket.gaierror(-2, "Name or service not known")
        monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.perf_counter()
    with pytest.raises(DepthModelError, match="not in the local cache.*hf download"):
        check_model_available(DepthOptions(model="someone/not-cached-depth-model"))
    assert time.perf_counter() - t0 < 10


def test_info_on_an_interrupted_build_says_how_to_finish_it(tmp_path):
    import subprocess
    import sys

    from fwdata.dataset.layout import MARKER_DIR

    (tmp_path / MARKER_DIR).mkdir(parents=True)
    (tmp_path / MARKER_DIR / "a-000000-000000000000.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "fwdata.cli", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    message = " ".join(r.stderr.split())
    assert "unfinished build (1 clip finished" in message and "fwdata build" in message

