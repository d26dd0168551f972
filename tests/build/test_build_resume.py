"""A build killed in the middle and run again ends with the same dataset as an uninterrupted build."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from fwdata.dataset.contract import DEPTH_NPZ, POINTS_NPZ, load_metadata, load_npz, read_camera_json
from fwdata.dataset.layout import MARKER_DIR


def _preset(path, prior) -> None:
    # the settings of conftest.BUILD_OVERRIDES, one clip at a time so the kill lands inside a clip
    path.write_text(f'workers = 1\n[clips]\nnum_frames = 33\nheight = 192\nwidth = 336\nstride = 1\n'
                    f'[depth]\nprior_dir = "{prior}"\n[sfm]\nnum_threads = 1\n')


def _build_cmd(videos, ds, preset):
    return [sys.executable, "-m", "fwdata.cli", "build", str(videos), "--out", str(ds), "--config", str(preset), "-q"]


def test_killed_build_resumes_to_the_same_dataset(inputs, main_build, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for kind in ("orbit", "forward"):  # same file names and sizes -> same sample ids as the main build
        src = next((inputs / "videos").glob(f"synth_{kind}_*.mp4"))
        shutil.copy(src, videos / src.name)
    ds = tmp_path / "ds"
    preset = tmp_path / "test.toml"
    _preset(preset, inputs / "prior")

    proc = subprocess.Popen(_build_cmd(videos, ds, preset), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    markers = ds / MARKER_DIR
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if markers.is_dir() and len(list(markers.glob("*.json"))) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the build ended before it could be killed: " + proc.stderr.read().decode()
        time.sleep(1.0)  # into the second clip
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(list(markers.glob("*.json"))) == 1, "exactly one clip was finished when the build was killed"
    assert not (ds / "metadata.json").exists()

    r = subprocess.run(_build_cmd(videos, ds, preset), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "built 1, skipped 1, failed 0" in r.stdout
    assert not [p for p in ds.rglob("*") if ".tmp-" in p.name], "temporary files of the killed run are cleaned"

    ref = main_build / "ds"
    meta, ref_meta = load_metadata(ds), load_metadata(ref)
    assert len(meta.samples) == 2
    for rec in meta.samples:
        other = ref_meta.sample(rec.id)
        assert rec.quality == other.quality and rec.notes == other.notes
        assert rec.source.model_copy(update={"path": ""}) == other.source.model_copy(update={"path": ""})
        a, b = read_camera_json(ds / rec.paths.camera_json), read_camera_json(ref / other.paths.camera_json)
        np.testing.assert_array_equal(a.w2c_array(), b.w2c_array())
        np.testing.assert_array_equal(a.intrinsics_array(), b.intrinsics_array())
        for rel, spec in ((rec.paths.depth, DEPTH_NPZ), (rec.paths.points, POINTS_NPZ)):
            x, y = load_npz(ds / rel, spec, rec.dims), load_npz(ref / rel, spec, rec.dims)
            for k in spec:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{rel}:{k}")
        assert (ds / rec.paths.video).read_bytes() == (ref / rec.paths.video).read_bytes()
        assert (ds / rec.paths.camera_txt).read_text() == (ref / rec.paths.camera_txt).read_text()
        assert (ds / rec.paths.points_ply).stat().st_size > 0
