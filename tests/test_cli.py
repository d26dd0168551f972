"""Command-line behaviour shared by `fwdata` and `fwmodel`: help, version, doctor, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fwdata import __version__
from fwdata.cli import app as fwdata_app
from fwdata.doctor import DoctorOptions, collect, estimate_dataset_bytes
from fwmodel.cli import app as fwmodel_app

runner = CliRunner()


@pytest.mark.parametrize("app", [fwdata_app, fwmodel_app])
def test_version_and_help(app):
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "doctor" in r.output


def test_doctor_reports_missing_depth_model_and_exits_1(tmp_path):
    r = runner.invoke(fwdata_app, ["doctor", "--out", str(tmp_path), "--depth-model", str(tmp_path / "no-such-model")])
    assert r.exit_code == 1
    problems = [line for line in r.output.replace("\n  ", " ").splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1 and "depth model" in problems[0] and "no-such-model" in problems[0]


def test_doctor_passes_with_random_tiny_model(tmp_path):
    r = runner.invoke(fwdata_app, ["doctor", "--out", str(tmp_path), "--depth-model", "random-tiny"])
    assert r.exit_code == 0, r.output
    assert "all required checks passed" in r.output


def test_doctor_requires_a_gpu_only_when_asked(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    checks = {c.name: c for c in collect(DoctorOptions(path=tmp_path, need_gpu=True))}
    assert not checks["gpus"].ok and checks["gpus"].required


def test_doctor_disk_check_fails_when_the_estimate_exceeds_free_space(tmp_path):
    checks = {c.name: c for c in collect(DoctorOptions(path=tmp_path / "a" / "b", required_free_bytes=10**18))}
    assert not checks["disk"].ok and "needed" in checks["disk"].detail


def test_disk_estimate_grows_with_the_inputs(tmp_path):
    import numpy as np

    from fwdata.dataset.video import write_mp4

    v = tmp_path / "v.mp4"
    write_mp4(v, np.zeros((20, 32, 64, 3), np.uint8), fps=10)
    (tmp_path / "bad.mp4").write_text("junk")
    from fwdata.build.clips import ClipOptions

    opts = ClipOptions(num_frames=9, height=32, width=64)  # 10 fps -> stride 1: clips at frames 0 and 9
    a, b = estimate_dataset_bytes([v], opts), estimate_dataset_bytes([v, v, tmp_path / "bad.mp4"], opts)
    one, clips1, two, clips2 = a.bytes, a.clips, b.bytes, b.clips
    assert (clips1, clips2) == (2, 4) and two == 2 * one > 2 * 9 * 32 * 64 * 10


def test_fwmodel_doctor_names_missing_weights(tmp_path):
    r = runner.invoke(fwmodel_app, ["doctor", "--output", str(tmp_path), "--weights", str(tmp_path / "wan")])
    problems = [line for line in r.output.replace("\n  ", " ").splitlines() if line.startswith("PROBLEM wan2.1 weights")]
    assert r.exit_code == 1 and len(problems) == 1 and "not found at" in problems[0], r.output


def test_schema_check_detects_drift(tmp_path):
    r = runner.invoke(fwdata_app, ["schema", "check", str(tmp_path)])
    assert r.exit_code == 1 and "out of date" in r.output
    assert runner.invoke(fwdata_app, ["schema", "export", str(tmp_path)]).exit_code == 0
    assert runner.invoke(fwdata_app, ["schema", "check", str(tmp_path)]).exit_code == 0
    schema = json.loads((tmp_path / "metadata.schema.json").read_text())
    assert schema["title"] == "DatasetMetadata"


def test_info_on_a_missing_dataset_is_a_usage_error(tmp_path):
    r = runner.invoke(fwdata_app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "metadata.json: missing" in r.output
