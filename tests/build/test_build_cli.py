"""`fwdata build` from the command line with the offline random-tiny depth model, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from fwdata.dataset.contract import load_metadata


def test_random_tiny_build_from_the_command_line(inputs, tmp_path):
    video = next((inputs / "videos").glob("synth_forward_*.mp4"))
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "fwdata.cli", "build", str(video), "--out", str(out),
                        "--depth-model", "random-tiny", "--frames", "17", "--height", "192", "--width", "336",
                        "--stride", "2", "--no-ply"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    assert "1 sample (17 frames" in text and "not real" in text
    meta = load_metadata(out)
    (rec,) = meta.samples
    assert rec.num_frames == 17 and rec.source.stride == 2 and rec.fps == 8.0
    assert rec.source.start_frame == 0 and rec.paths.points_ply is None
    assert "random-tiny" in rec.depth_source
    depth_model = next(m for m in meta.provenance.models if m.role == "depth")
    assert depth_model.random_init and depth_model.name == "random-tiny"
    assert meta.provenance.command.startswith("fwdata build")
    # validation flags data made with a random model
    v = subprocess.run([sys.executable, "-m", "fwdata.cli", "validate", str(out), "--format", "json"],
                       capture_output=True, text=True)
    assert v.returncode == 1
    checks = {f["check"] for f in json.loads(v.stdout)["findings"]}
    assert "gate.random_init_model" in checks
    assert not any(c.startswith(("schema.", "integrity.")) for c in checks), checks


def test_a_second_build_into_a_busy_dataset_says_who_holds_it(inputs, tmp_path):
    import os

    from fwdata.dataset.store import write_lock

    video = next((inputs / "videos").glob("synth_forward_*.mp4"))
    out = tmp_path / "ds"
    with write_lock(out):  # this test process is "the other build"
        r = subprocess.run([sys.executable, "-m", "fwdata.cli", "build", str(video), "--out", str(out),
                            "--depth-model", "random-tiny", "--frames", "17", "--height", "192", "--width", "336",
                            "-q"], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    message = " ".join(r.stderr.split())
    assert f"is being written by pid {os.getpid()}" in message and "Traceback" not in r.stderr
    assert not (out / "metadata.json").exists() and not (out / "videos").exists(), "nothing was built"
