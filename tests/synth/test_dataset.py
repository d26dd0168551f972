"""`fwdata synth`: rendered clips written as a ground-truth dataset in the contract."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from fwdata.synth import render as synth
from fwdata.dataset import camera
from fwdata.cli import app
from fwdata.dataset.contract import DEPTH_NPZ, POINTS_NPZ, load_metadata, load_npz, read_camera_json
from fwdata.synth.dataset import SynthOptions, synthetic_id, write_synthetic_dataset
from fwdata.dataset.video import read_frames

OPTS = SynthOptions(num_scenes=2, num_frames=9, height=64, width=96, path_kinds=["orbit", "pan"], write_ply=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, OPTS)
    return out


def test_dataset_holds_the_true_geometry(dataset):
    meta = load_metadata(dataset)
    assert [s.id for s in meta.samples] == sorted([synthetic_id(0, "orbit", 9), synthetic_id(1, "pan", 9)])
    s = meta.sample(synthetic_id(0, "orbit", 9))
    clip = synth.make_clip(0, "orbit", num_frames=9, height=64, width=96)
    cams = read_camera_json(dataset / s.paths.camera_json)
    # frame 0 is the world frame and relative motions equal the renderer's
    np.testing.assert_allclose(cams.w2c_array()[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(cams.w2c_array(), camera.relative_to_first(clip.w2c), atol=1e-12)
    np.testing.assert_allclose(cams.intrinsics_array()[3], clip.K)
    depth = load_npz(dataset / s.paths.depth, DEPTH_NPZ, s.dims)
    np.testing.assert_array_equal(depth["depth"], clip.depth)
    assert depth["valid"].all()
    # point maps: the frame-0 camera frame, so frame 0's points are its depth unprojected
    pts = load_npz(dataset / s.paths.points, POINTS_NPZ, s.dims)["points"].astype(np.float64)
    expected = camera.unproject_depth(clip.depth[0].astype(np.float64), clip.K)
    np.testing.assert_allclose(pts[0], expected, rtol=2e-3, atol=2e-3)
    # later frames' points lie on the scene surfaces, moved into the frame-0 camera frame
    world = camera.transform_points(camera.invert_pose(clip.w2c[0]), pts[8].reshape(-1, 3))
    assert np.median(np.abs(synth.surface_distance(clip_scene(0), world))) < 5e-3
    frames = read_frames(dataset / s.paths.video)
    assert frames.shape == clip.frames.shape
    assert np.abs(frames.astype(float) - clip.frames).mean() < 12  # H.264 at crf 18 on busy texture
    assert s.scale == "metric" and s.fps == 16.0


def clip_scene(seed):
    return synth.make_scene(seed)


def test_rerun_skips_finished_clips(dataset):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*.npz")}
    meta = write_synthetic_dataset(dataset, OPTS)
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*.npz")} == before
    assert meta.statistics.num_samples == 2


def test_same_seed_gives_the_same_bytes(dataset, tmp_path):
    write_synthetic_dataset(tmp_path, SynthOptions(num_scenes=1, num_frames=9, height=64, width=96,
                                                   path_kinds=["orbit"], write_ply=False))
    sid = synthetic_id(0, "orbit", 9)
    for sub in ("videos/{}.mp4", "depth/{}.npz", "camera_params/{}.json"):
        rel = sub.format(sid)
        assert (tmp_path / rel).read_bytes() == (dataset / rel).read_bytes(), rel


def test_cli_rejects_bad_options(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["synth", str(tmp_path), "--frames", "10"])
    assert r.exit_code == 2 and "4k+1" in r.output
    r = runner.invoke(app, ["synth", str(tmp_path), "--paths", "spiral"])
    assert r.exit_code == 2 and "unknown camera path kinds" in r.output


def test_no_ply_lists_no_ply_and_validates(tmp_path):
    """`synth --no-ply` writes no .ply and its records name none (the contract's points_ply is optional),
    so validate's schema checks pass; a record that names a .ply the dataset lacks still fails."""
    import json

    runner = CliRunner()
    ds = tmp_path / "ds"
    r = runner.invoke(app, ["synth", str(ds), "--scenes", "1", "--frames", "9", "--height", "64", "--width", "96",
                            "--paths", "orbit", "--no-ply", "-q"])
    assert r.exit_code == 0, r.output
    assert not list(ds.rglob("*.ply"))
    rec = load_metadata(ds).samples[0]
    assert rec.paths.points_ply is None and not any(p.endswith(".ply") for p in rec.paths.all())
    v = runner.invoke(app, ["validate", str(ds), "--format", "json", "-j", "0"])
    report = json.loads(v.stdout)
    assert not [f for f in report["findings"] if f["check"].startswith("schema.")], report["findings"]
    assert v.exit_code == 0, v.output

    raw = json.loads((ds / "metadata.json").read_text())
    listed = f"points/{rec.id}.ply"
    raw["samples"][0]["paths"]["points_ply"] = listed
    (ds / "metadata.json").write_text(json.dumps(raw, indent=1))
    v = runner.invoke(app, ["validate", str(ds), "--format", "json", "-j", "0"])
    assert v.exit_code == 1
    assert [(f["check"], f["file"]) for f in json.loads(v.stdout)["findings"]
            if f["check"].startswith("schema.")] == [("schema.missing_file", listed)]
