"""`fwdata export`: COLMAP (read back with pycolmap), nerfstudio transforms.json (axis convention pinned
by known values, projections against ours) and the DiffSynth metadata CSV (read back with pandas)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fwdata.cli import app
from fwdata.dataset import camera
from fwdata.dataset.contract import CameraFile, load_metadata, read_camera_json
from fwdata.dataset.ply import read_ply_xyz
from fwdata.dataset.video import read_frames
from fwdata.export import ExportError, export_dataset
from fwdata.export.common import SparseCloud, point_subsample, sample_depth
from fwdata.export.colmap import model_spec
from fwdata.export.nerfstudio import DEPTH_PNG_SCALE, transforms
from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export") / "ds"
    write_synthetic_dataset(root, SynthOptions(num_scenes=2, num_frames=9, height=96, width=160, write_ply=False,
                                               path_kinds=["orbit", "forward"]))
    return root


@pytest.fixture(scope="module")
def records(dataset):
    return load_metadata(dataset).samples


def _camera_file(w2c, K, width=160, height=96) -> CameraFile:
    w2c = np.asarray(w2c, dtype=np.float64)
    return CameraFile.from_arrays(w2c, K, width, height, "metric")


# A camera at (1, 2, 3) looking along world +x with world up = -y (our y-down world) and its known
# view of the point (5, 2.5, 3.2): camera coordinates (-0.2, 0.5, 4) -> pixel (80 - 100*0.05, 48 + 110*0.125).
EYE = np.array([1.0, 2.0, 3.0])
K_KNOWN = camera.intrinsics_matrix(100.0, 110.0, 80.0, 48.0)
POINT = np.array([5.0, 2.5, 3.2])
PIXEL = np.array([75.0, 61.75])


def _known_cameras() -> CameraFile:
    c2w = camera.look_at(EYE, EYE + [1.0, 0.0, 0.0])
    return _camera_file(np.stack([np.eye(4), camera.invert_pose(c2w)]), K_KNOWN)


# ------------------------------------------------------------------------------------------- colmap


def test_colmap_known_camera_projects_through_pycolmap(tmp_path):
    """Our w2c is COLMAP's cam_from_world and our principal point is COLMAP's (both pixel centres at +0.5)."""
    import pycolmap

    from fwdata.export.colmap import write_model

    cams = _known_cameras()
    uv, _ = camera.project_points(POINT[None], K_KNOWN, cams.w2c_array()[1])
    np.testing.assert_allclose(uv[0], PIXEL, atol=1e-12)
    cloud = SparseCloud(POINT[None], np.array([[10, 20, 30]], np.uint8), np.array([1]), PIXEL[None])
    write_model(tmp_path, model_spec(cams, cloud, "png"))
    rec = pycolmap.Reconstruction(str(tmp_path))
    assert rec.num_cameras() == 1 and rec.num_images() == 2 and rec.num_points3D() == 1
    assert rec.cameras[1].model.name == "PINHOLE"
    np.testing.assert_array_equal(rec.cameras[1].params, [100.0, 110.0, 80.0, 48.0])
    np.testing.assert_allclose(rec.images[1].cam_from_world().rotation.quat, [0, 0, 0, 1], atol=1e-15)  # identity
    np.testing.assert_allclose(rec.images[2].project_point(POINT), PIXEL, atol=1e-9)
    np.testing.assert_allclose(rec.images[2].projection_center(), EYE, atol=1e-12)
    pt = next(iter(rec.points3D.values()))
    assert [(e.image_id, e.point2D_idx) for e in pt.track.elements] == [(2, 0)]
    np.testing.assert_array_equal(pt.color, [10, 20, 30])
    np.testing.assert_allclose(rec.images[2].points2D[0].xy, PIXEL)


def test_colmap_one_camera_per_distinct_intrinsics():
    K2 = camera.intrinsics_matrix(120.0, 120.0, 80.0, 48.0)
    cams = _camera_file(np.stack([np.eye(4)] * 3), np.stack([K_KNOWN, K2, K_KNOWN]))
    empty = SparseCloud(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0, np.int64), np.zeros((0, 2)))
    spec = model_spec(cams, empty, "png")
    assert spec["cameras"] == [(1, 160, 96, [100.0, 110.0, 80.0, 48.0]), (2, 160, 96, [120.0, 120.0, 80.0, 48.0])]
    assert [im[2] for im in spec["images"]] == [1, 2, 1]


def test_colmap_export_reads_back_with_pycolmap(dataset, records, tmp_path):
    import pycolmap

    res = export_dataset(dataset, "colmap", tmp_path / "colmap", max_points=5000)
    assert res.samples == [r.id for r in records]
    for r in records:
        ours = read_camera_json(dataset / r.paths.camera_json)
        folder = tmp_path / "colmap" / r.id
        rec = pycolmap.Reconstruction(str(folder / "sparse" / "0"))
        assert rec.num_images() == r.num_frames and rec.num_cameras() == 1
        frames = read_frames(dataset / r.paths.video)
        for i, f in enumerate(ours.frames):
            image = rec.images[i + 1]
            cam = rec.cameras[image.camera_id]
            assert cam.model.name == "PINHOLE" and (cam.width, cam.height) == (r.width, r.height)
            np.testing.assert_allclose(cam.params, [f.fx, f.fy, f.cx, f.cy], rtol=0, atol=1e-6)
            np.testing.assert_allclose(image.cam_from_world().matrix(), np.asarray(f.w2c)[:3], rtol=0, atol=1e-6)
            from PIL import Image

            np.testing.assert_array_equal(np.asarray(Image.open(folder / "images" / image.name)), frames[i])
        # every point: its one observation is where pycolmap projects it, and it lies on the depth map
        depth, valid = sample_depth(dataset, r)
        assert 0 < rec.num_points3D() <= 5000
        K, w2c = ours.intrinsics_array(), ours.w2c_array()
        for pid, pt in list(rec.points3D.items())[::50]:
            (el,) = pt.track.elements
            image = rec.images[el.image_id]
            xy = image.points2D[el.point2D_idx].xy
            np.testing.assert_allclose(image.project_point(pt.xyz), xy, atol=1e-6)
            u, v = int(xy[0]), int(xy[1])
            fi = el.image_id - 1
            assert valid[fi, v, u]
            uv, z = camera.project_points(pt.xyz[None], K[fi], w2c[fi])
            np.testing.assert_allclose(uv[0], xy, atol=1e-6)
            assert z[0] == pytest.approx(float(depth[fi, v, u]), rel=1e-6)
            np.testing.assert_array_equal(pt.color, frames[fi, v, u])


def test_colmap_text_model(dataset, records, tmp_path):
    import pycolmap

    export_dataset(dataset, "colmap", tmp_path, samples=[records[0].id], text=True, max_points=100)
    sparse = tmp_path / records[0].id / "sparse" / "0"
    assert (sparse / "images.txt").is_file() and not (sparse / "images.bin").exists()
    rec = pycolmap.Reconstruction(str(sparse))
    ours = read_camera_json(dataset / records[0].paths.camera_json)
    np.testing.assert_allclose(rec.images[3].cam_from_world().matrix(), ours.w2c_array()[2, :3], atol=1e-6)


# --------------------------------------------------------------------------------------- nerfstudio


def _nerfstudio_pixel(T: np.ndarray, fl_x, fl_y, cx, cy, X: np.ndarray) -> np.ndarray:
    """nerfstudio's pinhole model: rays through image coordinate (x, y) have camera (OpenGL) direction
    ((x - cx) / fl_x, -(y - cy) / fl_y, -1) rotated by transform_matrix; invert it for a world point."""
    p = (np.linalg.inv(T) @ np.append(X, 1.0))[:3]
    return np.array([cx + fl_x * p[0] / -p[2], cy - fl_y * p[1] / -p[2]])


def test_nerfstudio_axis_convention_known_values():
    doc = transforms(_known_cameras(), "png")
    assert doc["camera_model"] == "OPENCV"
    assert (doc["fl_x"], doc["fl_y"], doc["cx"], doc["cy"], doc["w"], doc["h"]) == (100.0, 110.0, 80.0, 48.0, 160, 96)
    # our frame-0 camera looks down +z with y down: in OpenGL axes y and z flip
    np.testing.assert_array_equal(doc["frames"][0]["transform_matrix"], np.diag([1.0, -1.0, -1.0, 1.0]))
    # looking along world +x, world up -y: right = -z, up = -y, back = -x, centre (1, 2, 3)
    expected = [[0, 0, -1, 1], [0, -1, 0, 2], [-1, 0, 0, 3], [0, 0, 0, 1]]
    np.testing.assert_allclose(doc["frames"][1]["transform_matrix"], expected, atol=1e-15)
    T = np.asarray(doc["frames"][1]["transform_matrix"])
    np.testing.assert_allclose(_nerfstudio_pixel(T, 100.0, 110.0, 80.0, 48.0, POINT), PIXEL, atol=1e-12)
    assert [f["file_path"] for f in doc["frames"]] == ["images/frame_00001.png", "images/frame_00002.png"]
    assert doc["frames"][0]["depth_file_path"] == "depth/frame_00001.png"


def test_nerfstudio_per_frame_intrinsics_when_they_differ():
    K2 = camera.intrinsics_matrix(120.0, 121.0, 81.0, 47.0)
    doc = transforms(_camera_file(np.stack([np.eye(4)] * 2), np.stack([K_KNOWN, K2])), "jpg")
    assert "fl_x" not in doc and (doc["w"], doc["h"]) == (160, 96)
    f1 = doc["frames"][1]
    assert (f1["fl_x"], f1["fl_y"], f1["cx"], f1["cy"]) == (120.0, 121.0, 81.0, 47.0)
    assert f1["file_path"] == "images/frame_00002.jpg" and f1["depth_file_path"] == "depth/frame_00002.png"


def test_nerfstudio_export_projects_like_ours(dataset, records, tmp_path):
    from PIL import Image

    export_dataset(dataset, "nerfstudio", tmp_path, max_points=2000)
    rng = np.random.default_rng(0)
    for r in records:
        folder = tmp_path / r.id
        doc = json.loads((folder / "transforms.json").read_text())
        ours = read_camera_json(dataset / r.paths.camera_json)
        depth, valid = sample_depth(dataset, r)
        frames = read_frames(dataset / r.paths.video)
        assert len(doc["frames"]) == r.num_frames
        for i, (f, entry) in enumerate(zip(ours.frames, doc["frames"])):
            T = np.asarray(entry["transform_matrix"])
            np.testing.assert_allclose(T[:3, 3], camera.camera_centers(np.asarray(f.w2c)), atol=1e-9)
            X = camera.camera_centers(np.asarray(f.w2c)) + camera.invert_pose(np.asarray(f.w2c))[:3, :3] @ (
                rng.uniform(-1, 1, 3) * [1, 1, 0] + [0, 0, 3])  # a point 3 units in front of the camera
            ours_uv, _ = camera.project_points(X[None], f.K(), np.asarray(f.w2c))
            np.testing.assert_allclose(_nerfstudio_pixel(T, doc["fl_x"], doc["fl_y"], doc["cx"], doc["cy"], X),
                                       ours_uv[0], atol=1e-9)
            np.testing.assert_array_equal(np.asarray(Image.open(folder / entry["file_path"])), frames[i])
            d = np.asarray(Image.open(folder / entry["depth_file_path"]))
            assert d.dtype == np.uint16 and d.shape == (r.height, r.width)
            ok = valid[i] & (depth[i] * DEPTH_PNG_SCALE < 65535)
            np.testing.assert_allclose(d[ok] * 1e-3, depth[i][ok], atol=0.5e-3 + 1e-9)  # nerfstudio's default scale
            assert (d[~valid[i]] == 0).all()
        ply = read_ply_xyz(folder / doc["ply_file_path"])
        assert 0 < len(ply) <= 2000
        cloud = point_subsample(depth, valid, ours, frames, 2000)
        np.testing.assert_allclose(ply, cloud.xyz, rtol=1e-6, atol=1e-6)  # float32 in the file


# ---------------------------------------------------------------------------------------- diffsynth


def test_diffsynth_csv_reads_back_with_pandas(dataset, records, tmp_path):
    import pandas as pd

    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({records[0].id: "a textured room, the camera circles, with a comma"}))
    out = tmp_path / "ds_export"
    export_dataset(dataset, "diffsynth", out, prompt="a room", captions=caps)
    df = pd.read_csv(out / "metadata.csv", keep_default_na=False)
    assert list(df.columns[:2]) == ["video", "prompt"]
    assert list(df["id"]) == [r.id for r in records]
    assert list(df["prompt"]) == ["a textured room, the camera circles, with a comma", "a room"]
    for r, (_, row) in zip(records, df.iterrows()):
        for col, rel in (("video", r.paths.video), ("depth", r.paths.depth), ("points", r.paths.points),
                         ("camera_json", r.paths.camera_json), ("camera_txt", r.paths.camera_txt)):
            assert not Path(row[col]).is_absolute()
            assert (out / row[col]).resolve() == (dataset / rel).resolve() and (out / row[col]).is_file()
        assert row["points_ply"] == ""  # synthesised without .ply
        assert (row["num_frames"], row["height"], row["width"], row["scale"]) == (9, 96, 160, "metric")


def test_diffsynth_skips_gated_out_unless_named(dataset, records, tmp_path):
    import shutil

    import pandas as pd

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["samples"][0]["status"] = "gated_out"
    (copy / "metadata.json").write_text(json.dumps(meta))
    res = export_dataset(copy, "diffsynth", tmp_path / "a")
    assert res.samples == [records[1].id] and res.skipped_gated_out == [records[0].id]
    res = export_dataset(copy, "diffsynth", tmp_path / "b", samples=[records[0].id])
    assert list(pd.read_csv(tmp_path / "b" / "metadata.csv")["id"]) == [records[0].id]


# ------------------------------------------------------------------------------ determinism, CLI


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["colmap", "nerfstudio", "diffsynth"])
def test_same_dataset_same_bytes(dataset, records, tmp_path, fmt):
    for run in ("one", "two"):
        export_dataset(dataset, fmt, tmp_path / run, samples=[records[1].id], max_points=3000)
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    assert one and one == two
    # a rerun into the same folder replaces the export and leaves no temporary files
    export_dataset(dataset, fmt, tmp_path / "one", samples=[records[1].id], max_points=3000)
    assert _tree(tmp_path / "one") == two


def test_cli_errors_are_one_line_exit_2(dataset, records, tmp_path):
    cases = [
        (["--format", "obj", "--out", str(tmp_path / "o")], "--format 'obj'"),
        (["--format", "colmap", "--out", str(tmp_path / "o"), "--sample", "nope"], "--sample: unknown"),
        (["--format", "colmap", "--out", str(dataset / "metadata.json")], "is a file"),
        (["--format", "colmap", "--out", str(dataset / "export")], "inside the dataset"),
        (["--format", "colmap", "--out", str(tmp_path / "o"), "--prompt", "x"], "diffsynth only"),
        (["--format", "nerfstudio", "--out", str(tmp_path / "o"), "--image-format", "gif"], "--image-format"),
    ]
    for args, text in cases:
        r = runner.invoke(app, ["export", str(dataset), *args])
        assert r.exit_code == 2, (args, r.output)
        assert text in r.output and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = runner.invoke(app, ["export", str(tmp_path), "--format", "colmap", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "metadata.json" in r.output
    assert not (dataset / "export").exists()
    with pytest.raises(ExportError):
        export_dataset(dataset, "colmap", tmp_path / "o", max_points=-1)


def test_cli_sample_takes_the_short_id_info_prints_and_refuses_an_ambiguous_prefix(dataset, records, tmp_path):
    import os.path

    import pandas as pd

    from fwdata.textout import short_ids

    ids = [r.id for r in records]
    short = short_ids(ids)[ids[1]]
    info = runner.invoke(app, ["info", str(dataset)], env={"COLUMNS": "80"})
    assert info.exit_code == 0 and short != ids[1] and short in info.output.split()
    r = runner.invoke(app, ["export", str(dataset), "--format", "diffsynth", "--out", str(tmp_path / "d"),
                            "--sample", short, "-q"])
    assert r.exit_code == 0, r.output
    assert list(pd.read_csv(tmp_path / "d" / "metadata.csv")["id"]) == [ids[1]]

    prefix = os.path.commonprefix(ids)
    assert prefix
    r = runner.invoke(app, ["export", str(dataset), "--format", "colmap", "--out", str(tmp_path / "a"),
                            "--sample", prefix])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "ambiguous" in lines[0], r.output
    assert "Traceback" not in r.output and not (tmp_path / "a").exists()


def test_cli_colmap_in_a_fresh_process(dataset, records, tmp_path):
    """The command as users run it: one process decodes the clip (decord) and then writes with pycolmap."""
    code = "from fwdata.cli import app; app()"
    r = subprocess.run([sys.executable, "-c", code, "export", str(dataset), "--format", "colmap", "--out",
                        str(tmp_path), "--sample", records[0].id, "--max-points", "500"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"exported 1 sample as colmap to {tmp_path}\n" in r.stdout
    assert sorted(p.name for p in (tmp_path / records[0].id / "sparse" / "0").iterdir()) == [
        "cameras.bin", "frames.bin", "images.bin", "points3D.bin", "rigs.bin"]


def test_cli_damaged_sample_exits_1_and_leaves_no_half_export(dataset, records, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    (copy / records[0].paths.depth).write_bytes(b"not an npz")
    out = tmp_path / "out"
    r = runner.invoke(app, ["export", str(copy), "--format", "nerfstudio", "--out", str(out), "-q"])
    assert r.exit_code == 1 and records[0].paths.depth in r.output and "Traceback" not in r.output
    assert list(out.iterdir()) == []  # no sample folder, no temporary folder
