"""The same inputs and options give the same bytes, however the build was run.

Three builds of the same two videos with the same options: in this process (one worker, torch on two
threads beforehand), with two worker processes, and again with two workers through the command
line in a fresh process. Every file must be byte-identical; in metadata.json only the build time
and the command line may differ. Depth comes from `random-tiny` so the torch model really runs
(its results depend on torch's thread count, which every clip must set the same way).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_same_files, dataset_files
import torch

from fwdata.build.pipeline import build_dataset, load_config
from fwdata.dataset.video import X264_OPTIONS, write_mp4, read_frames

OPTIONS = {"clips": {"num_frames": 17, "height": 128, "width": 224, "stride": 2}, "depth": {"model": "random-tiny"},
           "write_ply": True}
VOLATILE = ("created", "command", "runs")  # provenance fields that describe the runs, not the data



def _comparable(files: dict[str, bytes]) -> dict[str, bytes]:
    out = dict(files)
    meta = json.loads(out.pop("metadata.json"))
    meta.pop("name")  # the output folder's name by default
    for key in VOLATILE:
        meta["provenance"].pop(key)
    out["metadata.json"] = json.dumps(meta, sort_keys=True).encode()
    return out



@pytest.fixture(scope="module")
def three_builds(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    videos = [str(p) for p in sorted((inputs / "videos").glob("synth_*.mp4"))][:2]  # two clips: a worker each
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the main process's own setting must not reach the clips
    try:
        build_dataset(videos, root / "one_worker", load_config(None, {**OPTIONS, "workers": 1}))
        assert torch.get_num_threads() == 2, "the build restores the caller's torch threads"
    finally:
        torch.set_num_threads(before)
    build_dataset(videos, root / "two_workers", load_config(None, {**OPTIONS, "workers": 2}))
    cli = [sys.executable, "-m", "fwdata.cli", "build", *videos, "--out", str(root / "cli"), "-q", "-j", "2",
           "--frames", "17", "--height", "128", "--width", "224", "--stride", "2", "--depth-model", "random-tiny"]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return {name: dataset_files(root / name) for name in ("one_worker", "two_workers", "cli")}


def test_builds_are_byte_identical_whatever_the_workers(three_builds):
    one, two, cli = (_comparable(three_builds[k]) for k in ("one_worker", "two_workers", "cli"))
    assert sum(name.startswith("videos/") for name in one) == 2, "every clip was built"
    assert_same_files(one, two, "1 worker vs 2 workers")
    assert_same_files(two, cli, "2 workers, run twice")


def test_metadata_differs_only_in_run_fields(three_builds):
    a = json.loads(three_builds["one_worker"]["metadata.json"])
    b = json.loads(three_builds["cli"]["metadata.json"])
    assert a["provenance"]["command"] != b["provenance"]["command"]  # the comparison above really masked something
    models = {m["role"]: m for m in a["provenance"]["models"]}
    assert "asm=0" in models["video encoding"]["name"], "the encoder settings are recorded"
    assert a["provenance"]["options"]["threads"] == 1
    assert "workers" not in a["provenance"]["options"], "how many workers ran is not part of the data"


def test_encoder_gives_the_same_bytes_after_other_work(inputs, tmp_path):
    """The same frames encode to the same bytes, whatever ran in the process before."""
    frames = read_frames(next((inputs / "videos").glob("synth_orbit_*.mp4")))
    write_mp4(tmp_path / "a.mp4", frames, fps=16)
    torch.nn.functional.conv2d(torch.randn(1, 3, 64, 64), torch.randn(8, 3, 3, 3))  # other native work
    torch.set_flush_denormal(True)
    try:
        write_mp4(tmp_path / "b.mp4", frames, fps=16)
    finally:
        torch.set_flush_denormal(False)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert "asm=0" in X264_OPTIONS["x264-params"]
