"""`fwdata compare`: a built dataset measured against ground truth.

The "built" datasets here are ground-truth datasets rewritten with known damage (a scale change,
a focal error, depth off by a known factor, a clip taken every 2nd frame, a resize), so every
number the comparison reports has a known right answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fwdata.cli import app
from fwdata.dataset.contract import DEPTH_NPZ, CameraFile, load_metadata, load_npz, read_camera_json
from fwdata.compare import CompareError, compare_datasets
from fwdata.dataset.store import SampleData, write_metadata, write_sample
from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
from fwdata.dataset.video import read_frames

runner = CliRunner()


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("truth")
    write_synthetic_dataset(root, SynthOptions(num_scenes=2, num_frames=17, height=64, width=96,
                                               path_kinds=["orbit", "forward"], write_ply=False))
    return root


def rewrite(truth: Path, out: Path, change) -> Path:
    """Copy `truth` into `out`, passing each sample through `change(record, data) -> (record, data)`."""
    meta = load_metadata(truth)
    samples = []
    for rec in meta.samples:
        depth = load_npz(truth / rec.paths.depth, DEPTH_NPZ, rec.dims)
        data = SampleData(frames=read_frames(truth / rec.paths.video), depth=depth["depth"],
                          depth_valid=depth["valid"], cameras=read_camera_json(truth / rec.paths.camera_json))
        rec, data = change(rec, data)
        write_sample(out, rec, data, write_ply=False)
        samples.append(rec)
    write_metadata(out, meta.model_copy(update={"samples": samples}))
    return out


def cameras_like(cams: CameraFile, w2c=None, fx_factor=1.0, keep=None, width=None, height=None) -> CameraFile:
    keep = list(range(cams.num_frames)) if keep is None else keep
    K = cams.intrinsics_array()[keep].copy()
    K[:, 0, 0] *= fx_factor
    K[:, 1, 1] *= fx_factor
    return CameraFile.from_arrays(cams.w2c_array()[keep] if w2c is None else w2c, K,
                                  width=width or cams.width, height=height or cams.height, scale=cams.scale,
                                  source_frames=[cams.frames[i].source_frame for i in keep],
                                  timestamps=[cams.frames[i].timestamp for i in keep])


def test_truth_against_itself_is_exact(truth):
    df, unmatched = compare_datasets(truth, truth)
    assert unmatched == [] and len(df) == 2
    assert (df["frames"] == 17).all() and (df["registered_pct"] == 100).all()
    np.testing.assert_allclose(df[["ate_pct", "rpe_rot_deg", "focal_err_pct", "depth_absrel_pct"]].to_numpy(float),
                               0, atol=1e-6)
    np.testing.assert_allclose(df["scale"], 1.0, rtol=1e-9)
    assert (df["delta1_pct"] == 100).all() and (df["point_err_pct"] < 0.1).all()  # points are float16


def test_known_errors_are_measured(truth, tmp_path):
    """World scaled by 1/2.5 (depth with it), focal 3 % long, then depth 10 % too far."""

    def change(rec, data):
        w2c = data.cameras.w2c_array()
        w2c[:, :3, 3] /= 2.5
        cams = cameras_like(data.cameras, w2c=w2c, fx_factor=1.03)
        depth = data.depth / 2.5 * 1.1
        return rec.model_copy(update={"scale": "normalized"}), SampleData(data.frames, depth, data.depth_valid, cams)

    built = rewrite(truth, tmp_path / "built", change)
    df, _ = compare_datasets(built, truth)
    np.testing.assert_allclose(df["scale"], 2.5, rtol=1e-6)
    np.testing.assert_allclose(df["ate_pct"], 0, atol=1e-6)
    np.testing.assert_allclose(df["focal_err_pct"], 3.0, atol=1e-6)
    np.testing.assert_allclose(df["depth_absrel_pct"], 10.0, atol=1e-3)
    assert (df["delta1_pct"] == 100).all()
    # point maps come from depth and focal: pixel (x, y) = ((u - cx) / fx, (v - cy) / fy) lands at
    # 1.1 z (x / 1.03, y / 1.03, 1) instead of z (x, y, 1)
    meta = load_metadata(truth)
    for rec, err in zip(meta.samples, df["point_err_pct"]):
        cams = read_camera_json(truth / rec.paths.camera_json)
        valid = load_npz(truth / rec.paths.depth, DEPTH_NPZ, rec.dims)["valid"]
        f = cams.frames[0]
        x = (np.arange(rec.width) + 0.5 - f.cx) / f.fx
        y = (np.arange(rec.height) + 0.5 - f.cy) / f.fy
        a = 1.1 / 1.03 - 1.0
        per_pixel = np.sqrt((a * x[None, :]) ** 2 + (a * y[:, None]) ** 2 + 0.1 ** 2)
        expected = 100 * np.mean(np.broadcast_to(per_pixel, valid.shape)[valid])
        assert err == pytest.approx(expected, rel=0.01)


def test_frames_pair_by_source_frame_and_focal_compares_in_source_pixels(truth, tmp_path):
    """A clip of every 2nd truth frame, resized to half: cameras still match exactly; depth is skipped."""

    def change(rec, data):
        keep = list(range(0, 17, 2))  # 9 frames = 4k+1
        cams = cameras_like(data.cameras, keep=keep, fx_factor=0.5, width=48, height=32)
        K = cams.intrinsics_array()
        K[:, 0, 2] *= 0.5
        K[:, 1, 2] *= 0.5
        cams = CameraFile.from_arrays(cams.w2c_array(), K, width=48, height=32, scale=cams.scale,
                                      source_frames=[f.source_frame for f in cams.frames])
        frames = data.frames[keep][:, ::2, ::2]
        depth, valid = data.depth[keep][:, ::2, ::2], data.depth_valid[keep][:, ::2, ::2]
        source = rec.source.model_copy(update={"stride": 2, "resize_scale": (0.5, 0.5)})
        new = rec.model_copy(update={"num_frames": 9, "height": 32, "width": 48, "source": source})
        return new, SampleData(np.ascontiguousarray(frames), depth, valid, cams)

    built = rewrite(truth, tmp_path / "built", change)
    df, _ = compare_datasets(built, truth)
    assert (df["frames"] == 9).all()
    np.testing.assert_allclose(df[["ate_pct", "rpe_rot_deg", "focal_err_pct"]].to_numpy(float), 0, atol=1e-6)
    # the same crop at another size: depth and points are compared on the built grid (nearest truth pixel)
    assert df["depth_absrel_pct"].notna().all() and (df["depth_absrel_pct"] < 5.0).all(), df["depth_absrel_pct"]
    assert (df["point_err_pct"] < 5.0).all()


def test_damaged_sample_is_reported_and_the_rest_compared(truth, tmp_path):
    built = rewrite(truth, tmp_path / "built", lambda r, d: (r, d))
    meta = load_metadata(built)
    (built / meta.samples[0].paths.depth).write_bytes(b"not an npz")
    before = {p: p.read_bytes() for p in built.rglob("*") if p.is_file()}
    df, _ = compare_datasets(built, truth)
    assert df.loc[0, "note"].startswith("not compared") and np.isnan(df.loc[0, "registered_pct"])
    assert df.loc[1, "ate_pct"] < 1e-6
    assert {p: p.read_bytes() for p in built.rglob("*") if p.is_file()} == before, "compare must not modify data"


def test_cli_formats_and_usage_errors(truth, tmp_path):
    r = runner.invoke(app, ["compare", str(truth), "--truth", str(truth), "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == 2 and rows[0]["scale"] == pytest.approx(1.0)
    r = runner.invoke(app, ["compare", str(truth), "--truth", str(truth)])
    assert r.exit_code == 0 and "ATE%" in r.output and any(line.startswith("mean ") for line in r.output.splitlines())
    out = tmp_path / "acc.csv"
    r = runner.invoke(app, ["compare", str(truth), "--truth", str(truth), "-f", "csv", "-o", str(out)])
    assert r.exit_code == 0 and out.read_text().startswith("sample,truth,frames")
    # nothing in common: a dataset whose sources are named differently
    other = rewrite(truth, tmp_path / "other", lambda r, d: (r.model_copy(
        update={"source": r.source.model_copy(update={"path": "elsewhere/unrelated.mp4"})}), d))
    with pytest.raises(CompareError, match="no sample"):
        compare_datasets(other, truth)
    r = runner.invoke(app, ["compare", str(other), "--truth", str(truth)])
    assert r.exit_code == 2 and "no sample" in r.output
    r = runner.invoke(app, ["compare", str(tmp_path / "missing"), "--truth", str(truth)])
    assert r.exit_code == 2 and "missing" in r.output
    r = runner.invoke(app, ["compare", str(truth), "--truth", str(truth), "-f", "xml"])
    assert r.exit_code == 2
