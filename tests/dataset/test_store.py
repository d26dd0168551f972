"""Atomic sample writing, completion markers, video round trip and the fused cloud."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fwdata.dataset import camera
from fwdata.dataset.contract import (
    DEPTH_NPZ,
    POINTS_NPZ,
    CameraFile,
    ContractError,
    DatasetMetadata,
    Provenance,
    SampleRecord,
    SourceRef,
    load_metadata,
    load_npz,
    read_camera_json,
    read_camera_txt,
    camera_txt_to_arrays,
    sample_paths,
)
from fwdata.dataset.store import SampleData, finished_records, is_finished, write_metadata, write_sample
from fwdata.dataset.video import VideoError, probe, read_frames, write_mp4

T, H, W = 5, 32, 64  # decord mis-decodes some tiny widths (48 px); 64 is fine


def make_sample(sid="t-000000-00000000"):
    rng = np.random.default_rng(1)
    # a fronto-parallel wall at z = 2 seen by a camera moving sideways
    w2c = np.stack([camera.make_pose(np.eye(3), [-0.05 * i, 0.0, 0.0]) for i in range(T)])
    K = camera.intrinsics_matrix(40.0, 40.0, W / 2, H / 2)
    cams = CameraFile.from_arrays(w2c, K, width=W, height=H, scale="metric", source_frames=[2 * i for i in range(T)])
    depth = np.full((T, H, W), 2.0, np.float32)
    depth[0, 0, 0] = np.nan  # invalid pixel must come out as depth 0, valid False
    frames = rng.integers(0, 255, (T, H, W, 3), dtype=np.uint8)
    rec = SampleRecord(
        id=sid, paths=sample_paths(sid), num_frames=T, height=H, width=W, fps=10.0, scale="metric",
        scale_source="test", depth_source="test",
        source=SourceRef(path="x.mp4", fps=20.0, num_frames=20, width=W, height=H, start_frame=0, stride=2,
                         crop_xywh=(0, 0, W, H), resize_scale=(1, 1)),
    )
    return rec, SampleData(frames=frames, depth=depth, depth_valid=np.ones((T, H, W), bool), cameras=cams)


def test_write_sample_writes_every_file_of_the_contract(tmp_path):
    rec, data = make_sample()
    write_sample(tmp_path, rec, data)
    assert is_finished(tmp_path, rec.id)
    d = load_npz(tmp_path / rec.paths.depth, DEPTH_NPZ, rec.dims)
    assert d["depth"][0, 0, 0] == 0 and not d["valid"][0, 0, 0] and d["valid"].sum() == T * H * W - 1
    p = load_npz(tmp_path / rec.paths.points, POINTS_NPZ, rec.dims)
    # points are the unprojected depth: the wall at z=2 in frame 0; frame 4's camera sits at x=+0.2
    X = p["points"].astype(np.float64)
    np.testing.assert_allclose(X[..., 2][p["valid"]], 2.0, rtol=1e-3)
    u0 = (0.5 - W / 2) / 40.0 * 2.0
    np.testing.assert_allclose(X[4, 5, 0, 0], u0 + 0.2, atol=2e-3)
    cams = read_camera_json(tmp_path / rec.paths.camera_json)
    np.testing.assert_array_equal(cams.w2c_array(), data.cameras.w2c_array())
    w2c_txt, K_txt = camera_txt_to_arrays(read_camera_txt(tmp_path / rec.paths.camera_txt), W, H)
    np.testing.assert_allclose(w2c_txt, cams.w2c_array(), atol=1e-15)
    info = probe(tmp_path / rec.paths.video)
    assert (info.num_frames, info.width, info.height) == (T, W, H) and info.fps == pytest.approx(10.0)
    assert (tmp_path / rec.paths.points_ply).stat().st_size > 0
    # no temporary files are left behind
    assert not [p for p in tmp_path.rglob(".*tmp*")]
    assert [r.id for r in finished_records(tmp_path)] == [rec.id]


def test_wrong_arrays_write_nothing(tmp_path):
    rec, data = make_sample()
    data.depth = data.depth[:, :, :-1]
    with pytest.raises((ContractError, ValueError)):
        write_sample(tmp_path, rec, data)
    assert not is_finished(tmp_path, rec.id)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_failed_write_leaves_no_sample_and_no_temp_files(tmp_path, monkeypatch):
    rec, data = make_sample()
    import fwdata.dataset.store as store

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store, "format_camera_txt", boom)  # fails after the video and npz were staged
    with pytest.raises(OSError, match="disk full"):
        write_sample(tmp_path, rec, data)
    assert not is_finished(tmp_path, rec.id)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_metadata_from_markers_round_trips(tmp_path):
    recs = []
    for sid in ("a-000000-00000000", "b-000000-00000000"):
        rec, data = make_sample(sid)
        write_sample(tmp_path, rec, data, write_ply=False)
        recs.append(rec)
    meta = write_metadata(tmp_path, DatasetMetadata(provenance=Provenance(tool_version="0", created="now"),
                                                    samples=finished_records(tmp_path)))
    back = load_metadata(tmp_path)
    assert back == meta and back.statistics.num_samples == 2 and back.splits["train"] == [r.id for r in recs]


def test_video_round_trip_and_errors(tmp_path):
    frames = np.zeros((9, 32, 64, 3), np.uint8)
    frames[:, 8:24, 8:40] = np.linspace(0, 250, 9, dtype=np.uint8)[:, None, None, None]
    p = tmp_path / "v.mp4"
    write_mp4(p, frames, fps=12.0)
    back = read_frames(p)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 2.0
    second = tmp_path / "w.mp4"
    write_mp4(second, frames, fps=12.0)
    assert p.read_bytes() == second.read_bytes()  # deterministic encoding
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        probe(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("not a video at all")
    with pytest.raises(VideoError, match="not a readable video"):
        probe(tmp_path / "text.mp4")
    with pytest.raises(VideoError, match="not found"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="out of range"):
        read_frames(p, [0, 9])


def test_a_marker_being_written_is_not_a_finished_sample(tmp_path):
    """A 0-byte temporary marker (a writer killed mid-write, or a full disk) is ignored, not parsed."""
    from fwdata.dataset.layout import marker_path, tmp_name

    rec, data = make_sample("a-000000-00000000")
    write_sample(tmp_path, rec, data, write_ply=False)
    tmp_name(marker_path(tmp_path, "b-000000-00000000")).write_bytes(b"")
    assert [r.id for r in finished_records(tmp_path)] == [rec.id]


def test_one_writer_at_a_time_and_a_dead_holders_lock_is_taken_over(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    from fwdata.dataset.layout import LOCK_FILE
    from fwdata.dataset.store import DatasetBusy, write_lock

    with write_lock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(DatasetBusy, match=f"pid {os.getpid()} on "):
            with write_lock(tmp_path):
                pass
    # a holder killed with SIGKILL leaves its file behind, but not its lock
    code = ("import sys, time; from fwdata.dataset.store import write_lock\n"
            "with write_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(DatasetBusy, match=f"pid {proc.pid} "):
            with write_lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid  # stale content
    with write_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_short_ply_write_is_an_error_and_leaves_no_sample(tmp_path, monkeypatch):
    """open3d returns True after a short write (full disk): the sample must not be marked complete."""
    import open3d as o3d

    real = o3d.io.write_point_cloud

    def short_write(path, cloud, **kw):
        ok = real(path, cloud, **kw)
        with open(path, "r+b") as f:
            f.truncate(max(0, os.path.getsize(path) - 100))
        return ok

    monkeypatch.setattr(o3d.io, "write_point_cloud", short_write)
    rec, data = make_sample()
    with pytest.raises(OSError, match="incomplete|holds"):
        write_sample(tmp_path, rec, data, write_ply=True)
    assert finished_records(tmp_path) == [] and not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_disk_full_is_a_clear_reason_and_leaves_no_sample(tmp_path, monkeypatch):
    import errno

    import fwdata.dataset.store as store
    from fwdata.build.pipeline import _reason

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "npz_bytes", full)
    rec, data = make_sample()
    with pytest.raises(OSError) as info:
        write_sample(tmp_path, rec, data, write_ply=False)
    assert "disk full" in _reason(info.value) and "run the same command again" in _reason(info.value)
    assert finished_records(tmp_path) == [] and not [p for p in tmp_path.rglob("*") if p.is_file()]
